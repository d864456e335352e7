"""A controller under test: a command run as a child process and measured from the outside.

The command is a template. These placeholders are filled for each run (``{{`` for a literal brace):

=========================  ======================================================================
``{python}``               this interpreter
``{kubeconfig}``           a kubeconfig file for this run's own audited user (also ``$KUBECONFIG``)
``{namespaces}``           the run's namespaces, comma-separated; empty for cluster-wide
``{namespaces_flag}``      ``--namespaces=<the same>``, or nothing for cluster-wide (Stakater
                           reads an empty ``--namespaces=`` as no list, but older builds lack the
                           flag: leave it out there)
``{namespace}``            the first namespace; empty for cluster-wide (Stakater before
                           ``--namespaces`` watched one namespace given as ``KUBERNETES_NAMESPACE``)
``{metrics_port}``         the port the bench reads readiness and metrics on: a free one, or the
                           contender's fixed port (``--vs-port``; Stakater always serves ``:9090``)
``{controller_namespace}`` a namespace that exists, for the controller's own objects
``{debounce}``             the scenario's debounce in seconds (only ours has such a setting)
``{reload_strategy}``      ``annotations`` or ``env-vars`` (S11 asks for env-vars)
=========================  ======================================================================

The command runs through ``/bin/sh -c`` in its own process group, so a wrapper script or an env
prefix works; it is stopped with SIGTERM to the group (SIGKILL after 30 s). RSS and CPU are the sums
over the whole process tree, sampled every 0.5 s by a thread, so a busy event loop in the bench
cannot delay or skip samples.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import psutil  # type: ignore[import-untyped]

from tests.controlplane.envtest import free_port

Semantics = Literal["level", "edge"]
"""What rollouts to expect: ``level`` (ours: one per data change, none at startup, a burst within
the debounce is one), ``edge`` (Stakater and the floor: one per event that changes data)."""

SAMPLE_INTERVAL = 0.5
STOP_TIMEOUT = 30.0

OURS_COMMAND = (
    "{python} -m reloader --kubeconfig={kubeconfig} --namespaces={namespaces}"
    " --metrics-port={metrics_port} --metrics-address=127.0.0.1 --log-format=json"
    " --debounce-seconds={debounce} --min-restart-interval-seconds=0"
    " --restart-rate-per-second=1000 --restart-burst=1000"
    " --controller-namespace={controller_namespace} --reload-strategy={reload_strategy}"
)
"""Ours as the bench runs it: product defaults except the restart throttles (minimum interval,
global rate), which exist to slow rollouts down on purpose and would be measured instead of the
controller."""

FLOOR_COMMAND = (
    "{python} -m bench.floor --kubeconfig={kubeconfig} --namespaces={namespaces}"
    " --metrics-port={metrics_port}"
)


@dataclass(frozen=True)
class Contender:
    """A controller command and how to read it: readiness path and expected semantics."""

    name: str
    command: str
    ready_path: str
    semantics: Semantics
    port: int | None = None
    """The port it serves ``ready_path`` on when it cannot be told one (Stakater: 9090); None: a
    free port, passed as ``{metrics_port}``."""


OURS = Contender("reloader", OURS_COMMAND, "/readyz", "level")
FLOOR = Contender("floor", FLOOR_COMMAND, "/readyz", "edge")


@dataclass(frozen=True)
class Launch:
    """What one run of a controller is given."""

    kubeconfig: Path
    namespaces: Sequence[str]
    controller_namespace: str
    debounce: float = 0.0
    reload_strategy: str = "annotations"


def render(command: str, values: Mapping[str, str]) -> str:
    """Fill the placeholders; an unknown one is an error naming it, not a silent blank."""
    try:
        return command.format_map(values)
    except KeyError as error:
        raise SystemExit(f"bench: unknown placeholder {error} in command {command!r}") from None


@dataclass(frozen=True)
class Sample:
    """Seconds since the run's origin, RSS bytes, CPU seconds and run-queue seconds
    (``run_queue_seconds``) of the process tree."""

    at: float
    rss: int
    cpu: float
    waited: float = 0.0


def run_queue_seconds(pid: int) -> float:
    """Seconds the threads of ``pid`` alive now have spent ready to run but waiting for a CPU
    (the second field of Linux's ``/proc/<pid>/task/<tid>/schedstat``, in nanoseconds); 0 where
    there is no such file. On two cores shared with the control plane this is where a
    controller's latency tail goes: its event loop runnable, no core free."""
    total = 0
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with (
                contextlib.suppress(OSError, ValueError, IndexError),
                open(f"/proc/{pid}/task/{tid}/schedstat") as stats,
            ):
                total += int(stats.read().split()[1])
    return total / 1e9


def tree_usage(process: psutil.Process) -> tuple[int, float, float]:
    """RSS, CPU seconds and run-queue seconds of a process and all its descendants; vanished ones
    count as zero."""
    rss, cpu, waited = 0, 0.0, 0.0
    with contextlib.suppress(psutil.Error):
        members = [process, *process.children(recursive=True)]
        for member in members:
            with contextlib.suppress(psutil.Error):
                info = member.memory_info()
                times = member.cpu_times()
                rss += info.rss
                cpu += times.user + times.system
                waited += run_queue_seconds(member.pid)
    return rss, cpu, waited


class Sampler(threading.Thread):
    """Samples a process tree every ``SAMPLE_INTERVAL`` until stopped."""

    def __init__(self, pid: int, *, origin: float) -> None:
        super().__init__(daemon=True, name=f"sampler-{pid}")
        self._process = psutil.Process(pid)
        self._origin = origin
        self._stop_event = threading.Event()
        self.samples: list[Sample] = []

    def sample(self) -> None:
        rss, cpu, waited = tree_usage(self._process)
        if rss:
            self.samples.append(Sample(time.monotonic() - self._origin, rss, cpu, waited))

    def run(self) -> None:
        self.sample()
        while not self._stop_event.wait(SAMPLE_INTERVAL):
            self.sample()

    def stop(self) -> None:
        self.sample()
        self._stop_event.set()
        self.join()


def http_status(url: str) -> int:
    """The status of a GET, 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except OSError:
        return 0


def http_text(url: str) -> str:
    with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())
    return ""


@dataclass
class RunningController:
    """One child process of a contender: started, awaited ready, sampled, stopped."""

    contender: Contender
    launch: Launch
    log_path: Path
    origin: float
    port: int = 0
    ready_seconds: float | None = None
    exit_code: int | None = None
    _popen: subprocess.Popen[bytes] | None = None
    _sampler: Sampler | None = None
    _started: float = 0.0

    def __post_init__(self) -> None:
        if not self.port:
            self.port = self.contender.port or free_port()

    def argv(self) -> list[str]:
        namespaces = ",".join(self.launch.namespaces)
        values = {
            "python": sys.executable,
            "kubeconfig": str(self.launch.kubeconfig),
            "namespaces": namespaces,
            "namespaces_flag": f"--namespaces={namespaces}" if namespaces else "",
            "namespace": self.launch.namespaces[0] if self.launch.namespaces else "",
            "metrics_port": str(self.port),
            "controller_namespace": self.launch.controller_namespace,
            "debounce": f"{self.launch.debounce:g}",
            "reload_strategy": self.launch.reload_strategy,
        }
        return ["/bin/sh", "-c", render(self.contender.command, values)]

    def start(self) -> None:
        if self.contender.port and http_status(self.url + "/") != 0:
            raise RuntimeError(
                f"port {self.port} is already served: {self.contender.name} needs it"
            )
        env = {**os.environ, "KUBECONFIG": str(self.launch.kubeconfig)}
        env.pop("KUBERNETES_NAMESPACE", None)  # Stakater would watch that one namespace only
        with self.log_path.open("ab") as log:
            self._popen = subprocess.Popen(
                self.argv(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        self._started = time.monotonic()
        self._sampler = Sampler(self._popen.pid, origin=self.origin)
        self._sampler.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    async def wait_ready(self, *, limit: float = 180.0) -> float:
        """Seconds from spawn until the ready path answers 200 (fixed 3 s when it is empty)."""
        path = self.contender.ready_path
        deadline = self._started + limit
        while True:
            if not self.running():
                raise RuntimeError(f"{self.contender.name} exited; see {self.log_path}")
            if not path:
                await asyncio.sleep(max(0.0, self._started + 3.0 - time.monotonic()))
                break
            if await asyncio.to_thread(http_status, self.url + path) == 200:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.contender.name} not ready in {limit}s")
            await asyncio.sleep(0.05)
        self.ready_seconds = time.monotonic() - self._started
        return self.ready_seconds

    async def metrics(self) -> str:
        return await asyncio.to_thread(http_text, self.url + "/metrics")

    async def stop(self) -> None:
        """SIGTERM the process group, wait, SIGKILL if it lingers; the last sample is kept."""
        if self._sampler is not None:
            self._sampler.stop()
        if self._popen is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._popen.pid, signal.SIGTERM)
        try:
            self.exit_code = await asyncio.to_thread(self._popen.wait, STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._popen.pid, signal.SIGKILL)
            self.exit_code = await asyncio.to_thread(self._popen.wait)

    @property
    def samples(self) -> list[Sample]:
        return list(self._sampler.samples) if self._sampler is not None else []
