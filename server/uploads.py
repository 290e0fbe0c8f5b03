"""Receiving an uploaded artifact onto disk: bounded in size and idle time, never half-kept."""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import AsyncIterator
from pathlib import Path

from server.errors import InsufficientStorageError, RequestTimeoutError
from server.limits import PayloadTooLargeError


async def receive_to_file(chunks: AsyncIterator[bytes], path: Path, max_bytes: int, idle: float) -> int:
    """Write an upload to `path` (fsynced) and return its size; on any failure `path` is removed.

    413 past `max_bytes` (0: no limit), 408 when the client sends nothing for `idle` seconds (a
    stalled client would otherwise hold a connection and a partial file forever), 507 disk full.
    """
    size = 0
    iterator = aiter(chunks)
    try:
        with open(path, "wb") as out:
            while True:
                try:
                    chunk = await asyncio.wait_for(anext(iterator), idle or None)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    raise RequestTimeoutError(
                        f"the upload sent nothing for {idle:g} s; nothing was kept"
                    ) from None
                size += len(chunk)
                if max_bytes and size > max_bytes:
                    raise PayloadTooLargeError(
                        f"upload over the gateway's limit of {max_bytes} bytes (serve --max-upload-bytes); "
                        "nothing was kept"
                    )
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
    except OSError as exc:
        path.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise InsufficientStorageError("the gateway's disk is full; the upload was not kept") from None
        raise
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return size
