"""The artifact store on a real S3-compatible server (moto_server on loopback) and on a directory:
content-addressed puts, verified node-local fetches, one fetch per node, LRU eviction by bytes."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest
import s3fs

import deltas.store as store_module
from deltas import InvalidArtifactError, open_artifact
from deltas.store import (
    ArtifactMissingError,
    ArtifactStore,
    NodeCache,
    StoreError,
    materialize,
    named_digest,
)


@pytest.fixture
def s3_root(s3_server, request) -> str:
    return f"s3://{s3_server.bucket}/{request.node.name}"


def _blob(tmp_path, name: str, size: int, seed: int):
    path = tmp_path / name
    path.write_bytes(hashlib.sha256(str(seed).encode()).digest() * (size // 32))
    return path


def test_a_put_artifact_is_named_by_its_hash_and_read_on_two_nodes(tied, s3_root, tmp_path):
    store = ArtifactStore(s3_root)
    stored = store.put(tied.delta)
    expected = hashlib.sha256(tied.delta.read_bytes()).hexdigest()
    assert stored.sha256 == expected and stored.uri == f"{s3_root}/sha256/{expected}.safetensors"
    assert store.put(tied.delta) == stored  # already there: the same URI, nothing rewritten
    assert named_digest(stored.uri) == expected and named_digest(f"{s3_root}/other.safetensors") is None

    node_a, node_b = NodeCache(tmp_path / "a"), NodeCache(tmp_path / "b")
    for node in (node_a, node_b):
        local = node.fetch(stored.uri)
        assert local.read_bytes() == tied.delta.read_bytes()
        assert not list(local.parent.glob(".*.partial"))  # renamed into place, nothing half-kept
    assert node_a.usage()["files"] == 1 and node_a.usage()["bytes"] == stored.size


def test_an_artifact_opens_by_its_store_uri(tied, s3_root, tmp_path, monkeypatch):
    stored = ArtifactStore(s3_root).put(tied.delta)
    monkeypatch.setenv(store_module.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(store_module, "_cache", None)
    art = open_artifact(stored.uri)
    assert art.manifest == open_artifact(tied.delta).manifest
    assert art.path.parent == tmp_path / "cache"
    assert materialize(tied.delta) == tied.delta  # local paths pass through


def test_a_corrupted_object_is_refused_and_not_cached(tmp_path, s3_root):
    blob = _blob(tmp_path, "x.safetensors", 4096, seed=1)
    stored = ArtifactStore(s3_root).put(blob)
    fs = s3fs.S3FileSystem()
    fs.pipe(stored.uri, b"not the bytes it was named for")
    fs.invalidate_cache()
    cache = NodeCache(tmp_path / "cache")
    with pytest.raises(StoreError, match="hash to .* not to its name"):
        cache.fetch(stored.uri)
    assert cache.usage()["files"] == 0 and not list((tmp_path / "cache").glob(".*.partial"))


def test_a_missing_artifact_and_a_bad_uri_are_clear_errors(tmp_path, s3_root):
    cache = NodeCache(tmp_path / "cache")
    with pytest.raises(ArtifactMissingError, match="no such artifact"):
        cache.fetch(f"{s3_root}/sha256/{'0' * 64}.safetensors")
    with pytest.raises(InvalidArtifactError, match="not an artifact store URI"):
        cache.fetch(f"{s3_root}/delta.safetensors")


def test_concurrent_fetches_on_a_node_download_once(tmp_path, s3_root, monkeypatch):
    stored = ArtifactStore(s3_root).put(_blob(tmp_path, "x.safetensors", 1 << 20, seed=2))
    downloads = []
    real = NodeCache._download

    def counted(self, *args):
        downloads.append(threading.get_ident())
        real(self, *args)

    monkeypatch.setattr(NodeCache, "_download", counted)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(NodeCache(tmp_path / "c").fetch(stored.uri)))
        for _ in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(downloads) == 1 and len(results) == 6 and len(set(results)) == 1


def test_the_cache_evicts_least_recently_used_by_bytes(tmp_path, s3_root):
    store = ArtifactStore(s3_root)
    a, b, c = (store.put(_blob(tmp_path, f"{n}.safetensors", 64 << 10, seed=n)) for n in (10, 11, 12))
    cache = NodeCache(tmp_path / "cache", budget_bytes=2 * (64 << 10))
    pa, pb = cache.fetch(a.uri), cache.fetch(b.uri)
    os.utime(pb, ns=(1, 1))  # b used long ago
    cache.fetch(a.uri)  # a used now
    pc = cache.fetch(c.uri)
    assert pa.is_file() and pc.is_file() and not pb.is_file()
    assert cache.usage()["bytes"] <= cache.budget_bytes
    assert cache.fetch(b.uri).is_file()  # evicted copies are fetched again


def test_a_directory_store_works_the_same_and_writes_atomically(tied, tmp_path):
    store = ArtifactStore(tmp_path / "store")
    stored = store.put(tied.delta)
    where = tmp_path / "store" / "sha256" / f"{stored.sha256}.safetensors"
    assert where.read_bytes() == tied.delta.read_bytes() and stored.uri == str(where)
    assert not list((tmp_path / "store").rglob("*.partial"))
    assert materialize(stored.uri) == where and store.digest_of(stored.uri) == stored.sha256
    store.delete(stored.sha256)
    assert not list((tmp_path / "store" / "sha256").iterdir())


def test_deltagate_push_verifies_and_prints_the_uri(tied, s3_root, tmp_path):
    import subprocess
    import sys

    from tests.server.conftest import deltagate

    done = deltagate("push", tied.delta, "--store", s3_root)
    uri = done.stdout.strip()
    assert uri == ArtifactStore(s3_root).uri_of(hashlib.sha256(tied.delta.read_bytes()).hexdigest())
    assert s3fs.S3FileSystem().cat(uri) == tied.delta.read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not an artifact")
    failed = subprocess.run(
        [sys.executable, "-m", "cli", "push", str(bad), "--store", s3_root], capture_output=True, text=True
    )
    assert failed.returncode == 2 and "not a readable safetensors file" in failed.stderr


def test_the_cli_reads_an_artifact_by_its_store_uri(tied, s3_root, tmp_path, monkeypatch):
    from cli.artifacts import _parse_term
    from tests.server.conftest import deltagate

    uri = ArtifactStore(s3_root).put(tied.delta).uri
    term = _parse_term(f"{uri}:0.5:0.3")
    assert (term.path, term.alpha, term.density) == (uri, 0.5, 0.3)
    assert _parse_term(uri).path == uri and _parse_term(f"{tied.delta}:0.5").path == str(tied.delta)
    monkeypatch.setenv(store_module.CACHE_ENV, str(tmp_path / "cache"))
    shown = deltagate("inspect", uri, "--json").stdout
    assert '"tensors"' in shown and (tmp_path / "cache").is_dir()


FETCH_IN_A_PROCESS = """
import sys
from pathlib import Path
from deltas.store import NodeCache

class Counted(NodeCache):
    def _download(self, *args):
        with open(sys.argv[3], "a") as f:
            f.write("download\\n")
        super()._download(*args)

print(Counted(Path(sys.argv[1])).fetch(sys.argv[2]))
"""


def test_engine_workers_on_a_node_fetch_an_artifact_once(tmp_path, s3_root):
    """Processes (engine workers are processes) share the node cache: one downloads, the others wait."""
    import subprocess
    import sys

    stored = ArtifactStore(s3_root).put(_blob(tmp_path, "x.safetensors", 4 << 20, seed=3))
    marks = tmp_path / "downloads.txt"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", FETCH_IN_A_PROCESS, str(tmp_path / "node"), stored.uri, str(marks)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    paths = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert marks.read_text().count("download") == 1 and len(paths) == 1
    assert Path(paths.pop()).read_bytes() == (tmp_path / "x.safetensors").read_bytes()
