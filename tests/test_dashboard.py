"""The Grafana dashboard and the alert examples query only metrics a real controller serves.

A dashboard panel whose metric was renamed or never existed draws "No data" forever and nobody
notices, so every PromQL expression in ``dashboards/reloader.json`` (panels and template
variables), and in the alert rules and example queries of ``docs/metrics.md``, is checked against
the ``/metrics`` page of a controller running against the API server, after it has restarted a
workload. Names are read from the page's ``# TYPE`` lines and samples, so a labelled metric nothing
has touched yet still counts, and a histogram's ``_bucket``, ``_sum`` and ``_count`` series map to
its family.
"""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from reloader.http import bound_port, build_app, serve
from tests.scenario import Cluster, container, deployment

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "dashboards" / "reloader.json"
METRICS_DOC = ROOT / "docs" / "metrics.md"

PANEL_METRICS = (
    "reloader_reload_executed_total",
    "reloader_action_latency_seconds_bucket",
    "reloader_workqueue_depth",
    "reloader_workqueue_waiting",
    "reloader_workqueue_in_flight",
    "reloader_watch_relists_total",
    "reloader_watch_restarts_total",
    "reloader_cached_objects",
    "reloader_errors_total",
    "reloader_api_requests_total",
    "reloader_records_total",
    "reloader_record_resets_total",
    "reloader_restarts_deferred_total",
    "reloader_is_leader",
)
"""What issue 13 asks the dashboard to show: reloads by result, latency quantiles, the queue,
watches, caches, errors, API codes, records and resets, deferrals, the leader."""

# --- reading PromQL ---------------------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GRAFANA_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+")
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.:])[A-Za-z_:][\w:]*")
_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "inf", "nan"}
    | {"group_left", "group_right", "atan2"}
)


def metric_names(expression: str) -> set[str]:
    """The metric names an expression selects: identifiers outside label matchers, ranges,
    strings and grouping clauses that are neither a function call nor a keyword."""
    text = _STRING.sub('""', expression)
    text = _GRAFANA_VARIABLE.sub(" ", text)
    for pattern in (_MATCHERS, _RANGE, _GROUPING):
        text = pattern.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        called = text[match.end() :].lstrip().startswith("(")
        if not called and match.group().lower() not in _KEYWORDS:
            names.add(match.group())
    return names


def variable_metric_names(query: str) -> set[str]:
    """A template variable's query: ``label_values(selector, label)`` selects a metric, and its
    second argument is a label, not a metric."""
    label_values = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", query)
    if label_values:
        return metric_names(label_values.group(1))
    return metric_names(re.sub(r"^\s*query_result\((.*)\)\s*$", r"\1", query))


def test_metric_names_reads_selectors_not_labels_functions_or_variables() -> None:
    expression = (
        'histogram_quantile(0.9, sum by (le, kind) (rate(a_bucket{job=~"$job", x="y z"}'
        "[$__rate_interval]))) / on (kind) group_left sum(b_total offset 5m) > bool 1e3"
        ' and c{l="d_total"} unless max(d) without (pod)'
    )
    assert metric_names(expression) == {"a_bucket", "b_total", "c", "d"}
    assert variable_metric_names("label_values(reloader_workqueue_depth, job)") == {
        "reloader_workqueue_depth"
    }


# --- the dashboard's own shape --------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return document


def panels(document: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, also those nested in collapsed rows."""
    for panel in document.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def panel_expressions(document: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(panel title, PromQL) for every query target."""
    for panel in panels(document):
        for target in panel.get("targets", []):
            yield panel.get("title", "?"), target["expr"]


def variable_queries(document: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for variable in document["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            yield variable["name"], query["query"] if isinstance(query, dict) else query


def test_dashboard_is_a_grafana_dashboard_with_a_datasource_variable() -> None:
    document = dashboard()
    assert document["schemaVersion"] >= 36
    assert document["uid"] and document["title"]
    variables = {v["name"]: v for v in document["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in panels(document)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_every_query_uses_the_datasource_variable() -> None:
    """A hard-coded datasource uid works only in the Grafana it was exported from."""
    document = dashboard()
    wanted = {"type": "prometheus", "uid": "${datasource}"}
    for panel in panels(document):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == wanted, panel["title"]
        assert panel["targets"], f"{panel['title']} has no query"
        assert all(target["datasource"] == wanted for target in panel["targets"]), panel["title"]


def test_panels_do_not_overlap() -> None:
    taken: set[tuple[int, int]] = set()
    for panel in panels(dashboard()):
        box = panel["gridPos"]
        assert box["x"] + box["w"] <= 24, panel["title"]
        cells = {(box["x"] + dx, box["y"] + dy) for dx in range(box["w"]) for dy in range(box["h"])}
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells


def test_dashboard_shows_what_the_issue_asks_for() -> None:
    used = set().union(*(metric_names(expr) for _, expr in panel_expressions(dashboard())))
    missing = [name for name in PANEL_METRICS if name not in used]
    assert not missing, f"no panel queries {missing}"
    quantiles = [e for _, e in panel_expressions(dashboard()) if "histogram_quantile" in e]
    assert any("reloader_action_latency_seconds_bucket" in e for e in quantiles)


# --- the alert rules in docs/metrics.md -------------------------------------------------------


def alert_expressions() -> list[tuple[str, str]]:
    """(alert name, expr) from every YAML block of docs/metrics.md that holds rule groups."""
    blocks = re.findall(r"^```yaml\n(.*?)^```", METRICS_DOC.read_text(), re.MULTILINE | re.DOTALL)
    found = []
    for block in blocks:
        document = yaml.safe_load(block)
        groups = document.get("spec", document).get("groups", []) if document else []
        for group in groups:
            found += [(rule["alert"], str(rule["expr"])) for rule in group["rules"]]
    return found


def doc_queries() -> list[str]:
    """Each query line of the ``promql`` blocks of docs/metrics.md (comments skipped)."""
    text = METRICS_DOC.read_text()
    blocks = re.findall(r"^```promql\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    lines = (line.strip() for block in blocks for line in block.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def test_metrics_doc_has_the_alerts_the_issue_asks_for() -> None:
    names = " ".join(expr for _, expr in alert_expressions())
    for metric in (
        "reloader_reload_executed_total",
        "reloader_watch_relists_total",
        "reloader_workqueue_latency_seconds_bucket",
    ):
        assert metric in names, f"no example alert on {metric}"


# --- against a real controller's /metrics -----------------------------------------------------


def series_names(exposition: str) -> set[str]:
    """Every name a PromQL selector can use against this page.

    ``# TYPE`` lines name each family as it is exposed (a counter with ``_total``), so a labelled
    metric without samples yet still counts; a histogram's family name is not a series itself.
    """
    names: set[str] = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count", f"{name}_created"}
            elif kind == "summary":
                names |= {name, f"{name}_sum", f"{name}_count", f"{name}_created"}
            else:
                names.add(name)
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names


def test_series_names_map_histograms_to_their_series() -> None:
    page = (
        "# TYPE h_seconds histogram\n# TYPE c_total counter\nc_total 1.0\n"
        '# TYPE g gauge\ng{a="b"} 2.0\n'
    )
    expected = {"h_seconds_bucket", "h_seconds_sum", "h_seconds_count", "h_seconds_created"}
    assert series_names(page) == expected | {"c_total", "g"}


async def scrape_after_a_restart(scene: Cluster) -> str:
    """A controller that has restarted one Deployment for a Secret rotation, scraped over HTTP
    exactly as Prometheus would (``--metrics-count-by-namespace`` on, so every family is there)."""
    await scene.create_secret("db", {"password": "one"})
    env = [{"name": "P", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}}]
    annotations = {"reloader.stakater.com/auto": "true"}
    await scene.create_workload(
        deployment("api", annotations=annotations, containers=[container(env=env)])
    )
    controller = await scene.start_controller(metrics_count_by_namespace=True)
    await scene.wait_recorded("api")
    before = await scene.marker("Deployment", "api")
    await scene.set_secret("db", {"password": "two"})
    await scene.wait_marker("Deployment", "api", other_than=before)
    app = build_app(
        registry=controller.metrics.registry,
        healthy=lambda: (True, "ok"),
        ready=controller.ready,
    )
    runner = await serve(app, host="127.0.0.1", port=0)
    try:
        url = f"http://127.0.0.1:{bound_port(runner)}/metrics"
        return await _get(url)
    finally:
        await runner.cleanup()


async def _get(url: str) -> str:
    def fetch() -> str:
        with urllib.request.urlopen(url, timeout=10) as response:
            return str(response.read().decode())

    return await asyncio.to_thread(fetch)


@pytest.mark.cluster
async def test_every_expression_names_a_metric_the_controller_serves(scene: Cluster) -> None:
    page = await scrape_after_a_restart(scene)
    served = series_names(page)
    assert "reloader_action_latency_seconds_bucket" in page, "the restart left no latency sample"
    document = dashboard()
    queries = [
        *(
            ("panel " + title, expr, metric_names(expr))
            for title, expr in panel_expressions(document)
        ),
        *(("variable " + n, q, variable_metric_names(q)) for n, q in variable_queries(document)),
        *(("alert " + name, expr, metric_names(expr)) for name, expr in alert_expressions()),
        *(("query in metrics.md", expr, metric_names(expr)) for expr in doc_queries()),
    ]
    assert len([q for q in queries if q[0] == "query in metrics.md"]) >= 4
    unknown = [(where, sorted(names - served)) for where, _, names in queries if names - served]
    assert not unknown, f"expressions name metrics /metrics does not serve: {unknown}"
    assert all(names for _, _, names in queries), "an expression selects no metric at all"
