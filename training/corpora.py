"""Offline text corpora: a code domain (Python's standard library source) and general
English (the license texts Debian ships), split into train / held-out by file."""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

GENERAL_DIR = Path("/usr/share/common-licenses")


def _held_out(path: Path) -> bool:
    return int(hashlib.sha256(path.name.encode()).hexdigest(), 16) % 10 == 0


def python_files(held_out: bool) -> list[Path]:
    """Top-level stdlib modules, sorted; a fixed 10% by file-name hash is held out."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.stat().st_size > 2000)
    return [p for p in files if _held_out(p) == held_out]


def general_files() -> list[Path]:
    """General English text never trained on (license texts)."""
    return sorted(p for p in GENERAL_DIR.iterdir() if p.is_file() and not p.is_symlink())


def chunks(tokenizer, files: list[Path], length: int, limit: int) -> list[list[int]]:
    """Up to `limit` token windows of `length` tokens, taken in file order."""
    out: list[list[int]] = []
    for f in files:
        ids = tokenizer(f.read_text(errors="replace"), add_special_tokens=False)["input_ids"]
        for i in range(0, len(ids) - length + 1, length):
            out.append(ids[i : i + length])
            if len(out) >= limit:
                return out
    return out
