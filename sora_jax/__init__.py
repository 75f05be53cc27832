"""sora_jax: an open JAX/Flax rebuild of the system in OpenAI's Sora report."""

__version__ = "0.1.0"
