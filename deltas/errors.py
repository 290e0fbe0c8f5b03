"""Typed errors of the artifact layer; the gateway maps them to HTTP codes."""


class DeltaError(Exception):
    """Base class of every error deltas/ raises on purpose."""


class InvalidArtifactError(DeltaError):
    """A file is not a valid delta artifact (corrupt, truncated, wrong format, NaN/Inf)."""


class IncompatibleError(DeltaError):
    """Two models, or a delta and a base, do not fit together (architecture, names, shapes)."""


class CodecError(DeltaError):
    """An unknown codec or bad codec parameters (in a CLI spec, a recipe or a manifest)."""


class MergeMethodError(DeltaError):
    """An unknown merge method or parameters it does not take."""
