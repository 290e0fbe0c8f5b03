"""Delta artifacts: extraction, codecs, mixing and verification. Never imports vLLM."""

__version__ = "0.1.0"
