"""The state database's schema on a real PostgreSQL: gateways starting at once on one fresh database
(as replicas do) all come up, and a start-up that meets a database not there yet waits for it."""

from __future__ import annotations

import threading
import time

import pytest
import sqlalchemy as sa

from server.errors import UnavailableError
from server.schema import open_state


def test_gateways_starting_at_once_on_a_fresh_database_all_get_the_schema(postgres, tmp_path):
    url = postgres.database("concurrent_start")
    starting = threading.Barrier(8)
    outcomes: list[object] = []

    def start() -> None:
        starting.wait()
        try:
            outcomes.append(open_state(url, tmp_path, retry_seconds=0))  # no retry: the lock alone
        except Exception as exc:  # noqa: BLE001  (what a start-up would have died of)
            outcomes.append(exc)

    threads = [threading.Thread(target=start) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    errors = [o for o in outcomes if isinstance(o, Exception)]
    assert len(outcomes) == 8 and not errors, errors
    tables = set(sa.inspect(outcomes[0]).get_table_names())
    assert {"registry", "evals", "runs", "rebases"} <= tables, tables


def test_a_start_up_waits_for_a_database_that_is_not_there_yet(postgres, tmp_path):
    url = postgres.url.rsplit("/", 1)[0] + "/created_later"
    threading.Timer(2.0, postgres.database, args=("created_later",)).start()
    began = time.monotonic()
    engine = open_state(url, tmp_path, retry_seconds=30)
    assert time.monotonic() - began >= 1.5  # it did meet the missing database, and tried again
    assert "registry" in sa.inspect(engine).get_table_names()


def test_a_database_that_never_comes_is_a_503_naming_it_without_the_password(postgres, tmp_path):
    url = postgres.url.replace("deltagate@", "deltagate:s3cret@").rsplit("/", 1)[0] + "/never"
    with pytest.raises(UnavailableError, match="cannot be used now") as caught:
        open_state(url, tmp_path, retry_seconds=1)
    assert "s3cret" not in str(caught.value) and "/never" in str(caught.value)


def test_files_and_batches_of_the_previous_version_are_imported_with_their_answers(tmp_path):
    """The state dir as the previous version kept batches (files/ and batches/ JSON, answers in
    partial JSONL files, the last line cut off by a crash): imported once, the dirs renamed."""
    import json

    from server.batches.store import BatchStore, FileStore

    files, batches = tmp_path / "files", tmp_path / "batches"
    files.mkdir(), batches.mkdir()
    record = {
        "id": "file-abc",
        "object": "file",
        "bytes": 3,
        "created_at": 1,
        "filename": "in.jsonl",
        "purpose": "batch",
        "status": "processed",
        "expires_at": None,
        "status_details": None,
    }
    (files / "file-abc.json").write_text(json.dumps(record))
    (files / "file-abc.data").write_bytes(b"{}\n")
    batch = {"id": "batch_1", "status": "in_progress", "created_at": 2, "input_file_id": "file-abc"}
    (batches / "batch_1.json").write_text(json.dumps(batch))
    answer = {"id": "batch_req_1", "custom_id": "r0", "response": {"status_code": 200}, "error": None}
    (batches / "batch_1.output.jsonl").write_text(json.dumps(answer) + '\n{"id": "batch_req_2", "cus')
    engine = open_state(None, tmp_path)
    assert FileStore(engine).get("file-abc") == record and FileStore(engine).content("file-abc") == b"{}\n"
    assert BatchStore(engine).get("batch_1") == batch
    assert BatchStore(engine).answers("batch_1") == ([answer], [])
    assert (tmp_path / "files.imported").is_dir() and not files.exists() and not batches.exists()


def test_a_registry_that_named_the_host_engine_is_read_with_its_host(tmp_path):
    """Registries before one-name-per-thing called a hosted base's host `engine`: read as `host`,
    written back as `host` only."""
    import json

    from server.registry import Registry

    bases = {
        "old": {"name": "old", "path": "/m/old"},
        "new": {"name": "new", "path": "/m/new", "engine": "old", "runtime": True},
    }
    (tmp_path / "registry.json").write_text(json.dumps({"bases": bases}))
    registry = Registry(open_state(None, tmp_path))
    registry.refresh(force=True)
    new = registry.base("new")
    assert (new.host, new.group, registry.base("old").group) == ("old", "old", "old")
    assert "engine" not in new.model_dump() and new.model_dump()["host"] == "old"
