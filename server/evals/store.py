"""Evals, runs and graded items in SQLite (STATE_DIR/evals.sqlite): they survive restarts.

One connection, used from the event loop: every statement is a small local write or read.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS evals (id TEXT PRIMARY KEY, created_at REAL, body TEXT);
CREATE TABLE IF NOT EXISTS runs (id TEXT PRIMARY KEY, eval_id TEXT, created_at REAL, body TEXT,
    status TEXT, error TEXT, total INTEGER, measured TEXT);
CREATE TABLE IF NOT EXISTS items (run_id TEXT, variant TEXT, idx INTEGER, input TEXT, output TEXT,
    grades TEXT, status TEXT, error TEXT, scores TEXT, PRIMARY KEY (run_id, variant, idx));
"""


class EvalStore:
    """Rows in, dicts out."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None)  # autocommit: each write lands at once
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)
        columns = {r["name"] for r in self.db.execute("PRAGMA table_info(items)")}
        if "scores" not in columns:  # a state dir written before metrics existed
            self.db.execute("ALTER TABLE items ADD COLUMN scores TEXT")

    def close(self) -> None:
        self.db.close()

    # evals
    def add_eval(self, body: dict) -> str:
        eval_id = f"eval_{uuid.uuid4().hex[:16]}"
        self.db.execute("INSERT INTO evals VALUES (?, ?, ?)", (eval_id, time.time(), json.dumps(body)))
        return eval_id

    def eval(self, eval_id: str) -> dict | None:
        row = self.db.execute("SELECT * FROM evals WHERE id = ?", (eval_id,)).fetchone()
        return (
            {"id": row["id"], "created_at": row["created_at"], "body": json.loads(row["body"])}
            if row
            else None
        )

    def evals(self) -> list[dict]:
        ids = [r["id"] for r in self.db.execute("SELECT id FROM evals ORDER BY created_at")]
        return [self.eval(i) for i in ids]

    def delete_eval(self, eval_id: str) -> None:
        with self.db:
            runs = [r["id"] for r in self.db.execute("SELECT id FROM runs WHERE eval_id = ?", (eval_id,))]
            self.db.executemany("DELETE FROM items WHERE run_id = ?", [(r,) for r in runs])
            self.db.execute("DELETE FROM runs WHERE eval_id = ?", (eval_id,))
            self.db.execute("DELETE FROM evals WHERE id = ?", (eval_id,))

    # runs
    def add_run(self, eval_id: str, body: dict, total: int, measured: dict) -> str:
        run_id = f"evalrun_{uuid.uuid4().hex[:16]}"
        self.db.execute(
            "INSERT INTO runs VALUES (?, ?, ?, ?, 'queued', NULL, ?, ?)",
            (run_id, eval_id, time.time(), json.dumps(body), total, json.dumps(measured)),
        )
        return run_id

    def run(self, run_id: str) -> dict | None:
        row = self.db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            return None
        return {**dict(row), "body": json.loads(row["body"]), "measured": json.loads(row["measured"])}

    def runs(self, eval_id: str | None = None, statuses: tuple[str, ...] = ()) -> list[dict]:
        sql, args = "SELECT id FROM runs WHERE 1=1", []
        if eval_id:
            sql, args = sql + " AND eval_id = ?", [eval_id]
        if statuses:
            sql += f" AND status IN ({','.join('?' * len(statuses))})"
            args += list(statuses)
        return [self.run(r["id"]) for r in self.db.execute(sql + " ORDER BY created_at", args)]

    def set_status(self, run_id: str, status: str, error: str | None = None) -> None:
        self.db.execute("UPDATE runs SET status = ?, error = ? WHERE id = ?", (status, error, run_id))

    # items
    def put_item(self, run_id: str, variant: str, idx: int, row: dict) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO items VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                run_id,
                variant,
                idx,
                row["input"],
                row["output"],
                json.dumps(row["grades"]),
                row["status"],
                row["error"],
                json.dumps(row.get("scores") or {}),
            ),
        )

    def done_indices(self, run_id: str, variant: str) -> set[int]:
        rows = self.db.execute("SELECT idx FROM items WHERE run_id = ? AND variant = ?", (run_id, variant))
        return {r["idx"] for r in rows}

    def items(
        self, run_id: str, status: str | None = None, after: int = -1, limit: int | None = None
    ) -> list[dict]:
        sql, args = "SELECT rowid, * FROM items WHERE run_id = ? AND rowid > ?", [run_id, after]
        if status:
            sql, args = sql + " AND status = ?", args + [status]
        sql += " ORDER BY rowid" + (f" LIMIT {int(limit)}" if limit else "")
        return [
            {**dict(r), "grades": json.loads(r["grades"]), "scores": json.loads(r["scores"] or "{}")}
            for r in self.db.execute(sql, args)
        ]
