"""Experiment configs: ml_collections `get_config(arg)` files; they import no JAX."""
