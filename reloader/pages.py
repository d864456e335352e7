"""A LIST response body read one object at a time.

An informer reduces every listed object to a small snapshot and drops the rest. Decoded whole, a
page is all its objects at once (a page of 100 Deployments is about 20,000 small Python objects),
and the snapshots made while it is reduced are allocated among them: once the page is freed, each
snapshot keeps the allocator's pool it landed in, and the process keeps those pools for good
(measured at 22,000 cached objects: 5 more 1 MiB arenas, 3.6 MB of them free blocks). Read one
object at a time, what an object leaves behind is freed before the next is decoded, so the next
one reuses it, and the pools that stay are the ones the snapshots fill.

The body is read by the standard library's JSON scanner, one value at a time
(``JSONDecoder.raw_decode``), which needs the body as text. A body with any non-ASCII byte would
make text of up to four bytes per character; such a page is decoded whole by orjson instead (k8s
names are ASCII and Secret data is base64, so those are ConfigMaps holding UTF-8 text).
"""

from __future__ import annotations

import json
import re
from collections.abc import Generator, Iterator
from typing import Any, cast

import orjson

from reloader.model import RawObject


class BadListBody(ValueError):
    """The body is not a JSON object with an ``items`` array of objects."""


def _refuse_constant(name: str) -> object:
    raise BadListBody(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)
_SPACE = re.compile(r"[ \t\n\r]*")


class ListPage:
    """One LIST response: ``objects()`` once, then ``metadata`` (``resourceVersion``,
    ``continue``), which is complete only once the objects have been read."""

    def __init__(self, payload: bytes | bytearray) -> None:
        self.size = len(payload)
        """Bytes in the body, for sizing the next page."""
        self.count = 0
        """Objects read so far."""
        self.metadata: dict[str, Any] = {}
        self._payload: bytes | bytearray | None = payload

    def objects(self) -> Iterator[RawObject]:
        """Each item, decoded as it is reached; the body is let go once read (``BadListBody``
        when it is malformed, after the items before the fault)."""
        payload, self._payload = self._payload, None
        if payload is None:
            raise RuntimeError("a list page's objects are read once")
        if payload.isascii():
            text = payload.decode("ascii")
            del payload
            yield from self._counted(self._scanned(text))
        else:
            yield from self._counted(self._whole(payload))

    def _counted(self, objects: Iterator[RawObject]) -> Iterator[RawObject]:
        for obj in objects:
            self.count += 1
            yield obj
            del obj  # not alive while the next one is decoded

    def _whole(self, payload: bytes | bytearray) -> Iterator[RawObject]:
        try:
            decoded = orjson.loads(payload)
        except orjson.JSONDecodeError as error:
            raise BadListBody(f"response is not JSON: {error}") from error
        if not isinstance(decoded, dict):
            raise BadListBody(f"expected a JSON object, got {type(decoded).__name__}")
        items = decoded.pop("items", None) or []
        self.metadata = _object(decoded.get("metadata"))
        del decoded
        if not isinstance(items, list):
            raise BadListBody("items is not an array")
        items.reverse()
        while items:  # handed over one at a time, so each is freed once reduced
            yield _item(items.pop())

    def _scanned(self, text: str) -> Iterator[RawObject]:
        """The top-level object's members in order: the items of ``items`` one at a time, and
        ``metadata`` kept (the server writes it before the items; the order does not matter)."""
        try:
            at = _skip(text, _after(text, 0, "{"))
            more = not text.startswith("}", at)
            while more:
                key, at = _member_name(text, at)
                if key == "items" and text.startswith("[", at):
                    at = yield from _items(text, at + 1)
                else:
                    value, at = _DECODER.raw_decode(text, at)
                    if key == "metadata":
                        self.metadata = _object(value)
                    elif key == "items" and value is not None:
                        raise BadListBody("items is not an array")
                at = _skip(text, at)
                more = text.startswith(",", at)
                at = _skip(text, at + 1) if more else at
            at = _after(text, at, "}")
        except json.JSONDecodeError as error:
            raise BadListBody(f"response is not JSON: {error}") from error
        if _skip(text, at) != len(text):
            raise BadListBody(f"data after the object, at {at}")


def _items(text: str, at: int) -> Generator[RawObject, None, int]:
    """The values of the array whose first value (or end) is at ``at``; returns where the array
    ends."""
    at = _skip(text, at)
    if text.startswith("]", at):
        return at + 1
    while True:
        item, at = _DECODER.raw_decode(text, at)
        yield _item(item)
        del item  # not alive while the next one is decoded
        at = _skip(text, at)
        if not text.startswith(",", at):
            return _after(text, at, "]")
        at = _skip(text, at + 1)


def _member_name(text: str, at: int) -> tuple[str, int]:
    """The name of the member at ``at`` and where its value starts."""
    if not text.startswith('"', at):
        raise BadListBody(f"expected a member name at {at}")
    name, at = _DECODER.raw_decode(text, at)
    return name, _skip(text, _after(text, at, ":"))


def _skip(text: str, at: int) -> int:
    """Past the whitespace at ``at``."""
    match = _SPACE.match(text, at)
    return match.end() if match else at


def _after(text: str, at: int, token: str) -> int:
    """Past ``token``, which must come next (after whitespace)."""
    at = _skip(text, at)
    if not text.startswith(token, at):
        raise BadListBody(f"expected {token!r} at {at}")
    return at + 1


def _item(value: object) -> RawObject:
    if not isinstance(value, dict):
        raise BadListBody(f"an item is not a JSON object but {type(value).__name__}")
    return cast(RawObject, value)


def _object(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}
