"""ListPage: a LIST body read one object at a time gives what decoding it whole gives, holds no
object once the next is read, and turns a malformed body into ``BadListBody``."""

from __future__ import annotations

import json
import random
import sys
from typing import Any

import orjson
import pytest

from reloader import pages
from reloader.pages import BadListBody, ListPage

_TRICKY_TEXT = ['a "quoted" }]', "back\\slash", "\\u0022 not an escape", "{[,:]}", "", "x" * 300]


def _value(rng: random.Random, depth: int) -> Any:
    """A random JSON value whose strings hold what a scanner could mistake for structure."""
    choice = rng.randrange(8 if depth < 4 else 5)
    if choice == 0:
        return rng.choice(_TRICKY_TEXT) + chr(rng.randrange(32, 127))
    if choice == 1:
        return rng.randrange(-(2**40), 2**40)
    if choice == 2:
        return rng.choice([True, False, None, 1.5, -0.0])
    if choice == 3:
        return "caf\u00e9 \u2603" if rng.random() < 0.1 else "plain"
    if choice == 4:
        return {}
    if choice == 5:
        return [_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(_TRICKY_TEXT): _value(rng, depth + 1) for _ in range(rng.randrange(4))}


def _body(
    items: list[Any], metadata: dict[str, str], *, metadata_last: bool, spaced: bool
) -> bytes:
    page: dict[str, Any] = {"kind": "ConfigMapList", "apiVersion": "v1"}
    if not metadata_last:
        page["metadata"] = metadata
    page["items"] = items
    if metadata_last:
        page["metadata"] = metadata
    if spaced:  # what a proxy that re-indents the body would send
        return json.dumps(page, indent=2, ensure_ascii=True).encode()
    return orjson.dumps(page)


def _read(body: bytes) -> tuple[list[Any], dict[str, Any], int]:
    page = ListPage(body)
    objects = list(page.objects())
    return objects, page.metadata, page.count


@pytest.mark.parametrize("seed", range(40))
def test_it_reads_what_decoding_the_body_whole_reads(seed: int) -> None:
    rng = random.Random(seed)
    items = [
        {"metadata": {"name": f"cm-{n}"}, "data": {"k": _value(rng, 0)}, "more": _value(rng, 0)}
        for n in range(rng.randrange(6))
    ]
    metadata = {"resourceVersion": str(rng.randrange(10**9)), "continue": rng.choice(["", "t"])}
    body = _body(items, metadata, metadata_last=rng.random() < 0.3, spaced=rng.random() < 0.3)
    whole = orjson.loads(body)
    objects, read_metadata, count = _read(body)
    assert objects == whole["items"]
    assert read_metadata == whole["metadata"]
    assert count == len(whole["items"])


def test_an_empty_or_null_items_list_reads_as_no_objects() -> None:
    for body in (b'{"metadata":{"resourceVersion":"7"},"items":[]}', b'{"items":null}', b"{}"):
        objects, _, count = _read(body)
        assert objects == [] and count == 0


def test_a_body_with_text_beyond_ascii_reads_the_same() -> None:
    """Such a body is decoded whole (orjson), not scanned as text of wide characters."""
    items = [{"metadata": {"name": "a"}, "data": {"greeting": "gr\u00fc\u00df dich \U0001f600"}}]
    body = orjson.dumps({"metadata": {"resourceVersion": "3"}, "items": items})
    assert not body.isascii()
    assert _read(body) == (items, {"resourceVersion": "3"}, 1)


@pytest.mark.parametrize("non_ascii", [False, True])
def test_no_object_is_held_once_the_next_is_read(non_ascii: bool) -> None:
    """The reader keeps no reference to an object it handed over."""
    text = "\u00e9" if non_ascii else "e"
    items = [{"metadata": {"name": f"{text}-{n}"}} for n in range(3)]
    objects = ListPage(orjson.dumps({"items": items})).objects()
    first = next(objects)
    second = next(objects)
    assert sys.getrefcount(first) == 2  # ``first`` and the call's argument
    assert second["metadata"]["name"].endswith("-1")


def test_an_object_is_let_go_before_the_next_is_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    """What one object leaves behind is freed before the next is made, so the next reuses it.
    The real decoder, watched: how many hold the first object while the second is decoded."""
    held: list[Any] = []
    holders: list[int] = []
    decoder = pages._DECODER

    class Watching:
        def raw_decode(self, text: str, at: int) -> tuple[Any, int]:
            if held:
                holders.append(sys.getrefcount(held[0]))
            return decoder.raw_decode(text, at)

    monkeypatch.setattr(pages, "_DECODER", Watching())
    objects = ListPage(b'{"items":[{"a":1},{"b":2}]}').objects()
    held.append(next(objects))
    assert dict(next(objects)) == {"b": 2}
    assert holders == [2]  # ``held`` and the call's argument


def test_the_objects_are_read_once() -> None:
    page = ListPage(b'{"items":[{}]}')
    assert list(page.objects()) == [{}]
    with pytest.raises(RuntimeError):
        list(page.objects())


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"<html>502 Bad Gateway</html>",
        b"[]",
        b'{"items":[{}]',
        b'{"items":[{}',
        b'{"items":[{},]}',
        b'{"items":[{}],}',
        b'{"items":[{}] "metadata":{}}',
        b'{"items" [{}]}',
        b"{items:[]}",
        b'{"items":[{}]} {}',
        b'{"items":[1]}',
        b'{"items":"none"}',
        b'{"items":[{"value":NaN}]}',
        b'{"items":[{"value":Infinity}]}',
        '{"items":[1], "x":"\u00e9"}'.encode(),
        '{"items":"\u00e9"}'.encode(),
        b'{"items":[{"name":"\xff"}]}',
    ],
)
def test_a_malformed_body_is_refused(body: bytes) -> None:
    with pytest.raises(BadListBody):
        _read(body)


def test_objects_before_the_fault_are_read() -> None:
    """The informer retries the whole list; what was read before the fault were real objects."""
    objects = ListPage(b'{"items":[{"a":1},{"b":2},oops]}').objects()
    assert dict(next(objects)) == {"a": 1} and dict(next(objects)) == {"b": 2}
    with pytest.raises(BadListBody):
        next(objects)


def test_the_size_is_the_body_s() -> None:
    body = b'{"items":[{"a":1}]}'
    assert ListPage(body).size == len(body) == ListPage(bytearray(body)).size
