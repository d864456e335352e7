"""The transforms keep what decisions need and nothing of a config's values."""

from __future__ import annotations

import base64
import pickle
from typing import Any

from reloader.annotations import AnnotationNames
from reloader.digests import DigestKey, digest_items
from reloader.model import KINDS, ConfigRef
from reloader.snapshots import SnapshotContext, config_snapshot, workload_snapshot

CONTEXT = SnapshotContext(
    digest_key=DigestKey.from_secret(b"0123456789abcdef0123"),
    names=AnnotationNames(),
    auto_reload_all=False,
)
VALUE = "s3cr3t-p4ssw0rd-value"


def secret(value: str = VALUE, **metadata: Any) -> dict[str, Any]:
    encoded = base64.b64encode(value.encode()).decode()
    return {
        "metadata": {"name": "db", "namespace": "ns", **metadata},
        "data": {"password": encoded},
    }


def test_a_secret_snapshot_holds_no_value_in_any_form() -> None:
    snapshot = config_snapshot("Secret", secret(), context=CONTEXT)  # type: ignore[arg-type]
    dumped = pickle.dumps(snapshot) + repr(snapshot).encode()
    encoded = base64.b64encode(VALUE.encode())

    assert VALUE.encode() not in dumped
    assert encoded not in dumped
    assert list(digest_items(snapshot.digests)) == ["password"]


def test_config_flags_and_equality() -> None:
    annotations = {"reloader.stakater.com/match": "true", "reloader.stakater.com/ignore": "true"}
    marked = config_snapshot("Secret", secret(annotations=annotations), context=CONTEXT)  # type: ignore[arg-type]
    relabelled = config_snapshot("Secret", secret(labels={"x": "y"}), context=CONTEXT)  # type: ignore[arg-type]
    plain = config_snapshot("Secret", secret(), context=CONTEXT)  # type: ignore[arg-type]

    assert marked.match and marked.ignore
    assert relabelled == plain, "a label-only change must compare equal (no work)"
    assert config_snapshot("Secret", secret("other"), context=CONTEXT) != plain  # type: ignore[arg-type]


def deployment(annotations: dict[str, str], **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "web", "namespace": "ns", "annotations": annotations},
        "spec": {
            "template": {
                "spec": {
                    "containers": [
                        {"name": "app", "envFrom": [{"configMapRef": {"name": "cfg"}}]},
                        {"name": "sidecar"},
                    ]
                }
            },
            **spec,
        },
    }


def test_workload_snapshot_of_an_opted_in_deployment() -> None:
    annotations = {
        "reloader.stakater.com/auto": "true",
        "deployment.reloader.stakater.com/paused-at": "2026-01-02T03:04:05Z",
    }
    snap = workload_snapshot(
        KINDS["Deployment"], deployment(annotations, paused=True), context=CONTEXT
    )  # type: ignore[arg-type]

    assert snap.policy.opted_in
    assert snap.references == frozenset({ConfigRef("ConfigMap", "cfg", None, frozenset({"app"}))})
    assert snap.containers == ("app", "sidecar")
    assert snap.paused
    assert snap.paused_at == 1767323045.0


def test_workload_that_does_not_opt_in_keeps_no_references() -> None:
    snap = workload_snapshot(KINDS["Deployment"], deployment({}), context=CONTEXT)  # type: ignore[arg-type]
    assert not snap.policy.opted_in
    assert snap.references == frozenset()


def test_cronjob_template_is_found_under_the_job_template() -> None:
    body = deployment({"reloader.stakater.com/auto": "true"})
    cron = {**body, "spec": {"jobTemplate": {"spec": {"template": body["spec"]["template"]}}}}
    snap = workload_snapshot(KINDS["CronJob"], cron, context=CONTEXT)  # type: ignore[arg-type]
    assert {ref.name for ref in snap.references} == {"cfg"}
