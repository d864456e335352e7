"""The settings table of ``docs/configuration.md``, generated from ``Settings.model_fields``.

``python -m reloader.settings_doc`` prints the table between its two marker comments, ready to
paste over the old one; ``tests/test_docs.py`` fails when the document's table differs, so the
document cannot drift from the code. Every cell comes from the field itself: the flag from its
``json_schema_extra["flag"]`` (else ``--field-name``), the environment variable from the settings'
``env_prefix``, the type and bounds from the annotation and its constraints, the meaning from the
description.

A default computed from the environment (``controller_namespace`` reads ``POD_NAMESPACE``) is
shown as it would be with an empty environment, so the table does not depend on the machine that
renders it; the field's description names the variable.
"""

from __future__ import annotations

import os
import types
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal, get_args, get_origin

from pydantic import SecretStr
from pydantic.fields import FieldInfo

from reloader.settings import Settings

TABLE_START = "<!-- settings-table:start (generated: python -m reloader.settings_doc) -->"
TABLE_END = "<!-- settings-table:end -->"
HEADER = ("Flag", "Environment variable", "Type", "Default", "Meaning")

_SCALARS: dict[object, str] = {
    bool: "bool",
    int: "integer",
    float: "number",
    str: "string",
    SecretStr: "string (secret)",
}
_BOUNDS = (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"))


def flag_name(name: str, field: FieldInfo) -> str:
    """The command-line flag: Stakater's name where the field declares one, else kebab case."""
    extra = field.json_schema_extra
    if isinstance(extra, dict) and isinstance(extra.get("flag"), str):
        return str(extra["flag"])
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    """The environment variable pydantic-settings reads for the field."""
    return f"{Settings.model_config.get('env_prefix', '')}{name}".upper()


def _code(text: str) -> str:
    return f"`{text}`" if text else '`""`'


def _without_none(annotation: object) -> object:
    """``X | None`` → ``X``: an optional setting is described by what it holds when set."""
    if get_origin(annotation) in (types.UnionType, typing.Union):
        kept = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(kept) == 1:
            return kept[0]
    return annotation


def type_text(field: FieldInfo) -> str:
    annotation = _without_none(field.annotation)
    if get_origin(annotation) is Literal:
        return "one of " + ", ".join(_code(str(value)) for value in get_args(annotation))
    if get_origin(annotation) is list:
        text = "comma-separated list"
    else:
        text = _SCALARS.get(annotation, str(annotation))
    bounds = [
        f"{symbol} {_number(getattr(item, attribute))}"
        for item in field.metadata
        for attribute, symbol in _BOUNDS
        if getattr(item, attribute, None) is not None
    ]
    return ", ".join([text, *bounds])


def _number(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


@contextmanager
def _empty_environment() -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.clear()
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def default_text(field: FieldInfo) -> str:
    if field.default_factory is not None:
        with _empty_environment():
            value: Any = field.get_default(call_default_factory=True, validated_data={})
    else:
        value = field.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return _code(str(value).lower())
    if isinstance(value, list):
        return ", ".join(_code(str(item)) for item in value) if value else "empty"
    if isinstance(value, int | float):
        return _code(_number(value))
    return _code(str(value))


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _prose(text: str) -> str:
    """A description as Markdown text: ``<NAME>`` would otherwise be read as an HTML tag."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def table_rows() -> list[tuple[str, str, str, str, str]]:
    """One row per ``Settings`` field, in declaration order."""
    return [
        (
            _code(flag_name(name, field)),
            _code(env_name(name)),
            type_text(field),
            default_text(field),
            _prose(field.description or ""),
        )
        for name, field in Settings.model_fields.items()
    ]


def render_table() -> str:
    """The Markdown table, without the marker comments."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(_cell(cell) for cell in row) + " |" for row in table_rows()]
    return "\n".join(lines)


def render_block() -> str:
    """The table between its markers: what to paste into ``docs/configuration.md``."""
    return f"{TABLE_START}\n{render_table()}\n{TABLE_END}"


def main() -> None:
    print(render_block())


if __name__ == "__main__":
    main()
