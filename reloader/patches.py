"""What is written to restart or record a workload: pure functions from a decision to bodies.

Kept apart from ``restart.py`` (which talks to the server) so tests can read exactly what reaches
the API, and so every kind and strategy is a few lines here rather than a branch in the worker.

- Record (no restart): the workload-metadata annotation with the per-config digests. It never rolls
  pods, for any kind.
- Restart of a pod-template kind: in the same patch as the record, either the pod-template
  annotation ``reloader.stakater.com/last-reloaded-from`` (strategy ``annotations``: Stakater's
  JSON shape) or one ``STAKATER_<NAME>_<KIND>`` env var per changed config in every container
  (strategy
  ``env-vars``, Stakater's default). One patch means a restart is never done without being recorded.
- Every patch carries ``metadata.resourceVersion``: if the workload changed since the decision was
  made, the server answers 409 and the worker decides again on fresh state.
- CronJob: a Job built from the jobTemplate, named after the record it replaces and the new one, so
  creating it twice for one restart (a retry, a second replica) is a harmless 409, while every new
  restart gets a new name, even when a config returns to an earlier value.
- Job: a copy of the Job without what the Job controller generated, so it can be created again,
  naming the uid of the Job it replaces; and the ConfigMap that keeps that copy while the old Job
  is deleted and the new one not yet created.
- Deployment pause period: ``spec.paused`` and the ``paused-at`` annotation ride on the restart
  patch; the unpause is its own patch once the period has passed.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Literal

import orjson

from reloader.decide import Decision, Dependency
from reloader.digests import Recorded, encode_record
from reloader.model import (
    KINDS,
    LAST_RELOADED_FROM,
    RECORD_ANNOTATION,
    ConfigKind,
    RawObject,
    WorkloadKey,
)
from reloader.snapshots import WorkloadSnapshot

Strategy = Literal["annotations", "env-vars"]
INSTANTIATE_ANNOTATION = "cronjob.kubernetes.io/instantiate"
RECREATED_FROM_ANNOTATION = "reloader.stakater.com/recreated-from-uid"
"""On a Job we created again: the uid of the Job it replaces. It tells our Job apart from the old
one and from one someone else created under the same name."""
PENDING_JOB_LABEL = "reloader.stakater.com/pending-job"
"""On the ConfigMaps (in the controller's namespace) that keep a Job while it is re-created."""
PENDING_JOB_KEY = "job.json"
JOB_NAME_MAX = 63
"""A Job's name becomes a label value on its pods (``job-name``, ``batch.kubernetes.io/job-name``),
and label values have at most 63 characters; the CronJob controller keeps its own Job names
(``<cronjob>-<minutes>``) under it by limiting CronJob names to 52."""
_GENERATED_JOB_LABELS = (
    "controller-uid",
    "job-name",
    "batch.kubernetes.io/controller-uid",
    "batch.kubernetes.io/job-name",
)
_NOT_ENV_CHARS = re.compile(r"[^A-Z0-9]+")


def rfc3339(now: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))


def nested(path: tuple[str, ...], leaf: Mapping[str, Any]) -> dict[str, Any]:
    body = dict(leaf)
    for step in reversed(path):
        body = {step: body}
    return body


def env_var_name(kind: ConfigKind, name: str) -> str:
    """Stakater's variable name: ``my-config`` → ``STAKATER_MY_CONFIG_CONFIGMAP``.

    Upper-case; every run of characters outside ``[A-Z0-9]`` becomes one ``_``, except at the start.
    """
    converted = _NOT_ENV_CHARS.sub("_", name.upper()).lstrip("_")
    return f"STAKATER_{converted}_{kind.upper()}"


def reload_marker(dep: Dependency, *, namespace: str, now: float) -> str:
    """Stakater's ``last-reloaded-from`` JSON, with our digest in ``hash``."""
    marker = {
        "type": dep.kind.upper(),
        "name": dep.name,
        "namespace": namespace,
        "hash": dep.digest or "",
        "containerRefs": sorted(dep.containers),
        "observedAt": int(now),
    }
    return orjson.dumps(marker).decode()


def triggered(decision: Decision, deps: Mapping[str, Dependency]) -> list[Dependency]:
    """The dependencies that caused a restart; a deleted config is named with an empty digest."""
    found = []
    for ident in decision.triggers:
        dep = deps.get(ident)
        if dep is None:
            kind, _, name = ident.partition("/")
            dep = Dependency(kind, name, None, ())  # type: ignore[arg-type]
        found.append(dep)
    return found


def template_change(
    workload: WorkloadSnapshot,
    decision: Decision,
    deps: Mapping[str, Dependency],
    *,
    strategy: Strategy,
    now: float,
) -> dict[str, Any]:
    """The part of a pod template that makes the pods restart (strategic-merge form)."""
    changed = triggered(decision, deps)
    if strategy == "annotations":
        marker = reload_marker(changed[0], namespace=workload.key.namespace, now=now)
        return {"metadata": {"annotations": {LAST_RELOADED_FROM: marker}}}
    env = [_env_entry(dep) for dep in changed]
    containers = [{"name": name, "env": env} for name in workload.containers]
    return {"spec": {"containers": containers}}


def _env_entry(dep: Dependency) -> dict[str, Any]:
    """A deleted config gets an empty value rather than a removed variable: removing one that was
    never set would change nothing, and a restart must change the template."""
    return {"name": env_var_name(dep.kind, dep.name), "value": dep.digest or ""}


def record_patch(workload: WorkloadSnapshot, decision: Decision) -> dict[str, Any]:
    """Metadata only: the digest record, guarded by the resourceVersion decided on."""
    assert decision.record is not None
    return {
        "metadata": {
            "resourceVersion": workload.resource_version,
            "annotations": {RECORD_ANNOTATION: encode_record(decision.record)},
        }
    }


def restart_patch(
    workload: WorkloadSnapshot,
    decision: Decision,
    change: Mapping[str, Any],
    *,
    now: float,
    pause_annotation: str | None = None,
) -> dict[str, Any]:
    """Record plus the pod-template ``change`` (from ``template_change``), plus the pause for a
    Deployment with a pause period."""
    patch = record_patch(workload, decision)
    patch.update(nested(KINDS[workload.key.kind].pod_template_path, change))
    if pause_annotation is not None:
        patch["metadata"]["annotations"][pause_annotation] = rfc3339(now)
        patch["spec"]["paused"] = True
    return patch


def restart_at_patch(
    workload: WorkloadSnapshot, decision: Decision, *, now: float
) -> dict[str, Any]:
    """Argo Rollouts ``rollout-strategy: restart``: the Rollout controller restarts the pods."""
    patch = record_patch(workload, decision)
    patch["spec"] = {"restartAt": rfc3339(now)}
    return patch


def unpause_patch(workload: WorkloadSnapshot, *, paused_at_annotation: str) -> dict[str, Any]:
    return {
        "metadata": {
            "resourceVersion": workload.resource_version,
            "annotations": {paused_at_annotation: None},
        },
        "spec": {"paused": False},
    }


def env_containers(
    containers: list[dict[str, Any]], change: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """Apply an env-vars template change to a full container list (for merge-patch-only kinds)."""
    wanted = {c["name"]: c["env"] for c in change["spec"]["containers"]}
    updated = []
    for container in containers:
        entries = wanted.get(container.get("name", ""), [])
        replaced = {entry["name"] for entry in entries}
        env = [e for e in container.get("env") or [] if e.get("name") not in replaced]
        env += entries
        updated.append({**container, "env": env})
    return updated


def apply_template_change(template: dict[str, Any], change: Mapping[str, Any]) -> dict[str, Any]:
    """A pod template with the change applied (for Jobs, which are created rather than patched)."""
    result = dict(template)
    if "metadata" in change:
        metadata = dict(result.get("metadata") or {})
        metadata["annotations"] = {
            **(metadata.get("annotations") or {}),
            **change["metadata"]["annotations"],
        }
        result["metadata"] = metadata
    if "spec" in change:
        spec = dict(result.get("spec") or {})
        spec["containers"] = env_containers(list(spec.get("containers") or []), change)
        result["spec"] = spec
    return result


def cronjob_job_name(cronjob: RawObject, record: Recorded) -> str:
    """``<cronjob>-reload-<hash>``: one name per restart, the same name for a retry of it.

    The hash covers the CronJob's uid, the record on it now (the state the restart starts from)
    and the digests being recorded (not the new restart time, which a retry would change). The
    record is written only after the Job is created, so a retry after a crash or a failed record
    patch starts from the same record, computes the same name and gets 409. A restart that
    completed wrote a new record with its restart time, so the next restart starts from another
    record and gets another name, even when the config has come back to an earlier value
    (A→B→A→B). Two restarts of one CronJob within the same second with the same digests could
    still share a name; the minimum restart interval (10 s by default) rules that out.
    """
    metadata = cronjob.get("metadata", {})
    previous = (metadata.get("annotations") or {}).get(RECORD_ANNOTATION, "")
    target = encode_record(replace(record, restarted_at=None))
    seed = "\n".join((metadata.get("uid", ""), previous, target))
    suffix = hashlib.sha256(seed.encode()).hexdigest()[:8]
    room = JOB_NAME_MAX - len("-reload-") - len(suffix)
    # A cut name must not end in '-' or '.': "a.-reload-…" is not a valid DNS subdomain.
    prefix = metadata.get("name", "cronjob")[:room].rstrip("-.")
    return f"{prefix}-reload-{suffix}"


def job_from_cronjob(
    cronjob: RawObject, change: Mapping[str, Any], *, record: Decision
) -> dict[str, Any]:
    """What ``kubectl create job --from=cronjob/x`` makes, with the restart change applied, named
    by ``cronjob_job_name``."""
    assert record.record is not None
    metadata = cronjob.get("metadata", {})
    template = cronjob.get("spec", {}).get("jobTemplate", {})
    template_meta = template.get("metadata") or {}
    name = cronjob_job_name(cronjob, record.record)
    spec = dict(template.get("spec") or {})
    spec["template"] = apply_template_change(dict(spec.get("template") or {}), change)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": metadata.get("namespace"),
            "labels": dict(template_meta.get("labels") or {}),
            "annotations": {
                **(template_meta.get("annotations") or {}),
                INSTANTIATE_ANNOTATION: "manual",
            },
            "ownerReferences": [
                {
                    "apiVersion": "batch/v1",
                    "kind": "CronJob",
                    "name": metadata.get("name"),
                    "uid": metadata.get("uid"),
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": spec,
    }


def _without_generated_labels(labels: Mapping[str, str] | None) -> dict[str, str]:
    return {k: v for k, v in (labels or {}).items() if k not in _GENERATED_JOB_LABELS}


def recreated_job(job: RawObject, change: Mapping[str, Any], *, record: Decision) -> dict[str, Any]:
    """A Job to create in place of ``job``: same name and spec, new record, nothing generated, and
    the uid of the Job it replaces (``RECREATED_FROM_ANNOTATION``)."""
    assert record.record is not None
    metadata = job.get("metadata", {})
    annotations = dict(metadata.get("annotations") or {})
    annotations[RECORD_ANNOTATION] = encode_record(record.record)
    annotations[RECREATED_FROM_ANNOTATION] = metadata.get("uid", "")
    spec = {
        k: v for k, v in (job.get("spec") or {}).items() if k not in ("selector", "manualSelector")
    }
    template = dict(spec.get("template") or {})
    template_meta = dict(template.get("metadata") or {})
    template_meta["labels"] = _without_generated_labels(template_meta.get("labels"))
    template["metadata"] = template_meta
    spec["template"] = apply_template_change(template, change)
    body: dict[str, Any] = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": metadata.get("name"),
            "namespace": metadata.get("namespace"),
            "labels": _without_generated_labels(metadata.get("labels")),
            "annotations": annotations,
        },
        "spec": spec,
    }
    if metadata.get("ownerReferences"):
        # Without blockOwnerDeletion: setting it needs update on the owner's finalizers, which a
        # least-privilege role cannot grant for owners of any kind.
        body["metadata"]["ownerReferences"] = [
            {k: v for k, v in ref.items() if k != "blockOwnerDeletion"}
            for ref in metadata["ownerReferences"]
        ]
    return body


def pending_job_name(key: WorkloadKey) -> str:
    """The ConfigMap keeping the copy of one Job: one per Job, so a new copy replaces an old one."""
    digest = hashlib.sha256(f"{key.namespace}/{key.name}".encode()).hexdigest()[:16]
    return f"reloader-pending-job-{digest}"


def pending_job_configmap(job: Mapping[str, Any], *, namespace: str) -> dict[str, Any]:
    """A ConfigMap in the controller's ``namespace`` holding ``job`` (a ``recreated_job`` body).

    Written before the old Job is deleted and removed once the new one exists, so a Job is never
    deleted without a copy the controller can find again. A Job's pod template holds no Secret
    values (env from Secrets is by reference), but it may hold plain env values: never log it.
    """
    metadata = job["metadata"]
    key = WorkloadKey("Job", metadata["namespace"], metadata["name"])
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": pending_job_name(key),
            "namespace": namespace,
            "labels": {"app.kubernetes.io/name": "reloader", PENDING_JOB_LABEL: "true"},
            "annotations": {PENDING_JOB_LABEL: f"{key.namespace}/{key.name}"},
        },
        "data": {PENDING_JOB_KEY: orjson.dumps(dict(job)).decode()},
    }


def pending_job(configmap: Mapping[str, Any]) -> tuple[WorkloadKey, dict[str, Any]] | None:
    """The Job key and body kept in a pending-job ConfigMap; None if it is not one we wrote."""
    try:
        body = orjson.loads(configmap["data"][PENDING_JOB_KEY])
        metadata = body["metadata"]
        key = WorkloadKey("Job", str(metadata["namespace"]), str(metadata["name"]))
    except (KeyError, TypeError, orjson.JSONDecodeError):
        return None
    return (key, body) if isinstance(body, dict) else None
