"""High availability (``--enable-ha``): several replicas, one Lease, one writer.

Against the real API server:

- two controller processes (``python -m reloader --enable-ha``, each its own ``POD_NAME`` and, on
  the local control plane, its own audited client-certificate user): the leader is SIGKILLed in
  the middle of a burst of config changes over several Deployments, and every Deployment rolls
  exactly once (ReplicaSets from the server), the standby having taken the Lease (issue 12, fault
  test 8);
- a standby is ready and writes nothing while the leader lives (the apiserver's audit log), and a
  SIGTERMed leader gives the Lease up, so the standby takes over within a retry period instead of
  a lease duration;
- a leader cut off from the server (its RBAC revoked) stops leading before anyone else can start:
  two electors in this process, sampled, never lead at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from reloader.kube import Api, ApiNotFound
from reloader.leader import LEASE_NAME, LEASES, LeaderElector, LeaseTimings
from reloader.settings import SettingsError, load_settings
from tests.conftest import TestCluster
from tests.controlplane.envtest import ControlPlane, free_port
from tests.scenario import (
    Cluster,
    audited_writes,
    container,
    deployment,
    env_from,
    http_get,
    wait_for,
)
from tests.test_manifests import service_account_api

HASH_KEY = "a-digest-key-shared-by-both-replicas"
FAST = LeaseTimings(lease_duration=4.0, renew_deadline=3.0, retry_period=1.0)
"""Short timings for tests: 4 s lease, 3 s renew deadline, 1 s retry period."""
AUTO = {"reloader.stakater.com/auto": "true"}


def test_renew_deadline_must_be_shorter_than_the_lease() -> None:
    """The takeover's safety rests on renew deadline < lease duration: refused otherwise."""
    with pytest.raises(SettingsError, match="renew-deadline-seconds must be less"):
        load_settings(["--enable-ha", "--lease-duration-seconds=5", "--renew-deadline-seconds=5"])
    with pytest.raises(SettingsError, match="retry-period-seconds must be less"):
        load_settings(["--renew-deadline-seconds=2", "--retry-period-seconds=2"])
    settings = load_settings(["--enable-ha"])
    assert settings.enable_ha and not settings.ignored_compatibility_flags()
    assert settings.lease_name == LEASE_NAME


# --- replicas as processes -------------------------------------------------------------------


@dataclass
class Replica:
    """One ``python -m reloader --enable-ha`` process and its HTTP port and log."""

    identity: str
    port: int
    log: Path
    process: subprocess.Popen[bytes]

    def get(self, path: str) -> tuple[int, str]:
        return http_get(self.port, path)

    def is_leader_metric(self) -> str:
        """The value of ``reloader_is_leader`` for this replica, as scraped."""
        wanted = f'reloader_is_leader{{identity="{self.identity}"}} '
        lines = [line for line in self.get("/metrics")[1].splitlines() if line.startswith(wanted)]
        return lines[0].removeprefix(wanted) if lines else ""

    def log_records(self) -> list[dict[str, Any]]:
        records = []
        for line in self.log.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                records.append(json.loads(line))
        return records


@dataclass
class Replicas:
    """Starts replicas for one test and kills whatever is left at teardown."""

    tmp_path: Path
    cluster: TestCluster
    namespace: str
    timings: LeaseTimings
    started: list[Replica] = field(default_factory=list)

    def user(self, identity: str) -> str:
        """The replica's audited user: unique to the test, since the audit log is the session's."""
        return f"{self.namespace}:{identity}"

    def kubeconfig(self, identity: str) -> Mapping[str, Any]:
        """Its own audited user on the local control plane (the audit log tells its requests
        apart); the admin kubeconfig elsewhere."""
        plane = self.cluster.plane
        if plane is None:
            return self.cluster.kubeconfig
        return plane.audited_kubeconfig(self.user(identity))

    def start(self, identity: str) -> Replica:
        path = self.tmp_path / f"{identity}.kubeconfig"
        path.write_text(yaml.safe_dump(dict(self.kubeconfig(identity))))
        port, log = free_port(), self.tmp_path / f"{identity}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("POD_", "RELOADER_"))}
        env |= {"POD_NAME": identity, "RELOADER_HASH_KEY": HASH_KEY}
        args = [
            sys.executable,
            "-m",
            "reloader",
            "--enable-ha",
            f"--kubeconfig={path}",
            f"--namespaces={self.namespace}",
            f"--controller-namespace={self.namespace}",
            f"--lease-duration-seconds={self.timings.lease_duration}",
            f"--renew-deadline-seconds={self.timings.renew_deadline}",
            f"--retry-period-seconds={self.timings.retry_period}",
            "--debounce-seconds=1",
            "--min-restart-interval-seconds=0",
            f"--metrics-port={port}",
            "--metrics-address=127.0.0.1",
            "--log-format=json",
        ]
        with log.open("wb") as out:
            process = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
        replica = Replica(identity, port, log, process)
        self.started.append(replica)
        return replica

    async def wait_ready(self, replica: Replica) -> None:
        async def ready() -> bool:
            return (await asyncio.to_thread(replica.get, "/readyz"))[0] == 200

        await wait_for(ready, timeout=60, message=f"{replica.identity} ready")

    def logs(self) -> str:
        return "\n".join(f"--- {r.identity}\n{r.log.read_text()[-3000:]}" for r in self.started)

    def kill_all(self) -> None:
        for replica in self.started:
            if replica.process.poll() is None:
                replica.process.kill()
                replica.process.wait(10)


@pytest.fixture
def replicas(tmp_path: Path, cluster: TestCluster, namespace: str) -> Iterator[Replicas]:
    group = Replicas(tmp_path, cluster, namespace, FAST)
    try:
        yield group
    finally:
        group.kill_all()


async def lease_holder(api: Api, namespace: str) -> str | None:
    try:
        lease = await api.get(LEASES.object_path(namespace, LEASE_NAME))
    except ApiNotFound:
        return None
    return str((lease.get("spec") or {}).get("holderIdentity") or "")


async def wait_holder(api: Api, namespace: str, identity: str, *, timeout: float) -> float:
    """Wait until the Lease names ``identity``; the seconds it took."""
    start = time.monotonic()

    async def holds() -> bool:
        return await lease_holder(api, namespace) == identity

    await wait_for(holds, timeout=timeout, message=f"{identity} holds the lease")
    return time.monotonic() - start


async def apps(scene: Cluster, count: int) -> list[str]:
    """``count`` Deployments, each reading its own ConfigMap through envFrom, opted in."""
    names = [f"app-{i}" for i in range(count)]
    for name in names:
        await scene.create_configmap(f"{name}-config", {"v": "1"})
        reads = container(**env_from("ConfigMap", f"{name}-config"))
        await scene.create_workload(deployment(name, annotations=AUTO, containers=[reads]))
    return names


async def change(scene: Cluster, name: str, value: str) -> None:
    await scene.patch_configmap(f"{name}-config", {"data": {"v": value}})


@contextlib.asynccontextmanager
async def explained(replicas: Replicas) -> AsyncIterator[None]:
    """An assertion that fails carries the replicas' logs."""
    try:
        yield
    except AssertionError as error:
        raise AssertionError(f"{error}\n{replicas.logs()}") from None


# --- the tests --------------------------------------------------------------------------------


@pytest.mark.cluster
@pytest.mark.faults
async def test_leader_sigkilled_mid_burst_every_workload_rolls_exactly_once(
    scene: Cluster, replicas: Replicas
) -> None:
    """1. Six Deployments, each on its own ConfigMap; replica a leads, b stands by, both ready.
    2. Three ConfigMaps change; once a has rolled the first Deployment, two more change (still in
       a's debounce window), a is SIGKILLed, and the last changes while nobody leads.
    3. b takes the Lease within a lease duration and a retry.
    Result: every Deployment has exactly two ReplicaSets after a quiet period (rolled once, none
    twice); then a change rolls one again (b was alive and acting during the quiet period).
    """
    names = await apps(scene, 6)
    async with explained(replicas):
        a = replicas.start("reloader-a")
        await wait_holder(scene.api, scene.namespace, "reloader-a", timeout=60)
        b = replicas.start("reloader-b")
        await replicas.wait_ready(a)
        await replicas.wait_ready(b)
        for name in names:
            await scene.wait_recorded(name)
            await scene.wait_replica_sets(name, 1)
        for name in names[:3]:
            await change(scene, name, "2")
        await scene.wait_replica_sets(names[0], 2)
        for name in names[3:5]:
            await change(scene, name, "2")
        a.process.send_signal(signal.SIGKILL)
        await asyncio.to_thread(a.process.wait, 10)
        await change(scene, names[5], "2")
        bound = FAST.lease_duration + 2.2 * FAST.retry_period + 3
        await wait_holder(scene.api, scene.namespace, "reloader-b", timeout=bound)
        for name in names:
            await scene.wait_replica_sets(name, 2)
        await asyncio.sleep(3)  # > debounce + a retry: a second rollout would show by now
        for name in names:
            found = len(await scene.replica_sets(name))
            assert found == 2, f"{name} has {found} ReplicaSets, expected 2 (rolled once)"
        await change(scene, names[0], "3")
        await scene.assert_replica_sets_stay(names[0], 3)
        assert b.is_leader_metric() == "1.0"


@pytest.mark.cluster
async def test_standby_is_ready_writes_nothing_and_takes_over_quickly_after_sigterm(
    cluster: TestCluster, scene: Cluster, replicas: Replicas
) -> None:
    """1. Replica a leads; b starts, is ready, and reports itself not leader.
    2. Configs change: a rolls each Deployment once.
    3. a gets SIGTERM: it exits 0 and releases the Lease; b takes it within about a retry
       period (lease 8 s here: without the release it would wait out the lease duration).
    4. A change now rolls a Deployment, written by b.
    Result: the audit log has no write by b before a left, only b's own after.
    """
    if cluster.plane is None:
        pytest.skip("needs the local control plane's audit log")
    replicas.timings = LeaseTimings(lease_duration=8.0, renew_deadline=6.0, retry_period=1.0)
    names = await apps(scene, 4)
    async with explained(replicas):
        a = replicas.start("reloader-a")
        await wait_holder(scene.api, scene.namespace, "reloader-a", timeout=60)
        b = replicas.start("reloader-b")
        await replicas.wait_ready(a)
        await replicas.wait_ready(b)
        assert (a.is_leader_metric(), b.is_leader_metric()) == ("1.0", "0.0")
        for name in names:
            await scene.wait_recorded(name)
            await change(scene, name, "2")
        for name in names:
            await scene.assert_replica_sets_stay(name, 2, quiet=0)
        await asyncio.sleep(2)  # b has seen every change by now and, as a standby, wrote nothing
        assert mutations(cluster.plane, replicas.user("reloader-b")) == []
        a_writes = mutations(cluster.plane, replicas.user("reloader-a"))
        assert any(w.startswith("patch deployments/") for w in a_writes), a_writes

        a.process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(a.process.wait, 30) == 0
        took = await wait_holder(scene.api, scene.namespace, "reloader-b", timeout=20)
        assert took < 4, f"b took {took:.1f} s to take over a released lease"
        assert any(r.get("msg") == "released the lease" for r in a.log_records())

        await change(scene, names[0], "3")
        await scene.assert_replica_sets_stay(names[0], 3)
        writes = mutations(cluster.plane, replicas.user("reloader-b"))
        assert f"patch deployments/{names[0]}" in writes, writes
        assert b.is_leader_metric() == "1.0"


@pytest.mark.cluster
async def test_leader_cut_off_from_the_server_stops_before_another_can_lead(
    admin_api: Api, cluster: TestCluster, namespace: str
) -> None:
    """1. Elector a runs as a ServiceAccount allowed to use leases; it leads. Elector b (admin)
       stands by. A sampler watches both ``leading`` flags every 10 ms.
    2. a's RoleBinding is deleted: its renewals get 403.
    Result: a stops leading by its renew deadline; b leads only after a lease duration without a
    renewal, at least (lease duration - renew deadline) minus scheduling slack after a stopped,
    and the two never led at the same moment.
    """
    rbac = "/apis/rbac.authorization.k8s.io/v1"
    await admin_api.create(
        f"/api/v1/namespaces/{namespace}/serviceaccounts", {"metadata": {"name": "candidate"}}
    )
    rules = [
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "verbs": ["get", "create", "update"],
        }
    ]
    await admin_api.create(
        f"{rbac}/namespaces/{namespace}/roles", {"metadata": {"name": "lease"}, "rules": rules}
    )
    binding = {
        "metadata": {"name": "lease"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "lease"},
        "subjects": [{"kind": "ServiceAccount", "name": "candidate"}],
    }
    await admin_api.create(f"{rbac}/namespaces/{namespace}/rolebindings", binding)
    sa_api = await service_account_api(
        admin_api, cluster.kubeconfig, namespace=namespace, name="candidate"
    )
    a = LeaderElector(api=sa_api, namespace=namespace, identity="a", timings=FAST)
    b = LeaderElector(api=admin_api, namespace=namespace, identity="b", timings=FAST)
    both: list[float] = []
    a_stopped: list[float] = []
    b_started: list[float] = []

    async def sample() -> None:
        while True:
            now, a_leads, b_leads = time.monotonic(), a.leading, b.leading
            if a_leads and b_leads:
                both.append(now)
            if not a_leads and not a_stopped:
                a_stopped.append(now)
            if b_leads and not b_started:
                b_started.append(now)
            await asyncio.sleep(0.01)

    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(a.run())]
            await wait_for(lambda: _true(a.leading), timeout=30, message="a leads")
            tasks.append(group.create_task(sample()))
            tasks.append(group.create_task(b.run()))
            await asyncio.sleep(2 * FAST.retry_period)
            assert a.leading and not b.leading
            await admin_api.delete(f"{rbac}/namespaces/{namespace}/rolebindings/lease")
            await wait_for(lambda: _true(bool(b_started)), timeout=30, message="b leads")
            for task in tasks:
                task.cancel()
    finally:
        await sa_api.close()
    assert not both, "a and b led at the same moment"
    assert a_stopped, "a never stopped leading"
    gap = b_started[0] - a_stopped[0]
    margin = FAST.lease_duration - FAST.renew_deadline
    assert gap >= margin - 0.3, f"b led {gap:.2f} s after a stopped (margin {margin} s)"


def mutations(plane: ControlPlane, user: str) -> list[str]:
    """``user``'s writes that change something: access reviews (POSTed questions about its own
    rights, stored nowhere) are left out."""
    return [w for w in audited_writes(plane, user) if not w.startswith("create selfsubject")]


async def _true(value: bool) -> bool:
    return value
