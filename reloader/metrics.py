"""Every metric, on a private registry; Stakater's names kept so existing dashboards work.

Counters are incremented where an outcome is decided (restart.py); gauges are read at scrape time
from the ``statistics()`` of the queue, the informers and the API client, so the hot path does no
bookkeeping for them. No label ever carries a config value.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from reloader.kube import ApiStatistics
from reloader.watch import InformerStatistics

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@dataclass(frozen=True, slots=True)
class Sources:
    """Callables the scrape-time collector reads; app.py wires them."""

    informers: Callable[[], Iterable[InformerStatistics]]
    queue_depth: Callable[[], tuple[int, int, int]]
    api: Callable[[], ApiStatistics]


class _LiveCollector(Collector):
    def __init__(self, sources: Sources) -> None:
        self._sources = sources

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        objects = GaugeMetricFamily(
            "reloader_cached_objects", "Objects cached, by kind.", labels=["kind"]
        )
        relists = CounterMetricFamily(
            "reloader_watch_relists", "Relists after an expired watch, by kind.", labels=["kind"]
        )
        restarts = CounterMetricFamily(
            "reloader_watch_restarts", "Watch reconnects after an error, by kind.", labels=["kind"]
        )
        for stats in self._sources.informers():
            objects.add_metric([stats.kind], stats.objects)
            relists.add_metric([stats.kind], stats.relists)
            restarts.add_metric([stats.kind], stats.restarts)
        yield from (objects, relists, restarts)
        ready, waiting, processing = self._sources.queue_depth()
        depth = GaugeMetricFamily("reloader_workqueue_depth", "Workloads ready to be processed.")
        depth.add_metric([], ready)
        yield depth
        delayed = GaugeMetricFamily(
            "reloader_workqueue_waiting", "Workloads waiting (debounce/retry)."
        )
        delayed.add_metric([], waiting)
        yield delayed
        busy = GaugeMetricFamily("reloader_workqueue_in_flight", "Workloads being processed.")
        busy.add_metric([], processing)
        yield busy
        requests = CounterMetricFamily(
            "reloader_api_requests", "Requests sent to the API server.", labels=["method", "code"]
        )
        for (method, code), count in self._sources.api().requests.items():
            requests.add_metric([method, code], count)
        yield requests


class _ByNamespaceCollector(Collector):
    """Stakater's ``reloader_reload_executed_total_by_namespace``, under its exact series name.

    prometheus_client would append ``_total`` to a Counter of that name, so the series is emitted
    as an untyped metric with the name dashboards already query.
    """

    NAME = "reloader_reload_executed_total_by_namespace"

    def __init__(self, counts: collections.Counter[tuple[str, str]]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[Metric]:
        metric = Metric(
            self.NAME, "Workload restarts attempted, by success and namespace.", "unknown"
        )
        for (success, namespace), count in sorted(self._counts.items()):
            metric.add_sample(self.NAME, {"success": success, "namespace": namespace}, count)
        yield metric


class Metrics:
    """The metric objects the code records into; one instance per process (or per test)."""

    def __init__(self, *, by_namespace: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.reload_executed = Counter(
            "reloader_reload_executed",
            "Workload restarts attempted, by success.",
            ["success"],
            registry=r,
        )
        for success in ("true", "false"):
            self.reload_executed.labels(success=success)
        self.by_namespace = by_namespace
        self._by_namespace: collections.Counter[tuple[str, str]] = collections.Counter()
        if by_namespace:
            r.register(_ByNamespaceCollector(self._by_namespace))
        self.action_total = Counter(
            "reloader_action",
            "Restarts by workload kind and result.",
            ["workload_kind", "result"],
            registry=r,
        )
        self.action_latency = Histogram(
            "reloader_action_latency_seconds",
            "From the config change being seen to the workload patch being accepted.",
            ["workload_kind"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_latency = Histogram(
            "reloader_workqueue_latency_seconds",
            "Time a ready workload waited for a worker.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.records = Counter(
            "reloader_records", "Digest records written without a restart.", registry=r
        )
        self.record_resets = Counter(
            "reloader_record_resets",
            "Records found on a workload but not used, re-made without a restart, by reason: "
            "format (older controller), uid (object re-created), template (pod template edited), "
            "stale (a record older than the last restart put back), digest_key (key rotated).",
            ["reason"],
            registry=r,
        )
        self.restarts_deferred = Counter(
            "reloader_restarts_deferred",
            "Restarts held back by the per-workload interval or the global restart rate.",
            registry=r,
        )
        self.events_dropped = Counter(
            "reloader_events_dropped",
            "Kubernetes Events not written, by reason: spam (over the object's budget), "
            "queue_full, write_failed, shutdown (not flushed in time).",
            ["reason"],
            registry=r,
        )
        for reason in ("spam", "queue_full", "write_failed", "shutdown"):
            self.events_dropped.labels(reason=reason)
        self.notifications = Counter(
            "reloader_notifications",
            "Webhook (--webhook-url) and alert POSTs, by target and result (sent, failed, "
            "dropped: the alert queue was full). No label names a URL.",
            ["target", "result"],
            registry=r,
        )
        self.is_leader = Gauge(
            "reloader_is_leader",
            "1 while this replica may write (it holds the leader Lease, or --enable-ha is off), "
            "else 0; identity is its name in the Lease.",
            ["identity"],
            registry=r,
        )
        self.retries = Counter("reloader_retries", "Writes retried through the queue.", registry=r)
        self.errors = Counter("reloader_errors", "Errors by type.", ["type"], registry=r)
        self.events_received = Counter(
            "reloader_events_received",
            "Changes seen by the informers: event_type add, update or delete; resource_type "
            "configmaps, secrets or namespaces (Stakater's labels and values).",
            ["event_type", "resource_type"],
            registry=r,
        )
        # Stakater serves the default Go registry, whose process_* series dashboards use.
        ProcessCollector(registry=r)

    def count_event(self, *, old: object | None, new: object | None, resource_type: str) -> None:
        """One informer notification, named as Stakater names its informer callbacks."""
        event_type = "add" if old is None else "delete" if new is None else "update"
        self.events_received.labels(event_type=event_type, resource_type=resource_type).inc()

    def attach(self, sources: Sources) -> None:
        self.registry.register(_LiveCollector(sources))

    def count_reload(self, *, namespace: str, success: bool) -> None:
        flag = "true" if success else "false"
        self.reload_executed.labels(success=flag).inc()
        if self.by_namespace:
            self._by_namespace[(flag, namespace)] += 1
