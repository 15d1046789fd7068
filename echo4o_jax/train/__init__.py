"""Training: `python -m echo4o_jax.train --config configs/<name>.py --workdir DIR`."""
