"""Attach-rule presets per reference model: which layers an adapter targets.

``rules(model_name, preset, spec)`` returns ``[(regex, spec)]`` for lrj.attach.

| model | preset | layers |
|---|---|---|
| gpt | attention | blocks/*/attn/{query,key,value,out} |
| gpt | qv | blocks/*/attn/{query,value} |
| gpt | mlp | blocks/*/mlp/{gate,up,down} |
| gpt | all | attention + mlp |
| vit | attention, qv, mlp, all | as gpt, with mlp/{up,down} |
| bert | attention | encoder/layer/*/attention/self/{query,key,value} |
| bert | qv | encoder/layer/*/attention/self/{query,value} |
| bert | dense | the attention output, intermediate and output dense layers |
| bert | all | attention + dense |
| mlp | all | every layer |
"""

from __future__ import annotations

PRESETS = {
    "gpt": {
        "attention": r"blocks/\d+/attn/(query|key|value|out)",
        "qv": r"blocks/\d+/attn/(query|value)",
        "mlp": r"blocks/\d+/mlp/(gate|up|down)",
        "all": r"blocks/\d+/(attn/(query|key|value|out)|mlp/(gate|up|down))",
    },
    "vit": {
        "attention": r"blocks/\d+/attn/(query|key|value|out)",
        "qv": r"blocks/\d+/attn/(query|value)",
        "mlp": r"blocks/\d+/mlp/(up|down)",
        "all": r"blocks/\d+/(attn/(query|key|value|out)|mlp/(up|down))",
    },
    "bert": {
        "attention": r"encoder/layer/\d+/attention/self/(query|key|value)",
        "qv": r"encoder/layer/\d+/attention/self/(query|value)",
        "dense": r"encoder/layer/\d+/(attention/output|intermediate|output)/dense",
        "all": r"encoder/layer/\d+/(attention/self/(query|key|value)|(attention/output|intermediate|output)/dense)",
    },
    "mlp": {"all": r"layers/\d+"},
}


def rules(model_name: str, preset: str, spec) -> list[tuple[str, object]]:
  """``[(regex, spec)]`` for a model's named preset."""
  if model_name not in PRESETS:
    raise ValueError(f"Unknown model {model_name!r}; presets exist for {sorted(PRESETS)}.")
  if preset not in PRESETS[model_name]:
    raise ValueError(f"Unknown preset {preset!r} for {model_name}; known: {sorted(PRESETS[model_name])}.")
  return [(PRESETS[model_name][preset], spec)]
