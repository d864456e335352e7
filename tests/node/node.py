"""A real node for the test control plane: containerd + runc + CNI, kubelet and kube-proxy.

It runs the controller as a Pod from the image the Containerfile builds, as a cluster would: the
manifests applied, probes, in-cluster config with its ServiceAccount token, ``kubectl logs``.

Layout, chosen so that a Pod reaches the apiserver exactly as in a cluster:

- a bridge ``rtcni0`` with 10.244.0.1/24, made before anything starts: the node's IP, the
  address the apiserver advertises (so the ``kubernetes`` Service's endpoint is reachable from
  Pods), and the gateway the CNI bridge plugin gives Pods;
- the apiserver listens on every address (Pods come from the bridge) and its serving certificate
  also names the ``kubernetes`` Service's ClusterIP, 10.0.0.1, which kube-proxy (iptables mode)
  forwards to it;
- the kubelet authenticates as ``system:node:<name>`` in ``system:masters``: an admin identity, for
  simplicity (the apiserver runs RBAC only, without the Node authorizer); it accepts the apiserver's
  client certificate for ``kubectl logs``;
- containerd keeps its images in the cache (``~/.cache/reloader-testenv/node/containerd``), so the
  images built by ``images.sh`` are imported once; everything else lives in a temporary directory
  and is taken down by ``stop``: Pods' network namespaces, kube-proxy's rules, mounts, the bridge.

Only one node per machine: the bridge, its subnet and kube-proxy's rules are the host's. A lock
file makes a second one fail at once instead of fighting over them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

from tests.controlplane.envtest import (
    AUDITED_GROUP,
    BUILD_SCRIPT,
    CONTROLLERS,
    ControlPlane,
    _Process,
    free_port,
)

HERE = Path(__file__).resolve().parent
IMAGES_SCRIPT = HERE / "images.sh"
SETUP_SCRIPT = HERE / "setup.sh"
CACHE = Path(os.environ.get("RELOADER_TESTENV_CACHE", "~/.cache/reloader-testenv")).expanduser()
NODE_NAME = "reloader-node"
BRIDGE = "rtcni0"
NODE_IP = "10.244.0.1"
POD_SUBNET = "10.244.0.0/24"
SERVICE_IP = "10.0.0.1"
"""The ``kubernetes`` Service's ClusterIP: the first address of envtest's service range."""
NODE_CONTROLLERS = (
    f"{CONTROLLERS},serviceaccount,root-ca-cert-publisher,endpoint,endpointslice,nodelifecycle"
)
"""What Pods and Services need on top of envtest's: a ``default`` ServiceAccount and the
``kube-root-ca.crt`` ConfigMap in every namespace (a token volume mounts both), Endpoints for the
apiserver's service proxy and EndpointSlices for kube-proxy."""
NODE_AUDIT_POLICY = f"""\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
  - level: Metadata
    userGroups: ["{AUDITED_GROUP}", "system:serviceaccounts"]
  - level: None
"""
"""envtest's policy plus every ServiceAccount: what the controller Pod did, from which address
(``ControlPlane.audit_events`` of ``system:serviceaccount:<namespace>:reloader``)."""
LOCK = Path("/run/reloader-test-node.lock")
RUNC = os.environ.get("RELOADER_NODE_RUNC", "runc")
"""The OCI runtime binary containerd starts containers with (a wrapper that logs, to debug)."""
START_TIMEOUT = float(os.environ.get("RELOADER_NODE_START_TIMEOUT", "120"))
REQUIRED = ("containerd", "runc", "ctr", "buildah", "mmdebstrap", "iptables", "conntrack", "ip")


class NodeError(RuntimeError):
    pass


@dataclass(frozen=True)
class Images:
    """References of the locally built images, as containerd knows them."""

    pause: str
    app: str
    controller: str
    archives: tuple[str, ...]


def missing_prerequisites() -> list[str]:
    """Commands and files the node needs that this machine lacks (``setup.sh`` installs them)."""
    missing = [tool for tool in REQUIRED if shutil.which(tool) is None]
    missing += [
        f for f in ("/usr/lib/cni/bridge", "/usr/lib/cni/host-local") if not Path(f).exists()
    ]
    if os.geteuid() != 0:
        missing.append("root")
    return missing


def node_binary_dir() -> Path:
    """The control plane's binaries plus kubelet and kube-proxy (``build.sh node``)."""
    preset = os.environ.get("RELOADER_TESTENV_BIN")
    if preset:
        return Path(preset)
    result = subprocess.run(
        ["bash", str(BUILD_SCRIPT), "node"], check=True, stdout=subprocess.PIPE, text=True
    )
    return Path(result.stdout.strip().splitlines()[-1])


def build_images() -> Images:
    """Run ``images.sh`` (cheap when nothing changed) and read the references it prints."""
    result = subprocess.run(
        ["bash", str(IMAGES_SCRIPT)], check=True, stdout=subprocess.PIPE, text=True
    )
    refs: dict[str, str] = {}
    archives = []
    for line in result.stdout.splitlines():
        role, ref, archive = line.split()
        refs[role] = ref
        archives.append(archive)
    return Images(refs["pause"], refs["app"], refs["controller"], tuple(archives))


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, capture_output=True, text=True)


def node_control_plane() -> ControlPlane:
    """A control plane whose Pods can run: token volumes, the controllers they need, and an
    apiserver that Pods reach through the ``kubernetes`` Service (see the module docstring)."""
    plane = ControlPlane(
        controllers=NODE_CONTROLLERS,
        service_account_admission=True,
        serving_ips=[SERVICE_IP, NODE_IP],
    )
    client = plane.ca.issue("kube-apiserver-kubelet-client", organizations=["system:masters"])
    (plane.work_dir / "kubelet-client.crt").write_bytes(client.cert_pem)
    (plane.work_dir / "kubelet-client.key").write_bytes(client.key_pem)
    policy = plane.work_dir / "node-audit-policy.yaml"
    policy.write_text(NODE_AUDIT_POLICY)
    # envtest's flags come first; a repeated single-valued flag takes the last value.
    plane.extra_apiserver_args = (
        f"--audit-policy-file={policy}",
        f"--audit-log-path={plane.audit_log}",
        "--audit-log-format=json",
        "--audit-log-maxsize=0",
        "--bind-address=0.0.0.0",
        f"--advertise-address={NODE_IP}",
        "--endpoint-reconciler-type=lease",
        f"--kubelet-client-certificate={plane.work_dir / 'kubelet-client.crt'}",
        f"--kubelet-client-key={plane.work_dir / 'kubelet-client.key'}",
        "--kubelet-preferred-address-types=InternalIP",
    )
    return plane


@dataclass
class Node:
    """containerd, kubelet and kube-proxy for ``plane``, which must come from
    ``node_control_plane`` and be started after ``prepare_network``."""

    plane: ControlPlane
    images: Images
    bin_dir: Path = field(default_factory=node_binary_dir)
    work_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="reloader-node-")))

    def __post_init__(self) -> None:
        self._processes: dict[str, _Process] = {}
        self._lock: IO[str] | None = None
        self._netns_before: set[str] = set()

    # --- paths ----------------------------------------------------------------------------------

    def _path(self, name: str) -> Path:
        return self.work_dir / name

    @property
    def socket(self) -> Path:
        return self._path("containerd.sock")

    @property
    def kubelet_root(self) -> Path:
        return self._path("kubelet")

    # --- network --------------------------------------------------------------------------------

    def prepare_network(self) -> None:
        """Take the machine's node lock and make the bridge with the node's address."""
        self._lock = LOCK.open("w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise NodeError(f"another test node runs on this machine ({LOCK} is locked)") from None
        self._netns_before = set(_netns())
        _run("ip", "link", "delete", BRIDGE, check=False)  # left over from a killed run
        _run("ip", "link", "add", BRIDGE, "type", "bridge")
        _run("ip", "addr", "add", f"{NODE_IP}/24", "dev", BRIDGE)
        _run("ip", "link", "set", BRIDGE, "up")
        Path("/proc/sys/net/ipv4/ip_forward").write_text("1")

    def _cni_config(self) -> dict[str, Any]:
        return {
            "cniVersion": "0.4.0",
            "name": "reloader-test",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE,
                    "isGateway": True,
                    "ipMasq": True,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": POD_SUBNET, "gateway": NODE_IP}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": str(self._path("cni-ipam")),
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }

    # --- configuration --------------------------------------------------------------------------

    def _write_configs(self) -> None:
        cni_dir = self._path("cni")
        cni_dir.mkdir()
        (cni_dir / "10-reloader-test.conflist").write_text(json.dumps(self._cni_config()))
        # A containerd of its own: own socket and state, images kept in the cache.
        self._path("containerd.toml").write_text(
            f"""\
version = 2
root = "{CACHE / "node" / "containerd"}"
state = "{self._path("containerd-state")}"
[grpc]
  address = "{self.socket}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{self.images.pause}"
  restrict_oom_score_adj = {"true" if _restricted_oom_score() else "false"}
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
    BinaryName = "{RUNC}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni_dir}"
"""
        )
        identity = self.plane.user_kubeconfig(
            f"system:node:{NODE_NAME}", groups=["system:nodes", "system:masters"]
        )
        self._path("kubelet.kubeconfig").write_text(yaml.safe_dump(identity))
        self._path("ca.crt").write_bytes(self.plane.ca.cert_pem)
        self.kubelet_port = free_port()
        kubelet_config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "failCgroupV1": False,  # these machines are cgroup v1 (hybrid)
            "cgroupDriver": "cgroupfs",
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            "address": NODE_IP,
            "port": self.kubelet_port,
            "readOnlyPort": 0,
            "healthzPort": 0,
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(self._path("ca.crt"))},
            },
            "authorization": {"mode": "Webhook"},
            "failSwapOn": False,
            # Images cannot be pulled again here: never collect them, never evict for disk.
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%"},
            "resolvConf": "/etc/resolv.conf",
            "syncFrequency": "10s",
            "fileCheckFrequency": "10s",
        }
        self._path("kubelet.yaml").write_text(yaml.safe_dump(kubelet_config))
        proxy_config = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(self.plane.kubeconfig_path)},
            "hostnameOverride": NODE_NAME,
            "mode": "iptables",
            "clusterCIDR": POD_SUBNET,
            "healthzBindAddress": f"127.0.0.1:{free_port()}",
            "metricsBindAddress": f"127.0.0.1:{free_port()}",
            "conntrack": {"maxPerCore": 0},  # leave the host's conntrack table size alone
        }
        self._path("kube-proxy.yaml").write_text(yaml.safe_dump(proxy_config))

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> Node:
        """Start containerd, import the images, then kube-proxy and the kubelet; wait for Ready."""
        try:
            self._write_configs()
            containerd = _Process(
                "containerd",
                ["containerd", "--config", str(self._path("containerd.toml"))],
                self._path("containerd.log"),
            )
            self._start(containerd, lambda: self.socket.exists() and self._ctr_ok())
            self._import_images()
            self._start(
                _Process(
                    "kube-proxy",
                    [str(self.bin_dir / "kube-proxy"), f"--config={self._path('kube-proxy.yaml')}"],
                    self._path("kube-proxy.log"),
                ),
                lambda: True,
            )
            scheduler = _Process(
                "kube-scheduler",
                [
                    str(self.bin_dir / "kube-scheduler"),
                    f"--kubeconfig={self.plane.kubeconfig_path}",
                    "--leader-elect=false",
                    "--bind-address=127.0.0.1",
                    f"--secure-port={free_port()}",
                ],
                self._path("kube-scheduler.log"),
            )
            self._start(scheduler, lambda: True)
            kubelet = _Process(
                "kubelet",
                [
                    str(self.bin_dir / "kubelet"),
                    f"--config={self._path('kubelet.yaml')}",
                    f"--kubeconfig={self._path('kubelet.kubeconfig')}",
                    f"--root-dir={self.kubelet_root}",
                    f"--hostname-override={NODE_NAME}",
                    f"--node-ip={NODE_IP}",
                    "--v=1",
                ],
                self._path("kubelet.log"),
            )
            self._start(kubelet, self._node_ready)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, process: _Process, ready: Any) -> None:
        self._processes[process.name] = process
        process.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not ready():
            if not process.running():
                raise NodeError(f"{process.name} exited:\n{process.tail()}")
            if time.monotonic() > deadline:
                raise NodeError(f"{process.name} not ready in time:\n{process.tail()}")
            time.sleep(0.5)

    def _ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run(
            "ctr", "--address", str(self.socket), "--namespace", "k8s.io", *args, check=check
        )

    def _ctr_ok(self) -> bool:
        return self._ctr("version", check=False).returncode == 0

    def _import_images(self) -> None:
        present = set(self._ctr("images", "list", "--quiet").stdout.split())
        wanted = {self.images.pause, self.images.app, self.images.controller}
        for archive in self.images.archives:
            if wanted - present:
                self._ctr("images", "import", archive)
                present = set(self._ctr("images", "list", "--quiet").stdout.split())
        if wanted - present:
            raise NodeError(f"images not in containerd after import: {sorted(wanted - present)}")
        for stale in present - wanted:  # earlier builds of the same images: disk, not history
            if stale.startswith(("localhost/reloader:", "localhost/reloader-test/")):
                self._ctr("images", "remove", stale, check=False)

    def _node_ready(self) -> bool:
        result = self.kubectl("get", "node", NODE_NAME, "-o", "json", check=False)
        if result.returncode != 0:
            return False
        conditions = json.loads(result.stdout)["status"].get("conditions") or []
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    def kubectl(
        self, *args: str, check: bool = True, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """The control plane's kubectl as its admin."""
        result = subprocess.run(
            [str(self.bin_dir / "kubectl"), f"--kubeconfig={self.plane.kubeconfig_path}", *args],
            capture_output=True,
            text=True,
            input=stdin,
        )
        if check and result.returncode != 0:
            raise NodeError(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
        return result

    def stop(self) -> None:
        """Stop the kubelet, every Pod's containers, kube-proxy and containerd; undo the host
        changes (rules, network namespaces, mounts, bridge). Safe to call twice."""
        for name in ("kubelet", "kube-scheduler", "kube-proxy"):
            process = self._processes.pop(name, None)
            if process is not None:
                process.stop()
        if "containerd" in self._processes:
            self._remove_containers()
            self._processes.pop("containerd").stop()
        _remove_kube_rules()
        for name in set(_netns()) - self._netns_before:
            _run("ip", "netns", "delete", name, check=False)
        _unmount_under(self.work_dir)
        _run("ip", "link", "delete", BRIDGE, check=False)
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _remove_containers(self) -> None:
        """Kill and remove every container (sandboxes too) in containerd's Kubernetes namespace:
        the kubelet does not stop Pods when it exits, and the next run starts from nothing."""
        for task in self._ctr("tasks", "list", "--quiet", check=False).stdout.split():
            self._ctr("tasks", "kill", "--signal", "SIGKILL", task, check=False)
        deadline = time.monotonic() + 10
        while self._ctr("tasks", "list", "--quiet", check=False).stdout.split():
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        for task in self._ctr("tasks", "list", "--quiet", check=False).stdout.split():
            self._ctr("tasks", "delete", "--force", task, check=False)
        for container in self._ctr("containers", "list", "--quiet", check=False).stdout.split():
            self._ctr("containers", "delete", container, check=False)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.work_dir, ignore_errors=True)

    def logs(self) -> Iterator[tuple[str, str]]:
        for process in self._processes.values():
            yield process.name, process.tail()


def _restricted_oom_score() -> bool:
    """Whether this machine denies lowering ``oom_score_adj`` (no CAP_SYS_RESOURCE in our bounding
    set, as on these VMs): then containerd must not try (the sandbox's -998 fails runc's start
    with "failed to update /proc/self/oom_score_adj: Permission denied")."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapBnd:"):
            return not int(line.split()[1], 16) & (1 << 24)  # CAP_SYS_RESOURCE
    return False


def _netns() -> list[str]:
    result = _run("ip", "netns", "list", check=False)
    return [line.split()[0] for line in result.stdout.splitlines() if line.strip()]


def _remove_kube_rules() -> None:
    """Delete the chains kube-proxy, the kubelet and the CNI plugins made (``KUBE-*``, ``CNI-*``)
    and the jumps to them: Pods are killed without a CNI DEL, so nobody else will."""
    ours = ("KUBE-", "CNI-")
    for command in ("iptables", "ip6tables"):
        for table in ("filter", "nat", "mangle"):
            listed = _run(command, "-t", table, "-S", check=False).stdout.splitlines()
            for rule in listed:
                words = shlex.split(rule)
                if (
                    words[:1] == ["-A"]
                    and not words[1].startswith(ours)
                    and any(o in rule for o in ours)
                ):
                    _run(command, "-t", table, "-D", *words[1:], check=False)
            chains = [r.split()[1] for r in listed if r.startswith(("-N KUBE-", "-N CNI-"))]
            for chain in chains:
                _run(command, "-t", table, "-F", chain, check=False)
            for chain in chains:
                _run(command, "-t", table, "-X", chain, check=False)


def _unmount_under(root: Path) -> None:
    """Unmount what the kubelet and containerd mounted under ``root`` (Secret tmpfs, rootfs
    overlays, sandbox shm), deepest first, so the directory can be removed."""
    prefix = str(root.resolve()) + "/"
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for point in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
        _run("umount", "--lazy", point, check=False)


@contextlib.contextmanager
def running_node() -> Iterator[Node]:
    """A control plane and a node with the locally built images, taken down afterwards."""
    missing = missing_prerequisites()
    if missing:
        raise NodeError(f"missing for the node: {', '.join(missing)}; run {SETUP_SCRIPT} as root")
    images = build_images()
    bin_dir = node_binary_dir()
    plane = node_control_plane()
    node = Node(plane, images, bin_dir=bin_dir)
    try:
        node.prepare_network()
        plane.start()
        node.start()
        yield node
    finally:
        node.remove()
        plane.remove()
