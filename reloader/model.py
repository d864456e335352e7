"""The vocabulary every other module speaks: identities, raw body shapes and the workload kinds.

No I/O lives here. Identities are frozen, hashable dataclasses so they can key dicts and sets in
the index and the work queue. Raw Kubernetes JSON is described by ``TypedDict``s (total=False,
because the API server omits empty fields). A workload kind is a row of data in ``KINDS``, not a
set of functions: adding a kind means adding a row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, NotRequired, TypedDict

ConfigKind = Literal["ConfigMap", "Secret", "SecretProviderClass"]
CONFIG_KINDS: tuple[ConfigKind, ...] = ("ConfigMap", "Secret")
"""The kinds with data of their own, each watched by an informer. A ``SecretProviderClass`` (CSI
secrets store, ``--enable-csi-integration``) is a config too, but what its pods hold is read from
their ``SecretProviderClassPodStatus`` objects, per workload (``csi.py``)."""
SPC: ConfigKind = "SecretProviderClass"


WorkloadKindName = Literal["Deployment", "StatefulSet", "DaemonSet", "CronJob", "Job", "Rollout"]

RestartMethod = Literal["template", "create-job", "recreate", "rollout"]
"""How a kind is restarted: patch its pod template; create a Job from a CronJob's jobTemplate;
delete and recreate a Job; or an Argo Rollout (template patch, or ``spec.restartAt``)."""


@dataclass(frozen=True, slots=True, order=True)
class ObjectKey:
    """Namespace and name of any namespaced object: the key of an informer's store."""

    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True, order=True)
class ConfigKey:
    """One ConfigMap or Secret."""

    kind: ConfigKind
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind}/{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True, order=True)
class WorkloadKey:
    """One workload; the item the work queue holds."""

    kind: WorkloadKindName
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind}/{self.namespace}/{self.name}"


def workload_config_name(spc: str, workload: WorkloadKey) -> str:
    """The name under which one workload's view of a SecretProviderClass is kept (``csi.py``) and
    looked up (``decide.py``). Two workloads' pods may hold different versions of one class, so
    the view is per workload; no config name can contain ``@``."""
    return f"{spc}@{workload.kind}/{workload.name}"


@dataclass(frozen=True, slots=True)
class ConfigRef:
    """A pod spec's use of one config.

    ``keys`` is the set of data keys the pod reads (``configMapKeyRef.key``, volume ``items``), or
    ``None`` when it reads the whole object (``envFrom``, a volume without ``items``). The digest of
    a reference covers only those keys, so editing an unused key restarts nothing.
    ``containers`` names the containers that use it, for ``containerRefs`` and the env-vars
    strategy.
    """

    kind: ConfigKind
    name: str
    keys: frozenset[str] | None
    containers: tuple[str, ...]
    """Sorted, without repeats."""


# --- raw bodies -------------------------------------------------------------------------------


class RawMetadata(TypedDict, total=False):
    name: str
    namespace: str
    uid: str
    resourceVersion: str
    generation: int
    labels: dict[str, str]
    annotations: dict[str, str]
    creationTimestamp: str
    ownerReferences: list[dict[str, Any]]


class RawObject(TypedDict, total=False):
    """Any Kubernetes object as decoded from JSON; the fields we read are typed, the rest opaque."""

    apiVersion: str
    kind: str
    metadata: RawMetadata
    spec: dict[str, Any]
    status: dict[str, Any]
    data: dict[str, str]
    binaryData: dict[str, str]
    stringData: dict[str, str]
    type: str


WatchEventType = Literal["ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR"]


class RawWatchEvent(TypedDict):
    type: WatchEventType
    object: RawObject


class RawStatus(TypedDict, total=False):
    """``metav1.Status``, as sent in an ERROR watch event or an error response body."""

    kind: str
    code: int
    reason: str
    message: str
    details: NotRequired[dict[str, Any]]


# --- resource kinds ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Resource:
    """Where a resource lives in the API: enough to build list, watch and patch URLs."""

    group: str
    version: str
    plural: str
    kind: str

    @property
    def api_prefix(self) -> str:
        return f"/api/{self.version}" if not self.group else f"/apis/{self.group}/{self.version}"

    def collection_path(self, namespace: str | None) -> str:
        """URL of the collection, cluster-wide when ``namespace`` is None."""
        if namespace is None:
            return f"{self.api_prefix}/{self.plural}"
        return f"{self.api_prefix}/namespaces/{namespace}/{self.plural}"

    def object_path(self, namespace: str, name: str) -> str:
        return f"{self.collection_path(namespace)}/{name}"


CONFIGMAPS = Resource(group="", version="v1", plural="configmaps", kind="ConfigMap")
SECRETS = Resource(group="", version="v1", plural="secrets", kind="Secret")
EVENTS = Resource(group="", version="v1", plural="events", kind="Event")
NAMESPACES = Resource(group="", version="v1", plural="namespaces", kind="Namespace")

CONFIG_RESOURCES: dict[ConfigKind, Resource] = {"ConfigMap": CONFIGMAPS, "Secret": SECRETS}


@dataclass(frozen=True, slots=True)
class WorkloadKind:
    """One row per workload kind: where it lives, where its pod template sits, how it restarts.

    ``pod_template_path`` is the chain of keys from the object's root to the pod template
    (``spec.template`` for Deployments); the patch builder and the reference finder both follow it,
    so a kind with a deeper template (a CronJob's ``spec.jobTemplate.spec.template``) is one row.
    ``strategic_merge`` is False for custom resources, which accept only JSON merge patches.
    ``optional`` kinds (a CRD) may be absent from the server; that is not an error.
    ``setting_name`` is how ``--ignored-workload-types`` names the kind.
    """

    name: WorkloadKindName
    resource: Resource
    pod_template_path: tuple[str, ...]
    restart: RestartMethod = "template"
    strategic_merge: bool = True
    optional: bool = False

    @property
    def setting_name(self) -> str:
        return self.resource.plural


_APPS, _BATCH = ("apps", "v1"), ("batch", "v1")

KINDS: dict[WorkloadKindName, WorkloadKind] = {
    "Deployment": WorkloadKind(
        name="Deployment",
        resource=Resource(*_APPS, plural="deployments", kind="Deployment"),
        pod_template_path=("spec", "template"),
    ),
    "StatefulSet": WorkloadKind(
        name="StatefulSet",
        resource=Resource(*_APPS, plural="statefulsets", kind="StatefulSet"),
        pod_template_path=("spec", "template"),
    ),
    "DaemonSet": WorkloadKind(
        name="DaemonSet",
        resource=Resource(*_APPS, plural="daemonsets", kind="DaemonSet"),
        pod_template_path=("spec", "template"),
    ),
    "CronJob": WorkloadKind(
        name="CronJob",
        resource=Resource(*_BATCH, plural="cronjobs", kind="CronJob"),
        pod_template_path=("spec", "jobTemplate", "spec", "template"),
        restart="create-job",
    ),
    "Job": WorkloadKind(
        name="Job",
        resource=Resource(*_BATCH, plural="jobs", kind="Job"),
        pod_template_path=("spec", "template"),
        restart="recreate",
    ),
    "Rollout": WorkloadKind(
        name="Rollout",
        resource=Resource("argoproj.io", "v1alpha1", plural="rollouts", kind="Rollout"),
        pod_template_path=("spec", "template"),
        restart="rollout",
        strategic_merge=False,
        optional=True,
    ),
}
JOBS = KINDS["Job"].resource


def pod_template(obj: RawObject, kind: WorkloadKind) -> dict[str, Any]:
    """The pod template of a raw workload, or an empty dict when the object has none."""
    node: Any = obj
    for step in kind.pod_template_path:
        node = node.get(step) if isinstance(node, dict) else None
        if node is None:
            return {}
    return node if isinstance(node, dict) else {}


# --- annotations Kubernetes writes -------------------------------------------------------------

UNREAD_ANNOTATIONS = frozenset(
    {
        "deployment.kubernetes.io/revision",
        "kubectl.kubernetes.io/last-applied-configuration",
    }
)
"""Workload annotations Kubernetes itself writes that no snapshot is made of, left out of the
fingerprint. The Deployment controller raises the revision after every rollout, in an update of
its own: each restart was read whole twice (our patch, then that update). kubectl's copy of the
applied manifest can be kilobytes, hashed again on every status update otherwise. The settings
refuse these as new names for our own annotations (``--auto-annotation`` and the rest)."""

# --- annotations this controller writes -------------------------------------------------------

RECORD_ANNOTATION = "reloader.stakater.com/config-digests"
"""Workload metadata: the digests its running pods were started with (``digests.Recorded``)."""

LAST_RELOADED_FROM = "reloader.stakater.com/last-reloaded-from"
"""Pod template: Stakater's restart marker, naming the config that caused the restart."""

FIELD_MANAGER = "reloader"
