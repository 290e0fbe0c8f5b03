"""Cursor pages as the OpenAI SDK reads them (evals, runs, files, batches)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Query

After = Annotated[str | None, Query(description="the id of the previous page's last object")]


class Ided(dict):
    """A stored object (a dict) that pages by its `id`."""

    @property
    def id(self) -> str:
        return self["id"]


def cursor_page(objects: list, after: str | None, limit: int, order: str) -> dict:
    """`data`, `has_more`, `first_id`, `last_id`; the SDK asks for the next page with `after`
    set to the last id."""
    objects = objects if order == "asc" else objects[::-1]
    ids = [o.id for o in objects]
    start = ids.index(after) + 1 if after in ids else 0
    data = objects[start : start + limit]
    return {
        "object": "list",
        "data": data,
        "has_more": start + limit < len(objects),
        "first_id": data[0].id if data else None,
        "last_id": data[-1].id if data else None,
    }
