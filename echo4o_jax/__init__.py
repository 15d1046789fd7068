"""echo4o-jax: a JAX/Flax NNX reimplementation of BAGEL / Echo-4o."""

__version__ = "0.1.0"
