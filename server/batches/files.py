"""Files uploaded for batches and the batches' output files, in the state dir: `<id>.data` (the
bytes) and `<id>.json` (OpenAI's file object), each written atomically."""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path

from server.errors import NotFoundError


def write_atomic(path: Path, data: bytes) -> None:
    """`data` at `path`, or the old file if this is interrupted: never a half-written one."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial")
    with open(tmp, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


class FileStore:
    """Files by id: `file-<hex>`."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        for partial in root.glob(".*.partial"):  # left by a crash mid-write
            partial.unlink(missing_ok=True)

    def add(self, data: bytes, filename: str, purpose: str) -> dict:
        """Store `data` as a new file; its OpenAI file object."""
        file_id = f"file-{secrets.token_hex(12)}"
        write_atomic(self.root / f"{file_id}.data", data)
        record = {"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                  "filename": filename, "purpose": purpose, "status": "processed", "expires_at": None,
                  "status_details": None}  # fmt: skip
        write_atomic(self.root / f"{file_id}.json", json.dumps(record).encode())
        return record

    def get(self, file_id: str) -> dict:
        path = self.root / f"{file_id}.json"
        if "/" in file_id or not path.is_file():
            raise NotFoundError(f"file {file_id!r} not found")
        return json.loads(path.read_text())

    def content(self, file_id: str) -> bytes:
        self.get(file_id)
        return (self.root / f"{file_id}.data").read_bytes()

    def list(self, purpose: str | None = None) -> list[dict]:
        records = [json.loads(p.read_text()) for p in self.root.glob("file-*.json")]
        return sorted(
            (r for r in records if purpose in (None, r["purpose"])), key=lambda r: (r["created_at"], r["id"])
        )

    def delete(self, file_id: str) -> None:
        self.get(file_id)
        (self.root / f"{file_id}.json").unlink()
        (self.root / f"{file_id}.data").unlink(missing_ok=True)
