"""The transforms keep what decisions need and nothing of a config's values."""

from __future__ import annotations

import base64
import pickle
from dataclasses import replace
from typing import Any, cast

import pytest

from reloader.annotations import AnnotationNames
from reloader.digests import DigestKey, Recorded, digest_items, encode_record
from reloader.model import KINDS, RECORD_ANNOTATION, UNREAD_ANNOTATIONS, ConfigRef, RawObject
from reloader.snapshots import (
    SnapshotContext,
    bind_record,
    config_snapshot,
    pack_config,
    refreshed_workload,
    template_hash,
    unpacker,
    workload_snapshot,
)

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


@pytest.mark.parametrize(
    "annotations",
    [
        {},
        {"reloader.stakater.com/match": "true"},
        {"reloader.stakater.com/ignore": "true"},
        {"reloader.stakater.com/match": "true", "reloader.stakater.com/ignore": "true"},
    ],
)
def test_a_packed_config_unpacks_to_the_same_snapshot(annotations: dict[str, str]) -> None:
    snapshot = config_snapshot("Secret", secret(annotations=annotations), context=CONTEXT)  # type: ignore[arg-type]

    packed = pack_config(snapshot)

    assert unpacker("Secret")("ns", "db", packed) == snapshot
    assert VALUE.encode() not in pickle.dumps(packed)


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
    body = cast(RawObject, deployment(annotations, paused=True))
    snap = workload_snapshot(KINDS["Deployment"], body, context=CONTEXT)

    assert snap.policy.opted_in
    assert snap.references == (ConfigRef("ConfigMap", "cfg", None, ("app",)),)
    assert snap.containers == ("app", "sidecar")
    assert snap.paused
    assert snap.paused_at == 1767323045.0


def test_workload_that_does_not_opt_in_keeps_no_references() -> None:
    snap = workload_snapshot(KINDS["Deployment"], deployment({}), context=CONTEXT)  # type: ignore[arg-type]
    assert not snap.policy.opted_in
    assert snap.references == ()


def test_cronjob_template_is_found_under_the_job_template() -> None:
    body = deployment({"reloader.stakater.com/auto": "true"})
    cron = {**body, "spec": {"jobTemplate": {"spec": {"template": body["spec"]["template"]}}}}
    snap = workload_snapshot(KINDS["CronJob"], cron, context=CONTEXT)  # type: ignore[arg-type]
    assert {ref.name for ref in snap.references} == {"cfg"}


def template(env: list[dict[str, Any]] | None = None, /, **annotations: str) -> dict[str, Any]:
    app: dict[str, Any] = {"name": "app", "envFrom": [{"configMapRef": {"name": "cfg"}}]}
    if env is not None:
        app["env"] = env
    return {"metadata": {"annotations": annotations}, "spec": {"containers": [app]}}


def test_template_hash_ignores_what_a_restart_writes() -> None:
    plain = template_hash(template())
    marked = template(**{"reloader.stakater.com/last-reloaded-from": '{"hash":"x"}'})
    env_restarted = template([{"name": "STAKATER_CFG_CONFIGMAP", "value": "d"}])
    job_labels = template()
    job_labels["metadata"]["labels"] = {"batch.kubernetes.io/controller-uid": "u", "job-name": "j"}

    assert template_hash(marked) == plain
    assert template_hash(env_restarted) == plain
    assert template_hash(job_labels) == plain


def test_template_hash_sees_a_user_edit() -> None:
    key_ref = template()
    key_ref["spec"]["containers"][0] = {
        "name": "app",
        "env": [{"name": "A", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "a"}}}],
    }
    restarted_by_kubectl = template(**{"kubectl.kubernetes.io/restartedAt": "now"})

    assert template_hash(key_ref) != template_hash(template())
    assert template_hash(restarted_by_kubectl) != template_hash(template())
    assert template_hash(template([{"name": "MINE", "value": "1"}])) != template_hash(template())


BOUND = Recorded.of("k", {"ConfigMap/cfg": "d"}, uid="u-1", template="t-1")


@pytest.mark.parametrize(
    ("found", "uid", "reset"),
    [
        pytest.param(BOUND, "u-1", None, id="belongs"),
        pytest.param(BOUND, "", None, id="job-bound-by-template-only"),
        pytest.param(replace(BOUND, uid=""), "u-1", None, id="written-for-a-recreated-job"),
        pytest.param(replace(BOUND, uid="u-0"), "u-1", "uid", id="object-re-created"),
        pytest.param(replace(BOUND, template="t-0"), "u-1", "template", id="template-edited"),
        pytest.param(replace(BOUND, version=1), "u-1", "format", id="older-format"),
        pytest.param(None, "u-1", None, id="none"),
    ],
)
def test_a_record_is_used_only_on_its_own_object_and_template(
    found: Recorded | None, uid: str, reset: str | None
) -> None:
    bound = bind_record(found, uid=uid, template="t-1", marker_time=None, opted_in=True)
    assert bound is not None and (bound.uid, bound.template) == (uid, "t-1")
    assert bound.usable == (found is not None and reset is None)
    assert bound.reset == reset


def test_no_record_is_kept_for_a_workload_that_does_not_opt_in() -> None:
    assert bind_record(None, uid="u", template="t", marker_time=None, opted_in=False) is None


@pytest.mark.parametrize(
    ("restarted_at", "marker_time", "reset"),
    [
        pytest.param(100, 100.0, None, id="made-with-the-last-restart"),
        pytest.param(160, 100.0, None, id="restarted-since-by-env-vars"),
        pytest.param(None, None, None, id="never-restarted"),
        pytest.param(40, 100.0, "stale", id="older-than-the-last-restart"),
        pytest.param(None, 100.0, "stale", id="made-before-any-restart"),
    ],
)
def test_a_record_older_than_the_restart_marker_is_stale(
    restarted_at: int | None, marker_time: float | None, reset: str | None
) -> None:
    found = replace(BOUND, restarted_at=restarted_at)
    bound = bind_record(found, uid="u-1", template="t-1", marker_time=marker_time, opted_in=True)
    assert bound is not None and bound.reset == reset


def test_a_first_record_starts_from_the_marker_time() -> None:
    """A workload Stakater restarted: the marker's time is its last restart, not a stale sign."""
    bound = bind_record(None, uid="u", template="t", marker_time=99.5, opted_in=True)
    assert bound == Recorded.nothing(uid="u", template="t", restarted_at=99)


def test_a_record_copied_onto_a_re_created_deployment_is_set_aside() -> None:
    body = deployment({"reloader.stakater.com/auto": "true"})
    body["metadata"]["uid"] = "old-uid"
    first = workload_snapshot(KINDS["Deployment"], body, context=CONTEXT)  # type: ignore[arg-type]
    assert first.recorded is not None
    made = Recorded.of("k", {"ConfigMap/cfg": "d"}, uid="old-uid", template=first.recorded.template)
    body["metadata"]["annotations"][RECORD_ANNOTATION] = encode_record(made)
    assert workload_snapshot(KINDS["Deployment"], body, context=CONTEXT).recorded == made  # type: ignore[arg-type]

    body["metadata"]["uid"] = "new-uid"
    copied = workload_snapshot(KINDS["Deployment"], body, context=CONTEXT)  # type: ignore[arg-type]

    assert copied.recorded is not None and copied.recorded.reset == "uid"
    assert copied != first, "a re-created object must be looked at again"


def served(annotations: dict[str, str], *, generation: Any = 3, **metadata: Any) -> dict[str, Any]:
    """A Deployment as the server sends it: uid, generation, resourceVersion, status."""
    body = deployment(annotations)
    body["metadata"].update({"uid": "u-1", "resourceVersion": "100", **metadata})
    if generation is not None:
        body["metadata"]["generation"] = generation
    body["status"] = {"observedGeneration": 2, "replicas": 0}
    return body


def test_a_status_update_refreshes_the_snapshot_without_reading_it_again() -> None:
    """Same uid, generation and annotations: the stored snapshot with the new resourceVersion
    (the guarded patches need it). Labels and status are not read."""
    auto = {"reloader.stakater.com/auto": "true"}
    old = workload_snapshot(KINDS["Deployment"], served(auto), context=CONTEXT)  # type: ignore[arg-type]
    update = served(auto, resourceVersion="101", labels={"x": "y"})
    update["status"] = {"observedGeneration": 3, "replicas": 1}
    refreshed = refreshed_workload(old, update)  # type: ignore[arg-type]
    assert refreshed is not None and refreshed.resource_version == "101"
    assert refreshed == old == workload_snapshot(KINDS["Deployment"], update, context=CONTEXT)  # type: ignore[arg-type]
    assert refreshed_workload(old, served(auto)) is old  # type: ignore[arg-type]


@pytest.mark.parametrize("written", sorted(UNREAD_ANNOTATIONS))
def test_annotations_kubernetes_writes_and_no_snapshot_reads_refresh_it(written: str) -> None:
    """The Deployment controller's revision after a rollout, kubectl's applied manifest: the
    snapshot is refreshed, and equal to the one a whole read makes."""
    auto = {"reloader.stakater.com/auto": "true"}
    old = workload_snapshot(KINDS["Deployment"], served(auto), context=CONTEXT)  # type: ignore[arg-type]
    update = served({**auto, written: "2"}, resourceVersion="101")
    refreshed = refreshed_workload(old, update)  # type: ignore[arg-type]
    assert refreshed is not None and refreshed.resource_version == "101"
    assert refreshed == workload_snapshot(KINDS["Deployment"], update, context=CONTEXT)  # type: ignore[arg-type]
    changed = served({**auto, written: "2", "reloader.stakater.com/search": "true"})
    assert refreshed_workload(refreshed, changed) is None, "other annotations still count"  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "changed",
    [
        {"generation": 4},  # the spec changed: the pod template, paused, anything
        {"annotations": {"reloader.stakater.com/auto": "false"}},
        {"annotations": {"reloader.stakater.com/auto": "true", RECORD_ANNOTATION: "{}"}},
        {"uid": "u-2"},  # deleted and created again under the same name
        {"generation": None},  # no generation: nothing is assumed
        {"generation": 2**70},  # past 64 bits: read whole
    ],
)
def test_any_change_a_snapshot_is_made_of_reads_the_object_whole(changed: dict[str, Any]) -> None:
    auto = {"reloader.stakater.com/auto": "true"}
    old = workload_snapshot(KINDS["Deployment"], served(auto), context=CONTEXT)  # type: ignore[arg-type]
    annotations = changed.pop("annotations", auto)
    assert refreshed_workload(old, served(annotations, **changed)) is None  # type: ignore[arg-type]


def test_a_snapshot_made_without_a_generation_is_never_refreshed() -> None:
    old = workload_snapshot(KINDS["Deployment"], served({}, generation=None), context=CONTEXT)  # type: ignore[arg-type]
    assert old.fingerprint == b""
    assert refreshed_workload(old, served({}, generation=None)) is None  # type: ignore[arg-type]
