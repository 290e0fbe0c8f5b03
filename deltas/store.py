"""Artifacts where every node can read them: a content-addressed store and a node-local cache.

A store is a directory or an object-store prefix, addressed by URI (`/srv/deltas`, `file:///srv/deltas`,
`s3://bucket/deltas` on any S3-compatible endpoint). fsspec is the one interface over both (s3fs for
`s3://`; gcs/azure plugins would work the same way), so there is no second implementation per
backend. An artifact is stored once under its sha256 (`<root>/sha256/<hex>.safetensors`) and never
changes, so its URI names its content.

A node reads a stored artifact through its cache (`materialize`): fetched once per node (a file lock
makes concurrent fetches by threads and processes wait for the first), verified against the sha256
while it streams, renamed into place atomically, and evicted least-recently-used by bytes when the
cache is over its budget. Local paths pass through untouched.

The S3 endpoint and credentials come from the environment as boto clients read them
(`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import fsspec
from fsspec.core import url_to_fs

from deltas.errors import DeltaError, InvalidArtifactError

_CHUNK = 8 << 20
_STORED = re.compile(r"^(?P<root>.+)/sha256/(?P<digest>[0-9a-f]{64})\.safetensors$")
CACHE_ENV, CACHE_MIB_ENV = "DELTAGATE_ARTIFACT_CACHE", "DELTAGATE_ARTIFACT_CACHE_MIB"


class StoreError(DeltaError):
    """The artifact store cannot be reached, or holds an artifact that fails its hash."""


class ArtifactMissingError(StoreError):
    """The store has no artifact under that URI."""


def is_uri(path: str | Path) -> bool:
    """Whether `path` names an object in a remote store (s3://…), not a file on this node."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


class FileIdentity(NamedTuple):
    """What tells a file from another under the same path (replaced in place, or renamed over)."""

    size: int
    mtime_ns: int
    inode: int


def file_identity(path: str | Path) -> FileIdentity:
    """The identity of the file at `path` (OSError if there is none); an artifact-store URI names its
    content, which never changes: all zeros."""
    if is_uri(path):
        return FileIdentity(0, 0, 0)
    stat = os.stat(path)
    return FileIdentity(stat.st_size, stat.st_mtime_ns, stat.st_ino)


def named_digest(uri: str) -> str | None:
    """The sha256 a stored artifact's URI names (`<root>/sha256/<hex>.safetensors`), else None."""
    match = _STORED.match(uri)
    return match["digest"] if match else None


def file_sha256(path: Path) -> str:
    """sha256 of a local file's bytes, streamed."""
    hasher = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


def _fs_error(action: str, uri: str, exc: Exception) -> StoreError:
    return StoreError(f"artifact store: could not {action} {uri}: {type(exc).__name__}: {exc}")


@dataclass(frozen=True)
class StoredArtifact:
    """What `ArtifactStore.put` wrote: the artifact's URI, sha256 and size."""

    uri: str
    sha256: str
    size: int


class ArtifactStore:
    """A directory or object-store prefix holding artifacts by sha256."""

    def __init__(self, root: str | Path):
        self.root = str(root).rstrip("/")
        self.fs, self._path = url_to_fs(self.root)
        self.local = not is_uri(self.root)

    def uri_of(self, sha256: str) -> str:
        """The URI artifact `sha256` has in this store."""
        return f"{self.root}/sha256/{sha256}.safetensors"

    def digest_of(self, uri: str) -> str | None:
        """The sha256 `uri` names if it is an artifact of this store, else None."""
        match = _STORED.match(uri)
        return match["digest"] if match and match["root"] == self.root else None

    def put(self, path: Path, sha256: str | None = None) -> StoredArtifact:
        """Store the local file `path` (a no-op when it is already there); it is visible under its
        URI only once complete: an object-store PUT is atomic, a directory gets a rename."""
        sha256 = sha256 or file_sha256(path)
        size = path.stat().st_size
        uri = self.uri_of(sha256)
        key = f"{self._path}/sha256/{sha256}.safetensors"
        try:
            if self.fs.exists(key) and self.fs.size(key) == size:
                return StoredArtifact(uri, sha256, size)
            self.fs.makedirs(f"{self._path}/sha256", exist_ok=True)
            if self.local:
                tmp = f"{key}.{os.getpid()}.partial"
                self.fs.put_file(str(path), tmp)
                os.replace(tmp, key)
            else:
                self.fs.put_file(str(path), key)
        except Exception as exc:  # any backend's transport errors (botocore's are not OSErrors)
            raise _fs_error("write", uri, exc) from exc
        return StoredArtifact(uri, sha256, size)

    def delete(self, sha256: str) -> None:
        """Remove artifact `sha256` from the store (absent: nothing to do)."""
        key = f"{self._path}/sha256/{sha256}.safetensors"
        try:
            if self.fs.exists(key):
                self.fs.rm_file(key)
        except Exception as exc:  # any backend's transport errors (botocore's are not OSErrors)
            raise _fs_error("delete", self.uri_of(sha256), exc) from exc


class NodeCache:
    """This node's copies of stored artifacts, by sha256, under a byte budget (0: no budget)."""

    def __init__(self, directory: Path, budget_bytes: int = 0):
        self.directory = Path(directory)
        self.budget_bytes = budget_bytes

    @classmethod
    def from_env(cls, default: Path | None = None, budget_mib: float | None = None) -> NodeCache:
        """The cache `DELTAGATE_ARTIFACT_CACHE` names, else `default` (else ~/.cache/deltagate/artifacts),
        with a budget of `budget_mib`, else `DELTAGATE_ARTIFACT_CACHE_MIB` (default 0: unbounded)."""
        directory = os.environ.get(CACHE_ENV) or default or Path.home() / ".cache" / "deltagate" / "artifacts"
        if budget_mib is None:
            budget_mib = float(os.environ.get(CACHE_MIB_ENV, "0") or 0)
        return cls(Path(directory).resolve(), int(budget_mib * (1 << 20)))

    def path_of(self, sha256: str) -> Path:
        return self.directory / f"{sha256}.safetensors"

    def fetch(self, uri: str) -> Path:
        """The local, verified copy of the stored artifact `uri`, fetched if this node lacks it."""
        match = _STORED.match(uri)
        if match is None:
            raise InvalidArtifactError(f"{uri}: not an artifact store URI (…/sha256/<64 hex>.safetensors)")
        sha256 = match["digest"]
        local = self.path_of(sha256)
        if local.is_file():
            os.utime(local)  # recently used: last to be evicted
            return local
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / f".{sha256}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one fetch per node; the others wait and find the file
            if not local.is_file():
                self._download(uri, sha256, local)
                self._evict(keep=local)
        return local

    def _download(self, uri: str, sha256: str, local: Path) -> None:
        tmp = local.with_name(f".{local.name}.{os.getpid()}.partial")
        hasher = hashlib.sha256()
        try:
            with fsspec.open(uri, "rb") as src, open(tmp, "wb") as out:
                while chunk := src.read(_CHUNK):
                    hasher.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        except FileNotFoundError:
            tmp.unlink(missing_ok=True)
            raise ArtifactMissingError(f"{uri}: no such artifact in the store") from None
        except Exception as exc:  # any backend's transport errors (botocore's are not OSErrors)
            tmp.unlink(missing_ok=True)
            raise _fs_error("read", uri, exc) from exc
        if hasher.hexdigest() != sha256:
            tmp.unlink(missing_ok=True)
            raise StoreError(f"{uri}: its bytes hash to {hasher.hexdigest()}, not to its name; not used")
        os.replace(tmp, local)

    def _evict(self, keep: Path) -> None:
        """Drop least-recently-used copies until the cache fits its budget (never `keep`)."""
        if not self.budget_bytes:
            return
        files = sorted(self.directory.glob("*.safetensors"), key=lambda p: p.stat().st_mtime_ns)
        total = sum(p.stat().st_size for p in files)
        for path in files:
            if total <= self.budget_bytes:
                break
            if path != keep:
                total -= path.stat().st_size
                path.unlink(missing_ok=True)

    def usage(self) -> dict:
        """Files and bytes this cache holds, and its budget."""
        files = list(self.directory.glob("*.safetensors")) if self.directory.is_dir() else []
        size = sum(p.stat().st_size for p in files)
        return {
            "dir": str(self.directory),
            "files": len(files),
            "bytes": size,
            "budget_bytes": self.budget_bytes,
        }


_cache: NodeCache | None = None


def use_cache(cache: NodeCache) -> None:
    """Make `cache` this process's node cache (the gateway shares its own with its engines)."""
    global _cache
    _cache = cache


def materialize(path: str | Path) -> Path:
    """A local path for `path`: itself when local, else this node's cached copy of the stored artifact."""
    global _cache
    text = str(path)
    if text.startswith("file://"):
        return Path(text[len("file://") :])
    if not is_uri(text):
        return Path(path)
    if _cache is None:
        _cache = NodeCache.from_env()
    return _cache.fetch(text)
