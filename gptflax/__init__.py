"""gptflax: Build a Large Language Model (From Scratch), in JAX and Flax NNX."""

__version__ = "0.1.0"
