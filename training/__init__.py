"""Real training on the CPU that produces real deltas: SFT on a scored task (and, later, CPT)."""
