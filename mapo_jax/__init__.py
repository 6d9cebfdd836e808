"""mapo_jax: preference alignment of text-to-image diffusion models in JAX + Flax NNX."""

__version__ = "0.1.0"
