"""Keyed digests: what changes them, what does not, and the record format."""

from __future__ import annotations

import pytest

from reloader.digests import (
    RECORD_VERSION,
    DigestKey,
    Recorded,
    decode_record,
    encode_record,
    key_digests,
    reference_digest,
)
from reloader.model import ConfigKey

KEY = DigestKey.from_secret(b"k" * 32)
OTHER_KEY = DigestKey.from_secret(b"o" * 32)
CONFIG = ConfigKey("Secret", "team-a", "db")


def digest(
    data: dict[str, str],
    keys: frozenset[str] | None = None,
    key: DigestKey = KEY,
    config: ConfigKey = CONFIG,
) -> str:
    return reference_digest(
        key_digests(data, None, key=key, config=config), keys, key=key, config=config
    )


def test_same_content_same_digest_regardless_of_order() -> None:
    assert digest({"a": "1", "b": "2"}) == digest({"b": "2", "a": "1"})


def test_value_change_changes_digest() -> None:
    assert digest({"a": "1"}) != digest({"a": "2"})


def test_framing_is_unambiguous() -> None:
    """Stakater's k=v; framing makes these two equal; ours must not."""
    assert digest({"a": "b;c=d"}) != digest({"a": "b", "c": "d"})


def test_unused_key_change_does_not_change_a_key_reference() -> None:
    used = frozenset({"a"})
    assert digest({"a": "1", "b": "x"}, used) == digest({"a": "1", "b": "y"}, used)
    assert digest({"a": "1", "b": "x"}) != digest({"a": "1", "b": "y"})


def test_missing_key_then_added_changes_digest() -> None:
    used = frozenset({"a"})
    assert digest({}, used) != digest({"a": ""}, used)


def test_binary_data_counts_and_differs_from_data() -> None:
    as_data = key_digests({"a": "AA=="}, None, key=KEY, config=CONFIG)
    as_binary = key_digests(None, {"a": "AA=="}, key=KEY, config=CONFIG)
    assert reference_digest(as_data, None, key=KEY, config=CONFIG) != reference_digest(
        as_binary, None, key=KEY, config=CONFIG
    )


@pytest.mark.parametrize(
    "other",
    [
        pytest.param(ConfigKey("Secret", "team-b", "db"), id="namespace"),
        pytest.param(ConfigKey("Secret", "team-a", "db2"), id="name"),
        pytest.param(ConfigKey("ConfigMap", "team-a", "db"), id="kind"),
    ],
)
@pytest.mark.parametrize(
    ("data", "keys"),
    [
        pytest.param({"pin": "1234"}, None, id="all-keys"),
        pytest.param({"pin": "1234"}, frozenset({"pin"}), id="one-key"),
        pytest.param({}, frozenset({"pin"}), id="key-absent"),
        pytest.param({}, None, id="empty"),
    ],
)
def test_equal_content_elsewhere_digests_differently(
    other: ConfigKey, data: dict[str, str], keys: frozenset[str] | None
) -> None:
    """A tenant who guesses a value learns nothing by comparing digests across configs."""
    assert digest(data, keys) != digest(data, keys, config=other)
    mine = key_digests(data, None, key=KEY, config=CONFIG)
    theirs = key_digests(data, None, key=KEY, config=other)
    assert mine != theirs or not data, "per-key digests are bound to the config too"


def test_digest_depends_on_key() -> None:
    assert digest({"pin": "1234"}) != digest({"pin": "1234"}, key=OTHER_KEY)
    assert KEY.key_id != OTHER_KEY.key_id


def test_key_repr_hides_the_secret() -> None:
    assert "kkkk" not in repr(KEY)


def test_short_key_is_refused() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        DigestKey.from_secret(b"short")


def test_record_round_trips() -> None:
    record = Recorded.of(KEY.key_id, {"Secret/db": "ab", "ConfigMap/app": "cd"})
    assert decode_record(encode_record(record)) == record
    bound = Recorded.of(KEY.key_id, {"Secret/db": ""}, uid="u-1", template="t-1")
    assert decode_record(encode_record(bound)) == bound
    assert f'"v":{RECORD_VERSION}' in encode_record(bound)


@pytest.mark.parametrize(
    "configs",
    [
        pytest.param({"ConfigMap/app": "0123456789abcdef" * 2}, id="hex-digest"),
        pytest.param({"Secret/db": "0123456789ABCDEF" * 2}, id="capital-hex-kept-as-text"),
        pytest.param({"Secret/db": "0123456789abcde " * 2}, id="hex-with-spaces"),
        pytest.param({"ConfigMap/app": ""}, id="absent"),
        pytest.param({"SecretProviderClass/vault@Deployment/web": "d"}, id="provider-class"),
        pytest.param({"Job/x": "d", "ConfigMap": "e", "": ""}, id="ids-of-no-known-kind"),
        pytest.param({"ConfigMap/" + "n" * 300: "é" * 300}, id="long-parts"),
    ],
)
def test_packed_records_give_back_what_was_recorded(configs: dict[str, str]) -> None:
    """Packing is for memory only: the annotation written back is the one read, byte for byte,
    whatever a hand-edited record holds."""
    record = Recorded.of("k", configs)
    assert record.as_dict() == configs
    assert decode_record(encode_record(record)) == record


def test_a_hex_digest_is_kept_in_half_its_text() -> None:
    """The whole entry, id included, takes less than the digest's text alone."""
    digest = "0123456789abcdef" * 2
    assert len(Recorded.of("k", {"ConfigMap/app": digest}).packed_configs) < len(digest)


def test_a_record_without_version_is_version_one() -> None:
    """The format of controllers before the digests were bound: parsed, then set aside."""
    old = decode_record('{"keyId":"k","configs":{"ConfigMap/a":"d"},"restartedAt":7}')
    assert old is not None and old.version == 1 and old.restarted_at == 7


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(None, id="absent"),
        pytest.param("", id="empty"),
        pytest.param("{not json", id="not-json"),
        pytest.param("[]", id="not-an-object"),
        pytest.param('{"keyId": 1, "configs": {}}', id="key-not-string"),
        pytest.param('{"keyId": "x", "configs": {"a": 1}}', id="digest-not-string"),
    ],
)
def test_malformed_record_reads_as_none(value: str | None) -> None:
    assert decode_record(value) is None


def test_restart_time_round_trips_and_is_optional() -> None:
    stamped = Recorded.of("k", {"ConfigMap/a": "d"}, restarted_at=1700000000)
    assert decode_record(encode_record(stamped)) == stamped
    bad_time = '{"v":2,"keyId":"k","configs":{},"restartedAt":"soon"}'
    assert decode_record(bad_time) == Recorded.of("k", {})
