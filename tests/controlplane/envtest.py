"""A real, local Kubernetes control plane for tests, the demo and the benchmark: no Docker needed.

It does what controller-runtime's envtest does, plus kube-controller-manager so that a pod-template
patch produces a real new ReplicaSet:

- binaries come from ``build.sh`` (built from the Go module proxy, cached outside the checkout);
- everything lives in a temporary directory; ports are free ports on 127.0.0.1;
- one CA signs the apiserver's serving certificate and the client certificates (the admin user is in
  ``system:masters``; ``user_kubeconfig`` mints certificates for any other user and groups, which is
  how RBAC tests run as a restricted identity); a separate key pair signs service-account tokens;
- ``--advertise-address=127.0.0.1`` because these machines have no default route, RBAC on, and
  ``/readyz`` awaited so the RBAC bootstrap is done before a test starts.

The processes are plain ``subprocess.Popen`` children, so the control plane does not belong to any
event loop and can be shared by a whole pytest session. ``restart_apiserver`` stops and starts the
apiserver on the same port and etcd, which is how tests force watch failures and 410 relists.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

BUILD_SCRIPT = Path(__file__).with_name("build.sh")
START_TIMEOUT = float(os.environ.get("RELOADER_TESTENV_START_TIMEOUT", "90"))
CONTROLLERS = "deployment,replicaset,statefulset,daemonset,job,cronjob,garbagecollector,namespace"
AUDITED_GROUP = "reloader-test:audited"
"""Requests of users in this group are written to the audit log; nobody else's are."""
AUDIT_POLICY = f"""\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
  - level: Metadata
    userGroups: ["{AUDITED_GROUP}"]
  - level: None
"""


def binary_dir() -> Path:
    """The directory holding etcd, kube-apiserver and kube-controller-manager, building if needed.

    ``RELOADER_TESTENV_BIN`` points at ready binaries; otherwise ``build.sh`` (idempotent, cheap
    when the cache is warm) is run and its last output line is the directory.
    """
    preset = os.environ.get("RELOADER_TESTENV_BIN")
    if preset:
        return Path(preset)
    result = subprocess.run(
        ["bash", str(BUILD_SCRIPT)], check=True, stdout=subprocess.PIPE, text=True
    )
    return Path(result.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- certificates -------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyPair:
    cert_pem: bytes
    key_pem: bytes


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class TinyCA:
    """A throwaway certificate authority valid for a week."""

    def __init__(self, common_name: str) -> None:
        self._key = _key()
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = datetime.datetime.now(datetime.UTC)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(self._name)
            .issuer_name(self._name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self._key, hashes.SHA256())
        )

    @property
    def cert_pem(self) -> bytes:
        return self._cert.public_bytes(serialization.Encoding.PEM)

    def issue(
        self,
        common_name: str,
        *,
        organizations: Sequence[str] = (),
        server_names: Sequence[str] = (),
        server_ips: Sequence[str] = (),
    ) -> KeyPair:
        """A leaf certificate: for a server when names or IPs are given, else for a client."""
        key = _key()
        attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
        attributes += [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organizations]
        now = datetime.datetime.now(datetime.UTC)
        server = bool(server_names or server_ips)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attributes))
            .issuer_name(self._name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if server:
            sans: list[x509.GeneralName] = [x509.DNSName(n) for n in server_names]
            sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in server_ips]
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _pem_key(key))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --- processes ----------------------------------------------------------------------------------


@dataclass
class _Process:
    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.popen = subprocess.Popen(
            self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        log.close()

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        if self.popen is None:
            return
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self.popen = None

    def tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


class ControlPlaneError(RuntimeError):
    pass


@dataclass
class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager on 127.0.0.1, for one test session."""

    bin_dir: Path = field(default_factory=binary_dir)
    work_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="reloader-cp-")))
    controller_manager: bool = True
    extra_apiserver_args: Sequence[str] = ()
    audit: bool = True
    """Write an audit log of ``AUDITED_GROUP``'s requests (``audit_events``). It costs nothing
    for other users, so it is on by default; it is left out when ``extra_apiserver_args`` bring
    an audit policy of their own."""
    controllers: str = CONTROLLERS
    """The kube-controller-manager's ``--controllers``; a node adds the ones Pods and Services need
    (``tests/node``)."""
    service_account_admission: bool = False
    """Whether Pods get their ServiceAccount token volume: off for out-of-cluster tests (no
    ServiceAccount controller needed), on for a control plane with a node."""
    serving_ips: Sequence[str] = ()
    """More IP addresses for the serving certificate than 127.0.0.1: the ``kubernetes`` Service's
    ClusterIP and the address Pods reach the apiserver at, when a node runs Pods."""

    def __post_init__(self) -> None:
        self.etcd_port, self.etcd_peer_port = free_port(), free_port()
        self.port = free_port()
        self.ca = TinyCA("reloader-test-ca")
        self._processes: dict[str, _Process] = {}
        self._write_credentials()

    # --- addresses and credentials --------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def etcd_url(self) -> str:
        return f"http://127.0.0.1:{self.etcd_port}"

    def _path(self, name: str) -> Path:
        return self.work_dir / name

    def _write_credentials(self) -> None:
        serving = self.ca.issue(
            "localhost",
            server_names=[
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
            ],
            server_ips=["127.0.0.1", *self.serving_ips],
        )
        self._path("ca.crt").write_bytes(self.ca.cert_pem)
        self._path("apiserver.crt").write_bytes(serving.cert_pem)
        self._path("apiserver.key").write_bytes(serving.key_pem)
        signer = _key()
        self._path("sa.key").write_bytes(_pem_key(signer))
        self._path("sa.pub").write_bytes(
            signer.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        self.kubeconfig = self.user_kubeconfig("admin", groups=["system:masters"])
        self.kubeconfig_path = self._path("admin.kubeconfig")
        self.kubeconfig_path.write_text(yaml.safe_dump(self.kubeconfig))

    def user_kubeconfig(self, user: str, *, groups: Sequence[str] = ()) -> dict[str, Any]:
        """A kubeconfig authenticating as ``user`` in ``groups`` by a client certificate."""
        pair = self.ca.issue(user, organizations=groups)
        return kubeconfig_dict(
            self.url,
            ca_pem=self.ca.cert_pem,
            user={
                "client-certificate-data": _b64(pair.cert_pem),
                "client-key-data": _b64(pair.key_pem),
            },
        )

    def audited_kubeconfig(self, user: str) -> dict[str, Any]:
        """A cluster-admin kubeconfig for ``user`` whose every request is in the audit log."""
        return self.user_kubeconfig(user, groups=["system:masters", AUDITED_GROUP])

    @property
    def audit_log(self) -> Path:
        return self._path("audit.log")

    def audit_events(self, user: str) -> list[dict[str, Any]]:
        """The audit events of ``user``'s completed requests, oldest first.

        The apiserver writes an event before it answers (the log backend's default blocking
        mode), so a request this process saw answered is already in the file.
        """
        if not self.audit:
            raise ControlPlaneError("this control plane was started without an audit log")
        if not self.audit_log.exists():
            return []
        events = []
        for line in self.audit_log.read_text().splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:  # the last line, still being written
                continue
            if event.get("user", {}).get("username") == user:
                events.append(event)
        return events

    def _audit_args(self) -> list[str]:
        if not self.audit or any(
            a.startswith("--audit-policy-file") for a in self.extra_apiserver_args
        ):
            return []
        policy = self._path("audit-policy.yaml")
        policy.write_text(AUDIT_POLICY)
        return [
            f"--audit-policy-file={policy}",
            f"--audit-log-path={self.audit_log}",
            "--audit-log-format=json",
            "--audit-log-maxsize=0",
        ]

    def token_kubeconfig(self, token: str) -> dict[str, Any]:
        """A kubeconfig authenticating with a bearer token (a ServiceAccount's TokenRequest)."""
        return kubeconfig_dict(self.url, ca_pem=self.ca.cert_pem, user={"token": token})

    # --- lifecycle ------------------------------------------------------------------------------

    def _etcd(self) -> _Process:
        client = f"http://127.0.0.1:{self.etcd_port}"
        argv = [
            str(self.bin_dir / "etcd"),
            f"--data-dir={self._path('etcd')}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls=http://127.0.0.1:{self.etcd_peer_port}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{self.etcd_peer_port}",
            f"--initial-cluster=default=http://127.0.0.1:{self.etcd_peer_port}",
            "--unsafe-no-fsync=true",
            "--log-level=warn",
        ]
        return _Process("etcd", argv, self._path("etcd.log"))

    def _apiserver(self) -> _Process:
        argv = [
            str(self.bin_dir / "kube-apiserver"),
            f"--etcd-servers={self.etcd_url}",
            f"--cert-dir={self._path('certs')}",
            f"--tls-cert-file={self._path('apiserver.crt')}",
            f"--tls-private-key-file={self._path('apiserver.key')}",
            f"--client-ca-file={self._path('ca.crt')}",
            f"--secure-port={self.port}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            "--endpoint-reconciler-type=none",
            "--service-cluster-ip-range=10.0.0.0/24",
            "--allow-privileged=true",
            *self._admission_args(),
            "--authorization-mode=RBAC",
            f"--service-account-issuer={self.url}",
            f"--service-account-key-file={self._path('sa.pub')}",
            f"--service-account-signing-key-file={self._path('sa.key')}",
            "--v=0",
            *self._audit_args(),
            *self.extra_apiserver_args,
        ]
        return _Process("kube-apiserver", argv, self._path("kube-apiserver.log"))

    def _admission_args(self) -> list[str]:
        if self.service_account_admission:
            return []
        return ["--disable-admission-plugins=ServiceAccount"]

    def _controller_manager(self) -> _Process:
        argv = [
            str(self.bin_dir / "kube-controller-manager"),
            f"--kubeconfig={self.kubeconfig_path}",
            "--bind-address=127.0.0.1",
            f"--secure-port={free_port()}",
            "--leader-elect=false",
            f"--controllers={self.controllers}",
            f"--root-ca-file={self._path('ca.crt')}",
            f"--service-account-private-key-file={self._path('sa.key')}",
            "--kube-api-qps=200",
            "--kube-api-burst=400",
            "--concurrent-deployment-syncs=10",
            "--v=0",
        ]
        return _Process("kube-controller-manager", argv, self._path("kcm.log"))

    def start(self) -> ControlPlane:
        """Start etcd, then the apiserver, then the controller-manager; each awaited healthy."""
        try:
            self._start(self._etcd(), lambda: http_ok(f"{self.etcd_url}/health", None))
            self.start_apiserver()
            if self.controller_manager:
                self._processes["kcm"] = self._controller_manager()
                self._processes["kcm"].start()
        except BaseException:
            self.stop()
            raise
        return self

    def start_apiserver(self) -> None:
        """Start the apiserver; when it comes back after a stop or a kill, start the
        controller-manager again with it.

        While the apiserver is down, the controller-manager's reflectors back off up to 30 s
        (with as much jitter again) between attempts, so the Deployment controller could still be
        waiting to reconnect when the next test needed a ReplicaSet (seen: two webhook tests
        timing out at 30 s right after test_watch_faults restarted the apiserver). The fault tests
        check how our controller recovers; the Deployment controller's recovery is not under test.
        """
        self._start(self._apiserver(), lambda: http_ok(f"{self.url}/readyz", self._ssl()))
        manager = self._processes.get("kcm")
        if manager is not None:
            manager.stop()
            manager.start()

    def stop_apiserver(self) -> None:
        process = self._processes.pop("kube-apiserver", None)
        if process is not None:
            process.stop()

    def restart_apiserver(self) -> None:
        """Stop and start the apiserver on the same port: every watch breaks, caches start over."""
        self.stop_apiserver()
        self.start_apiserver()

    def kill_apiserver(self) -> None:
        """SIGKILL the apiserver (a crash or an OOM kill: no graceful close of any connection)."""
        process = self._processes.pop("kube-apiserver", None)
        if process is not None and process.popen is not None:
            process.popen.kill()
            process.popen.wait()

    def freeze_apiserver(self) -> None:
        """SIGSTOP the apiserver: connections stay open but go silent (a hung server or proxy)."""
        self._signal_apiserver(signal.SIGSTOP)

    def thaw_apiserver(self) -> None:
        self._signal_apiserver(signal.SIGCONT)

    def _signal_apiserver(self, signum: signal.Signals) -> None:
        process = self._processes["kube-apiserver"]
        assert process.popen is not None
        process.popen.send_signal(signum)

    def etcd_delete(self, key: str) -> int:
        """Delete one key straight from etcd (behind the apiserver's back); returns keys deleted.

        With the apiserver stopped, this is "an object deleted while nobody was watching": the
        restarted apiserver's watch cache starts after the deletion, so a client resuming from
        its old resourceVersion gets 410 Gone and must relist to notice.
        """
        body = json.dumps({"key": _b64(key.encode())}).encode()
        request = urllib.request.Request(
            f"{self.etcd_url}/v3/kv/deleterange", data=body, method="POST"
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(json.loads(response.read()).get("deleted", 0))

    def etcd_compact(self) -> int:
        """Compact etcd's history up to its current revision; returns that revision.

        With the apiserver's watch cache off for a resource (``--watch-cache-sizes=<resource>#0``)
        its watches are served by etcd, so a watch resumed from a revision before this one gets
        410 Gone, as after a long disconnection in a busy cluster.
        """
        revision = int(self._etcd_post("/v3/kv/range", {"key": _b64(b"\0")})["header"]["revision"])
        self._etcd_post("/v3/kv/compaction", {"revision": str(revision), "physical": True})
        return revision

    def _etcd_post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(
            f"{self.etcd_url}{path}", data=json.dumps(body).encode(), method="POST"
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return dict(json.loads(response.read()))

    def _start(self, process: _Process, healthy: Any) -> None:
        self._processes[process.name] = process
        process.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not healthy():
            if not process.running():
                raise ControlPlaneError(f"{process.name} exited:\n{process.tail()}")
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"{process.name} not healthy in time:\n{process.tail()}")
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop in reverse order of start; safe to call twice."""
        for name in ("kcm", "kube-apiserver", "etcd"):
            process = self._processes.pop(name, None)
            if process is not None:
                process.stop()

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.work_dir, ignore_errors=True)

    def _ssl(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self._path("ca.crt")))
        return context

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def logs(self) -> Iterator[tuple[str, str]]:
        for process in self._processes.values():
            yield process.name, process.tail()


def kubeconfig_dict(server: str, *, ca_pem: bytes, user: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "envtest",
                "cluster": {"server": server, "certificate-authority-data": _b64(ca_pem)},
            }
        ],
        "users": [{"name": "envtest", "user": user}],
        "contexts": [{"name": "envtest", "context": {"cluster": "envtest", "user": "envtest"}}],
        "current-context": "envtest",
    }


def http_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
    """Whether ``url`` answers 200 now (any connection error counts as no)."""
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def main() -> None:
    """Start a control plane and wait: for poking at it with kubectl."""
    with ControlPlane() as plane:
        print(f"control plane up at {plane.url}")
        print(f"  export KUBECONFIG={plane.kubeconfig_path}")
        print("Ctrl-C to stop.")
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)


if __name__ == "__main__":
    main()
