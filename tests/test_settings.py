"""Settings: flags over environment over defaults, Stakater's names, exit 2 on bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest

from reloader.settings import SettingsError, load_settings


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KUBERNETES_NAMESPACE", "RELOADER_NAMESPACES", "RELOADER_WORKERS"):
        monkeypatch.delenv(name, raising=False)


def test_defaults_watch_all_namespaces() -> None:
    settings = load_settings([])
    assert settings.cluster_wide and settings.metrics_port == 9090
    assert settings.debounce_seconds == 1.0


def test_stakater_flags_parse_comma_lists() -> None:
    settings = load_settings(["--namespaces", "b, a", "--namespaces-to-ignore=kube-system"])
    assert settings.namespaces == ["a", "b"]
    assert settings.namespaces_to_ignore == ["kube-system"]


def test_bare_bool_flag_means_true_and_explicit_false_works() -> None:
    assert load_settings(["--auto-reload-all"]).auto_reload_all is True
    assert load_settings(["--reload-on-delete=false"]).reload_on_delete is False


def test_environment_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELOADER_WORKERS", "7")
    monkeypatch.setenv("RELOADER_NAMESPACES", "x,y")
    settings = load_settings([])
    assert settings.workers == 7 and settings.namespaces == ["x", "y"]


def test_flag_beats_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELOADER_WORKERS", "7")
    assert load_settings(["--workers", "3"]).workers == 3


def test_stakater_single_namespace_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBERNETES_NAMESPACE", "team-a")
    assert load_settings([]).namespaces == ["team-a"]
    assert load_settings(["--namespaces", "b"]).namespaces == ["b"]


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        pytest.param(["--workers", "0"], "workers", id="workers-zero"),
        pytest.param(["--debounce-seconds", "soon"], "debounce_seconds", id="not-a-number"),
        pytest.param(["--namespaces", "Bad_Name"], "not a namespace name", id="bad-namespace"),
        pytest.param(["--log-format", "xml"], "log_format", id="unknown-log-format"),
        pytest.param(
            ["--resources-to-ignore", "configmaps,secrets"], "cannot ignore both", id="ignore-both"
        ),
        pytest.param(["--resources-to-ignore", "pods"], "unknown resource", id="ignore-pods"),
        pytest.param(["--ignored-workload-types", "pods"], "unknown workload", id="bad-kind"),
        pytest.param(["--namespace-selector", "a:b:c=d"], "not a label selector", id="selector"),
        pytest.param(["--reload-strategy", "restart"], "reload_strategy", id="bad-strategy"),
        pytest.param(["--hash-key", "short"], "hash_key", id="short-hash-key"),
        pytest.param(
            ["--auto-annotation", "deployment.kubernetes.io/revision"],
            "written by Kubernetes itself",
            id="renamed-to-a-kubernetes-annotation",
        ),
    ],
)
def test_invalid_settings_raise_one_line(argv: list[str], fragment: str) -> None:
    with pytest.raises(SettingsError, match=fragment) as caught:
        load_settings(argv)
    assert "\n" not in str(caught.value)


def test_invalid_settings_exit_2_before_connecting() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "reloader", "--workers", "0", "--kubeconfig", "/nonexistent"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("reloader: invalid settings: workers")
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("items", "selector"),
    [
        ("team:payments", "team=payments"),
        ("team=payments", "team=payments"),
        ("team:*", "team"),
        ("team=*", "team"),
        ("team:a,tier!=web", "team=a,tier!=web"),
        ("env in (prod)", "env in (prod)"),
        ("!legacy", "!legacy"),
    ],
)
def test_stakater_selector_forms_become_kubernetes_selectors(items: str, selector: str) -> None:
    settings = load_settings(["--namespace-selector", items, "--resource-label-selector", items])
    assert settings.namespace_label_selector == selector
    assert settings.config_label_selector == selector


def test_scoping_flags_choose_what_is_watched() -> None:
    from reloader.model import KINDS

    settings = load_settings(
        ["--resources-to-ignore", "Secrets", "--ignored-workload-types", "jobs,CronJobs"]
    )
    assert settings.watches_config("ConfigMap")
    assert not settings.watches_config("Secret")
    watched = {name for name, kind in KINDS.items() if settings.watches_workload(kind)}
    assert watched == {"Deployment", "StatefulSet", "DaemonSet"}
    argo = load_settings(["--is-Argo-Rollouts"])
    assert {n for n, k in KINDS.items() if argo.watches_workload(k)} >= {"Rollout", "Job"}


def test_strategy_defaults_to_annotations_and_takes_stakater_values() -> None:
    assert load_settings([]).reload_strategy == "annotations"
    assert load_settings(["--reload-strategy", "env-vars"]).reload_strategy == "env-vars"


def test_repeated_list_flags_add_up_and_selectors_keep_their_commas() -> None:
    settings = load_settings(
        [
            "--namespaces=a,b",
            "--namespaces=c",
            "--namespace-selector=tier in (web,api)",
            "--namespace-selector=team:x",
        ]
    )
    assert settings.namespaces == ["a", "b", "c"]
    assert settings.namespace_label_selector == "tier in (web,api),team=x"


def test_stakater_only_flags_are_accepted_and_reported_as_ignored() -> None:
    settings = load_settings(["--enable-pprof", "--sync-after-restart", "--pprof-addr=:6061"])
    assert settings.ignored_compatibility_flags() == ["--enable-pprof"]


def test_enable_ha_is_a_real_flag_not_an_ignored_one() -> None:
    settings = load_settings(["--enable-ha"])
    assert settings.enable_ha
    assert settings.ignored_compatibility_flags() == []
