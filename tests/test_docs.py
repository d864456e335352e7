"""The documents in ``docs/`` agree with the code: no cluster, pure reads of files and objects.

What users copy from the docs (flags, variables, annotation keys, metric names) is checked
against the code that defines it, in both directions where that makes sense. A failure says what
to change; the settings table's failure prints the whole expected table to paste.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from reloader.annotations import AnnotationNames
from reloader.kube import ApiStatistics
from reloader.metrics import Metrics, Sources
from reloader.settings import Settings, build_parser
from reloader.settings_doc import TABLE_END, TABLE_START, flag_name, render_block, render_table
from reloader.watch import InformerStatistics

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CONFIGURATION = DOCS / "configuration.md"
COMPATIBILITY = DOCS / "stakater-compatibility.md"
TESTING = DOCS / "testing.md"
METRICS = DOCS / "metrics.md"
OUR_DOCUMENTS = (ROOT / "README.md", *sorted(DOCS.glob("*.md")))
"""Every document we write: their links and anchors must resolve."""

STAKATER_FLAGS = (
    "--auto-reload-all",
    "--reload-strategy",
    "--reload-on-create",
    "--reload-on-delete",
    "--sync-after-restart",
    "--is-Argo-Rollouts",
    "--enable-csi-integration",
    "--enable-ha",
    "--webhook-url",
    "--resources-to-ignore",
    "--ignored-workload-types",
    "--namespaces",
    "--namespaces-to-ignore",
    "--namespace-selector",
    "--resource-label-selector",
    "--auto-annotation",
    "--configmap-auto-annotation",
    "--secret-auto-annotation",
    "--configmap-annotation",
    "--secret-annotation",
    "--auto-search-annotation",
    "--search-match-annotation",
    "--ignore-annotation",
    "--pause-deployment-annotation",
    "--pause-deployment-time-annotation",
    "--log-format",
    "--log-level",
    "--enable-pprof",
    "--pprof-addr",
)
"""Every flag of Stakater Reloader v1.4.21 (``internal/pkg/util/util.go``): 29 of them."""

STAKATER_VARIABLES = (
    "KUBERNETES_NAMESPACE",
    "POD_NAME",
    "POD_NAMESPACE",
    "RELOADER_NAMESPACE",
    "RELOADER_DEPLOYMENT_NAME",
    "METRICS_COUNT_BY_NAMESPACE",
    "ALERT_ON_RELOAD",
    "ALERT_WEBHOOK_URL",
    "ALERT_SINK",
    "ALERT_WEBHOOK_PROXY",
    "ALERT_ADDITIONAL_INFO",
    "KUBECONFIG",
)
"""Every environment variable the Stakater binary reads (besides Go's own)."""

STAKATER_ANNOTATIONS = (
    "secretproviderclass.reloader.stakater.com/auto",
    "secretproviderclass.reloader.stakater.com/reload",
    "secretproviderclasses.exclude.reloader.stakater.com/reload",
    "reloader.stakater.com/last-reloaded-from",
    "reloader.stakater.com/meta-info",
)
"""Stakater annotations that ``AnnotationNames`` does not hold (unsupported, or written only)."""


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def mentions(text: str, token: str) -> bool:
    """``token`` appears as a whole: ``--namespaces`` is not found in ``--namespaces-to-ignore``."""
    return re.search(rf"(?<![\w-]){re.escape(token)}(?![\w-])", text) is not None


def settings_block(document: str) -> tuple[int, int] | None:
    start, end = document.find(TABLE_START), document.find(TABLE_END)
    if start < 0 or end < start:
        return None
    return start, end + len(TABLE_END)


# --- the generated settings table -----------------------------------------------------------


def test_settings_table_in_the_configuration_doc_is_the_generated_one() -> None:
    document = read(CONFIGURATION)
    span = settings_block(document)
    expected = render_block()
    assert span is not None, (
        f"docs/configuration.md has no settings table between the markers; add:\n\n{expected}\n"
    )
    found = document[span[0] : span[1]]
    assert found == expected, (
        "docs/configuration.md's settings table differs from reloader/settings.py. Replace it "
        f"with the output of `python -m reloader.settings_doc`:\n\n{expected}\n"
    )


def test_generated_table_has_one_row_per_setting() -> None:
    rows = render_table().splitlines()[2:]
    assert len(rows) == len(Settings.model_fields)


@pytest.mark.parametrize("name", list(Settings.model_fields))
def test_each_documented_flag_is_one_the_parser_accepts(name: str) -> None:
    flag = flag_name(name, Settings.model_fields[name])
    parsed, unknown = build_parser().parse_known_args([f"{flag}=x"])
    assert unknown == [], f"{flag} is not a flag of `reloader`"
    assert vars(parsed) in ({name: "x"}, {name: ["x"]}), f"{flag} does not set {name}"


# --- every flag, variable and annotation is documented ------------------------------------------


def prose_without_the_table() -> str:
    """What a reader sees besides the generated table: its rows do not count as explanation."""
    document = read(CONFIGURATION)
    span = settings_block(document)
    if span is not None:
        document = document[: span[0]] + document[span[1] :]
    return document + read(COMPATIBILITY)


@pytest.mark.parametrize("name", list(Settings.model_fields))
def test_every_setting_is_explained_outside_the_generated_table(name: str) -> None:
    flag = flag_name(name, Settings.model_fields[name])
    assert mentions(prose_without_the_table(), flag), (
        f"{flag} appears only in the generated table: say what it is for in "
        "docs/configuration.md or docs/stakater-compatibility.md"
    )


@pytest.mark.parametrize("flag", STAKATER_FLAGS)
def test_every_stakater_flag_is_in_the_compatibility_doc(flag: str) -> None:
    assert mentions(read(COMPATIBILITY), f"`{flag}`"), f"{flag} missing from the flags table"


def test_the_stakater_flag_list_is_complete() -> None:
    assert len(set(STAKATER_FLAGS)) == 29


@pytest.mark.parametrize("variable", STAKATER_VARIABLES)
def test_every_stakater_variable_is_in_the_compatibility_doc(variable: str) -> None:
    assert mentions(read(COMPATIBILITY), variable), f"{variable} missing"


def annotation_defaults() -> list[str]:
    return [str(field.default) for field in dataclasses.fields(AnnotationNames)]


@pytest.mark.parametrize("key", annotation_defaults() + list(STAKATER_ANNOTATIONS))
def test_every_stakater_annotation_is_in_the_compatibility_doc(key: str) -> None:
    assert f"`{key}`" in read(COMPATIBILITY), f"{key} missing from the annotations table"


# --- metric names ----------------------------------------------------------------------------


def exposed_metric_names() -> set[str]:
    """The series names a scrape shows, for every metric the controller defines."""
    metrics = Metrics(by_namespace=True)
    metrics.attach(
        Sources(
            informers=lambda: [InformerStatistics("ConfigMap", 1, True, 0, 0, 0, 0.0)],
            queue_depth=lambda: (0, 0, 0),
            api=lambda: ApiStatistics(requests={("GET", "200"): 1}),
        )
    )
    names = set()
    for family in metrics.registry.collect():
        names.add(f"{family.name}_total" if family.type == "counter" else family.name)
    return names


def metrics_section(document: str) -> str:
    match = re.search(r"^## Metrics\n(.*?)(?=^## )", document, flags=re.MULTILINE | re.DOTALL)
    assert match is not None, "docs/stakater-compatibility.md has no '## Metrics' section"
    return match.group(1)


def our_column() -> Iterator[str]:
    """The metric names in the 'Ours' column of the metrics table."""
    for line in metrics_section(read(COMPATIBILITY)).splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[1].startswith("`"):
            yield from (name.split("{")[0] for name in re.findall(r"`([^`]+)`", cells[1]))


def test_every_metric_the_doc_claims_is_exposed() -> None:
    claimed = set(our_column())
    assert claimed, "the metrics table has no 'Ours' column entries"
    assert claimed <= exposed_metric_names(), claimed - exposed_metric_names()


def test_every_exposed_metric_is_in_the_doc() -> None:
    section = metrics_section(read(COMPATIBILITY))
    named = {name.split("{")[0] for name in re.findall(r"`([^`]+)`", section)}
    missing = sorted(exposed_metric_names() - named)
    assert not missing, f"add these to the metrics table of stakater-compatibility.md: {missing}"


def metrics_doc_rows() -> set[str]:
    """The metric named in the first cell of each table row of docs/metrics.md."""
    rows = re.findall(r"^\| `([a-z_:]+)` \|", read(METRICS), flags=re.MULTILINE)
    return set(rows)


def test_every_exposed_metric_has_a_row_in_the_metrics_doc() -> None:
    missing = sorted(exposed_metric_names() - metrics_doc_rows())
    assert not missing, f"add a row (type, labels, meaning) to docs/metrics.md for: {missing}"


def test_every_metric_the_metrics_doc_describes_is_exposed() -> None:
    stale = sorted(metrics_doc_rows() - exposed_metric_names())
    assert not stale, f"docs/metrics.md describes metrics the controller does not expose: {stale}"


# --- links -----------------------------------------------------------------------------------


LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    in_code = False
    for line in read(path).splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        base = slug(line.lstrip("#"))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def local_links(path: Path) -> Iterator[tuple[str, Path, str]]:
    for target in LINK.findall(read(path)):
        if re.match(r"^[a-z]+:", target):
            continue  # http(s), mailto
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        yield target, resolved, anchor


def test_readme_links_every_doc_it_names_to_an_existing_file() -> None:
    docs_links = [
        (target, resolved)
        for target, resolved, _ in local_links(ROOT / "README.md")
        if target.startswith("docs/")
    ]
    assert docs_links, "the README links no docs"
    missing = [target for target, resolved in docs_links if not resolved.is_file()]
    assert not missing, f"README links to missing files: {missing}"


def anchor_resolves(path: Path, anchor: str) -> bool:
    return not anchor or path.suffix != ".md" or anchor in anchors(path)


@pytest.mark.parametrize("path", OUR_DOCUMENTS, ids=lambda p: p.name)
def test_local_links_and_anchors_resolve(path: Path) -> None:
    broken = [
        target
        for target, resolved, anchor in local_links(path)
        if not resolved.exists() or not anchor_resolves(resolved, anchor)
    ]
    assert not broken, f"broken links in {path.relative_to(ROOT)}: {broken}"


# --- the test table ----------------------------------------------------------------------------


def test_testing_doc_lists_every_test_file() -> None:
    document = read(TESTING)
    files = sorted(path.relative_to(ROOT).as_posix() for path in ROOT.glob("tests/test_*.py"))
    missing = [name for name in files if f"`{name}`" not in document]
    assert not missing, f"add these to the table in docs/testing.md: {missing}"
