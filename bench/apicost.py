"""What each controller costs the API server, counted from the apiserver's audit log.

Why the audit log and not the apiserver's metrics: on this Kubernetes version
``apiserver_request_total`` is labelled by verb, resource, scope, code and ``component`` (always
``apiserver``), not by user or user agent, so with kube-controller-manager and the bench itself
sending requests it cannot tell whose they were. The audit log names the user of every request, and
each controller run authenticates as a user of its own (``cluster.BenchPlane.kubeconfig_for``), so
the count is exact. ``metric_labels`` reads the label set the server reports, and the run records
it, so a version that adds a user-agent label shows up in the results.

One request is one ``auditID``: a watch logs ``ResponseStarted`` and, when it ends,
``ResponseComplete``; it counts once. Verbs are the audit verbs (get, list, watch, create, update,
patch, delete).
"""

from __future__ import annotations

import base64
import json
import re
import ssl
import tempfile
import urllib.request
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from tests.controlplane.envtest import ControlPlane

WRITE_VERBS = frozenset({"create", "update", "patch", "delete", "deletecollection"})
REVIEWS = frozenset(
    {
        "selfsubjectaccessreviews",
        "selfsubjectrulesreviews",
        "selfsubjectreviews",
        "subjectaccessreviews",
        "localsubjectaccessreviews",
        "tokenreviews",
    }
)
"""Resources whose ``create`` is a question to the server and stores nothing (the controller's
start-up permission check sends about 30 SelfSubjectAccessReviews): not writes."""


@dataclass(frozen=True)
class Request:
    """One audited request: verb, resource, HTTP code, received at (epoch seconds), user agent;
    when its answer was complete, and the object it named (``phases``)."""

    verb: str
    resource: str
    code: int
    at: float
    user_agent: str
    done: float = 0.0
    namespace: str = ""
    name: str = ""


def parse_event(line: str) -> tuple[str, str, Request] | None:
    """(user, auditID, request) from one audit log line; None for anything unreadable."""
    try:
        event: dict[str, Any] = json.loads(line)
        received = datetime.fromisoformat(event["requestReceivedTimestamp"]).timestamp()
        stage = event.get("stageTimestamp")
        ref = event.get("objectRef") or {}
        request = Request(
            verb=str(event.get("verb", "")),
            resource=str(ref.get("resource", "")),
            code=int((event.get("responseStatus") or {}).get("code", 0)),
            at=received,
            user_agent=str(event.get("userAgent", "")),
            done=datetime.fromisoformat(stage).timestamp() if stage else received,
            namespace=str(ref.get("namespace", "")),
            name=str(ref.get("name", "")),
        )
        return str(event["user"]["username"]), str(event["auditID"]), request
    except (ValueError, KeyError, TypeError):
        return None


class AuditLog:
    """Reads the audit log incrementally and keeps every audited request, by user."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._offset = 0
        self._by_user: dict[str, dict[str, Request]] = {}

    def refresh(self) -> None:
        """Read complete lines appended since the last call (a partial last line waits)."""
        if not self._path.exists():
            return
        with self._path.open("rb") as handle:
            handle.seek(self._offset)
            chunk = handle.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self._offset += len(complete)
        for line in complete.decode(errors="replace").splitlines():
            parsed = parse_event(line)
            if parsed is not None:
                user, audit_id, request = parsed
                seen = self._by_user.setdefault(user, {})
                earlier = seen.get(audit_id)
                if earlier is None or request.done > earlier.done:
                    seen[audit_id] = request  # a watch's ResponseComplete follows its start

    def requests(self, user: str) -> list[Request]:
        self.refresh()
        return sorted(self._by_user.get(user, {}).values(), key=lambda r: r.at)


def by_verb(requests: Iterable[Request]) -> dict[str, int]:
    """Requests by audit verb; a ``create`` of a review resource is counted as ``review``."""
    verbs = ("review" if r.resource in REVIEWS else r.verb for r in requests)
    return dict(sorted(Counter(verbs).items()))


def failures(requests: Iterable[Request]) -> dict[str, int]:
    """Requests answered with an error, by status code (409: a conflict the controller retried)."""
    return dict(sorted(Counter(str(r.code) for r in requests if r.code >= 400).items()))


def writes(requests: Iterable[Request], *, since: float = 0.0, until: float = float("inf")) -> int:
    """Write requests received in [since, until) (epoch seconds); reviews are not writes."""
    return sum(
        1
        for r in requests
        if r.verb in WRITE_VERBS and r.resource not in REVIEWS and since <= r.at < until
    )


def _admin_ssl(plane: ControlPlane, directory: Path) -> ssl.SSLContext:
    user = plane.kubeconfig["users"][0]["user"]
    cert, key = directory / "admin.crt", directory / "admin.key"
    cert.write_bytes(base64.b64decode(user["client-certificate-data"]))
    key.write_bytes(base64.b64decode(user["client-key-data"]))
    context = ssl.create_default_context(cadata=plane.ca.cert_pem.decode())
    context.load_cert_chain(str(cert), str(key))
    return context


def metric_labels(plane: ControlPlane, metric: str = "apiserver_request_total") -> list[str]:
    """The label names the apiserver reports on ``metric`` (read with the admin certificate)."""
    with tempfile.TemporaryDirectory() as directory:
        context = _admin_ssl(plane, Path(directory))
        with urllib.request.urlopen(f"{plane.url}/metrics", context=context, timeout=10) as reply:
            text = reply.read().decode()
    for line in text.splitlines():
        if line.startswith(metric + "{"):
            return sorted(set(re.findall(r'(\w+)="', line)))
    return []
