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
