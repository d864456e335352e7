"""Keyed digests of config content, and the record of them kept on each workload.

Why keyed: the digests are written into workload annotations, which many more people can read than
can read Secrets. A plain hash of a low-entropy secret (a 6-digit PIN, a short password) can be
brute-forced offline from the annotation; an HMAC under a key the reader does not have cannot.
Stakater writes a plain SHA-1, so this is a deliberate difference.

Guarantees:
- A config is reduced to one 16-byte HMAC per data key as soon as it is read; the values are never
  kept, so the cache holds nothing a Secret reader could not already compute without the key.
- A reference digest covers only the keys the workload reads (all keys for ``envFrom`` or a whole
  volume), framed without ambiguity (length-prefixed), so editing an unused key restarts nothing.
- Every digest is bound to the config's identity (kind, namespace, name) and to the format version,
  so equal content in two namespaces, or under two names, gives unrelated digests: a tenant who can
  create Secrets with guessed values learns nothing by comparing digests across namespaces.
- Every record names the key it was made with (``key_id``) and its format version (``v``); a record
  made under another key or in another format is not comparable and is re-recorded without a
  restart (see ``docs/configuration.md``, key rotation), so a controller upgrade restarts nothing.
- A record names the object and pod template it was made for (``uid``, ``template``), so a record
  copied onto a re-created object, or restored stale onto a changed template, can be set aside.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import secrets
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import get_args

import orjson

from reloader.framing import framed, text_of, unframed, utf8
from reloader.model import ConfigKey, ConfigKind

RECORD_VERSION = 2
"""Version 1 had no ``v`` field, digests not bound to the config's identity and no binding to the
workload; version 2 adds all three."""
ABSENT = ""
"""The recorded digest of a config that was missing when the record was made: its creation later is
then told apart from a config that merely became a dependency (an opt-in, a new reference)."""
PER_KEY_DIGEST_BYTES = 16
KeyDigests = bytes
"""Per-data-key digests of one config, packed into one bytes object (read it with
``digest_items``): for each key, in name order, the framed name and its digest. One object per
config because tens of thousands are cached: a tuple of names beside the digests cost 56 bytes
more per config, a tuple per key far more."""

_MISSING_KEY = b"\x00absent"


@dataclass(frozen=True, slots=True)
class DigestKey:
    """The HMAC key and its public identifier (itself an HMAC, so it reveals nothing)."""

    key_id: str
    secret: bytes

    @classmethod
    def from_secret(cls, secret: bytes) -> DigestKey:
        if len(secret) < 16:
            raise ValueError("the digest key must be at least 16 bytes")
        key_id = hmac.new(secret, b"reloader digest key id", hashlib.sha256).hexdigest()[:12]
        return cls(key_id=key_id, secret=secret)

    @staticmethod
    def generate_secret() -> bytes:
        return secrets.token_bytes(32)

    def __repr__(self) -> str:
        return f"DigestKey(key_id={self.key_id!r})"


def _framed(*parts: bytes) -> bytes:
    """What a MAC covers, without ambiguity: four-byte lengths, fixed because digests depend on
    them (the cache's packed forms use ``framing``, which may change without changing a digest)."""
    return b"".join(len(part).to_bytes(4, "big") + part for part in parts)


def _pairs(packed: bytes) -> list[tuple[bytes, bytes]]:
    """The parts ``framing.framed`` joined, two by two (name and digest, id and digest)."""
    parts = unframed(packed)
    return list(zip(parts[::2], parts[1::2], strict=True))


def _identity(config: ConfigKey) -> bytes:
    """What binds a MAC to one config: format version, kind, namespace and name, framed."""
    version = str(RECORD_VERSION).encode()
    return _framed(version, config.kind.encode(), config.namespace.encode(), config.name.encode())


def key_digests(
    data: Mapping[str, str] | None,
    binary_data: Mapping[str, str] | None,
    *,
    key: DigestKey,
    config: ConfigKey,
) -> KeyDigests:
    """One HMAC per data key of a ConfigMap or Secret; ``data`` and ``binaryData`` both count.

    Each MAC covers the config's identity and the data key as well as the value, so the same value
    under another name or namespace digests differently."""
    entries: list[tuple[str, bytes]] = []
    identity = _identity(config)
    for source, tag in ((data, b"d"), (binary_data, b"b")):
        for name, value in (source or {}).items():
            message = _framed(identity, tag, name.encode(), value.encode())
            mac = hmac.new(key.secret, message, hashlib.sha256)
            entries.append((name, mac.digest()[:PER_KEY_DIGEST_BYTES]))
    entries.sort()
    return framed(part for name, digest in entries for part in (utf8(name), digest))


def digest_items(digests: KeyDigests) -> dict[str, bytes]:
    """Key name → digest, from the packed form."""
    return {text_of(name): digest for name, digest in _pairs(digests)}


def reference_digest(
    digests: KeyDigests, keys: frozenset[str] | None, *, key: DigestKey, config: ConfigKey
) -> str:
    """The digest of what one workload reads from one config, as 32 hex characters.

    A key the workload names but the config lacks counts as absent, so adding it later changes
    the digest (the pod would see the new key after a restart). The config's identity is in the
    MAC too: an empty config, or only absent keys, still digests differently per config.
    """
    present = digest_items(digests)
    names = sorted(present) if keys is None else sorted(keys)
    mac = hmac.new(key.secret, b"reloader reference", hashlib.sha256)
    mac.update(_identity(config))
    mac.update(b"all" if keys is None else b"some")
    for name in names:
        mac.update(_framed(name.encode(), present.get(name, _MISSING_KEY)))
    return mac.hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class Recorded:
    """The digests recorded on a workload: what its running pods were started with.

    ``configs`` maps a config id (``ConfigMap/name`` or ``Secret/name``; the namespace is the
    workload's own) to its reference digest, or to ``ABSENT`` for a config that was missing.
    ``restarted_at`` (Unix seconds) is when the controller last restarted the workload: the minimum
    restart interval is measured from it, for every kind and strategy (a CronJob or the env-vars
    strategy leave no other trace on the object).

    ``uid`` and ``template`` bind the record to the object (``metadata.uid``) and to its pod
    template (``snapshots.template_hash``), and ``restarted_at`` to the template's restart marker:
    a record that does not match the object it is found on describes other pods, and is set aside.
    An empty ``uid`` is not bound to one object.

    A ``Recorded`` with an empty ``key_id`` stands for "nothing usable recorded" on a known object:
    it carries the object's binding, so the first record made for it is bound, and in ``reset`` why
    a record found on the object was set aside (``format``, ``uid``, ``template``, ``stale``), if
    one was.
    """

    key_id: str
    packed_configs: bytes
    """``configs``, packed (``pack_configs``): every watched workload carrying a record keeps one,
    and (id, digest) string pairs cost about 200 bytes per config, the packed form about 60."""
    restarted_at: int | None = None
    uid: str = ""
    template: str = ""
    version: int = RECORD_VERSION
    reset: str | None = None

    @property
    def configs(self) -> tuple[tuple[str, str], ...]:
        """(config id, digest) pairs, sorted by id."""
        pairs = _pairs(self.packed_configs)
        return tuple((_config_id_of(ident), _digest_of(digest)) for ident, digest in pairs)

    def as_dict(self) -> dict[str, str]:
        return dict(self.configs)

    @property
    def usable(self) -> bool:
        """Whether this is a record at all (see the class docstring)."""
        return bool(self.key_id)

    @classmethod
    def of(
        cls,
        key_id: str,
        configs: Mapping[str, str],
        *,
        restarted_at: int | None = None,
        uid: str = "",
        template: str = "",
    ) -> Recorded:
        return cls(key_id, pack_configs(configs.items()), restarted_at, uid, template)

    @classmethod
    def nothing(
        cls, *, uid: str, template: str, restarted_at: int | None = None, reset: str | None = None
    ) -> Recorded:
        """No usable record on an object with this binding; ``reset``: why one found was not."""
        return cls("", b"", restarted_at, uid, template, RECORD_VERSION, reset)


_ID_PREFIXES = ("", *(f"{kind}/" for kind in get_args(ConfigKind)))
"""How a record names configs (``decide.config_id``: kind, slash, name): a packed id keeps the
prefix's index; index 0 is an id of no known kind, kept whole."""
_HEX_TEXT = b"h"
_PLAIN_TEXT = b"t"
"""Lead a packed digest: 16 bytes that were 32 lowercase hex characters, or the text as found (an
``ABSENT`` digest, a hand-edited annotation)."""


def _packed_config_id(ident: str) -> bytes:
    for index, prefix in enumerate(_ID_PREFIXES):
        if index and ident.startswith(prefix):
            return index.to_bytes(1, "big") + utf8(ident[len(prefix) :])
    return b"\x00" + utf8(ident)


def _config_id_of(packed: bytes) -> str:
    return _ID_PREFIXES[packed[0]] + text_of(packed[1:])


def _packed_digest(digest: str) -> bytes:
    if len(digest) == 2 * PER_KEY_DIGEST_BYTES:
        with contextlib.suppress(ValueError):
            raw = bytes.fromhex(digest)
            if raw.hex() == digest:  # fromhex skips spaces and reads capitals: only exact text
                return _HEX_TEXT + raw
    return _PLAIN_TEXT + utf8(digest)


def _digest_of(packed: bytes) -> str:
    if packed[:1] == _HEX_TEXT:
        return packed[1:].hex()
    return text_of(packed[1:])


def pack_configs(configs: Iterable[tuple[str, str]]) -> bytes:
    """(config id, digest) pairs as one bytes object, sorted by id: about 40 bytes a config with a
    20-character name, where the two strings framed as text took 70."""
    return framed(
        part
        for ident, digest in sorted(configs)
        for part in (_packed_config_id(ident), _packed_digest(digest))
    )


def encode_record(record: Recorded) -> str:
    """The annotation value; stable (sorted) so an unchanged record is never rewritten."""
    body: dict[str, object] = {
        "v": record.version,
        "keyId": record.key_id,
        "configs": dict(record.configs),
    }
    if record.uid:
        body["uid"] = record.uid
    if record.template:
        body["template"] = record.template
    if record.restarted_at is not None:
        body["restartedAt"] = record.restarted_at
    return orjson.dumps(body, option=orjson.OPT_SORT_KEYS).decode()


def _text(body: Mapping[str, object], name: str) -> str:
    value = body.get(name)
    return value if isinstance(value, str) else ""


def _integer(body: Mapping[str, object], name: str) -> int | None:
    value = body.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def decode_record(value: str | None) -> Recorded | None:
    """Parse the annotation; anything malformed reads as no record (the workload is re-recorded).

    A record without ``v`` is version 1; it is still parsed (so its restart time is kept) and the
    caller sets it aside as not comparable."""
    if not value:
        return None
    try:
        body = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(body, dict):
        return None
    key_id, configs = body.get("keyId"), body.get("configs")
    if not isinstance(key_id, str) or not isinstance(configs, dict):
        return None
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in configs.items()):
        return None
    return Recorded(
        sys.intern(key_id),  # every record made under one key names it: one string for all
        pack_configs(configs.items()),
        restarted_at=_integer(body, "restartedAt"),
        uid=_text(body, "uid"),
        template=_text(body, "template"),
        version=_integer(body, "v") or 1,
    )
