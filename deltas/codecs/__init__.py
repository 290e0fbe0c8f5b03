"""Per-tensor encodings of a delta: one module per codec behind `deltas.codecs.base.Codec`."""

from __future__ import annotations

from pydantic import ValidationError

from deltas.codecs.base import Codec, Encoded, TensorSource
from deltas.codecs.bitdelta import BitDeltaCodec
from deltas.codecs.dense import DenseCodec
from deltas.codecs.lowrank import LowRankCodec
from deltas.codecs.quant import Int4Codec, Int8Codec
from deltas.codecs.sparse import DareCodec, SparseCodec
from deltas.errors import CodecError

CODECS: dict[str, type[Codec]] = {
    c.name: c for c in (DenseCodec, Int8Codec, Int4Codec, SparseCodec, DareCodec, BitDeltaCodec, LowRankCodec)
}

__all__ = ["CODECS", "Codec", "Encoded", "TensorSource", "get_codec", "parse_codec"]


def get_codec(name: str, params: dict | None = None) -> Codec:
    """The codec `name` with `params`; CodecError naming the problem otherwise."""
    try:
        cls = CODECS[name]
    except KeyError:
        raise CodecError(f"unknown codec {name!r}; known: {', '.join(sorted(CODECS))}") from None
    try:
        return cls(cls.Params.model_validate(params or {}))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise CodecError(f"codec {name!r}: bad parameters ({problems})") from None


def parse_codec(spec: str) -> Codec:
    """A codec from `name[:key=value,...]`, e.g. `int4:group=64` or `sparse:density=0.05`."""
    name, _, rest = spec.strip().partition(":")
    params: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise CodecError(f"codec spec {spec!r}: expected key=value, got {item!r}")
        params[key.strip()] = value.strip()
    return get_codec(name, params)
