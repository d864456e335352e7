"""The API client turns bodies that are not JSON objects into a retryable error, not a crash."""

from __future__ import annotations

import pytest

from reloader.kube import ApiUnavailable, _decode_object


@pytest.mark.parametrize(
    "payload",
    [b"<html>502 Bad Gateway</html>", b'{"type": "ADDED", "obj', b"[1, 2]", b'"text"'],
)
def test_a_body_that_is_not_a_json_object_is_retryable(payload: bytes) -> None:
    with pytest.raises(ApiUnavailable) as caught:
        _decode_object(payload)
    assert caught.value.retryable
    assert caught.value.reason == "BadBody"


def test_a_json_object_decodes() -> None:
    assert _decode_object(b'{"kind": "Status", "code": 410}') == {"kind": "Status", "code": 410}
