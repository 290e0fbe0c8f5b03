"""Rewrite an engine's answers for the client at byte level, without parsing JSON.

What changes on the way: the `model` field (the engine serves its base name; the client asked
for a variant) and, in streams where the gateway asked for usage the client did not, the
usage-only chunk is taken out; usage counts are read on the way for the metrics.

The engine's chunks are compact JSON (pydantic `model_dump_json`), so `"model":"base"`
appears once per event as a top-level key; inside a JSON string a quote is escaped, so the
pattern cannot match generated text. Events are only ever cut at the blank line that ends them,
so a pattern split across two network reads is never missed. An event that does not carry the
compact pattern (another engine's formatting) falls back to a JSON rewrite of that event.
"""

from __future__ import annotations

import json
import re

_EVENT_END = b"\n\n"
_DATA = b"data: {"
_USAGE = b'"usage":{'
# Keys, not text: inside a JSON string these quotes would be escaped. Chat and completions count
# prompt/completion tokens; Responses and Anthropic Messages input/output tokens.
_USAGE_COUNTS = re.compile(rb'"(prompt_tokens|completion_tokens|input_tokens|output_tokens)":(\d+)')
_AS_OPENAI = {b"input_tokens": "prompt_tokens", b"output_tokens": "completion_tokens"}


def usage_counts(raw: bytes) -> dict | None:
    """{prompt_tokens, completion_tokens} from the usage keys in `raw` (the largest of each: a
    Messages stream reports output tokens so far in several events)."""
    counts: dict[str, int] = {}
    for key, value in _USAGE_COUNTS.findall(raw):
        name = _AS_OPENAI.get(key) or key.decode()
        counts[name] = max(counts.get(name, 0), int(value))
    return counts or None


def _model_field(name: str) -> bytes:
    return b'"model":' + json.dumps(name).encode()


def rewrite_body(raw: bytes, served: str, requested: str) -> tuple[bytes, dict | None]:
    """A complete JSON answer with the client's model name, and its usage counts if any."""
    old = _model_field(served)
    if raw.count(old) == 1:
        return raw.replace(old, _model_field(requested)), usage_counts(raw)
    try:  # not the engine's compact JSON (or not JSON at all, e.g. a proxy's error page)
        obj = json.loads(raw)
    except ValueError:
        return raw, None
    if not isinstance(obj, dict):
        return raw, None
    if "model" in obj:
        obj["model"] = requested
    return json.dumps(obj).encode(), usage_counts(raw)


class StreamRewriter:
    """Feed raw bytes from the engine, get the bytes to send to the client."""

    def __init__(self, served: str, requested: str, *, keep_usage: bool):
        self._old = _model_field(served)
        self._old_spaced = b'"model": ' + json.dumps(served).encode()  # another engine's JSON formatting
        self._new = _model_field(requested)
        self._requested = requested
        self._keep_usage = keep_usage
        self._buffer = b""
        self.usage: dict | None = None

    def feed(self, data: bytes) -> bytes:
        """The complete events in `buffer + data`, rewritten; an incomplete tail waits for more."""
        buffer = self._buffer + data
        cut = buffer.rfind(_EVENT_END)
        if cut < 0:
            self._buffer = buffer
            return b""
        ready, self._buffer = buffer[: cut + 2], buffer[cut + 2 :]
        if _USAGE in ready:
            ready = self._take_usage(ready)
        if ready.count(self._old) == ready.count(_DATA):  # the common case: one pattern per event
            return ready.replace(self._old, self._new)
        return b"".join(self._rewrite_event(e) for e in ready.split(_EVENT_END) if e)

    def flush(self) -> bytes:
        """Whatever the engine sent after its last complete event (normally nothing)."""
        rest, self._buffer = self._buffer, b""
        return self._rewrite_event(rest) if rest.strip() else b""

    def _take_usage(self, ready: bytes) -> bytes:
        """Record the usage counts; drop the usage-only chunk if the client did not ask for usage."""
        events = []
        for event in ready.split(_EVENT_END):
            if not event:
                continue
            if _USAGE in event:
                for key, value in (usage_counts(event) or {}).items():
                    self.usage = self.usage or {}
                    self.usage[key] = max(self.usage.get(key, 0), value)
                usage_only = event.startswith(_DATA) and not json.loads(event[6:]).get("choices")
                if usage_only and not self._keep_usage:
                    continue
            events.append(event + _EVENT_END)
        return b"".join(events)

    def _rewrite_event(self, event: bytes) -> bytes:
        event = event.strip(b"\n")
        if self._old in event:
            return event.replace(self._old, self._new, 1) + _EVENT_END
        head, sep, data = event.partition(b"data: ")  # also named events: "event: <type>\ndata: {...}"
        if sep and data.startswith(b"{") and self._old_spaced in data:
            try:
                obj = json.loads(data)
            except ValueError:
                return event + _EVENT_END
            for holder in (obj, obj.get("response"), obj.get("message")):  # Responses, Messages events
                if isinstance(holder, dict) and "model" in holder:
                    holder["model"] = self._requested
            return head + sep + json.dumps(obj, separators=(",", ":")).encode() + _EVENT_END
        return event + _EVENT_END
