"""Stakater's annotation semantics (notes §1.1 and §1.2), one behaviour per test or table row."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from reloader.annotations import (
    MAX_LIST_CHARS,
    MAX_LIST_ITEMS,
    SHARED_POLICIES_MAX,
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


@pytest.mark.parametrize(
    ("key", "kind"), [(CM_EXCLUDE, "ConfigMap"), (SECRET_EXCLUDE, "Secret")], ids=["cm", "secret"]
)
def test_exclude_on_template_applies(key: str, kind: ConfigKind) -> None:
    """Stakater's own e2e suite expects this (a pending test); its code reads metadata only."""
    parsed = policy(None, {AUTO: "true", key: "c"})
    assert not parsed.wants(kind, "c", referenced=True, match=False)
    assert parsed.wants(kind, "d", referenced=True, match=False)


def test_exclude_lists_on_metadata_and_template_add_up() -> None:
    parsed = policy({CM_EXCLUDE: "a"}, {AUTO: "true", CM_EXCLUDE: "b"})
    assert not parsed.wants("ConfigMap", "a", referenced=True, match=False)
    assert not parsed.wants("ConfigMap", "b", referenced=True, match=False)
    assert parsed.wants("ConfigMap", "c", referenced=True, match=False)


def test_exclude_on_template_is_not_read_when_metadata_holds_the_switch() -> None:
    """Like ``auto`` itself: the template is read only if none of the kind's keys is on metadata."""
    parsed = policy({AUTO: "true"}, {CM_EXCLUDE: "c", SECRET_EXCLUDE: "s"})
    assert parsed.wants("ConfigMap", "c", referenced=True, match=False)
    assert parsed.wants("Secret", "s", referenced=True, match=False)
    per_kind = policy({SECRET_RELOAD: "s"}, {AUTO: "true", CM_EXCLUDE: "c", SECRET_EXCLUDE: "s"})
    assert not per_kind.wants("ConfigMap", "c", referenced=True, match=False)
    assert per_kind.wants("Secret", "s", referenced=False, match=False)


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
        pytest.param("[[:alpha:]]+", "abc", True, id="posix-class"),
        pytest.param("[[:alpha:]]+", "a1", False, id="posix-class-no-digit"),
        pytest.param(r"\pL+", "abc", True, id="unicode-class"),
        pytest.param(r"\Qa.b\E", "a.b", True, id="quoted-literal"),
        pytest.param(r"\Qa.b\E", "axb", False, id="quoted-dot-is-literal"),
        pytest.param(r"app\z", "app", True, id="end-of-text"),
        pytest.param(r"a\{4294967296}", "a{4294967296}", True, id="escaped-brace-is-literal"),
        pytest.param("(a|a)*b", "a" * 40, False, id="catastrophic-for-backtracking"),
        pytest.param("(x+x+)+y", "x" * 253, False, id="nested-quantifiers"),
        pytest.param("(" * 2000 + "a" + ")" * 2000, "a", True, id="deep-nesting"),
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
        pytest.param("a{4294967296}", id="repeat-count-overflow"),
        pytest.param("a{1001}", id="repeat-count-over-1000"),
        pytest.param(r"x\C", id="any-byte-go-refuses"),
        pytest.param(r"\\\C", id="escaped-backslash-then-any-byte"),
        pytest.param("(?=a)", id="lookahead"),
        pytest.param(r"(a)\1", id="backreference"),
        pytest.param("[^x]{1000}" * 8, id="program-over-RE2_MAX_MEM"),
        pytest.param("x\ud800.", id="lone-surrogate"),
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


def test_a_refused_pattern_reason_is_bounded() -> None:
    item = "(" * 3000
    _, problems = parse({CM_RELOAD: item})
    assert len(problems) == 1
    assert len(problems[0].value) <= 80 and len(problems[0].reason) <= 120


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("a" * (MAX_LIST_CHARS + 1), id="too-long"),
        pytest.param(",".join(f"c{i}" for i in range(MAX_LIST_ITEMS + 1)), id="too-many-items"),
    ],
)
def test_an_oversized_named_list_is_refused_whole(value: str) -> None:
    parsed, problems = parse({CM_RELOAD: value}, {AUTO: "true"})
    assert [(p.annotation, "the whole list is ignored" in p.reason) for p in problems] == [
        (CM_RELOAD, True)
    ]
    assert len(problems[0].value) <= 80
    assert not parsed.wants("ConfigMap", "c0", referenced=False, match=False)
    # The key is still present on metadata, so the template's auto stays hidden.
    assert not parsed.wants("ConfigMap", "c0", referenced=True, match=False)


def test_a_named_list_at_the_caps_is_accepted() -> None:
    names = [f"c{i}" for i in range(MAX_LIST_ITEMS)]
    value = ",".join(names)
    value += "," + "x" * (MAX_LIST_CHARS - len(value) - 1)
    assert len(value) == MAX_LIST_CHARS and len(value.split(",")) == MAX_LIST_ITEMS + 1
    parsed, problems = parse({CM_RELOAD: ",".join(names)})
    assert problems == ()
    assert parsed.exact_names("ConfigMap") == set(names)
    long_item, _ = parse({CM_RELOAD: "c0," + "x" * (MAX_LIST_CHARS - 3)})
    assert long_item.wants("ConfigMap", "c0", referenced=False, match=False)


def test_problem_values_are_cut_short() -> None:
    _, problems = parse({AUTO: "y" * 100_000, PAUSE: "1" * 100_000 + "x"})
    assert len(problems) == 2
    assert all(len(p.value) <= 80 and p.value.endswith("…") for p in problems)
    assert all(len(p.text) < 300 for p in problems)


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


@pytest.mark.parametrize(
    ("text", "nanoseconds"),
    [
        pytest.param("9223372036854775807ns", 2**63 - 1, id="int64-max"),
        pytest.param("-9223372036854775808ns", -(2**63), id="int64-min"),
        pytest.param("2562047h", 2562047 * 3600 * 10**9, id="largest-whole-hours"),
        pytest.param("0.000000001s", 1, id="one-nanosecond"),
        pytest.param("0.0000000009s", 0, id="below-a-nanosecond-truncates"),
        pytest.param("1.00000000000000000000001s", 10**9, id="excess-fraction-digits"),
        pytest.param("1h1h", 2 * 3600 * 10**9, id="repeated-unit"),
        pytest.param("+0", 0, id="signed-zero"),
        pytest.param("0000000000000000000001s", 10**9, id="leading-zeros"),
    ],
)
def test_parse_go_duration_matches_go_at_the_edges(text: str, nanoseconds: int) -> None:
    assert parse_go_duration(text) == pytest.approx(nanoseconds / 1e9, abs=1e-12)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("9223372036854775808ns", id="int64-max-plus-one"),
        pytest.param("2562048h", id="hours-overflow"),
        pytest.param("9" * 400 + "s", id="huge-number"),
        pytest.param("2562047h2562047h", id="sum-overflow"),
        pytest.param(".s", id="dot-without-digits"),
        pytest.param("1s ", id="trailing-space"),
        pytest.param("1S", id="unit-case"),
    ],
)
def test_parse_go_duration_rejects_like_go(text: str) -> None:
    assert parse_go_duration(text) is None


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        pytest.param("1" * 1_000_000 + "x", None, id="digits-then-junk"),
        pytest.param("1" * 1_000_000 + ".x", None, id="digits-dot-then-junk"),
        pytest.param("0" * 1_000_000 + "1s", 1.0, id="a-million-leading-zeros"),
        pytest.param("." + "1" * 1_000_000 + "s", 1 / 9, id="a-million-fraction-digits"),
        pytest.param("1ns" * 300_000, 300_000e-9, id="300k-parts"),
        pytest.param("1" + "x" * 1_000_000, None, id="a-million-char-unit"),
    ],
)
def test_parse_go_duration_is_linear_on_hostile_input(text: str, seconds: float | None) -> None:
    """A quadratic parser takes hours on these 1 MB values (the old regex took 0.5 s at 8 kB and
    four times that per doubling); pytest's timeout fails the test if that ever comes back."""
    parsed = parse_go_duration(text)
    assert parsed == (None if seconds is None else pytest.approx(seconds))


def test_a_short_duration_is_parsed_once_per_distinct_value() -> None:
    from reloader import annotations

    annotations._cached_seconds.cache_clear()
    for _ in range(3):
        policy({PAUSE: "7m"})
        policy({PAUSE: "7m"})
    info = annotations._cached_seconds.cache_info()
    assert (info.misses, info.hits) == (1, 5)


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


def test_equal_annotations_share_one_policy_object() -> None:
    first, _ = parse({AUTO: "true"})
    second, _ = parse({AUTO: "true"})
    named, _ = parse({CM_RELOAD: "a,b"})

    assert first is second
    assert named == parse({CM_RELOAD: "a,b"})[0] and named is not first


def test_the_shared_policies_are_bounded() -> None:
    """Hostile variety (a unique named list per workload) costs at most the table's size."""
    from reloader.annotations import _SHARED_POLICIES

    for i in range(SHARED_POLICIES_MAX * 3):
        policy, _ = parse({CM_RELOAD: f"config-{i}"})
        assert policy.exact_names("ConfigMap") == frozenset({f"config-{i}"})
    assert 0 < len(_SHARED_POLICIES) <= SHARED_POLICIES_MAX
