"""PackedTable: behaves as a dict of str → bytes under any sequence of changes, keeps its buffer
bounded by what is live, and refuses to be changed while iterated."""

from __future__ import annotations

import random

import pytest

from reloader.table import PackedTable


def test_it_reads_back_what_was_written() -> None:
    table = PackedTable([("app-config", b"\x01digest"), ("db", b"")])
    assert table["app-config"] == b"\x01digest" and table["db"] == b""
    assert "db" in table and "missing" not in table
    assert table.get("missing") is None
    assert len(table) == 2 and list(table) == ["app-config", "db"]
    with pytest.raises(KeyError):
        table["missing"]
    with pytest.raises(KeyError):
        del table["missing"]


def test_names_and_values_of_any_size_and_text() -> None:
    """Long names and values take the five-byte length; odd text (a lone surrogate, which JSON
    can carry) comes back as it was."""
    table = PackedTable()
    odd, long_name, long_value = "caf\u00e9-\ud800", "n" * 300, bytes(range(256)) * 5
    table[odd] = b"x"
    table[long_name] = long_value
    assert table[odd] == b"x" and table[long_name] == long_value
    assert set(table) == {odd, long_name}


def test_a_value_of_the_same_size_is_written_in_place() -> None:
    table = PackedTable([("a", b"1111"), ("b", b"2222")])
    size = len(table._data)
    table["a"] = b"3333"
    assert len(table._data) == size and list(table) == ["a", "b"]
    table["a"] = b"longer value"
    assert list(table) == ["b", "a"] and table["a"] == b"longer value"


def test_churn_keeps_the_buffer_within_twice_what_is_live() -> None:
    """A config rewritten many times (its digests changing size) and names coming and going
    must not grow the table without bound: dead records are dropped once they outweigh the live
    ones, and deleted slots are dropped before they fill the table."""
    table = PackedTable()
    for round_ in range(2000):
        table["hot"] = b"x" * (round_ % 7)
        table[f"gone-{round_}"] = b"v"
        del table[f"gone-{round_}"]
    live = sum(3 + len(name) + len(table[name]) for name in table)
    assert len(table) == 1 and len(table._data) <= 2 * max(live, 64)
    assert len(table._slots) <= 16


def test_compact_keeps_only_live_records_in_a_buffer_of_their_size() -> None:
    table = PackedTable((f"cm-{n}", b"d" * 16) for n in range(100))
    for n in range(0, 100, 2):
        del table[f"cm-{n}"]
    table.compact()
    assert len(table._data) == sum(3 + len(name) + 16 for name in table)
    assert list(table) == [f"cm-{n}" for n in range(1, 100, 2)]
    assert all(table[f"cm-{n}"] == b"d" * 16 for n in range(1, 100, 2))


def test_slots_are_as_wide_as_the_buffer_needs() -> None:
    """2-byte slots while every offset is under 64 KiB, 4-byte ones once the buffer grows past,
    2-byte again once compacted below: the table reads the same throughout."""
    values = {f"cm-{n}": bytes([n % 256]) * 300 for n in range(300)}
    table = PackedTable()
    for name, value in list(values.items())[:100]:
        table[name] = value
    assert table._slots.itemsize == 2
    for name, value in list(values.items())[100:]:
        table[name] = value
    assert len(table._data) > 1 << 16 and table._slots.itemsize == 4
    assert dict(table) == values
    for n in range(100, 300):
        del table[f"cm-{n}"], values[f"cm-{n}"]
    table.compact()
    assert table._slots.itemsize == 2
    assert dict(table) == values and all(table[name] == value for name, value in values.items())


def test_emptied_table_gives_its_buffers_back() -> None:
    table = PackedTable((f"cm-{n}", b"v") for n in range(1000))
    for n in range(1000):
        del table[f"cm-{n}"]
    assert len(table) == 0 and len(table._data) == 0 and len(table._slots) == 8


def test_changing_it_while_iterating_raises() -> None:
    table = PackedTable([("a", b"1"), ("b", b"2")])
    names = iter(table)
    table[next(names) + "-new"] = b"3"
    with pytest.raises(RuntimeError):
        next(names)


@pytest.mark.parametrize("seed", range(20))
def test_it_matches_a_dict_under_random_changes(seed: int) -> None:
    rng = random.Random(seed)
    table, expected = PackedTable(), dict[str, bytes]()
    names = [f"cm-{n}" for n in range(40)] + ["", "é" * 90, "x" * 260]
    for _ in range(1500):
        name = rng.choice(names)
        if rng.random() < 0.6:
            value = rng.randbytes(rng.choice([0, 1, 16, 40, 300]))
            table[name] = expected[name] = value
        elif name in expected:
            del table[name], expected[name]
        if rng.random() < 0.01:
            table.compact()
        assert len(table) == len(expected)
        assert (name in table) == (name in expected)
    assert dict(table) == expected
