"""Which of the permissions the configuration needs the server refuses, asked before starting.

Stakater's Helm chart grants fewer verbs than this controller uses (no ``watch`` on workloads, no
``patch`` on CronJobs and Jobs, no ``create`` on Secrets). Without ``watch`` the informers would
list once and then be refused forever: a cache that never learns of the controller's own writes,
so decisions from it would be wrong. One SelfSubjectAccessReview per permission (every account
may ask about itself) finds all of them at once, so a single log line and ``/readyz`` can say
exactly what to grant, instead of one 403 per informer as each hits it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from typing import Any

from reloader import permissions
from reloader.kube import Api
from reloader.model import KINDS, SECRETS
from reloader.permissions import Feature, Permission
from reloader.settings import Settings

REVIEWS = "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"


def required(settings: Settings) -> dict[str, frozenset[Permission]]:
    """What ``settings`` need once the digest key is loaded, by namespace ("" for cluster-wide).

    The key Secret is read by name at every start; creating it was needed only once, and whoever
    creates it instead of the controller makes that grant unnecessary.
    """
    features: list[Feature] = ["always"]
    if any(settings.watches_workload(KINDS[kind]) for kind in ("CronJob", "Job")):
        features.append("cronjobs-and-jobs")
    if settings.is_argo_rollouts:
        features.append("argo-rollouts")
    if settings.namespace_label_selector and settings.cluster_wide:
        features.append("namespace-selector")
    if settings.enable_csi_integration:
        features.append("csi")
    needs = {scope: permissions.needed(features) for scope in settings.namespaces or [""]}
    own: list[Feature] = ["pending-jobs"] if "cronjobs-and-jobs" in features else []
    if settings.hash_key is None and settings.hash_key_file is None:
        own.append("digest-key")
    creating_key = Permission("", SECRETS.plural, "create")
    key = permissions.needed(own) - {creating_key}
    home = settings.controller_namespace
    needs[home] = needs.get(home, frozenset()) | _renamed(key, settings.hash_key_secret)
    if settings.enable_ha:
        lease = _renamed(permissions.needed(["leader-election"]), settings.lease_name)
        needs[home] = needs[home] | lease
    return needs


def _renamed(needs: Iterable[Permission], name: str) -> frozenset[Permission]:
    """Grants on one named object under the name in force (``--hash-key-secret``,
    ``--lease-name``)."""
    return frozenset(Permission(p.group, p.resource, p.verb, name) if p.name else p for p in needs)


REVIEWS_IN_FLIGHT = 16
"""Reviews asked at once: in namespaced mode there are about 26 per watched namespace (524 for 20
namespaces), and one at a time they held the start for seconds."""


async def refused(api: Api, needs: Mapping[str, frozenset[Permission]]) -> list[str]:
    """Each permission the server does not allow, as ``verb resource.group [in namespace]``, in
    namespace and permission order."""
    asked = [
        (namespace, permission)
        for namespace, wanted in sorted(needs.items())
        for permission in sorted(wanted)
    ]
    slots = asyncio.Semaphore(REVIEWS_IN_FLIGHT)

    async def ask(namespace: str, permission: Permission) -> bool:
        async with slots:
            return await allowed(api, permission, namespace=namespace)

    answers = await asyncio.gather(*(ask(namespace, p) for namespace, p in asked))
    return [
        f"{permission}{f' in namespace {namespace}' if namespace else ''}"
        for (namespace, permission), granted in zip(asked, answers, strict=True)
        if not granted
    ]


async def allowed(api: Api, permission: Permission, *, namespace: str) -> bool:
    """What the server answers to a SelfSubjectAccessReview for ``permission``."""
    resource, _, subresource = permission.resource.partition("/")
    attributes = {
        "namespace": namespace,
        "group": permission.group,
        "resource": resource,
        "subresource": subresource,
        "verb": permission.verb,
        "name": permission.name,
    }
    review: dict[str, Any] = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectAccessReview",
        "spec": {"resourceAttributes": attributes},
    }
    answer: dict[str, Any] = dict(await api.create(REVIEWS, review))
    return bool(answer.get("status", {}).get("allowed"))
