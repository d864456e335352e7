"""How a pod spec's uses of ConfigMaps and Secrets are found (notes §1.3, with keys)."""

from __future__ import annotations

from typing import Any

import pytest

from reloader.model import ConfigKind, ConfigRef
from reloader.references import find_references, pack_references, unpack_references


def ref(kind: ConfigKind, name: str, keys: set[str] | None, containers: set[str]) -> ConfigRef:
    return ConfigRef(
        kind, name, None if keys is None else frozenset(keys), tuple(sorted(containers))
    )


def found(spec: dict[str, Any]) -> frozenset[ConfigRef]:
    """The references as a set, after checking they come as a sorted tuple without repeats."""
    references = find_references(spec)
    idents = [(r.kind, r.name) for r in references]
    assert isinstance(references, tuple) and idents == sorted(set(idents))
    return frozenset(references)


def container(name: str = "app", **fields: Any) -> dict[str, Any]:
    return {"name": name, "image": "busybox", **fields}


def key_ref(field: str, name: str, key: str | None = "k") -> dict[str, Any]:
    body = {"name": name} if key is None else {"name": name, "key": key}
    return {"name": "VAR", "valueFrom": {field: body}}


def mount(volume: str) -> dict[str, Any]:
    return {"name": volume, "mountPath": f"/etc/{volume}"}


def items(*keys: str) -> list[dict[str, str]]:
    return [{"key": key, "path": key} for key in keys]


MOUNTED = [container(volumeMounts=[mount("vol")])]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        pytest.param(
            {"containers": [container(env=[key_ref("configMapKeyRef", "cm")])]},
            {ref("ConfigMap", "cm", {"k"}, {"app"})},
            id="env-configMapKeyRef",
        ),
        pytest.param(
            {"containers": [container(env=[key_ref("secretKeyRef", "s", "password")])]},
            {ref("Secret", "s", {"password"}, {"app"})},
            id="env-secretKeyRef",
        ),
        pytest.param(
            {"containers": [container(envFrom=[{"configMapRef": {"name": "cm"}}])]},
            {ref("ConfigMap", "cm", None, {"app"})},
            id="envFrom-configMapRef",
        ),
        pytest.param(
            {"containers": [container(envFrom=[{"secretRef": {"name": "s"}, "prefix": "X_"}])]},
            {ref("Secret", "s", None, {"app"})},
            id="envFrom-secretRef",
        ),
        pytest.param(
            {"containers": MOUNTED, "volumes": [{"name": "vol", "configMap": {"name": "cm"}}]},
            {ref("ConfigMap", "cm", None, {"app"})},
            id="volume-configMap-whole",
        ),
        pytest.param(
            {
                "containers": MOUNTED,
                "volumes": [{"name": "vol", "configMap": {"name": "cm", "items": items("a", "b")}}],
            },
            {ref("ConfigMap", "cm", {"a", "b"}, {"app"})},
            id="volume-configMap-items",
        ),
        pytest.param(
            {
                "containers": MOUNTED,
                "volumes": [{"name": "vol", "configMap": {"name": "cm", "items": []}}],
            },
            {ref("ConfigMap", "cm", None, {"app"})},
            id="volume-configMap-empty-items-is-whole",
        ),
        pytest.param(
            {"containers": MOUNTED, "volumes": [{"name": "vol", "secret": {"secretName": "s"}}]},
            {ref("Secret", "s", None, {"app"})},
            id="volume-secret-whole",
        ),
        pytest.param(
            {
                "containers": MOUNTED,
                "volumes": [{"name": "vol", "secret": {"secretName": "s", "items": items("t")}}],
            },
            {ref("Secret", "s", {"t"}, {"app"})},
            id="volume-secret-items",
        ),
        pytest.param(
            {
                "containers": MOUNTED,
                "volumes": [
                    {
                        "name": "vol",
                        "projected": {
                            "sources": [
                                {"configMap": {"name": "cm"}},
                                {"secret": {"name": "s", "items": items("tls.crt")}},
                                {"serviceAccountToken": {"path": "token"}},
                                {"downwardAPI": {"items": [{"path": "labels"}]}},
                            ]
                        },
                    }
                ],
            },
            {ref("ConfigMap", "cm", None, {"app"}), ref("Secret", "s", {"tls.crt"}, {"app"})},
            id="projected-configMap-and-secret",
        ),
        pytest.param(
            {
                "containers": [container()],
                "initContainers": [container("init", env=[key_ref("secretKeyRef", "s")])],
            },
            {ref("Secret", "s", {"k"}, {"init"})},
            id="initContainer-env",
        ),
        pytest.param(
            {
                "containers": [container()],
                "initContainers": [container("init", envFrom=[{"configMapRef": {"name": "cm"}}])],
            },
            {ref("ConfigMap", "cm", None, {"init"})},
            id="initContainer-envFrom",
        ),
    ],
)
def test_reference_kinds(spec: dict[str, Any], expected: set[ConfigRef]) -> None:
    assert found(spec) == expected


def test_volume_is_attributed_to_the_containers_that_mount_it() -> None:
    spec = {
        "initContainers": [container("init", volumeMounts=[mount("conf")])],
        "containers": [
            container("app", volumeMounts=[mount("conf"), mount("other")]),
            container("sidecar", volumeMounts=[mount("other")]),
        ],
        "volumes": [
            {"name": "conf", "configMap": {"name": "cm"}},
            {"name": "other", "emptyDir": {}},
        ],
    }
    assert found(spec) == {ref("ConfigMap", "cm", None, {"init", "app"})}


def test_unmounted_volume_is_still_a_reference() -> None:
    spec = {"containers": [container()], "volumes": [{"name": "v", "secret": {"secretName": "s"}}]}
    assert found(spec) == {ref("Secret", "s", None, set())}


def test_keys_of_several_uses_are_merged_into_one_reference() -> None:
    spec = {
        "containers": [
            container("a", env=[key_ref("configMapKeyRef", "cm", "x")]),
            container("b", env=[key_ref("configMapKeyRef", "cm", "y")]),
        ],
        "initContainers": [container("i", env=[key_ref("configMapKeyRef", "cm", "x")])],
    }
    assert found(spec) == {ref("ConfigMap", "cm", {"x", "y"}, {"a", "b", "i"})}


@pytest.mark.parametrize(
    "whole",
    [
        pytest.param({"envFrom": [{"configMapRef": {"name": "cm"}}]}, id="envFrom"),
        pytest.param({"volumeMounts": [mount("v")]}, id="volume-without-items"),
    ],
)
def test_whole_object_use_wins_over_keys(whole: dict[str, Any]) -> None:
    spec = {
        "containers": [
            container("a", env=[key_ref("configMapKeyRef", "cm", "x")]),
            container("b", **whole),
        ],
        "volumes": [{"name": "v", "configMap": {"name": "cm"}}],
    }
    assert found(spec) == {ref("ConfigMap", "cm", None, {"a", "b"})}


def test_volume_items_and_env_keys_unite() -> None:
    spec = {
        "containers": [
            container(env=[key_ref("secretKeyRef", "s", "user")], volumeMounts=[mount("v")])
        ],
        "volumes": [{"name": "v", "secret": {"secretName": "s", "items": items("password")}}],
    }
    assert found(spec) == {ref("Secret", "s", {"user", "password"}, {"app"})}


def test_same_name_different_kinds_are_two_references() -> None:
    spec = {
        "containers": [
            container(envFrom=[{"configMapRef": {"name": "x"}}, {"secretRef": {"name": "x"}}])
        ]
    }
    assert found(spec) == {
        ref("ConfigMap", "x", None, {"app"}),
        ref("Secret", "x", None, {"app"}),
    }


def test_key_ref_without_key_reads_the_whole_object() -> None:
    spec = {"containers": [container(env=[key_ref("configMapKeyRef", "cm", key=None)])]}
    assert found(spec) == {ref("ConfigMap", "cm", None, {"app"})}


def test_plain_env_values_are_not_references() -> None:
    spec = {"containers": [container(env=[{"name": "A", "value": "b"}])]}
    assert found(spec) == frozenset()


@pytest.mark.parametrize(
    "spec",
    [
        pytest.param(
            {"containers": [container()], "imagePullSecrets": [{"name": "regcred"}]},
            id="imagePullSecrets",
        ),
        pytest.param(
            {
                "containers": MOUNTED,
                "volumes": [
                    {
                        "name": "vol",
                        "csi": {
                            "driver": "secrets-store.csi.k8s.io",
                            "nodePublishSecretRef": {"name": "creds"},
                            "volumeAttributes": {"secretProviderClass": "spc"},
                        },
                    }
                ],
            },
            id="csi-volume",
        ),
        pytest.param(
            {
                "containers": MOUNTED,
                "volumes": [
                    {"name": "vol", "projected": {"sources": [{"serviceAccountToken": {}}]}}
                ],
            },
            id="service-account-token",
        ),
        pytest.param(
            {
                "containers": MOUNTED,
                "serviceAccountName": "sa",
                "automountServiceAccountToken": True,
            },
            id="service-account",
        ),
        pytest.param(
            {
                "containers": MOUNTED,
                "volumes": [{"name": "vol", "cephfs": {"secretRef": {"name": "ceph"}}}],
            },
            id="volume-plugin-credentials",
        ),
        pytest.param(
            {
                "containers": [
                    container(
                        env=[key_ref("configMapKeyRef", ""), {"valueFrom": {"secretKeyRef": {}}}],
                        envFrom=[{"configMapRef": {}}, {"secretRef": {"name": ""}}],
                    )
                ],
                "volumes": [
                    {"name": "a", "configMap": {}},
                    {"name": "b", "secret": {"secretName": ""}},
                    {"name": "c", "secret": {"name": "wrong-field"}},
                    {"name": "d", "projected": {"sources": [{"configMap": {"name": ""}}]}},
                ],
            },
            id="empty-or-missing-names",
        ),
    ],
)
def test_ignored_sources(spec: dict[str, Any]) -> None:
    assert found(spec) == frozenset()


@pytest.mark.parametrize(
    "spec",
    [
        pytest.param(None, id="none"),
        pytest.param([], id="list"),
        pytest.param("spec", id="string"),
        pytest.param({}, id="empty"),
        pytest.param({"containers": None, "volumes": None}, id="none-fields"),
        pytest.param({"containers": "x", "initContainers": 5, "volumes": {}}, id="wrong-types"),
        pytest.param({"containers": [None, 1, "x", []]}, id="wrong-item-types"),
        pytest.param(
            {"containers": [{"env": "x", "envFrom": {}, "volumeMounts": 3}]}, id="wrong-lists"
        ),
        pytest.param(
            {
                "containers": [
                    {"env": [None, {"valueFrom": "x"}, {"valueFrom": {"secretKeyRef": 1}}]}
                ]
            },
            id="wrong-env",
        ),
        pytest.param(
            {"containers": [{"env": [key_ref("configMapKeyRef", 5)]}]},  # type: ignore[arg-type]
            id="int-name",
        ),
        pytest.param(
            {"volumes": [None, {"name": 1}, {"projected": None}, {"projected": {"sources": 1}}]},
            id="wrong-volumes",
        ),
        pytest.param(
            {"volumes": [{"projected": {"sources": [None, {"configMap": "x"}]}}]},
            id="wrong-projected-sources",
        ),
        pytest.param(
            {"containers": [{"volumeMounts": [None, {"name": None}]}], "volumes": [{"name": []}]},
            id="wrong-mounts",
        ),
    ],
)
def test_malformed_specs_never_raise(spec: Any) -> None:
    assert found(spec) == frozenset()


def test_malformed_items_read_the_whole_object() -> None:
    spec = {
        "volumes": [
            {"name": "a", "configMap": {"name": "x", "items": "nope"}},
            {
                "name": "b",
                "secret": {"secretName": "y", "items": [None, {"key": 5}, {"path": "p"}]},
            },
        ]
    }
    assert found(spec) == {
        ref("ConfigMap", "x", None, set()),
        ref("Secret", "y", None, set()),
    }


def test_container_without_a_name_still_references() -> None:
    spec = {"containers": [{"envFrom": [{"secretRef": {"name": "s"}}]}]}
    assert found(spec) == {ref("Secret", "s", None, set())}


@pytest.mark.parametrize(
    "references",
    [
        pytest.param((), id="none"),
        pytest.param(
            (
                ref("ConfigMap", "app", None, {"app"}),
                ref("ConfigMap", "keys", {"a", "b.properties"}, {"app", "init"}),
                ref("Secret", "db", {"password"}, set()),
                ref("SecretProviderClass", "vault", None, {"app"}),
            ),
            id="every-kind-and-shape",
        ),
        pytest.param(
            (ref("ConfigMap", "n" * 300, {"k" * 400}, {"c" * 255}),), id="parts-over-254-bytes"
        ),
        pytest.param((ref("Secret", "ключ", {"\ud800"}, {"é"}),), id="not-ascii"),
    ],
)
def test_packed_references_unpack_to_equal_references(references: tuple[ConfigRef, ...]) -> None:
    assert unpack_references(pack_references(references)) == references


def test_an_empty_key_set_stays_apart_from_the_whole_object() -> None:
    """``find_references`` never makes one, but packing must not turn it into "every key"."""
    some = ref("ConfigMap", "app", set(), {"app"})
    assert unpack_references(pack_references([some])) == (some,)
