"""Every Stakater annotation form, on workload metadata and on the pod template, end to end.

Each negative test makes the change that must NOT restart alone and waits a quiet period longer
than the debounce and the controller's reaction: the pod template must be unchanged and no
ReplicaSet added. Only then is the change that must restart made, which proves the controller was
alive; it must restart exactly once, with a marker naming that config
(``Cluster.assert_not_restarted_then_restarts``). Making both changes in one debounce window would
give one rollout whether or not the first was ignored.
"""

from __future__ import annotations

from typing import Any

import pytest

from reloader.model import KINDS, RECORD_ANNOTATION
from tests.scenario import Change, Cluster, container, deployment, env_from

pytestmark = pytest.mark.cluster


def uses(*refs: tuple[str, str]) -> list[dict[str, Any]]:
    """One container reading every (kind, name) through envFrom."""
    env = [
        {"configMapRef": {"name": n}} if k == "ConfigMap" else {"secretRef": {"name": n}}
        for k, n in refs
    ]
    return [container(envFrom=env)]


async def change(scene: Cluster, kind: str, name: str, value: str = "2") -> None:
    if kind == "ConfigMap":
        await scene.patch_configmap(name, {"data": {"a": value}})
    else:
        await scene.set_secret(name, {"a": value})


def changing(scene: Cluster, kind: str, name: str, value: str = "2") -> Change:
    """``change`` for later: the negative check makes it at a moment of its choosing."""

    async def make() -> None:
        await change(scene, kind, name, value)

    return make


async def start(scene: Cluster, name: str = "web") -> None:
    await scene.start_controller()
    await scene.wait_recorded(name)


async def test_typed_auto_reacts_to_its_kind_only(scene: Cluster) -> None:
    await scene.create_configmap("cfg", {"a": "1"})
    await scene.create_secret("sec", {"a": "1"})
    annotations = {"configmap.reloader.stakater.com/auto": "true"}
    containers = uses(("ConfigMap", "cfg"), ("Secret", "sec"))
    await scene.create_workload(deployment("web", annotations=annotations, containers=containers))
    await start(scene)

    await scene.assert_not_restarted_then_restarts(
        "web",
        wrong=changing(scene, "Secret", "sec"),
        right=changing(scene, "ConfigMap", "cfg"),
        source=("ConfigMap", "cfg"),
    )


async def test_secret_typed_auto(scene: Cluster) -> None:
    await scene.create_configmap("cfg", {"a": "1"})
    await scene.create_secret("sec", {"a": "1"})
    annotations = {"secret.reloader.stakater.com/auto": "true"}
    containers = uses(("ConfigMap", "cfg"), ("Secret", "sec"))
    await scene.create_workload(deployment("web", annotations=annotations, containers=containers))
    await start(scene)

    await scene.assert_not_restarted_then_restarts(
        "web",
        wrong=changing(scene, "ConfigMap", "cfg"),
        right=changing(scene, "Secret", "sec"),
        source=("Secret", "sec"),
    )


async def test_named_list_reloads_on_a_config_the_spec_does_not_reference(scene: Cluster) -> None:
    await scene.create_configmap("used", {"a": "1"})
    await scene.create_configmap("elsewhere", {"a": "1"})
    annotations = {"configmap.reloader.stakater.com/reload": "elsewhere"}
    await scene.create_workload(
        deployment("web", annotations=annotations, containers=uses(("ConfigMap", "used")))
    )
    await start(scene)

    await scene.assert_not_restarted_then_restarts(
        "web",
        wrong=changing(scene, "ConfigMap", "used"),  # referenced but not named, no auto
        right=changing(scene, "ConfigMap", "elsewhere"),
        source=("ConfigMap", "elsewhere"),
    )


async def test_named_list_items_are_anchored_regular_expressions(scene: Cluster) -> None:
    for name in ("db-main", "x-db-main"):
        await scene.create_secret(name, {"a": "1"})
    annotations = {"secret.reloader.stakater.com/reload": "db-.*"}
    await scene.create_workload(deployment("web", annotations=annotations))
    await start(scene)

    await scene.assert_not_restarted_then_restarts(
        "web",
        wrong=changing(scene, "Secret", "x-db-main"),  # matches only unanchored
        right=changing(scene, "Secret", "db-main"),
        source=("Secret", "db-main"),
    )


async def test_named_regex_picks_up_a_config_created_later(scene: Cluster) -> None:
    await scene.create_configmap("unrelated", {"a": "1"})
    annotations = {"configmap.reloader.stakater.com/reload": "feature-.*"}
    await scene.create_workload(deployment("web", annotations=annotations))
    await scene.start_controller()  # nothing matches yet: nothing to record

    async def appear() -> None:
        await scene.create_configmap("feature-x", {"a": "1"})
        await scene.wait_recorded("web")  # appeared: recorded, not a change

    await scene.assert_not_restarted_then_restarts(
        "web",
        wrong=appear,
        right=changing(scene, "ConfigMap", "feature-x"),
        source=("ConfigMap", "feature-x"),
    )


async def test_search_reacts_only_to_configs_marked_match(scene: Cluster) -> None:
    await scene.create_configmap("plain", {"a": "1"})
    await scene.create_configmap(
        "marked", {"a": "1"}, annotations={"reloader.stakater.com/match": "true"}
    )
    annotations = {"reloader.stakater.com/search": "true"}
    containers = uses(("ConfigMap", "plain"), ("ConfigMap", "marked"))
    await scene.create_workload(deployment("web", annotations=annotations, containers=containers))
    await start(scene)

    await scene.assert_not_restarted_then_restarts(
        "web",
        wrong=changing(scene, "ConfigMap", "plain"),
        right=changing(scene, "ConfigMap", "marked"),
        source=("ConfigMap", "marked"),
    )


async def test_exclude_list_beats_auto(scene: Cluster) -> None:
    await scene.create_configmap("keep", {"a": "1"})
    await scene.create_configmap("skip", {"a": "1"})
    annotations = {
        "reloader.stakater.com/auto": "true",
        "configmaps.exclude.reloader.stakater.com/reload": "skip",
    }
    containers = uses(("ConfigMap", "keep"), ("ConfigMap", "skip"))
    await scene.create_workload(deployment("web", annotations=annotations, containers=containers))
    await start(scene)

    await scene.assert_not_restarted_then_restarts(
        "web",
        wrong=changing(scene, "ConfigMap", "skip"),
        right=changing(scene, "ConfigMap", "keep"),
        source=("ConfigMap", "keep"),
    )


async def test_secret_exclude_list(scene: Cluster) -> None:
    await scene.create_secret("keep", {"a": "1"})
    await scene.create_secret("skip", {"a": "1"})
    annotations = {
        "reloader.stakater.com/auto": "true",
        "secrets.exclude.reloader.stakater.com/reload": "skip",
    }
    containers = uses(("Secret", "keep"), ("Secret", "skip"))
    await scene.create_workload(deployment("web", annotations=annotations, containers=containers))
    await start(scene)

    await scene.assert_not_restarted_then_restarts(
        "web",
        wrong=changing(scene, "Secret", "skip"),
        right=changing(scene, "Secret", "keep"),
        source=("Secret", "keep"),
    )


async def test_ignore_on_the_config_wins(scene: Cluster) -> None:
    await scene.create_configmap(
        "quiet", {"a": "1"}, annotations={"reloader.stakater.com/ignore": "true"}
    )
    await scene.create_configmap("loud", {"a": "1"})
    annotations = {"reloader.stakater.com/auto": "true"}
    containers = uses(("ConfigMap", "quiet"), ("ConfigMap", "loud"))
    await scene.create_workload(deployment("web", annotations=annotations, containers=containers))
    await start(scene)

    await scene.assert_not_restarted_then_restarts(
        "web",
        wrong=changing(scene, "ConfigMap", "quiet"),
        right=changing(scene, "ConfigMap", "loud"),
        source=("ConfigMap", "loud"),
    )


async def test_auto_on_the_pod_template(scene: Cluster) -> None:
    await scene.create_configmap("cfg", {"a": "1"})
    await scene.create_workload(
        deployment(
            "web",
            template_annotations={"reloader.stakater.com/auto": "true"},
            containers=[container(**env_from("ConfigMap", "cfg"))],
        )
    )
    await start(scene)

    await change(scene, "ConfigMap", "cfg")
    await scene.assert_replica_sets_stay("web", 2)


async def test_named_list_on_the_pod_template(scene: Cluster) -> None:
    await scene.create_secret("token", {"a": "1"})
    await scene.create_workload(
        deployment("web", template_annotations={"secret.reloader.stakater.com/reload": "token"})
    )
    await start(scene)

    await change(scene, "Secret", "token")
    await scene.assert_replica_sets_stay("web", 2)


async def test_template_is_not_read_when_metadata_has_the_kind_s_annotation(
    scene: Cluster,
) -> None:
    """Stakater reads the template only when metadata has none of the keys for that config kind."""
    await scene.create_configmap("cfg", {"a": "1"})
    await scene.create_configmap("named", {"a": "1"})
    await scene.create_workload(
        deployment(
            "web",
            annotations={"configmap.reloader.stakater.com/reload": "named"},
            template_annotations={"reloader.stakater.com/auto": "true"},
            containers=[container(**env_from("ConfigMap", "cfg"))],
        )
    )
    await start(scene)

    await scene.assert_not_restarted_then_restarts(
        "web",
        wrong=changing(scene, "ConfigMap", "cfg"),  # template auto is shadowed
        right=changing(scene, "ConfigMap", "named"),
        source=("ConfigMap", "named"),
    )


async def test_exclude_on_the_pod_template_is_not_read(scene: Cluster) -> None:
    await scene.create_configmap("cfg", {"a": "1"})
    await scene.create_workload(
        deployment(
            "web",
            annotations={"reloader.stakater.com/auto": "true"},
            template_annotations={"configmaps.exclude.reloader.stakater.com/reload": "cfg"},
            containers=[container(**env_from("ConfigMap", "cfg"))],
        )
    )
    await start(scene)

    await change(scene, "ConfigMap", "cfg")
    await scene.assert_replica_sets_stay("web", 2)
    assert await scene.marker("Deployment", "web") is not None


async def test_exclude_on_the_pod_template_applies_with_auto_there(scene: Cluster) -> None:
    """Stakater's e2e case: ``auto`` and the exclude list both on the template (none on
    metadata), so the template is the source of both."""
    await scene.create_configmap("keep", {"a": "1"})
    await scene.create_configmap("skip", {"a": "1"})
    template = {
        "reloader.stakater.com/auto": "true",
        "configmaps.exclude.reloader.stakater.com/reload": "skip",
    }
    containers = uses(("ConfigMap", "keep"), ("ConfigMap", "skip"))
    await scene.create_workload(
        deployment("web", template_annotations=template, containers=containers)
    )
    await start(scene)

    await scene.assert_not_restarted_then_restarts(
        "web",
        wrong=changing(scene, "ConfigMap", "skip"),
        right=changing(scene, "ConfigMap", "keep"),
        source=("ConfigMap", "keep"),
    )


async def test_auto_false_opts_out(scene: Cluster) -> None:
    await scene.create_configmap("cfg", {"a": "1"})
    await scene.create_workload(
        deployment(
            "web",
            annotations={"reloader.stakater.com/auto": "false"},
            containers=[container(**env_from("ConfigMap", "cfg"))],
        )
    )
    await scene.start_controller()

    async def opt_in_then_change() -> None:
        obj = await scene.get_deployment("web")
        assert RECORD_ANNOTATION not in obj["metadata"].get("annotations", {}), "opted out"
        path = KINDS["Deployment"].resource.object_path(scene.namespace, "web")
        opt_in = {"metadata": {"annotations": {"reloader.stakater.com/auto": "true"}}}
        await scene.api.patch(path, opt_in, patch_type="merge")
        await scene.wait_recorded("web")  # first sight: recorded, not restarted
        await change(scene, "ConfigMap", "cfg", "3")

    await scene.assert_not_restarted_then_restarts(
        "web",
        wrong=changing(scene, "ConfigMap", "cfg"),
        right=opt_in_then_change,
        source=("ConfigMap", "cfg"),
    )
