"""memcontrol: audit and control training-data memorization in diffusion image generators."""

__version__ = "0.1.0"
