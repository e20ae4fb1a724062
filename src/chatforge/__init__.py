"""chatforge: raw text to a model you can chat with."""
__version__ = "0.1.0"
