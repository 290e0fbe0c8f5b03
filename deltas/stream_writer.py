"""Write a safetensors file tensor by tensor, without holding all tensors in memory.

safetensors' own ``save_file`` needs every tensor at once; a delta of a large model
is as large as the model, so we spool payloads to disk as they are produced and
write the header (which must come first) when the set is complete. Files written
here are read back with ``safetensors.safe_open``; the tests check that round trip.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import torch

from deltas.checkpoint import tensor_bytes

_DTYPES = {
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.bool: "BOOL",
}


class StreamingSafetensorsWriter:
    """Append tensors one at a time; `finish` writes the file atomically."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._spool = tempfile.NamedTemporaryFile(
            dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".spool", delete=False
        )
        self._entries: dict[str, dict] = {}
        self._offset = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append one tensor's bytes to the spool."""
        if name in self._entries:
            raise ValueError(f"tensor {name!r} written twice")
        data = tensor_bytes(tensor)
        self._spool.write(data)
        self._entries[name] = {
            "dtype": _DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [self._offset, self._offset + len(data)],
        }
        self._offset += len(data)

    def finish(self, metadata: dict[str, str]) -> int:
        """Write header + payloads to a temp file, fsync, rename over `path`; return bytes."""
        self._spool.flush()
        header = dict(self._entries)
        header["__metadata__"] = metadata
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # safetensors aligns the data section to 8 bytes
        tmp = self.path.with_name(f".{self.path.name}.partial")
        try:
            with open(tmp, "wb") as out, open(self._spool.name, "rb") as spool:
                out.write(struct.pack("<Q", len(blob)))
                out.write(blob)
                shutil.copyfileobj(spool, out, length=16 << 20)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        finally:
            self.abort()
            tmp.unlink(missing_ok=True)
        return self.path.stat().st_size

    def abort(self) -> None:
        """Drop the spool; nothing is written at `path`."""
        self._spool.close()
        Path(self._spool.name).unlink(missing_ok=True)
