"""The decision table of decide.py, one behaviour per test."""

from __future__ import annotations

from reloader.decide import Decision, Dependency, decide
from reloader.digests import ABSENT, Recorded

KEY_ID = "key-1"


def dep(name: str, digest: str | None, kind: str = "ConfigMap") -> tuple[str, Dependency]:
    return f"{kind}/{name}", Dependency(kind, name, digest, ("app",))  # type: ignore[arg-type]


def run(
    recorded: dict[str, str] | None,
    deps: dict[str, Dependency],
    *,
    key_id: str = KEY_ID,
    on_create: bool = False,
    on_delete: bool = False,
) -> Decision:
    record = Recorded.of(key_id, recorded) if recorded is not None else None
    return decide(
        recorded=record,
        deps=deps,
        key_id=KEY_ID,
        reload_on_create=on_create,
        reload_on_delete=on_delete,
    )


def test_first_sight_records_without_restart() -> None:
    decision = run(None, dict([dep("app", "d1")]))
    assert decision.action == "record"
    assert decision.record == Recorded.of(KEY_ID, {"ConfigMap/app": "d1"})


def test_nothing_to_watch_writes_nothing() -> None:
    assert run(None, {}).action == "nothing"


def test_unchanged_digest_does_nothing() -> None:
    assert run({"ConfigMap/app": "d1"}, dict([dep("app", "d1")])).action == "nothing"


def test_changed_digest_restarts_and_records_new_digest() -> None:
    decision = run({"ConfigMap/app": "d1"}, dict([dep("app", "d2")]))
    assert decision.action == "restart"
    assert decision.triggers == ("ConfigMap/app",)
    assert decision.record == Recorded.of(KEY_ID, {"ConfigMap/app": "d2"})


def test_several_changes_restart_once_naming_all() -> None:
    deps = dict([dep("a", "2"), dep("b", "2", "Secret"), dep("c", "1")])
    decision = run({"ConfigMap/a": "1", "Secret/b": "1", "ConfigMap/c": "1"}, deps)
    assert decision.action == "restart"
    assert decision.triggers == ("ConfigMap/a", "Secret/b")


def test_other_key_id_rerecords_without_restart() -> None:
    decision = run({"ConfigMap/app": "old"}, dict([dep("app", "new")]), key_id="key-0")
    assert (decision.action, decision.reset) == ("record", "digest_key")
    assert decision.record == Recorded.of(KEY_ID, {"ConfigMap/app": "new"})


def test_created_config_records_unless_reload_on_create() -> None:
    deps = dict([dep("app", "d1"), dep("late", "d9")])
    missing_then = {"ConfigMap/app": "d1", "ConfigMap/late": ABSENT}
    assert run(missing_then, deps).action == "record"
    decision = run(missing_then, deps, on_create=True)
    assert (decision.action, decision.triggers) == ("restart", ("ConfigMap/late",))


def test_new_dependency_is_recorded_even_with_reload_on_create() -> None:
    """Not in the record at all: an opt-in or a named list edit, not a creation."""
    deps = dict([dep("app", "d1"), dep("named", "d9")])
    decision = run({"ConfigMap/app": "d1"}, deps, on_create=True)
    assert decision.action == "record"
    assert decision.record == Recorded.of(KEY_ID, {"ConfigMap/app": "d1", "ConfigMap/named": "d9"})


def test_opt_in_after_opt_out_never_restarts() -> None:
    opted_out = run({"ConfigMap/app": "d1"}, {}, on_create=True, on_delete=True)
    assert opted_out.action == "record" and opted_out.record is not None
    assert opted_out.record.configs == ()
    back = decide(
        recorded=opted_out.record,
        deps=dict([dep("app", "d2")]),
        key_id=KEY_ID,
        reload_on_create=True,
        reload_on_delete=True,
    )
    assert back.action == "record"


def test_a_set_aside_record_is_remade_bound_without_restart() -> None:
    aside = Recorded.nothing(uid="u-2", template="t-2", reset="uid")
    decision = decide(
        recorded=aside,
        deps=dict([dep("app", "d2")]),
        key_id=KEY_ID,
        reload_on_create=True,
        reload_on_delete=True,
    )
    assert (decision.action, decision.reset) == ("record", "uid")
    assert decision.record == Recorded.of(
        KEY_ID, {"ConfigMap/app": "d2"}, uid="u-2", template="t-2"
    )


def test_new_records_keep_the_binding() -> None:
    bound = Recorded.of(KEY_ID, {"ConfigMap/app": "d1"}, uid="u", template="t", restarted_at=5)
    decision = decide(
        recorded=bound,
        deps=dict([dep("app", "d2")]),
        key_id=KEY_ID,
        reload_on_create=False,
        reload_on_delete=False,
    )
    assert decision.action == "restart"
    assert decision.record == Recorded.of(
        KEY_ID, {"ConfigMap/app": "d2"}, uid="u", template="t", restarted_at=5
    )


def test_deleted_config_keeps_its_entry_without_reload_on_delete() -> None:
    assert run({"ConfigMap/app": "d1"}, dict([dep("app", None)])).action == "nothing"


def test_deleted_config_restarts_with_reload_on_delete_and_is_forgotten() -> None:
    decision = run({"ConfigMap/app": "d1"}, dict([dep("app", None)]), on_delete=True)
    assert (decision.action, decision.triggers) == ("restart", ("ConfigMap/app",))
    assert decision.record == Recorded.of(KEY_ID, {"ConfigMap/app": ABSENT})
    again = run({"ConfigMap/app": ABSENT}, dict([dep("app", "d1")]), on_create=True)
    assert (again.action, again.triggers) == ("restart", ("ConfigMap/app",))


def test_recreated_config_with_same_content_does_nothing() -> None:
    assert run({"ConfigMap/app": "d1"}, dict([dep("app", "d1")])).action == "nothing"


def test_dropped_dependency_is_pruned_without_restart() -> None:
    decision = run({"ConfigMap/app": "d1", "ConfigMap/gone": "d2"}, dict([dep("app", "d1")]))
    assert decision.action == "record"
    assert decision.record == Recorded.of(KEY_ID, {"ConfigMap/app": "d1"})


def test_missing_config_on_first_sight_is_recorded_as_missing() -> None:
    decision = run(None, dict([dep("optional", None)]))
    assert decision.action == "record"
    assert decision.record == Recorded.of(KEY_ID, {"ConfigMap/optional": ABSENT})
