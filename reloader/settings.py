"""Every knob of the controller, parsed and validated once at startup.

Each setting is read, in order of precedence, from a command-line flag (Stakater Reloader's flag
name where one exists, otherwise the field name in kebab case), an environment variable
``RELOADER_<FIELD>`` (plus Stakater's ``KUBERNETES_NAMESPACE`` for single-namespace mode), and the
default. Invalid input ends the process with one message and exit code 2 before anything connects
to the API server: a controller that starts with a half-understood configuration does damage.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import socket
import sys
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from reloader.annotations import DEFAULT_NAMES, AnnotationNames
from reloader.model import KINDS, UNREAD_ANNOTATIONS, WorkloadKind

CommaList = Annotated[list[str], NoDecode]
WORKLOAD_TYPE_NAMES = tuple(sorted(kind.setting_name for kind in KINDS.values()))
SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def _service_account_namespace() -> str:
    """The pod's namespace when neither POD_NAMESPACE nor RELOADER_NAMESPACE is set."""
    try:
        with open(SERVICE_ACCOUNT_NAMESPACE) as file:
            return file.read().strip() or "reloader"
    except OSError:
        return "reloader"


def _split_outside_parentheses(text: str) -> list[str]:
    """Split on commas outside parentheses and double quotes; unquote each part.

    Stakater's list flags are pflag string slices, read as one CSV record: a field in double
    quotes may hold commas and loses its quotes. Its Helm chart relies on that, rendering
    ``--namespace-selector="team=a"`` with the quotes inside the argument. A quoted field's own
    commas then separate items as usual (the lists are ANDed selectors or sets of names).
    """
    parts, depth, quoted, current = [], 0, False, ""
    for char in text:
        quoted ^= char == '"'
        depth += 0 if quoted else {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0 and not quoted:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    items: list[str] = []
    for part in (part.strip() for part in parts):
        inner = _unquote(part)
        items += _split_outside_parentheses(inner) if inner != part else [part]
    return [item for item in items if item]


def _unquote(text: str) -> str:
    """One pair of surrounding double quotes removed (``""`` inside stands for one quote, as
    in CSV)."""
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return text[1:-1].replace('""', '"')
    return text


def _secret_env(name: str) -> SecretStr | None:
    """A Stakater variable holding a URL: a secret, and unset when empty."""
    value = os.environ.get(name, "").strip()
    return SecretStr(value) if value else None


_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _flag(name: str, help_text: str) -> dict[str, Any]:
    return {"json_schema_extra": {"flag": name}, "description": help_text}


class Settings(BaseSettings):
    """The controller's configuration; see ``docs/configuration.md`` for the table."""

    model_config = SettingsConfigDict(env_prefix="RELOADER_", extra="forbid", frozen=True)

    namespaces: CommaList = Field(
        default_factory=list,
        **_flag("--namespaces", "Namespaces to watch, comma-separated; empty watches all."),
    )
    namespaces_to_ignore: CommaList = Field(
        default_factory=list,
        **_flag("--namespaces-to-ignore", "Namespaces never acted on, in every mode."),
    )
    reload_on_create: bool = Field(
        default=False,
        **_flag(
            "--reload-on-create", "Restart when a referenced config appears after the workload."
        ),
    )
    reload_on_delete: bool = Field(
        default=False,
        **_flag("--reload-on-delete", "Restart when a referenced config is deleted."),
    )
    auto_reload_all: bool = Field(
        default=False,
        **_flag("--auto-reload-all", "Treat every workload as auto unless auto is 'false'."),
    )
    debounce_seconds: float = Field(
        default=1.0,
        ge=0,
        le=3600,
        description="Wait this long after a config change so a burst gives one rollout.",
    )
    workers: int = Field(
        default=4,
        ge=1,
        le=256,
        description=(
            "Restart workers; together they sync as many workloads at once as --restart-burst"
            " lets out, at most 64."
        ),
    )
    min_restart_interval_seconds: float = Field(
        default=10.0,
        ge=0,
        le=86400,
        description="Least time between two restarts of one workload; later changes wait.",
    )
    restart_rate_per_second: float = Field(
        default=5.0, gt=0, description="Global restarts per second allowed (token bucket rate)."
    )
    restart_burst: int = Field(default=50, ge=1, description="Global restart burst size.")
    record_rate_per_second: float = Field(
        default=50.0,
        gt=0,
        description="Record-only writes per second (first sight, re-record; token bucket rate).",
    )
    record_burst: int = Field(default=100, ge=1, description="Record-only write burst size.")
    log_level: Literal["trace", "debug", "info", "warn", "warning", "error", "fatal", "panic"] = (
        Field(default="info", **_flag("--log-level", "Log level."))
    )
    log_format: Literal["json", "text", ""] = Field(
        default="",
        **_flag("--log-format", "json or text; empty picks text on a terminal, JSON otherwise."),
    )
    metrics_port: int = Field(default=9090, ge=0, le=65535, description="Port of /metrics etc.")
    metrics_count_by_namespace: bool = Field(
        default_factory=lambda: os.environ.get("METRICS_COUNT_BY_NAMESPACE") == "enabled",
        description="Export restarts by namespace (Stakater: METRICS_COUNT_BY_NAMESPACE=enabled).",
    )
    metrics_address: str = Field(
        default="",
        description="Address the HTTP port binds; empty: every IPv4 and IPv6 address.",
    )
    kubeconfig: str | None = Field(
        default=None,
        **_flag("--kubeconfig", "Kubeconfig path; defaults to in-cluster, then $KUBECONFIG."),
    )
    hash_key: SecretStr | None = Field(
        default=None,
        min_length=16,
        description="Key for config digests. Unset: read (or create) the hash key Secret.",
    )
    hash_key_file: str | None = Field(
        default=None,
        description="File holding the digest key (a mounted Secret key); read when no hash key.",
    )
    hash_key_secret: str = Field(
        default="reloader-hash-key",
        description="Secret in the controller's namespace holding the digest key (key 'key').",
    )
    controller_namespace: str = Field(
        default_factory=lambda: (
            os.environ.get("POD_NAMESPACE")
            or os.environ.get("RELOADER_NAMESPACE")
            or _service_account_namespace()
        ),
        description="The controller's own namespace (POD_NAMESPACE or RELOADER_NAMESPACE).",
    )
    stall_timeout_seconds: float = Field(
        default=70.0, gt=0, description="Reconnect a watch that sent nothing for this long."
    )
    namespace_selector: CommaList = Field(
        default_factory=list,
        **_flag(
            "--namespace-selector",
            "Only namespaces whose labels match (k:v, k=v, k:* or selector syntax; ANDed).",
        ),
    )
    resource_label_selector: CommaList = Field(
        default_factory=list,
        **_flag(
            "--resource-label-selector",
            "Only ConfigMaps/Secrets whose labels match (same syntax; applied server-side).",
        ),
    )
    resources_to_ignore: CommaList = Field(
        default_factory=list,
        **_flag("--resources-to-ignore", "Ignore 'configmaps' or 'secrets' entirely."),
    )
    ignored_workload_types: CommaList = Field(
        default_factory=list,
        **_flag(
            "--ignored-workload-types",
            "Workload kinds never restarted: jobs, cronjobs (also deployments, statefulsets, "
            "daemonsets, rollouts).",
        ),
    )
    reload_strategy: Literal["annotations", "env-vars"] = Field(
        default="annotations",
        **_flag(
            "--reload-strategy",
            "annotations (pod-template annotation) or env-vars (STAKATER_<NAME>_<KIND> env var).",
        ),
    )
    is_argo_rollouts: bool = Field(
        default=False,
        **_flag("--is-Argo-Rollouts", "Also watch and restart Argo Rollouts (if the CRD exists)."),
    )
    enable_csi_integration: bool = Field(
        default=False,
        **_flag(
            "--enable-csi-integration",
            "Also reload on Secrets Store CSI driver rotations: watch SecretProviderClassPodStatus "
            "(if the CRD exists) for workloads that mount a SecretProviderClass.",
        ),
    )
    pause_deployment_annotation: str = Field(
        default=DEFAULT_NAMES.pause_period,
        **_flag("--pause-deployment-annotation", "Rename the pause-period annotation."),
    )
    pause_deployment_time_annotation: str = Field(
        default=DEFAULT_NAMES.paused_at,
        **_flag("--pause-deployment-time-annotation", "Rename the paused-at annotation."),
    )
    sync_after_restart: bool = Field(
        default=False,
        **_flag(
            "--sync-after-restart",
            "Accepted for Stakater compatibility and not needed: changes made while the "
            "controller was down are found on start anyway.",
        ),
    )
    enable_ha: bool = Field(
        default=False,
        **_flag(
            "--enable-ha",
            "Leader election on a Lease in the controller namespace: run several replicas, one "
            "writes, the others stand by with warm caches.",
        ),
    )
    leader_identity: str = Field(
        default_factory=lambda: os.environ.get("POD_NAME", ""),
        description="This replica's name in the Lease (POD_NAME in a pod); empty: host_pid.",
    )
    lease_name: str = Field(
        default="stakater-reloader-lock",
        description="The leader Lease's name (Stakater's), in the controller namespace.",
    )
    lease_duration_seconds: float = Field(
        default=15.0, ge=1, le=3600, description="How long standbys wait on an unrenewed Lease."
    )
    renew_deadline_seconds: float = Field(
        default=10.0, gt=0, description="A leader unable to renew this long stops writing."
    )
    retry_period_seconds: float = Field(
        default=2.0, gt=0, description="Between two Lease renewals, or two attempts to acquire."
    )
    enable_pprof: bool = Field(
        default=False,
        **_flag("--enable-pprof", "Accepted for Stakater compatibility; ignored (with a warning)."),
    )
    pprof_addr: str = Field(
        default=":6060",
        **_flag("--pprof-addr", "Accepted for Stakater compatibility; ignored."),
    )
    webhook_url: SecretStr | None = Field(
        default=None,
        **_flag(
            "--webhook-url",
            "POST each reload to this URL instead of restarting the workload (a secret: never "
            "logged).",
        ),
    )
    alert_on_reload: bool = Field(
        default_factory=lambda: os.environ.get("ALERT_ON_RELOAD") == "true",
        description="Send an alert after each restart (Stakater: ALERT_ON_RELOAD=true).",
    )
    alert_sink: str = Field(
        default_factory=lambda: os.environ.get("ALERT_SINK", ""),
        description="slack, teams, gchat; anything else POSTs raw text (Stakater: ALERT_SINK).",
    )
    alert_webhook_url: SecretStr | None = Field(
        default_factory=lambda: _secret_env("ALERT_WEBHOOK_URL"),
        description="Where alerts go (Stakater: ALERT_WEBHOOK_URL; a secret: never logged).",
    )
    alert_webhook_proxy: SecretStr | None = Field(
        default_factory=lambda: _secret_env("ALERT_WEBHOOK_PROXY"),
        description="HTTP proxy for alerts (Stakater: ALERT_WEBHOOK_PROXY).",
    )
    alert_additional_info: str = Field(
        default_factory=lambda: os.environ.get("ALERT_ADDITIONAL_INFO", ""),
        description="Text put before each alert (Stakater: ALERT_ADDITIONAL_INFO).",
    )
    notify_timeout_seconds: float = Field(
        default=10.0, gt=0, le=300, description="Timeout of one webhook or alert POST."
    )
    auto_annotation: str = Field(
        default=DEFAULT_NAMES.auto, **_flag("--auto-annotation", "Rename 'auto'.")
    )
    configmap_auto_annotation: str = Field(
        default=DEFAULT_NAMES.configmap_auto,
        **_flag("--configmap-auto-annotation", "Rename the ConfigMap auto annotation."),
    )
    secret_auto_annotation: str = Field(
        default=DEFAULT_NAMES.secret_auto,
        **_flag("--secret-auto-annotation", "Rename the Secret auto annotation."),
    )
    configmap_annotation: str = Field(
        default=DEFAULT_NAMES.configmap_reload,
        **_flag("--configmap-annotation", "Rename the named ConfigMap list annotation."),
    )
    secret_annotation: str = Field(
        default=DEFAULT_NAMES.secret_reload,
        **_flag("--secret-annotation", "Rename the named Secret list annotation."),
    )
    auto_search_annotation: str = Field(
        default=DEFAULT_NAMES.search,
        **_flag("--auto-search-annotation", "Rename 'search'."),
    )
    search_match_annotation: str = Field(
        default=DEFAULT_NAMES.match,
        **_flag("--search-match-annotation", "Rename 'match'."),
    )
    ignore_annotation: str = Field(
        default=DEFAULT_NAMES.ignore, **_flag("--ignore-annotation", "Rename 'ignore'.")
    )

    @field_validator(
        "namespaces",
        "namespaces_to_ignore",
        "namespace_selector",
        "resource_label_selector",
        "resources_to_ignore",
        "ignored_workload_types",
        mode="before",
    )
    @classmethod
    def _split_comma_list(cls, value: object) -> object:
        """``a,b`` → [a, b]; a repeated flag gives a list of such strings, which add up (as
        Stakater's string-slice flags do). Commas inside parentheses (``k in (a,b)``) stay."""
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return [part for item in value for part in _split_outside_parentheses(item)]
        return value

    @field_validator("namespaces", "namespaces_to_ignore")
    @classmethod
    def _valid_namespace_names(cls, value: list[str]) -> list[str]:
        bad = [name for name in value if not _DNS_LABEL.match(name) or len(name) > 63]
        if bad:
            raise ValueError(f"not a namespace name: {', '.join(bad)}")
        return sorted(set(value))

    @field_validator("namespace_selector", "resource_label_selector")
    @classmethod
    def _valid_selectors(cls, value: list[str]) -> list[str]:
        for item in value:
            label_selector([item])  # raises ValueError with the offending item
        return value

    @field_validator("resources_to_ignore")
    @classmethod
    def _one_config_kind_at_most(cls, value: list[str]) -> list[str]:
        lowered = sorted({item.lower() for item in value})
        unknown = [item for item in lowered if item not in ("configmaps", "secrets")]
        if unknown:
            raise ValueError(f"unknown resource {', '.join(unknown)} (use configmaps or secrets)")
        if len(lowered) > 1:
            raise ValueError("cannot ignore both configmaps and secrets: nothing would be watched")
        return lowered

    @field_validator("ignored_workload_types")
    @classmethod
    def _known_workload_types(cls, value: list[str]) -> list[str]:
        lowered = sorted({item.lower() for item in value})
        unknown = [item for item in lowered if item not in WORKLOAD_TYPE_NAMES]
        if unknown:
            known = ", ".join(WORKLOAD_TYPE_NAMES)
            raise ValueError(f"unknown workload type {', '.join(unknown)} (use {known})")
        return lowered

    @field_validator("webhook_url", "alert_webhook_url", "alert_webhook_proxy")
    @classmethod
    def _http_url(cls, value: SecretStr | None) -> SecretStr | None:
        """An http(s) URL; the message never repeats the value, which may hold a token."""
        if value is None:
            return None
        scheme, _, rest = value.get_secret_value().strip().partition("://")
        if scheme.lower() not in ("http", "https") or not rest:
            raise ValueError("not an http:// or https:// URL (value not shown: it is a secret)")
        return value

    @model_validator(mode="after")
    def _single_namespace_from_stakater_env(self) -> Settings:
        """Stakater's ``KUBERNETES_NAMESPACE`` selects single-namespace mode when no list is set."""
        single = os.environ.get("KUBERNETES_NAMESPACE", "").strip()
        if single and not self.namespaces:
            object.__setattr__(self, "namespaces", [single])
        return self

    @model_validator(mode="after")
    def _no_annotation_named_as_one_kubernetes_writes(self) -> Settings:
        """Changes to ``UNREAD_ANNOTATIONS`` are not looked at: one of ours renamed to one of them
        would be read once and then never again."""
        for name in dataclasses.astuple(self.annotation_names()):
            if name in UNREAD_ANNOTATIONS:
                raise ValueError(f"{name} is written by Kubernetes itself; choose another name")
        return self

    @model_validator(mode="after")
    def _lease_timings_leave_a_margin(self) -> Settings:
        """The safety of a takeover rests on these inequalities (``leader.py``)."""
        if not self.retry_period_seconds < self.renew_deadline_seconds:
            raise ValueError("retry-period-seconds must be less than renew-deadline-seconds")
        if not self.renew_deadline_seconds < self.lease_duration_seconds:
            raise ValueError("renew-deadline-seconds must be less than lease-duration-seconds")
        return self

    def ignored_compatibility_flags(self) -> list[str]:
        """Stakater flags that are accepted so existing installs start, but do nothing here."""
        ignored = {"--enable-pprof": self.enable_pprof}
        return [flag for flag, given in ignored.items() if given]

    @property
    def identity(self) -> str:
        """This replica's name in the leader Lease: unique per process even without POD_NAME."""
        return self.leader_identity or f"{socket.gethostname()}_{os.getpid()}"

    @property
    def cluster_wide(self) -> bool:
        return not self.namespaces

    @property
    def config_label_selector(self) -> str | None:
        return label_selector(self.resource_label_selector) or None

    @property
    def namespace_label_selector(self) -> str | None:
        return label_selector(self.namespace_selector) or None

    def watches_config(self, kind: str) -> bool:
        """False for the kind named in ``--resources-to-ignore``."""
        return f"{kind.lower()}s" not in self.resources_to_ignore

    def watches_workload(self, kind: WorkloadKind) -> bool:
        if kind.setting_name in self.ignored_workload_types:
            return False
        return not kind.optional or self.is_argo_rollouts

    def annotation_names(self) -> AnnotationNames:
        """The annotation keys in force, after any renaming flags."""
        return AnnotationNames(
            auto=self.auto_annotation,
            configmap_auto=self.configmap_auto_annotation,
            secret_auto=self.secret_auto_annotation,
            configmap_reload=self.configmap_annotation,
            secret_reload=self.secret_annotation,
            search=self.auto_search_annotation,
            match=self.search_match_annotation,
            ignore=self.ignore_annotation,
            pause_period=self.pause_deployment_annotation,
            paused_at=self.pause_deployment_time_annotation,
        )


_SELECTOR_ITEM = re.compile(
    r"^!?[A-Za-z0-9]([-A-Za-z0-9_./]*[A-Za-z0-9])?"
    r"(\s*(=|==|!=)\s*[-A-Za-z0-9_.]*"
    r"|\s+(in|notin)\s+\([-A-Za-z0-9_., ]*\))?$"
)


def _selector_item(item: str) -> str:
    """Stakater's forms (``k:v``, ``k:*``, ``k=*``) become Kubernetes selector syntax."""
    item = item.strip()
    key, colon, value = item.partition(":")
    if colon and "=" not in item and "(" not in item:
        item = key.strip() if value.strip() == "*" else f"{key.strip()}={value.strip()}"
    elif item.endswith("=*") and item.count("=") == 1:
        item = item[:-2].strip()
    if not _SELECTOR_ITEM.match(item):
        raise ValueError(f"not a label selector: {item!r}")
    return item


def label_selector(items: Sequence[str]) -> str:
    """One server-side ``labelSelector`` from a list of items, ANDed (commas)."""
    return ",".join(_selector_item(item) for item in items if item.strip())


class SettingsError(Exception):
    """The configuration cannot be used; the message is one line fit for the user."""


def _flag_name(field_name: str, extra: object) -> str:
    if isinstance(extra, dict) and isinstance(extra.get("flag"), str):
        return str(extra["flag"])
    return "--" + field_name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    """A parser whose flags are generated from the fields, so flags and settings never drift."""
    parser = argparse.ArgumentParser(
        prog="reloader",
        description="Restart workloads when the ConfigMaps and Secrets they use change.",
        argument_default=argparse.SUPPRESS,
    )
    for name, field in Settings.model_fields.items():
        flag = _flag_name(name, field.json_schema_extra)
        env = f"RELOADER_{name.upper()}"
        options: dict[str, Any] = {"dest": name, "help": f"{field.description} [{env}]"}
        if field.annotation is bool:
            options.update(nargs="?", const="true", metavar="BOOL")  # `--flag` or `--flag=false`
        elif field.annotation == list[str]:
            options.update(action="append", metavar="A,B")  # repeated flags add up
        else:
            options["metavar"] = "VALUE"
        parser.add_argument(flag, **options)
    return parser


def _one_line(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "settings"
        parts.append(f"{where}: {item['msg']}")
    return "invalid settings: " + "; ".join(parts)


def load_settings(argv: Sequence[str]) -> Settings:
    """Parse flags over environment over defaults; raise SettingsError with one line."""
    given = vars(build_parser().parse_args(list(argv)))
    try:
        return Settings(**given)
    except ValidationError as error:
        raise SettingsError(_one_line(error)) from None


def load_settings_or_exit(argv: Sequence[str]) -> Settings:
    """The process entry's variant: one message on stderr and exit code 2 when invalid."""
    try:
        return load_settings(argv)
    except SettingsError as error:
        print(f"reloader: {error}", file=sys.stderr)
        raise SystemExit(2) from None
