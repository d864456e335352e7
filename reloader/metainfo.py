"""Stakater's ``reloader-meta-info`` ConfigMap: what runs, with which options, as which Deployment.

Stakater's tooling reads it (PR #970). Stakater writes it at startup into ``$RELOADER_NAMESPACE``
(its Helm chart sets that variable and grants a Role there), and skips it with a warning when the
variable is unset; this does the same. It is never needed to restart anything, so a failure to
write it is logged with what to grant and the controller carries on.
"""

from __future__ import annotations

import json
import logging
import os
import platform
from typing import Any

from reloader import __version__
from reloader.kube import Api, ApiError, ApiForbidden, ApiNotFound
from reloader.model import CONFIGMAPS
from reloader.settings import Settings

log = logging.getLogger("reloader.metainfo")

NAME = "reloader-meta-info"
LABEL = ("reloader.stakater.com/meta-info", "reloader")
ZERO_TIME = "0001-01-01T00:00:00Z"
"""What Go writes for an unset ``time.Time``; no commit time is built into this package."""


def _json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


def build_info() -> dict[str, str]:
    """Stakater's ``buildInfo`` fields; ``goVersion`` names the runtime, which here is Python."""
    return {
        "goVersion": f"python{platform.python_version()}",
        "releaseVersion": __version__,
        "commitHash": "unknown",
        "commitTime": ZERO_TIME,
        "edition": "oss",
    }


def reloader_options(settings: Settings) -> dict[str, Any]:
    """Every Stakater option under its JSON name, filled from our settings.

    A webhook URL is a secret (it often carries a token), so only whether one is set is shown.
    """
    names = settings.annotation_names()
    webhook = getattr(settings, "webhook_url", None)
    return {
        "autoReloadAll": settings.auto_reload_all,
        "configmapUpdateOnChangeAnnotation": names.configmap_reload,
        "secretUpdateOnChangeAnnotation": names.secret_reload,
        "reloaderAutoAnnotation": names.auto,
        "ignoreResourceAnnotation": names.ignore,
        "configmapReloaderAutoAnnotation": names.configmap_auto,
        "secretReloaderAutoAnnotation": names.secret_auto,
        "configmapExcludeReloaderAnnotation": names.configmaps_exclude,
        "secretExcludeReloaderAnnotation": names.secrets_exclude,
        "autoSearchAnnotation": names.search,
        "searchMatchAnnotation": names.match,
        "rolloutStrategyAnnotation": names.rollout_strategy,
        "pauseDeploymentAnnotation": names.pause_period,
        "pauseDeploymentTimeAnnotation": names.paused_at,
        "logFormat": settings.log_format,
        "logLevel": settings.log_level,
        "isArgoRollouts": settings.is_argo_rollouts,
        "reloadStrategy": settings.reload_strategy,
        "reloadOnCreate": settings.reload_on_create,
        "reloadOnDelete": settings.reload_on_delete,
        "syncAfterRestart": settings.sync_after_restart,
        "enableHA": settings.enable_ha,
        "webhookUrl": "<set, not shown>" if webhook else "",
        "resourcesToIgnore": list(settings.resources_to_ignore),
        "workloadTypesToIgnore": list(settings.ignored_workload_types),
        "namespaceSelectors": list(settings.namespace_selector),
        "resourceSelectors": list(settings.resource_label_selector),
        "namespacesToIgnore": list(settings.namespaces_to_ignore),
        "enablePProf": settings.enable_pprof,
        "pprofAddr": settings.pprof_addr,
    }


def config_map(settings: Settings, *, namespace: str, deployment: str) -> dict[str, Any]:
    """The ConfigMap as Stakater writes it: three JSON documents and one label."""
    deployment_info = {"name": deployment, "namespace": namespace, "creationTimestamp": None}
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": NAME, "namespace": namespace, "labels": dict([LABEL])},
        "data": {
            "buildInfo": _json(build_info()),
            "reloaderOptions": _json(reloader_options(settings)),
            "deploymentInfo": _json(deployment_info),
        },
    }


async def publish(api: Api, settings: Settings) -> None:
    """Create or replace the ConfigMap in ``$RELOADER_NAMESPACE``; never raises an ApiError.

    Replaced with PUT rather than patched: Stakater's chart grants ``create`` and ``update`` on
    configmaps in its namespace, not ``patch``.
    """
    namespace = os.environ.get("RELOADER_NAMESPACE", "").strip()
    if not namespace:
        log.info("RELOADER_NAMESPACE is not set; the reloader-meta-info ConfigMap is not written")
        return
    body = config_map(
        settings, namespace=namespace, deployment=os.environ.get("RELOADER_DEPLOYMENT_NAME", "")
    )
    try:
        await _create_or_replace(api, namespace, body)
    except ApiError as error:
        verb = "create and update" if isinstance(error, ApiForbidden) else "write"
        log.warning(
            f"cannot write the {NAME} ConfigMap (only Stakater's tooling reads it); to have it, "
            f"grant {verb} on configmaps in namespace {namespace!r} to the controller's account",
            extra={"namespace": namespace, "error": str(error)},
        )
        return
    log.info("wrote the meta-info configmap", extra={"namespace": namespace, "configmap": NAME})


async def _create_or_replace(api: Api, namespace: str, body: dict[str, Any]) -> None:
    path = CONFIGMAPS.object_path(namespace, NAME)
    try:
        await api.get(path)
    except ApiNotFound:
        await api.create(CONFIGMAPS.collection_path(namespace), body)
        return
    # kube.Api has no public PUT yet; _json is its one request path (see the report).
    await api.replace(path, body)
