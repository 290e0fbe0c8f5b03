"""Checkpoint access and the vLLM engine side: worker extension, engine processes."""
