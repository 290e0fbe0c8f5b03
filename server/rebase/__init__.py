"""Rebase: move a fleet of variants to an updated base, with an α search, an eval gate and aliases."""
