"""A codec recipe: which codec each tensor gets (e.g. int4 everywhere, norms kept exact)."""

from __future__ import annotations

from fnmatch import fnmatchcase
from functools import cached_property
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from deltas.codecs import Codec, parse_codec
from deltas.errors import DeltaError


class CodecRule(BaseModel):
    """Tensors whose name matches the glob `match` get `codec`."""

    model_config = ConfigDict(extra="forbid")
    match: str
    codec: str

    _valid = field_validator("codec")(lambda v: parse_codec(v) and v)


class CodecPlan(BaseModel):
    """First matching rule wins; otherwise 1-D tensors get `vectors`, the rest `default`.

    1-D tensors (norms, biases) are a rounding error of the size, and per-row or low-rank
    codecs make no sense for them, so by default they stay exact.
    """

    model_config = ConfigDict(extra="forbid")
    default: str = "dense"
    vectors: str = "dense"
    rules: list[CodecRule] = Field(default_factory=list)
    exclude: list[str] = Field(default_factory=list, description="globs of tensors left out (Δ = 0)")
    zstd: bool = Field(False, description="compress every tensor's payload with zstd (lossless)")

    _valid = field_validator("default", "vectors")(lambda v: parse_codec(v) and v)

    @classmethod
    def uniform(cls, spec: str, *, zstd: bool = False) -> CodecPlan:
        """`spec` for every matrix, exact vectors."""
        return cls(default=spec, zstd=zstd)

    @classmethod
    def from_file(cls, path: str | Path) -> CodecPlan:
        """Load a YAML codec recipe (keys: default, vectors, rules: [{match, codec}], exclude, zstd)."""
        try:
            return cls.model_validate(yaml.safe_load(Path(path).read_text()) or {})
        except (OSError, yaml.YAMLError, ValidationError) as exc:
            raise DeltaError(f"codec recipe {path}: {exc}") from None

    @cached_property
    def _codecs(self) -> dict[str, Codec]:
        specs = {self.default, self.vectors, *(r.codec for r in self.rules)}
        return {s: parse_codec(s) for s in specs}

    @property
    def needs_gradients(self) -> bool:
        """Whether some codec selects entries by |Δ ⊙ ∇L| (then calibration gradients are needed)."""
        return any(getattr(c.params, "select", None) == "gradient" for c in self._codecs.values())

    def excludes(self, name: str) -> bool:
        """Whether tensor `name` is left out of the artifact (its base weights are kept)."""
        return any(fnmatchcase(name, pattern) for pattern in self.exclude)

    def codec_for(self, name: str, shape: list[int]) -> Codec:
        """The codec tensor `name` of `shape` is encoded with."""
        for rule in self.rules:
            if fnmatchcase(name, rule.match):
                return self._codecs[rule.codec]
        return self._codecs[self.vectors if len(shape) < 2 else self.default]
