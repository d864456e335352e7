"""Stakater's annotation semantics (notes §1.1 and §1.2), one behaviour per test or table row."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from reloader.annotations import (
    AnnotationNames,
    Policy,
    Problem,
    parse_go_duration,
    parse_policy,
)
from reloader.model import ConfigKind

NAMES = AnnotationNames()
AUTO = NAMES.auto
CM_AUTO = NAMES.configmap_auto
SECRET_AUTO = NAMES.secret_auto
CM_RELOAD = NAMES.configmap_reload
SECRET_RELOAD = NAMES.secret_reload
SEARCH = NAMES.search
CM_EXCLUDE = NAMES.configmaps_exclude
SECRET_EXCLUDE = NAMES.secrets_exclude
PAUSE = NAMES.pause_period
STRATEGY = NAMES.rollout_strategy


def parse(
    meta: Mapping[str, object] | None = None,
    template: Mapping[str, object] | None = None,
    *,
    auto_all: bool = False,
    names: AnnotationNames = NAMES,
) -> tuple[Policy, tuple[Problem, ...]]:
    return parse_policy(
        meta,  # type: ignore[arg-type]  # malformed bodies are part of the contract
        template,  # type: ignore[arg-type]
        names=names,
        auto_reload_all=auto_all,
    )


def policy(
    meta: Mapping[str, object] | None = None,
    template: Mapping[str, object] | None = None,
    *,
    auto_all: bool = False,
) -> Policy:
    parsed, problems = parse(meta, template, auto_all=auto_all)
    assert problems == ()
    return parsed


# --- each annotation form ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("meta", "kind", "name", "referenced", "match", "expected"),
    [
        pytest.param({AUTO: "true"}, "ConfigMap", "c", True, False, True, id="auto-cm"),
        pytest.param({AUTO: "true"}, "Secret", "s", True, False, True, id="auto-secret"),
        pytest.param({AUTO: "true"}, "ConfigMap", "c", False, False, False, id="auto-unreferenced"),
        pytest.param({CM_AUTO: "true"}, "ConfigMap", "c", True, False, True, id="cm-auto-cm"),
        pytest.param({CM_AUTO: "true"}, "Secret", "s", True, False, False, id="cm-auto-secret"),
        pytest.param({SECRET_AUTO: "true"}, "Secret", "s", True, False, True, id="secret-auto"),
        pytest.param(
            {SECRET_AUTO: "true"}, "ConfigMap", "c", True, False, False, id="secret-auto-cm"
        ),
        pytest.param(
            {CM_RELOAD: "c"}, "ConfigMap", "c", False, False, True, id="named-unreferenced"
        ),
        pytest.param({CM_RELOAD: "c"}, "ConfigMap", "c", True, False, True, id="named-referenced"),
        pytest.param({CM_RELOAD: "c"}, "ConfigMap", "d", True, False, False, id="named-other-name"),
        pytest.param({CM_RELOAD: "c"}, "Secret", "c", False, False, False, id="named-other-kind"),
        pytest.param({SECRET_RELOAD: "s"}, "Secret", "s", False, False, True, id="named-secret"),
        pytest.param({SEARCH: "true"}, "ConfigMap", "c", True, True, True, id="search-match"),
        pytest.param({SEARCH: "true"}, "Secret", "s", True, True, True, id="search-match-secret"),
        pytest.param({SEARCH: "true"}, "ConfigMap", "c", True, False, False, id="search-no-match"),
        pytest.param({SEARCH: "true"}, "ConfigMap", "c", False, True, False, id="search-unref"),
        pytest.param({SEARCH: "false"}, "ConfigMap", "c", True, True, False, id="search-false"),
        pytest.param({}, "ConfigMap", "c", True, True, False, id="nothing"),
    ],
)
def test_annotation_forms(
    meta: dict[str, str],
    kind: ConfigKind,
    name: str,
    referenced: bool,
    match: bool,
    expected: bool,
) -> None:
    assert policy(meta).wants(kind, name, referenced=referenced, match=match) is expected


def test_no_annotations_is_not_opted_in() -> None:
    assert not policy().opted_in
    assert not policy({"unrelated": "x"}, {"other": "y"}).opted_in


@pytest.mark.parametrize(
    "meta",
    [
        pytest.param({AUTO: "true"}, id="auto"),
        pytest.param({CM_AUTO: "true"}, id="configmap-auto"),
        pytest.param({SECRET_AUTO: "true"}, id="secret-auto"),
        pytest.param({SEARCH: "true"}, id="search"),
        pytest.param({CM_RELOAD: "a"}, id="configmap-named"),
        pytest.param({SECRET_RELOAD: "a.*"}, id="secret-named-regex"),
    ],
)
def test_each_opt_in_form_opts_in(meta: dict[str, str]) -> None:
    assert policy(meta).opted_in


def test_renamed_annotations_are_the_ones_read() -> None:
    names = AnnotationNames(auto="example.com/auto")
    renamed, _ = parse({"example.com/auto": "true"}, names=names)
    default, _ = parse({AUTO: "true"}, names=names)
    assert renamed.wants("ConfigMap", "c", referenced=True, match=False)
    assert not default.opted_in


# --- metadata vs template ---------------------------------------------------------------------


def test_template_is_read_when_metadata_has_none_of_the_keys() -> None:
    parsed = policy({"unrelated": "x"}, {AUTO: "true"})
    assert parsed.wants("ConfigMap", "c", referenced=True, match=False)


@pytest.mark.parametrize(
    "meta",
    [
        pytest.param({AUTO: "false"}, id="auto-false"),
        pytest.param({SEARCH: "false"}, id="search-false"),
        pytest.param({CM_RELOAD: ""}, id="empty-named-list"),
    ],
)
def test_any_switch_key_on_metadata_hides_the_template(meta: dict[str, str]) -> None:
    parsed = policy(meta, {AUTO: "true", CM_RELOAD: "c"})
    assert not parsed.wants("ConfigMap", "c", referenced=True, match=False)


def test_secret_named_list_on_metadata_hides_template_auto_for_secrets_only() -> None:
    """The switch is per kind in Stakater's ``ShouldReload``.

    1. Metadata has only the Secret named list; the template has ``auto``.
    2. For a Secret the named-list key is present on metadata, so the template is not read.
    3. For a ConfigMap none of its four keys is on metadata, so the template's ``auto`` applies.
    Result: referenced Secrets outside the list are ignored; referenced ConfigMaps restart.
    """
    parsed = policy({SECRET_RELOAD: "s"}, {AUTO: "true"})
    assert parsed.wants("Secret", "s", referenced=False, match=False)
    assert not parsed.wants("Secret", "other", referenced=True, match=False)
    assert parsed.wants("ConfigMap", "c", referenced=True, match=False)


def test_typed_auto_of_other_kind_does_not_hide_the_template() -> None:
    parsed = policy({CM_AUTO: "true"}, {SECRET_RELOAD: "s"})
    assert parsed.wants("Secret", "s", referenced=False, match=False)
    assert parsed.wants("ConfigMap", "c", referenced=True, match=False)


def test_exclude_on_template_is_ignored() -> None:
    parsed = policy(None, {AUTO: "true", CM_EXCLUDE: "c"})
    assert parsed.wants("ConfigMap", "c", referenced=True, match=False)


def test_exclude_on_metadata_applies_to_template_auto_and_does_not_hide_it() -> None:
    parsed = policy({CM_EXCLUDE: "c"}, {AUTO: "true"})
    assert not parsed.wants("ConfigMap", "c", referenced=True, match=False)
    assert parsed.wants("ConfigMap", "d", referenced=True, match=False)


def test_pause_and_strategy_on_template_are_ignored() -> None:
    parsed = policy({AUTO: "true"}, {PAUSE: "5m", STRATEGY: "restart"})
    assert parsed.pause_period is None
    assert parsed.rollout_strategy == "rollout"


# --- booleans ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["1", "t", "T", "TRUE", "true", "True"])
def test_parse_bool_true_values(value: str) -> None:
    assert policy({AUTO: value}).wants("Secret", "s", referenced=True, match=False)


@pytest.mark.parametrize("value", ["0", "f", "F", "FALSE", "false", "False"])
def test_parse_bool_false_values(value: str) -> None:
    assert not policy({AUTO: value}).opted_in


@pytest.mark.parametrize("value", ["yes please", "yes", "on", "tRUE", " true", ""])
@pytest.mark.parametrize("key", [AUTO, CM_AUTO, SECRET_AUTO])
def test_invalid_bool_is_a_problem_and_not_opted_in(key: str, value: str) -> None:
    parsed, problems = parse({key: value})
    assert problems == (Problem(key, value, "not a boolean (use true or false)"),)
    assert not parsed.opted_in


def test_invalid_auto_counts_as_set_under_auto_reload_all() -> None:
    parsed, problems = parse({AUTO: "yes please"}, auto_all=True)
    assert not parsed.opted_in
    assert len(problems) == 1


def test_empty_auto_counts_as_unset_under_auto_reload_all() -> None:
    """Stakater tests ``auto == ""``, so an empty value leaves --auto-reload-all in force."""
    parsed, problems = parse({AUTO: ""}, auto_all=True)
    assert parsed.wants("ConfigMap", "c", referenced=True, match=False)
    assert [p.annotation for p in problems] == [AUTO]


# --- --auto-reload-all ------------------------------------------------------------------------


def test_auto_reload_all_opts_in_an_unannotated_workload() -> None:
    parsed = policy(None, None, auto_all=True)
    assert parsed.opted_in
    assert parsed.wants("ConfigMap", "c", referenced=True, match=False)
    assert parsed.wants("Secret", "s", referenced=True, match=False)
    assert not parsed.wants("Secret", "s", referenced=False, match=False)


@pytest.mark.parametrize("source", ["metadata", "template"])
def test_auto_false_opts_out_of_auto_reload_all(source: str) -> None:
    annotations = {AUTO: "false"}
    meta, template = (annotations, None) if source == "metadata" else (None, annotations)
    assert not policy(meta, template, auto_all=True).opted_in


def test_typed_auto_false_opts_out_of_auto_reload_all_for_its_kind_only() -> None:
    parsed = policy({CM_AUTO: "false"}, auto_all=True)
    assert not parsed.wants("ConfigMap", "c", referenced=True, match=False)
    assert parsed.wants("Secret", "s", referenced=True, match=False)


def test_named_list_does_not_opt_out_of_auto_reload_all() -> None:
    parsed = policy({SECRET_RELOAD: "s"}, auto_all=True)
    assert parsed.wants("Secret", "other", referenced=True, match=False)
    assert not parsed.wants("Secret", "other", referenced=False, match=False)


# --- named lists ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("items", "name", "expected"),
    [
        pytest.param("app-.*", "app-x", True, id="prefix-pattern"),
        pytest.param("app-.*", "xapp-x", False, id="anchored-at-start"),
        pytest.param("app", "app2", False, id="anchored-at-end"),
        pytest.param("app", "app", True, id="literal"),
        pytest.param(" a , b ", "b", True, id="items-trimmed"),
        pytest.param("a,,b", "b", True, id="empty-item-skipped"),
        pytest.param("a|b", "b", True, id="alternation-is-whole-name"),
        pytest.param("a|b", "a-x", False, id="alternation-still-anchored"),
        pytest.param("db-[0-9]+", "db-12", True, id="character-class"),
        pytest.param("(?i)APP", "app", True, id="inline-flag"),
        pytest.param("a.b", "a-b", True, id="dot-is-a-wildcard"),
    ],
)
def test_named_list_items_are_anchored_regexes(items: str, name: str, expected: bool) -> None:
    assert (
        policy({CM_RELOAD: items}).wants("ConfigMap", name, referenced=False, match=False)
        is expected
    )


@pytest.mark.parametrize(
    "item",
    [
        pytest.param("[b", id="unterminated-set"),
        pytest.param("(b", id="unbalanced-paren"),
        pytest.param("[[:alpha:]]+", id="re2-posix-class"),
        pytest.param(r"\pL+", id="re2-unicode-class"),
    ],
)
def test_invalid_regex_is_a_problem_and_other_items_still_apply(item: str) -> None:
    parsed, problems = parse({CM_RELOAD: f"a, {item} ,c.*"})
    assert len(problems) == 1
    assert (problems[0].annotation, problems[0].value) == (CM_RELOAD, item)
    assert problems[0].reason.startswith("not a valid regular expression: ")
    assert len(problems[0].reason) > len("not a valid regular expression: ")
    assert parsed.wants("ConfigMap", "a", referenced=False, match=False)
    assert parsed.wants("ConfigMap", "cx", referenced=False, match=False)
    assert parsed.exact_names("ConfigMap") == {"a"}


def test_only_invalid_items_do_not_opt_in() -> None:
    parsed, problems = parse({CM_RELOAD: "[b"})
    assert not parsed.opted_in
    assert problems


def test_exact_names_and_has_regex_split_literals_from_patterns() -> None:
    parsed = policy({CM_RELOAD: "a, d-e, x.*, b.c", SECRET_RELOAD: "s1,s2"})
    assert parsed.exact_names("ConfigMap") == {"a", "d-e"}
    assert parsed.has_regex("ConfigMap")
    assert parsed.exact_names("Secret") == {"s1", "s2"}
    assert not parsed.has_regex("Secret")
    assert parsed.wants("ConfigMap", "bxc", referenced=False, match=False)


def test_no_named_list_has_no_names_and_no_regex() -> None:
    parsed = policy({AUTO: "true"})
    assert parsed.exact_names("ConfigMap") == frozenset()
    assert not parsed.has_regex("Secret")


# --- search -----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["True", "1", "yes", ""])
def test_search_needs_exactly_true(value: str) -> None:
    parsed, problems = parse({SEARCH: value})
    assert not parsed.wants("ConfigMap", "c", referenced=True, match=True)
    assert [(p.annotation, p.value) for p in problems] == [(SEARCH, value)]


def test_search_false_is_not_a_problem() -> None:
    assert parse({SEARCH: "false"})[1] == ()


# --- exclude ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        pytest.param("a", False, id="excluded-and-named"),
        pytest.param("b", False, id="excluded-and-referenced"),
        pytest.param("c", True, id="not-excluded"),
        pytest.param("a2", True, id="exclude-is-exact-not-regex"),
    ],
)
def test_exclude_beats_auto_and_named(name: str, expected: bool) -> None:
    meta = {AUTO: "true", CM_RELOAD: "a.*", CM_EXCLUDE: " a , b,a.* "}
    assert policy(meta).wants("ConfigMap", name, referenced=True, match=False) is expected


def test_exclude_is_per_kind() -> None:
    parsed = policy({AUTO: "true", SECRET_EXCLUDE: "x"})
    assert parsed.wants("ConfigMap", "x", referenced=True, match=False)
    assert not parsed.wants("Secret", "x", referenced=True, match=False)


def test_exclude_beats_search() -> None:
    parsed = policy({SEARCH: "true", CM_EXCLUDE: "c"})
    assert not parsed.wants("ConfigMap", "c", referenced=True, match=True)


# --- equality ---------------------------------------------------------------------------------


def test_same_annotations_give_equal_hashable_policies() -> None:
    meta = {AUTO: "true", CM_RELOAD: "a,b.*", CM_EXCLUDE: "x", PAUSE: "5m"}
    first, second = policy(dict(meta)), policy(dict(meta))
    assert first == second
    assert hash(first) == hash(second)
    assert len({first, second}) == 1


def test_item_order_does_not_change_the_policy() -> None:
    assert policy({CM_RELOAD: "a, b.*"}) == policy({CM_RELOAD: "b.*,a"})


def test_different_annotations_give_different_policies() -> None:
    assert policy({CM_RELOAD: "a"}) != policy({CM_RELOAD: "b"})
    assert policy({AUTO: "true"}) != policy({CM_AUTO: "true"})


# --- pause period -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        pytest.param("5m", 300.0, id="minutes"),
        pytest.param("1h30m", 5400.0, id="compound"),
        pytest.param("90s", 90.0, id="seconds"),
        pytest.param("1.5h", 5400.0, id="fractional-hours"),
        pytest.param("1.5s", 1.5, id="fractional-seconds"),
        pytest.param("300ms", 0.3, id="milliseconds"),
        pytest.param("2h45m30.5s", 9930.5, id="three-units"),
        pytest.param(".5m", 30.0, id="leading-dot"),
        pytest.param("0", 0.0, id="bare-zero"),
    ],
)
def test_pause_period_parses_go_durations(value: str, seconds: float) -> None:
    parsed = policy({PAUSE: value})
    assert parsed.pause_period == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value",
    ["5 minutes", "5", "", "m", "1.2.3s", "5M", " 5m", "1d", "-5m", "9999999999h"],
)
def test_invalid_pause_period_is_a_problem(value: str) -> None:
    parsed, problems = parse({PAUSE: value})
    assert parsed.pause_period is None
    assert [(p.annotation, p.value) for p in problems] == [(PAUSE, value)]


def test_absent_pause_period_is_none() -> None:
    assert policy({AUTO: "true"}).pause_period is None


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("-1m", -60.0),
        ("+5s", 5.0),
        ("-0", 0.0),
        ("1us", 1e-6),
        ("1µs", 1e-6),
        ("1μs", 1e-6),
        ("10ns", 1e-8),
        ("1.s", 1.0),
        ("1m0.5s", 60.5),
    ],
)
def test_parse_go_duration(text: str, seconds: float) -> None:
    assert parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "-", ".", "00", "1", "s", "1h-5m", "1e3s", "\u0661s"])
def test_parse_go_duration_rejects(text: str) -> None:
    assert parse_go_duration(text) is None


# --- rollout strategy -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "strategy", "problem"),
    [
        pytest.param(None, "rollout", False, id="absent"),
        pytest.param("", "rollout", False, id="empty"),
        pytest.param("rollout", "rollout", False, id="rollout"),
        pytest.param("restart", "restart", False, id="restart"),
        pytest.param("Restart", "rollout", True, id="case-sensitive"),
        pytest.param("delete", "rollout", True, id="unknown"),
    ],
)
def test_rollout_strategy(value: str | None, strategy: str, problem: bool) -> None:
    meta = {} if value is None else {STRATEGY: value}
    parsed, problems = parse(meta)
    assert parsed.rollout_strategy == strategy
    assert bool(problems) is problem


# --- problems and malformed input -------------------------------------------------------------


def test_problems_are_sorted_by_annotation_then_value() -> None:
    meta = {SEARCH: "yes", AUTO: "nope", CM_RELOAD: "[z,(a", PAUSE: "soon"}
    _, problems = parse(meta)
    keys = [(p.annotation, p.value) for p in problems]
    assert keys == sorted(keys)
    assert len(keys) == 5


def test_a_value_read_for_both_kinds_is_reported_once() -> None:
    _, problems = parse(None, {AUTO: "yes"})
    assert problems == (Problem(AUTO, "yes", "not a boolean (use true or false)"),)


def test_same_problems_compare_equal() -> None:
    assert parse({AUTO: "x", CM_RELOAD: "[a"})[1] == parse({CM_RELOAD: "[a", AUTO: "x"})[1]


@pytest.mark.parametrize(
    ("meta", "template"),
    [
        pytest.param(None, None, id="none"),
        pytest.param([], "x", id="not-mappings"),
        pytest.param({AUTO: True}, None, id="bool-value"),
        pytest.param({AUTO: None, CM_RELOAD: 5}, None, id="none-and-int-values"),
        pytest.param({1: "true"}, None, id="int-key"),
    ],
)
def test_malformed_annotations_never_raise_and_count_as_absent(
    meta: object, template: object
) -> None:
    parsed, problems = parse(meta, template)  # type: ignore[arg-type]
    assert parsed == Policy()
    assert problems == ()


def test_non_string_value_on_metadata_does_not_hide_the_template() -> None:
    parsed = policy({AUTO: True}, {AUTO: "true"})
    assert parsed.opted_in
