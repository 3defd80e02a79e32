"""Agent Sessions server (`sessiond`)."""

__version__ = "0.1.0"
