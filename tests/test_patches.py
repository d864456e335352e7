"""What reaches the server for each kind and strategy (pure functions of patches.py)."""

from __future__ import annotations

from typing import Any, cast

import orjson
import pytest

from reloader.annotations import Policy
from reloader.decide import Decision, Dependency
from reloader.digests import Recorded, encode_record
from reloader.model import LAST_RELOADED_FROM, RECORD_ANNOTATION, RawObject, WorkloadKey
from reloader.patches import (
    INSTANTIATE_ANNOTATION,
    JOB_NAME_MAX,
    PENDING_JOB_LABEL,
    RECREATED_FROM_ANNOTATION,
    env_var_name,
    job_from_cronjob,
    pending_job,
    pending_job_configmap,
    recreated_job,
    restart_at_patch,
    restart_patch,
    template_change,
    unpause_patch,
)
from reloader.snapshots import WorkloadSnapshot

NOW = 1_700_000_000.0
PAUSED_AT = "deployment.reloader.stakater.com/paused-at"


def snapshot(kind: str = "Deployment") -> WorkloadSnapshot:
    return WorkloadSnapshot(
        key=WorkloadKey(kind, "ns", "web"),  # type: ignore[arg-type]
        packed_references=b"",
        policy=Policy(),
        problems=(),
        recorded=None,
        last_restart_at=None,
        containers=("app", "sidecar"),
        resource_version="42",
        uid="uid-1",
    )


DEPS = {"ConfigMap/app-config": Dependency("ConfigMap", "app-config", "d2", ("app",))}
RESTART = Decision(
    "restart", Recorded.of("k", {"ConfigMap/app-config": "d2"}), ("ConfigMap/app-config",), "x"
)


def change(strategy: Any) -> dict[str, Any]:
    return template_change(snapshot(), RESTART, DEPS, strategy=strategy, now=NOW)


@pytest.mark.parametrize(
    ("kind", "name", "expected"),
    [
        ("ConfigMap", "my-config", "STAKATER_MY_CONFIG_CONFIGMAP"),
        ("Secret", "db.password", "STAKATER_DB_PASSWORD_SECRET"),
        ("ConfigMap", "--odd..name", "STAKATER_ODD_NAME_CONFIGMAP"),
        ("Secret", "a1", "STAKATER_A1_SECRET"),
    ],
)
def test_env_var_name_follows_stakater(kind: Any, name: str, expected: str) -> None:
    assert env_var_name(kind, name) == expected


def test_annotation_restart_patch_records_and_marks_in_one_body() -> None:
    patch = restart_patch(snapshot(), RESTART, change("annotations"), now=NOW)

    assert patch["metadata"]["resourceVersion"] == "42"
    assert patch["metadata"]["annotations"][RECORD_ANNOTATION] == encode_record(RESTART.record)  # type: ignore[arg-type]
    marker = orjson.loads(patch["spec"]["template"]["metadata"]["annotations"][LAST_RELOADED_FROM])
    assert marker == {
        "type": "CONFIGMAP",
        "name": "app-config",
        "namespace": "ns",
        "hash": "d2",
        "containerRefs": ["app"],
        "observedAt": int(NOW),
    }


def test_env_vars_patch_sets_the_variable_in_every_container() -> None:
    patch = restart_patch(snapshot(), RESTART, change("env-vars"), now=NOW)

    containers = patch["spec"]["template"]["spec"]["containers"]
    assert containers == [
        {"name": "app", "env": [{"name": "STAKATER_APP_CONFIG_CONFIGMAP", "value": "d2"}]},
        {"name": "sidecar", "env": [{"name": "STAKATER_APP_CONFIG_CONFIGMAP", "value": "d2"}]},
    ]
    assert "metadata" not in patch["spec"]["template"]


def test_deleted_config_empties_the_env_var_so_the_template_changes() -> None:
    deleted = Decision("restart", Recorded.of("k", {}), ("Secret/gone",), "deleted")
    change = template_change(snapshot(), deleted, {}, strategy="env-vars", now=NOW)
    assert change["spec"]["containers"][0]["env"] == [{"name": "STAKATER_GONE_SECRET", "value": ""}]


def test_pause_rides_on_the_restart_patch() -> None:
    patch = restart_patch(
        snapshot(), RESTART, change("annotations"), now=NOW, pause_annotation=PAUSED_AT
    )
    assert patch["spec"]["paused"] is True
    assert patch["metadata"]["annotations"][PAUSED_AT] == "2023-11-14T22:13:20Z"


def test_unpause_clears_the_annotation() -> None:
    patch = unpause_patch(snapshot(), paused_at_annotation=PAUSED_AT)
    assert patch == {
        "metadata": {"resourceVersion": "42", "annotations": {PAUSED_AT: None}},
        "spec": {"paused": False},
    }


def test_rollout_restart_strategy_sets_restart_at_only() -> None:
    patch = restart_at_patch(snapshot("Rollout"), RESTART, now=NOW)
    assert patch["spec"] == {"restartAt": "2023-11-14T22:13:20Z"}


CRONJOB: dict[str, Any] = {
    "metadata": {"name": "nightly", "namespace": "ns", "uid": "cj-uid"},
    "spec": {
        "schedule": "0 0 * * *",
        "jobTemplate": {
            "metadata": {"labels": {"team": "a"}, "annotations": {"note": "x"}},
            "spec": {
                "backoffLimit": 1,
                "template": {"spec": {"containers": [{"name": "app", "image": "i"}]}},
            },
        },
    },
}


def test_job_from_cronjob_is_what_kubectl_create_job_from_makes() -> None:
    change = template_change(snapshot("CronJob"), RESTART, DEPS, strategy="annotations", now=NOW)
    job = job_from_cronjob(cast(RawObject, CRONJOB), change, record=RESTART)

    assert job["metadata"]["labels"] == {"team": "a"}
    assert job["metadata"]["annotations"] == {"note": "x", INSTANTIATE_ANNOTATION: "manual"}
    owner = job["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
        "CronJob",
        "nightly",
        "cj-uid",
        True,
    )
    assert job["spec"]["backoffLimit"] == 1
    assert LAST_RELOADED_FROM in job["spec"]["template"]["metadata"]["annotations"]


def test_job_name_is_the_same_for_the_same_decision_and_fits() -> None:
    change = template_change(snapshot("CronJob"), RESTART, DEPS, strategy="annotations", now=NOW)
    cronjob = cast(RawObject, CRONJOB)
    first = job_from_cronjob(cronjob, change, record=RESTART)["metadata"]["name"]
    again = job_from_cronjob(cronjob, change, record=RESTART)["metadata"]["name"]
    long_name = cast(RawObject, {**CRONJOB, "metadata": {**CRONJOB["metadata"], "name": "n" * 52}})
    long_job = job_from_cronjob(long_name, change, record=RESTART)["metadata"]["name"]

    assert first == again
    assert first.startswith("nightly-reload-")
    assert len(long_job) <= 63


def _cronjob_recorded(record: Recorded | None, name: str = "nightly") -> dict[str, Any]:
    annotations = {RECORD_ANNOTATION: encode_record(record)} if record else {}
    return {
        **CRONJOB,
        "metadata": {**CRONJOB["metadata"], "name": name, "annotations": annotations},
    }


def _restart_to(digest: str, *, at: int) -> Decision:
    record = Recorded.of("k", {"ConfigMap/app-config": digest}, restarted_at=at)
    return Decision("restart", record, ("ConfigMap/app-config",), "x")


def _job_name(cronjob: dict[str, Any], decision: Decision) -> str:
    change = template_change(snapshot("CronJob"), decision, DEPS, strategy="annotations", now=NOW)
    return str(
        job_from_cronjob(cast(RawObject, cronjob), change, record=decision)["metadata"]["name"]
    )


def test_job_names_differ_when_a_config_comes_back_and_repeat_for_a_retry() -> None:
    """A→B→A→B: three restarts, three names (digests alone would name the third like the first);
    a retry (the record on the CronJob not yet written, a later restart time) keeps its name."""
    first_sight = Recorded.of("k", {"ConfigMap/app-config": "A"})
    to_b = _restart_to("B", at=100)
    to_a = _restart_to("A", at=101)
    to_b_again = _restart_to("B", at=102)
    names = [
        _job_name(_cronjob_recorded(first_sight), to_b),
        _job_name(_cronjob_recorded(to_b.record), to_a),
        _job_name(_cronjob_recorded(to_a.record), to_b_again),
    ]
    assert len(set(names)) == 3, names

    retry = _restart_to("B", at=160)
    assert _job_name(_cronjob_recorded(to_a.record), retry) == names[2]


def test_job_names_differ_for_a_cronjob_recreated_under_the_same_name() -> None:
    """Jobs of a deleted CronJob may still exist while the garbage collector works."""
    cronjob = _cronjob_recorded(None)
    again = {**cronjob, "metadata": {**cronjob["metadata"], "uid": "another-uid"}}
    assert _job_name(cronjob, RESTART) != _job_name(again, RESTART)


def test_a_cut_job_name_is_a_valid_name() -> None:
    """A CronJob name may be 52 characters with dots; cut before "-reload-", it must not end in a
    dot or a dash ("a.-reload-…" is not a DNS subdomain)."""
    name = "a" * 46 + ".bcdef"
    job_name = _job_name(_cronjob_recorded(None, name=name), RESTART)
    assert len(job_name) <= JOB_NAME_MAX
    assert job_name.startswith("a" * 46 + "-reload-"), job_name


def test_recreated_job_drops_what_the_job_controller_generated() -> None:
    generated = {"controller-uid": "u", "batch.kubernetes.io/job-name": "migrate", "app": "m"}
    job: dict[str, Any] = {
        "metadata": {
            "name": "migrate",
            "namespace": "ns",
            "uid": "u",
            "resourceVersion": "9",
            "labels": dict(generated),
            "annotations": {RECORD_ANNOTATION: "old"},
        },
        "spec": {
            "selector": {"matchLabels": {"controller-uid": "u"}},
            "manualSelector": False,
            "backoffLimit": 2,
            "template": {
                "metadata": {"labels": dict(generated)},
                "spec": {"containers": [{"name": "app", "image": "i"}]},
            },
        },
        "status": {"succeeded": 1},
    }
    change = template_change(snapshot("Job"), RESTART, DEPS, strategy="annotations", now=NOW)
    body = recreated_job(cast(RawObject, job), change, record=RESTART)

    assert body["metadata"]["labels"] == {"app": "m"}
    assert set(body["metadata"]) == {"name", "namespace", "labels", "annotations"}
    assert body["metadata"]["annotations"][RECORD_ANNOTATION] == encode_record(RESTART.record)  # type: ignore[arg-type]
    assert "selector" not in body["spec"]
    assert "manualSelector" not in body["spec"]
    assert "status" not in body
    assert body["spec"]["template"]["metadata"]["labels"] == {"app": "m"}
    assert body["metadata"]["annotations"][RECREATED_FROM_ANNOTATION] == "u"


def test_pending_job_copy_holds_the_body_and_reads_back() -> None:
    body = {"metadata": {"name": "migrate", "namespace": "apps"}, "spec": {"backoffLimit": 1}}
    configmap = pending_job_configmap(body, namespace="reloader")

    assert configmap["metadata"]["namespace"] == "reloader"
    assert configmap["metadata"]["labels"][PENDING_JOB_LABEL] == "true"
    assert len(configmap["metadata"]["name"]) <= 63
    assert pending_job(configmap) == (WorkloadKey("Job", "apps", "migrate"), body)
    other = pending_job_configmap(
        {**body, "metadata": {"name": "migrate", "namespace": "b"}}, namespace="reloader"
    )
    assert other["metadata"]["name"] != configmap["metadata"]["name"]
    assert pending_job({"data": {"job.json": "not json"}}) is None
    assert pending_job({"data": {}}) is None
