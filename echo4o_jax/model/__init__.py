"""Flax NNX model components: one file per component."""
