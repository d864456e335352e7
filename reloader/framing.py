"""Short length-prefixed framing for what the cache keeps packed in one bytes object per entry.

Tens of thousands of references, per-key digests and record entries stay cached for as long as
their objects exist. Kept as Python objects, each string costs 49 bytes before its first character
and each small object 48 to 64; packed into one bytes object per entry they cost their length plus
one byte. A part of up to 254 bytes (every Kubernetes name, key and digest) takes a one-byte length;
a longer one (hostile or odd input: nothing is assumed of a part's size) takes five.

This framing is for memory only and never reaches a MAC or the API: digests are computed over
``digests._framed``'s fixed four-byte lengths, so changing this layout changes no digest.
"""

from __future__ import annotations

from collections.abc import Iterable

_LONG = 0xFF
"""The length byte that says a four-byte length follows."""


def frame(part: bytes) -> bytes:
    """One part with its length in front."""
    size = len(part)
    if size < _LONG:
        return size.to_bytes(1, "big") + part
    return _LONG.to_bytes(1, "big") + size.to_bytes(4, "big") + part


def framed(parts: Iterable[bytes]) -> bytes:
    return b"".join(frame(part) for part in parts)


def part_at(data: bytes | bytearray, at: int) -> tuple[int, int]:
    """Where the part framed at offset ``at`` starts and ends (its length read, not copied)."""
    size = data[at]
    if size == _LONG:
        start = at + 5
        return start, start + int.from_bytes(data[at + 1 : start], "big")
    return at + 1, at + 1 + size


def unframed(data: bytes) -> list[bytes]:
    """The parts ``framed`` joined, in order."""
    parts: list[bytes] = []
    at, end = 0, len(data)
    while at < end:
        start, at = part_at(data, at)
        parts.append(data[start:at])
    return parts


def utf8(text: str) -> bytes:
    """Text as bytes: UTF-8, where any string JSON can carry (lone surrogates too) survives."""
    return text.encode("utf-8", "surrogatepass")


def text_of(data: bytes) -> str:
    return data.decode("utf-8", "surrogatepass")
