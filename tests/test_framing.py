"""The cache's short framing: any parts come back as they went in, whatever their size."""

from __future__ import annotations

import pytest

from reloader.framing import frame, framed, text_of, unframed, utf8


@pytest.mark.parametrize(
    "parts",
    [
        pytest.param([], id="nothing"),
        pytest.param([b""], id="one-empty"),
        pytest.param([b"a", b"", b"bc"], id="short"),
        pytest.param([b"x" * 254, b"y" * 255, b"z" * 70_000], id="at-and-over-one-byte"),
        pytest.param([b"\xff", b"\xff" * 300], id="the-marker-byte-as-content"),
    ],
)
def test_parts_round_trip(parts: list[bytes]) -> None:
    assert unframed(framed(parts)) == parts


def test_a_short_part_costs_one_byte_and_a_long_one_five() -> None:
    assert len(frame(b"x" * 254)) == 255
    assert len(frame(b"x" * 255)) == 260


def test_any_string_json_can_carry_survives() -> None:
    for text in ["", "app-config", "ключ", "\ud800 lone surrogate", "emoji \U0001f600"]:
        assert text_of(utf8(text)) == text
