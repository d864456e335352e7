"""The Kubernetes API permissions the controller needs, as data, by the feature that needs them.

This table is the contract between the code and the RBAC in ``manifests/``. Two tests hold both
sides to it (``tests/test_manifests.py``):

- the shipped ClusterRole and Roles must grant exactly these rules: nothing missing, nothing extra,
  no wildcard (over-granting shows up here);
- the controller is run as the shipped ServiceAccount through real reloads and must never receive
  403 (a new API call that this table and the manifests forgot shows up there).

Where each need comes from:

``always``
    ``watch.Informer._list``/``_watch`` list and watch ConfigMaps, Secrets and every workload kind
    (never ``get``: configs are read from the watch cache); ``restart.Restarter._patch`` patches
    workloads (restart and record in one patch); ``events.EventRecorder`` creates core Events
    and patches their ``count`` when one repeats.
``cronjobs-and-jobs``
    ``Restarter._get`` reads a CronJob or Job in full before restarting it;
    ``Restarter._run_cronjob`` creates a Job from a CronJob; ``Restarter._recreate_job`` deletes a
    Job and creates it again. Those Jobs point at their CronJob with ``blockOwnerDeletion``, which
    the OwnerReferencesPermissionEnforcement admission plugin (not on by default; OpenShift enables
    it) allows only to whoever may ``update`` the owner's ``finalizers`` subresource.
``argo-rollouts``
    ``--is-Argo-Rollouts``: list, watch and patch Rollouts, and ``Restarter._get`` before an
    env-vars restart.
``namespace-selector``
    ``--namespace-selector``: ``app.Controller._namespace_informer`` lists and watches Namespaces.
``csi``
    ``--enable-csi-integration``: ``csi.PodStatuses`` lists and watches
    SecretProviderClassPodStatuses, and finds each one's workload with a ``get`` of its Pod and
    of the Pod's ReplicaSet or Job (no Pod informer: see ``csi.py``).
``digest-key``
    ``app._read_or_create_key`` reads the key Secret by name and ``app._create_key`` creates it
    when missing, in the controller's own namespace only. RBAC cannot restrict ``create`` to a
    name, so this one goes in a Role in that namespace, never in the ClusterRole.
``pending-jobs``
    ``Restarter._keep_pending`` stores a copy of a Job in a ConfigMap before deleting the Job for
    re-creation (and replaces a copy left by an earlier attempt: delete, create);
    ``Restarter._drop_pending`` deletes it once the new Job exists;
    ``Restarter.resume_pending_jobs`` lists them at start-up. In the controller's own namespace
    only, so in the same Role.
``leader-election``
    ``--enable-ha``: ``leader.LeaderElector`` reads the Lease by name, creates it when missing and
    replaces it (``update``, with the ``resourceVersion`` it read) to acquire, renew and release
    it; client-go's verbs, so Stakater's chart grants them too. In the controller's own
    namespace, in the same Role.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from reloader.csi import POD_STATUSES, PODS, REPLICA_SETS
from reloader.leader import LEASE_NAME, LEASES
from reloader.model import CONFIGMAPS, EVENTS, KINDS, NAMESPACES, SECRETS, Resource

KEY_SECRET = "reloader-hash-key"
"""The digest key Secret's default name (``Settings.hash_key_secret``); RBAC grants ``get`` on it
alone."""


@dataclass(frozen=True, slots=True, order=True)
class Permission:
    """One verb on one resource of one API group ("" is core), on every object or only ``name``."""

    group: str
    resource: str
    verb: str
    name: str = ""

    def __str__(self) -> str:
        where = f"{self.resource}.{self.group}" if self.group else self.resource
        return f"{self.verb} {where}" + (f" {self.name!r}" if self.name else "")


Feature = Literal[
    "always",
    "cronjobs-and-jobs",
    "argo-rollouts",
    "namespace-selector",
    "csi",
    "digest-key",
    "pending-jobs",
    "leader-election",
]


def _grant(
    resource: Resource, verbs: Iterable[str], *, subresource: str = "", name: str = ""
) -> frozenset[Permission]:
    plural = f"{resource.plural}/{subresource}" if subresource else resource.plural
    return frozenset(Permission(resource.group, plural, verb, name) for verb in verbs)


_WATCH = ("list", "watch")
_DEPLOYMENT, _STATEFULSET, _DAEMONSET = (
    KINDS[kind].resource for kind in ("Deployment", "StatefulSet", "DaemonSet")
)
_CRONJOB, _JOB, _ROLLOUT = (KINDS[kind].resource for kind in ("CronJob", "Job", "Rollout"))

NEEDS: Mapping[Feature, frozenset[Permission]] = {
    "always": frozenset().union(
        _grant(CONFIGMAPS, _WATCH),
        _grant(SECRETS, _WATCH),
        _grant(_DEPLOYMENT, (*_WATCH, "patch")),
        _grant(_STATEFULSET, (*_WATCH, "patch")),
        _grant(_DAEMONSET, (*_WATCH, "patch")),
        _grant(EVENTS, ("create", "patch")),
    ),
    "cronjobs-and-jobs": frozenset().union(
        _grant(_CRONJOB, (*_WATCH, "get", "patch")),
        _grant(_JOB, (*_WATCH, "get", "patch", "create", "delete")),
        _grant(_CRONJOB, ("update",), subresource="finalizers"),
    ),
    "argo-rollouts": _grant(_ROLLOUT, (*_WATCH, "get", "patch")),
    "namespace-selector": _grant(NAMESPACES, _WATCH),
    "csi": frozenset().union(
        _grant(POD_STATUSES, _WATCH),
        _grant(PODS, ("get",)),
        _grant(REPLICA_SETS, ("get",)),
        _grant(_JOB, ("get",)),
    ),
    "digest-key": _grant(SECRETS, ("get",), name=KEY_SECRET) | _grant(SECRETS, ("create",)),
    "pending-jobs": _grant(CONFIGMAPS, ("create", "list", "delete")),
    "leader-election": _grant(LEASES, ("get", "update"), name=LEASE_NAME)
    | _grant(LEASES, ("create",)),
}

CLUSTER_ROLE: tuple[Feature, ...] = (
    "always",
    "cronjobs-and-jobs",
    "argo-rollouts",
    "namespace-selector",
    "csi",
)
"""What the cluster-wide ClusterRole grants: every optional feature, so enabling a flag never needs
an RBAC edit (a grant on a resource the cluster does not serve, like Rollouts, is inert)."""

NAMESPACED_ROLE: tuple[Feature, ...] = ("always", "cronjobs-and-jobs", "argo-rollouts", "csi")
"""The single-namespace Role: the same, less Namespaces (cluster-scoped, and the selector is a
cluster-wide flag)."""

KEY_ROLE: tuple[Feature, ...] = ("digest-key", "pending-jobs", "leader-election")
"""The Role in the controller's own namespace, in both installs: the digest key Secret, the
copies of Jobs being re-created and the leader Lease (its name, ``reloader-hash-key``, predates
the second)."""


def needed(features: Iterable[Feature]) -> frozenset[Permission]:
    """The union of what ``features`` need."""
    return frozenset().union(*(NEEDS[feature] for feature in features))
