"""Experiment harness of lowrank_jax: data, training loop, studies."""
