"""``reloader explain``: the answer the controller's own code gives, read back from a real server.

Pure tests check the display-only walk of the pod spec against ``find_references`` and the command
line. Cluster tests build one workload per reason a workload does not reload and read the answer
in-process; the exit codes, the JSON document and the absence of Secret values are checked on the
real command (``python -m reloader explain``, a child process with a kubeconfig file).
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from reloader.digests import DigestKey
from reloader.explain import (
    ExplainError,
    Explanation,
    Target,
    explain_workload,
    parse_command,
    reference_uses,
    to_json,
)
from reloader.kube import connect_with_dict
from reloader.model import KINDS, SECRETS
from reloader.references import find_references
from reloader.settings import Settings
from tests.conftest import TestCluster
from tests.scenario import (
    TEST_KEY,
    Cluster,
    container,
    deployment,
    wait_for,
    with_token,
    workload,
)

SECRET_VALUE = "s3cr3t-value-never-printed-5b1e"
AUTO = {"reloader.stakater.com/auto": "true"}
ENV_DB = container(env=[{"name": "P", "valueFrom": {"secretKeyRef": {"name": "db", "key": "p"}}}])


# --- pure ----------------------------------------------------------------------------------------


def _mount(volume: str) -> dict[str, str]:
    return {"name": volume, "mountPath": f"/etc/{volume}"}


POD_SPECS = [
    pytest.param({"containers": [ENV_DB]}, id="env-key"),
    pytest.param(
        {
            "containers": [
                container("a", envFrom=[{"configMapRef": {"name": "cm"}}]),
                container("b", envFrom=[{"secretRef": {"name": "db"}}]),
            ],
            "initContainers": [container("init", envFrom=[{"configMapRef": {"name": "cm"}}])],
        },
        id="envFrom-and-init",
    ),
    pytest.param(
        {
            "containers": [container("a", volumeMounts=[_mount("v"), _mount("p")])],
            "volumes": [
                {"name": "v", "configMap": {"name": "cm", "items": [{"key": "x", "path": "x"}]}},
                {"name": "unmounted", "secret": {"secretName": "lonely"}},
                {
                    "name": "p",
                    "projected": {
                        "sources": [{"secret": {"name": "db"}}, {"configMap": {"name": "cm"}}]
                    },
                },
            ],
        },
        id="volumes-projected-unmounted",
    ),
    pytest.param(
        {
            "containers": [
                container(
                    "a", env=[{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "c"}}}]
                ),
                container("b", env=[{"name": "Y", "valueFrom": {"secretKeyRef": {"name": ""}}}]),
                "not a container",
            ],
            "volumes": [{"name": "v", "secret": {}}, {"name": "w", "configMap": "x"}],
        },
        id="malformed",
    ),
]


@pytest.mark.parametrize("pod_spec", POD_SPECS)
def test_display_walk_agrees_with_find_references(pod_spec: dict[str, Any]) -> None:
    """Same configs, same containers, same keys (None: the whole object) as the decision uses."""
    uses = reference_uses(pod_spec)
    merged: dict[tuple[str, str], tuple[set[str], set[str] | None]] = {}
    for use in uses:
        containers, keys = merged.get((use.kind, use.name), (set(), set()))
        if use.container:
            containers.add(use.container)
        keys = None if keys is None or use.keys is None else keys | set(use.keys)
        merged[(use.kind, use.name)] = (containers, keys)
    expected = {
        (ref.kind, ref.name): (set(ref.containers), None if ref.keys is None else set(ref.keys))
        for ref in find_references(pod_spec)
    }
    assert merged == expected


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("deployment/x", "Deployment"),
        ("Deployments/x", "Deployment"),
        ("deploy/x", "Deployment"),
        ("sts/x", "StatefulSet"),
        ("DaemonSet/x", "DaemonSet"),
        ("ds/x", "DaemonSet"),
        ("cj/x", "CronJob"),
        ("cronjobs/x", "CronJob"),
        ("job/x", "Job"),
        ("rollout/x", "Rollout"),
        ("deployment.apps/x", "Deployment"),
    ],
)
def test_kind_names_long_plural_and_short(text: str, kind: str) -> None:
    assert parse_command([text, "-n", "ns"]).target == Target(KINDS[kind], "ns", "x")  # type: ignore[index]


@pytest.mark.parametrize("text", ["pod/x", "deployment", "deployment/", "x"])
def test_a_target_that_is_not_a_workload_is_refused(text: str) -> None:
    with pytest.raises(ExplainError, match="KIND/NAME"):
        parse_command([text])


def test_the_controllers_flags_and_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELOADER_RELOAD_ON_DELETE", "true")
    command = parse_command(
        ["deploy/x", "--auto-reload-all", "--namespaces-to-ignore=a,b", "-o", "json"]
    )
    assert command.settings.auto_reload_all
    assert command.settings.reload_on_delete
    assert command.settings.namespaces_to_ignore == ["a", "b"]
    assert command.output == "json"
    assert command.target.namespace == "default"


def test_invalid_settings_are_an_error_not_a_guess() -> None:
    with pytest.raises(ExplainError, match="invalid settings: ignored_workload_types"):
        parse_command(["deploy/x", "--ignored-workload-types=pods"])


# --- against the server, in-process --------------------------------------------------------------


def _settings(**overrides: Any) -> Settings:
    return Settings(**{"hash_key": TEST_KEY.decode(), **overrides})


async def _explain(scene: Cluster, kind: str, name: str, **settings: Any) -> Explanation:
    target = Target(KINDS[kind], scene.namespace, name)  # type: ignore[index]
    return await explain_workload(scene.api, target, _settings(**settings))


def _config(explanation: Explanation, kind: str, name: str) -> Any:
    return next(c for c in explanation.configs if (c.kind, c.name) == (kind, name))


NOT_RELOADING = [
    pytest.param({}, {}, {}, "no reloader annotation", None, id="no-annotation"),
    pytest.param(
        {"annotations": {"reloader.stakater.com/auto": "false"}},
        {},
        {"auto_reload_all": True},
        "reloader.stakater.com/auto='false' on the metadata turns reloading off",
        None,
        id="auto-false",
    ),
    pytest.param(
        {"annotations": {**AUTO, "secrets.exclude.reloader.stakater.com/reload": "db"}},
        {},
        {},
        "none of the configs",
        ("excluded", "listed in secrets.exclude.reloader.stakater.com/reload"),
        id="excluded",
    ),
    pytest.param(
        {"annotations": AUTO},
        {"annotations": {"reloader.stakater.com/ignore": "true"}},
        {},
        "none of the configs",
        ("ignored", 'carries reloader.stakater.com/ignore="true"'),
        id="config-ignored",
    ),
    pytest.param(
        {"annotations": {"reloader.stakater.com/search": "true"}},
        {},
        {},
        "none of the configs",
        ("not-wanted", "lacks reloader.stakater.com/match"),
        id="search-without-match",
    ),
    pytest.param(
        {"annotations": {"secret.reloader.stakater.com/reload": "other-.*"}},
        {},
        {},
        "none of the configs",
        ("not-wanted", "not named in secret.reloader.stakater.com/reload"),
        id="named-list-not-matching",
    ),
    pytest.param(
        {"annotations": AUTO, "kind": "CronJob"},
        {},
        {"ignored_workload_types": ["cronjobs"]},
        "--ignored-workload-types includes cronjobs",
        ("watched", "reloader.stakater.com/auto='true'"),
        id="kind-ignored",
    ),
    pytest.param(
        {"annotations": AUTO},
        {},
        {"namespaces_to_ignore": ["NAMESPACE"]},
        "is in --namespaces-to-ignore",
        ("watched", "reloader.stakater.com/auto='true'"),
        id="namespace-ignored",
    ),
    pytest.param(
        {"annotations": AUTO},
        {},
        {"namespaces": ["elsewhere"]},
        "is not in --namespaces",
        ("watched", "reloader.stakater.com/auto='true'"),
        id="namespace-not-watched",
    ),
    pytest.param(
        {"annotations": AUTO},
        {},
        {"namespace_selector": ["team=a"]},
        "does not match --namespace-selector (team=a)",
        ("watched", "reloader.stakater.com/auto='true'"),
        id="namespace-not-selected",
    ),
    pytest.param(
        {"annotations": AUTO},
        {},
        {"resources_to_ignore": ["secrets"]},
        "none of the configs",
        ("ignored", "--resources-to-ignore=secrets"),
        id="resources-to-ignore",
    ),
    pytest.param(
        {"annotations": AUTO},
        {},
        {"resource_label_selector": ["team=a"]},
        "are missing or not seen by the controller",
        ("not-selected", "--resource-label-selector (team=a)"),
        id="label-selector",
    ),
    pytest.param(
        {"annotations": AUTO, "containers": [container()]},
        {},
        {},
        "it references no ConfigMap or Secret",
        None,
        id="config-not-referenced",
    ),
]


@pytest.mark.cluster
@pytest.mark.parametrize(("shape", "secret", "settings", "reason", "verdict"), NOT_RELOADING)
async def test_each_reason_a_workload_does_not_reload(
    scene: Cluster,
    shape: Mapping[str, Any],
    secret: Mapping[str, Any],
    settings: Mapping[str, Any],
    reason: str,
    verdict: tuple[str, str] | None,
) -> None:
    """1. Secret ``db``; a workload reading it (or nothing) with the case's annotations.
    2. Explain it under the case's controller settings.
    Result: it does not reload, the reason says why, and ``db``'s line says what became of it."""
    kind = shape.get("kind", "Deployment")
    await scene.create_secret("db", {"p": SECRET_VALUE}, annotations=secret.get("annotations"))
    containers = shape.get("containers", [ENV_DB])
    body = workload(kind, "web", annotations=shape.get("annotations"), containers=containers)
    await scene.create_workload(body)
    overrides = {
        k: [scene.namespace if item == "NAMESPACE" else item for item in value]
        if isinstance(value, list)
        else value
        for k, value in settings.items()
    }
    explanation = await _explain(scene, kind, "web", **overrides)
    assert not explanation.will_reload
    assert any(reason in text for text in explanation.reasons), explanation.reasons
    if verdict is not None:
        status, why = verdict
        db = _config(explanation, "Secret", "db")
        assert (db.status, why in db.reason) == (status, True), db
    assert SECRET_VALUE not in json.dumps(to_json(explanation))


@pytest.mark.cluster
async def test_sources_and_enabling_annotation_on_the_pod_template(scene: Cluster) -> None:
    """1. A ConfigMap read by env, envFrom, a volume and a projected volume in two containers;
       ``auto`` on the pod template, not the metadata.
    Result: every use is listed with its container and route; the template is named as the
    source; the answer's configs are exactly those ``find_references`` finds."""
    await scene.create_configmap("cm", {"x": "1", "y": "2"})
    key_ref = {"name": "X", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "x"}}}
    containers = [
        container("a", env=[key_ref], volumeMounts=[_mount("v")]),
        container("b", envFrom=[{"configMapRef": {"name": "cm"}}], volumeMounts=[_mount("p")]),
    ]
    volumes = [
        {"name": "v", "configMap": {"name": "cm", "items": [{"key": "y", "path": "y"}]}},
        {"name": "p", "projected": {"sources": [{"configMap": {"name": "cm"}}]}},
    ]
    body = deployment("web", template_annotations=AUTO, containers=containers, volumes=volumes)
    await scene.create_workload(body)
    explanation = await _explain(scene, "Deployment", "web")
    assert explanation.will_reload, explanation.reasons
    configmaps = next(p for p in explanation.policies if p.kind == "ConfigMap")
    assert (configmaps.source, dict(configmaps.annotations)) == ("pod template", AUTO)
    cm = _config(explanation, "ConfigMap", "cm")
    routes = {(use.container, use.via, use.volume, use.keys) for use in cm.uses}
    assert routes == {
        ("a", "env", None, ("x",)),
        ("a", "volume", "v", ("y",)),
        ("b", "envFrom", None, None),
        ("b", "projected", "p", None),
    }
    spec = body["spec"]["template"]["spec"]
    assert {(c.kind, c.name) for c in explanation.configs} == {
        (ref.kind, ref.name) for ref in find_references(spec)
    }
    assert explanation.reload_now is False  # nothing recorded yet: first sight only records


@pytest.mark.cluster
async def test_would_reload_now_then_last_reload_after_the_controller_acts(scene: Cluster) -> None:
    """1. A Deployment reading Secret ``db``; a controller records its digests, then stops.
    2. ``db`` changes while no controller runs; explain.
    3. A controller starts again and restarts it; explain again.
    Result: step 2 says it would reload now (recorded and current digests differ); step 3 says it
    is up to date and names the last reload from the marker and the ``Reloaded`` Event."""
    await scene.create_secret("db", {"p": SECRET_VALUE})
    await scene.create_workload(deployment("web", annotations=AUTO, containers=[ENV_DB]))
    await scene.start_controller()
    await scene.wait_recorded("web")
    await scene.stop_controllers()
    await scene.set_secret("db", {"p": "rotated"})

    pending = await _explain(scene, "Deployment", "web")
    assert (pending.will_reload, pending.reload_now) == (True, True), pending.reload_now_reason
    assert pending.reload_now_reason.startswith("yes: Secret/db changed")
    db = _config(pending, "Secret", "db")
    assert db.changed
    assert db.recorded and db.current and db.recorded != db.current
    assert pending.last_reload is None

    await scene.start_controller()
    await scene.wait_marker("Deployment", "web")

    async def reloaded() -> Explanation | None:
        answer = await _explain(scene, "Deployment", "web")
        return answer if answer.reload_now is False and answer.events else None

    done = await wait_for(reloaded, message="explain sees the restart and its Event")
    assert done.last_reload is not None
    assert (done.last_reload["kind"], done.last_reload["name"]) == ("Secret", "db")
    assert [e["reason"] for e in done.events] == ["Reloaded"]
    assert not _config(done, "Secret", "db").changed


@pytest.mark.cluster
async def test_the_digest_key_is_read_from_the_controllers_secret(scene: Cluster) -> None:
    """1. The key Secret in the (test's) controller namespace holds the test key.
    2. Explain without --hash-key, then with a controller namespace that has no key Secret.
    Result: the first uses the controller's key id; the second says the key cannot be read and
    still answers everything else (it reloads; "now" is unknown)."""
    encoded = base64.b64encode(TEST_KEY).decode()
    body = {"metadata": {"name": "reloader-hash-key"}, "data": {"key": encoded}}
    await scene.api.create(SECRETS.collection_path(scene.namespace), body)
    await scene.create_secret("db", {"p": SECRET_VALUE})
    await scene.create_workload(deployment("web", annotations=AUTO, containers=[ENV_DB]))
    target = Target(KINDS["Deployment"], scene.namespace, "web")

    found = await explain_workload(
        scene.api, target, Settings(controller_namespace=scene.namespace)
    )
    assert found.key_id == DigestKey.from_secret(TEST_KEY).key_id
    assert found.reload_now is False

    missing = await explain_workload(scene.api, target, Settings(controller_namespace="nowhere"))
    assert (missing.key_id, missing.reload_now, missing.will_reload) == (None, None, True)
    assert "cannot read the digest key Secret nowhere/reloader-hash-key" in missing.key_note
    assert _config(missing, "Secret", "db").status == "watched"


READ_ONLY_RULES = [
    {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get"]},
    {"apiGroups": [""], "resources": ["configmaps", "secrets", "events"], "verbs": ["list"]},
    {
        "apiGroups": [""],
        "resources": ["secrets"],
        "verbs": ["get"],
        "resourceNames": ["reloader-hash-key"],
    },
]
"""What docs/troubleshooting.md says ``explain`` needs for a Deployment: reads only."""


@pytest.mark.cluster
async def test_read_access_is_enough(cluster: TestCluster, scene: Cluster) -> None:
    """1. A ServiceAccount whose Role grants only ``READ_ONLY_RULES`` in the namespace, which is
       also the controller's (the key Secret is there).
    2. Explain a Deployment as that account.
    Result: the full answer (the key read, the configs listed, Events listed: no notes)."""
    ns = scene.namespace
    encoded = base64.b64encode(TEST_KEY).decode()
    key_secret = {"metadata": {"name": "reloader-hash-key"}, "data": {"key": encoded}}
    await scene.api.create(SECRETS.collection_path(ns), key_secret)
    await scene.create_secret("db", {"p": SECRET_VALUE})
    await scene.create_workload(deployment("web", annotations=AUTO, containers=[ENV_DB]))
    rbac = f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}"
    await scene.api.create(f"/api/v1/namespaces/{ns}/serviceaccounts", {"metadata": {"name": "ro"}})
    await scene.api.create(f"{rbac}/roles", {"metadata": {"name": "ro"}, "rules": READ_ONLY_RULES})
    binding = {
        "metadata": {"name": "ro"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "ro"},
        "subjects": [{"kind": "ServiceAccount", "name": "ro", "namespace": ns}],
    }
    await scene.api.create(f"{rbac}/rolebindings", binding)
    request = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {}}
    answer = await scene.api.create(f"/api/v1/namespaces/{ns}/serviceaccounts/ro/token", request)
    api = await connect_with_dict(with_token(cluster.kubeconfig, answer["status"]["token"]))
    scene.apis.append(api)
    target = Target(KINDS["Deployment"], ns, "web")

    async def answered() -> Explanation | None:
        try:
            found = await explain_workload(api, target, Settings(controller_namespace=ns))
        except ExplainError:
            return None  # the authorizer lags the RBAC objects briefly
        return found if found.key_id is not None and not found.notes else None

    found = await wait_for(answered, timeout=15, message="explain as a read-only account")
    assert found.will_reload
    assert found.key_id == DigestKey.from_secret(TEST_KEY).key_id
    assert _config(found, "Secret", "db").status == "watched"


# --- the real command ----------------------------------------------------------------------------

JSON_KEYS = {
    "workload",
    "willReload",
    "reasons",
    "reloadNow",
    "reloadNowReason",
    "digestKey",
    "record",
    "policy",
    "configs",
    "problems",
    "lastReload",
    "notes",
}
CONFIG_KEYS = {
    "kind",
    "name",
    "exists",
    "status",
    "reason",
    "uses",
    "recordedDigest",
    "currentDigest",
    "changed",
}


def _command(kubeconfig: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reloader", "explain", *args, f"--kubeconfig={kubeconfig}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin", "RELOADER_HASH_KEY": TEST_KEY.decode()},
    )


@pytest.mark.cluster
async def test_the_command_exit_codes_json_and_no_secret_value(
    cluster: TestCluster, scene: Cluster, tmp_path: Path
) -> None:
    """1. Secret ``db``; Deployment ``web`` (auto) reads it, ``plain`` has no annotation.
    2. Run ``python -m reloader explain`` on each, on a missing one and with a bad kind.
    Result: exit 0, 1, 2, 2; the JSON document has the documented keys; neither the Secret's
    value nor its base64 form appears in any output."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(cluster.kubeconfig))
    await scene.create_secret("db", {"p": SECRET_VALUE})
    await scene.create_workload(deployment("web", annotations=AUTO, containers=[ENV_DB]))
    await scene.create_workload(deployment("plain", containers=[ENV_DB]))
    ns = scene.namespace

    reloads = _command(kubeconfig, "deployment/web", "-n", ns)
    plain = _command(kubeconfig, "deploy/plain", "-n", ns)
    missing = _command(kubeconfig, "deploy/missing", "-n", ns)
    bad = _command(kubeconfig, "pods/web", "-n", ns)
    as_json = _command(kubeconfig, "deployments/web", "-n", ns, "--output", "json")
    missing_json = _command(kubeconfig, "deploy/missing", "-n", ns, "-o", "json")

    assert reloads.returncode == 0, reloads.stderr
    assert "reloads when a watched config changes" in reloads.stdout
    assert "Secret/db: watched" in reloads.stdout
    assert "container app: env (keys p)" in reloads.stdout
    assert plain.returncode == 1, plain.stderr
    assert "will NOT reload" in plain.stdout
    assert "no reloader annotation" in plain.stdout
    assert missing.returncode == 2
    assert "not found" in missing.stderr
    assert bad.returncode == 2
    assert as_json.returncode == 0, as_json.stderr
    document = json.loads(as_json.stdout)
    assert set(document) == JSON_KEYS
    assert document["workload"] == {"kind": "Deployment", "namespace": ns, "name": "web"}
    assert document["willReload"] is True
    (db,) = document["configs"]
    assert set(db) == CONFIG_KEYS
    assert (db["kind"], db["name"], db["status"]) == ("Secret", "db", "watched")
    assert db["uses"] == [{"container": "app", "via": "env", "volume": None, "keys": ["p"]}]
    assert missing_json.returncode == 2
    assert "not found" in json.loads(missing_json.stdout)["error"]
    encoded = base64.b64encode(SECRET_VALUE.encode()).decode()
    for result in (reloads, plain, missing, bad, as_json, missing_json):
        for text in (result.stdout, result.stderr):
            assert SECRET_VALUE not in text
            assert encoded not in text
