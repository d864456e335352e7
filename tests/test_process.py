"""The process as users run it: ``python -m reloader``, flags, probes, metrics, logs, SIGTERM.

One test drives a real child process through a Secret rotation against the real API server and
then checks what it exposed: the probes answered, the metrics have Stakater's names and ours, the
logs are JSON lines, and the Secret's value appears nowhere (not in logs, metrics or Events).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from reloader.kube import Api
from reloader.model import SECRETS
from tests.conftest import TestCluster
from tests.controlplane.envtest import free_port
from tests.scenario import Cluster, answers_ok, container, deployment, http_get, wait_for

SECRET_VALUE = "hunter2-do-not-log-me-7f3a"
ROTATED_VALUE = "correct-horse-battery-staple-9c1d"


def test_invalid_settings_exit_2_with_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "reloader", "--workers=0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("reloader: invalid settings: workers")


@pytest.mark.cluster
async def test_process_rolls_on_secret_rotation_and_exits_cleanly(
    cluster: TestCluster, scene: Cluster, tmp_path: Path
) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(cluster.kubeconfig))
    port = free_port()
    log_path = tmp_path / "reloader.log"
    await scene.create_secret("db", {"password": SECRET_VALUE})
    env_ref = {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}}
    await scene.create_workload(
        deployment(
            "api",
            annotations={"reloader.stakater.com/auto": "true"},
            containers=[container(env=[env_ref])],
        )
    )
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "reloader",
                f"--kubeconfig={kubeconfig}",
                f"--namespaces={scene.namespace}",
                f"--metrics-port={port}",
                "--metrics-address=127.0.0.1",
                "--log-format=json",
                "--log-level=debug",
                "--debounce-seconds=0.2",
                "--min-restart-interval-seconds=0",
                f"--controller-namespace={scene.namespace}",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        await wait_for(answers_ok(port, "/readyz"), timeout=60, message="/readyz answers 200")
        assert http_get(port, "/healthz")[0] == 200
        await scene.wait_recorded("api")
        await scene.set_secret("db", {"password": ROTATED_VALUE})
        await scene.assert_replica_sets_stay("api", 2)
        status, metrics = http_get(port, "/metrics")
        assert status == 200
    except AssertionError as error:
        raise AssertionError(f"{error}\ncontroller log:\n{log_path.read_text()[-3000:]}") from None
    finally:
        process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(process.wait, 30)
    logs = log_path.read_text()
    assert code == 0, logs[-2000:]

    for name in (
        'reloader_reload_executed_total{success="true"} 1.0',
        "reloader_action_latency_seconds_bucket",
        "reloader_workqueue_depth",
        "reloader_workqueue_latency_seconds",
        'reloader_cached_objects{kind="Secret"}',
        "reloader_watch_relists_total{",
        "reloader_api_requests_total{",
    ):
        assert name in metrics, f"{name} missing from /metrics"
    records = [json.loads(line) for line in logs.splitlines() if line.strip()]
    assert any(r.get("msg") == "restarted workload" for r in records), logs[-2000:]
    events = json.dumps(await scene.events("Reloaded"))
    for value in (SECRET_VALUE, ROTATED_VALUE):
        for encoded in (value, base64.b64encode(value.encode()).decode()):
            assert encoded not in logs
            assert encoded not in metrics
            assert encoded not in events
    # The key Secret was created in the controller's namespace on first start.
    assert await _secret_exists(scene.api, scene.namespace, "reloader-hash-key")


async def _answers(port: int) -> bool:
    return (await asyncio.to_thread(http_get, port, "/healthz"))[0] != 0


async def _secret_exists(api: Api, namespace: str, name: str) -> bool:
    secret = await api.get(SECRETS.object_path(namespace, name))
    return bool(secret.get("data", {}).get("key"))


@pytest.mark.parametrize(
    "hash_key",
    [
        pytest.param("", id="waiting-for-the-key-secret"),
        pytest.param("a-digest-key-of-enough-length", id="waiting-for-the-first-list"),
    ],
)
async def test_sigterm_while_the_api_server_is_unreachable_exits_promptly(
    tmp_path: Path, hash_key: str
) -> None:
    """A pod that never got to talk to the API server must still stop when Kubernetes asks."""
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": f"https://127.0.0.1:{free_port()}"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "c",
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(kubeconfig))
    env = {k: v for k, v in os.environ.items() if k != "RELOADER_HASH_KEY"}
    if hash_key:
        env["RELOADER_HASH_KEY"] = hash_key
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "reloader",
            f"--kubeconfig={path}",
            f"--metrics-port={port}",
            "--metrics-address=127.0.0.1",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    # The port opens after the signal handlers are set: from then on a SIGTERM is the
    # controller's to handle (a fixed sleep raced a slow start on a busy machine).
    await wait_for(lambda: _answers(port), timeout=60, message="the HTTP port never opened")
    await asyncio.sleep(2)  # into the retry loop
    assert process.poll() is None, "exited on its own"
    process.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(process.wait, 15)
    assert code == 0
