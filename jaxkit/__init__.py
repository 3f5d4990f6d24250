"""jaxkit: a JAX research framework for efficient transformers."""
__version__ = "0.1.0"
