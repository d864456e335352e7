"""PackedTable: a name → bytes mapping kept in one buffer, for the caches with an entry per config.

The config stores and the reference index hold an entry for every ConfigMap and Secret, tens of
thousands of them for as long as they exist. In a dict each entry costs a name string (49 bytes
before its first character, about 70 with the allocator's rounding), a bytes object for the value
(33 before its first byte) and a slot in the dict's table (about 46 bytes at the usual fill): some
170 bytes for a 20-character name and a 20-byte value, in small blocks interleaved with whatever
else was allocated at the time, which the allocator cannot give back while one of them lives.

Here a namespace's entries are records in one ``bytearray`` (a state byte, then the name and the
value in ``framing``'s short framing) and an open-addressing table of record offsets (2, 4 or 8
bytes a slot, kept at most two thirds full): the same entry costs its name, its value, three bytes
and 3 to 6 bytes of table (2-byte slots while the buffer is under 64 KiB), and the whole
namespace is two buffers.

- Lookups hash the name's UTF-8 bytes and probe linearly; a name is compared only when its length
  matches. Every operation is O(1) on average, O(name) in hashing.
- A changed value of the same size is written in place (a digest changing keeps its size); any
  other change appends a new record and marks the old one dead. The buffer is rebuilt with only
  the live records when dead bytes outweigh live ones, and the table when deleted slots would
  fill it: each rebuild is paid for by as many changes as it moves entries.
- Iteration yields names in the order their records sit in the buffer (insertion order, a value
  of another size moving its name to the end). Changing the table while iterating raises, as a
  dict does.
- Values come back as new ``bytes`` objects: a reader holds a copy, never a view into the buffer.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator, MutableMapping

from reloader.framing import frame, part_at, text_of, utf8

_EMPTY, _DELETED = 0, 1
"""Slot values that are not records: a slot holds a record's offset plus ``_OFFSET_BASE``."""
_OFFSET_BASE = 2
_LIVE, _DEAD = 0, 1
"""A record's first byte."""
_MIN_SLOTS = 8
_SLOT_TYPES = ("H", "I", "Q")
"""Slot widths, narrowest first: a table's slots are as wide as its buffer's largest offset needs.
Most namespaces' buffers are a few KiB, so 2-byte slots (the slots were a quarter of what the
config stores and the index kept at 20,000 configs); 4 bytes past 64 KiB, 8 past 4 GiB."""


def _slot_type(largest: int) -> str:
    """The narrowest slot type that holds ``largest``."""
    return next(code for code in _SLOT_TYPES if largest < 1 << (8 * array(code).itemsize))


def _empty_slots(count: int = _MIN_SLOTS, *, largest: int = 0) -> array[int]:
    code = _slot_type(largest)
    return array(code, bytes(array(code).itemsize * count))


def _live_records(data: bytearray) -> Iterator[tuple[int, int]]:
    """(offset, end) of each live record of ``data``, in buffer order."""
    at = 0
    while at < len(data):
        _, name_end = part_at(data, at + 1)
        end = part_at(data, name_end)[1]
        if data[at] == _LIVE:
            yield at, end
        at = end


def _slot_count(entries: int) -> int:
    """The smallest power of two that holds ``entries`` at most half full, so a rebuilt table
    takes as many insertions again before it needs the next rebuild."""
    count = _MIN_SLOTS
    while count < 2 * entries:
        count *= 2
    return count


class PackedTable(MutableMapping[str, bytes]):
    """``str`` → ``bytes``, in one buffer of framed records and one table of their offsets."""

    __slots__ = ("_data", "_dead_bytes", "_live", "_slots", "_used")

    def __init__(self, items: Iterable[tuple[str, bytes]] = ()) -> None:
        self._data = bytearray()
        self._slots = _empty_slots()
        self._live = 0
        """Entries."""
        self._used = 0
        """Slots that are not empty: entries and deleted markers (what decides a rebuild)."""
        self._dead_bytes = 0
        for name, value in items:
            self[name] = value

    # --- reading ------------------------------------------------------------------------------

    def __getitem__(self, name: str) -> bytes:
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def get(self, name: str, default: bytes | None = None) -> bytes | None:  # type: ignore[override]
        """As ``__getitem__``, without raising for a missing name (the informer asks this for
        every object it stores)."""
        slot = self._find(utf8(name))[0]
        if slot < 0:
            return default
        start, end = self._value_at(self._slots[slot] - _OFFSET_BASE)
        return bytes(self._data[start:end])

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._find(utf8(name))[0] >= 0

    def __len__(self) -> int:
        return self._live

    def __iter__(self) -> Iterator[str]:
        data = self._data
        size = len(data)
        for offset, _ in _live_records(data):
            start, end = part_at(data, offset + 1)
            yield text_of(bytes(data[start:end]))
            if self._data is not data or len(data) != size:
                raise RuntimeError("PackedTable changed size during iteration")

    # --- writing ------------------------------------------------------------------------------

    def __setitem__(self, name: str, value: bytes) -> None:
        key = utf8(name)
        record = bytes((_LIVE,)) + frame(key) + frame(value)
        slot, free = self._find(key)
        if slot >= 0:
            self._replace(slot, record)
            return
        if 3 * (self._used + 1) > 2 * len(self._slots):
            self._rebuild()
            free = self._find(key)[1]
        if self._slots[free] == _EMPTY:
            self._used += 1
        self._set_slot(free, self._append(record))
        self._live += 1

    def __delitem__(self, name: str) -> None:
        slot = self._find(utf8(name))[0]
        if slot < 0:
            raise KeyError(name)
        self._kill(self._slots[slot] - _OFFSET_BASE)
        self._slots[slot] = _DELETED
        self._live -= 1
        if not self._live:
            self.clear()
        else:
            self._rebuild_if_mostly_dead()

    def clear(self) -> None:
        self._data = bytearray()
        self._slots = _empty_slots()
        self._live = self._used = self._dead_bytes = 0

    def compact(self) -> None:
        """Rebuild with only the live records, in buffers of their exact size (a buffer grown by
        appending keeps up to an eighth more than it holds)."""
        self._rebuild()

    # --- records ------------------------------------------------------------------------------

    def _value_at(self, offset: int) -> tuple[int, int]:
        """Where the value of the record at ``offset`` starts and ends; the record ends there."""
        _, name_end = part_at(self._data, offset + 1)
        return part_at(self._data, name_end)

    def _name_is(self, offset: int, key: bytes) -> bool:
        start, end = part_at(self._data, offset + 1)
        return end - start == len(key) and self._data[start:end] == key

    def _find(self, key: bytes) -> tuple[int, int]:
        """(the slot holding ``key``'s record or -1, the slot where it would be inserted)."""
        slots = self._slots
        mask = len(slots) - 1
        index = hash(key) & mask
        free = -1
        while True:
            held = slots[index]
            if held == _EMPTY:
                return -1, index if free < 0 else free
            if held == _DELETED:
                if free < 0:
                    free = index
            elif self._name_is(held - _OFFSET_BASE, key):
                return index, index
            index = (index + 1) & mask

    def _append(self, record: bytes) -> int:
        offset = len(self._data)
        self._data += record
        return offset

    def _set_slot(self, slot: int, offset: int) -> None:
        held = offset + _OFFSET_BASE
        if held >= 1 << (8 * self._slots.itemsize):
            self._slots = array(_slot_type(held), self._slots)
        self._slots[slot] = held

    def _kill(self, offset: int) -> None:
        self._data[offset] = _DEAD
        self._dead_bytes += self._value_at(offset)[1] - offset

    def _replace(self, slot: int, record: bytes) -> None:
        offset = self._slots[slot] - _OFFSET_BASE
        end = self._value_at(offset)[1]
        if end - offset == len(record):
            self._data[offset:end] = record
            return
        self._kill(offset)
        self._set_slot(slot, self._append(record))
        self._rebuild_if_mostly_dead()

    def _rebuild_if_mostly_dead(self) -> None:
        if 2 * self._dead_bytes > len(self._data):
            self._rebuild()

    def _rebuild(self) -> None:
        """Copy the live records into a new buffer and index them in a new table sized for them."""
        old = self._data
        records = list(_live_records(old))
        self._data = bytearray(b"".join(old[offset:end] for offset, end in records))
        count = _slot_count(len(records))
        slots = self._slots = _empty_slots(count, largest=len(self._data) + _OFFSET_BASE)
        self._dead_bytes = 0
        mask, at = count - 1, 0
        for offset, end in records:
            start, name_end = part_at(self._data, at + 1)
            index = hash(bytes(self._data[start:name_end])) & mask
            while slots[index] != _EMPTY:  # a new table: no deleted slots, no equal names
                index = (index + 1) & mask
            slots[index] = at + _OFFSET_BASE
            at += end - offset
        self._used = self._live = len(records)
