"""The Containerfile, read as data (tests/test_node.py builds it with buildah and runs the image).

What is checked is what a review would check: two stages; the runtime stage installs the wheel the
builder made, built by the same command as ``make wheel`` (so the image holds the package the tests
ran against); no compiler or package manager run in the runtime stage; a numeric non-root user (so
the kubelet can verify ``runAsNonRoot``); an exec-form entrypoint (the controller is PID 1 and gets
SIGTERM itself); labels that agree with pyproject.toml; and a build context without the virtualenv
or the git history.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILD_TOOLS = {"gcc", "g++", "cc", "make", "build-essential", "clang", "apt-get", "apk", "dnf"}
"""Words that mean a compiler or a package manager runs in the runtime stage."""


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [i.args for i in self.instructions if i.keyword == keyword]


def instructions(text: str) -> list[Instruction]:
    """Logical instructions: comment lines dropped, ``\\`` continuations joined."""
    result: list[Instruction] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # a comment inside a continuation does not end it, as in the builders
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        result.append(Instruction(keyword.upper(), args.strip()))
        pending = ""
    assert not pending, "the file ends inside a continuation"
    return result


def global_args(text: str) -> dict[str, str]:
    """The ``ARG``s before the first ``FROM`` with their defaults: only they may name a base."""
    found: dict[str, str] = {}
    for instruction in instructions(text):
        if instruction.keyword == "FROM":
            break
        if instruction.keyword == "ARG":
            name, _, default = instruction.args.partition("=")
            found[name.strip()] = default.strip()
    return found


def stages(text: str) -> list[Stage]:
    """The stages, their bases with the global ``ARG`` defaults put in (what a plain build uses)."""
    result: list[Stage] = []
    defaults = global_args(text)
    for instruction in instructions(text):
        if instruction.keyword == "ARG" and not result:
            continue
        if instruction.keyword == "FROM":
            args = re.sub(
                r"\$\{(\w+)\}|\$(\w+)", lambda m: defaults[m[1] or m[2]], instruction.args
            )
            words = args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            result.append(Stage(base=words[0], name=name))
        else:
            assert result, f"{instruction.keyword} before the first FROM"
            result[-1].instructions.append(instruction)
    return result


def labels(stage: Stage) -> dict[str, str]:
    found: dict[str, str] = {}
    for args in stage.all("LABEL"):
        for word in shlex.split(args):
            key, _, value = word.partition("=")
            found[key] = value
    return found


def pip_wheel_shape(command: str) -> list[str]:
    """A ``pip wheel`` command reduced to what decides the wheel: flags that only change output
    noise or caching go, and the output directory becomes a placeholder."""
    words = shlex.split(command)
    words = words[words.index("pip") + 1 :] if "pip" in words else words
    words = words[next(i for i, w in enumerate(words) if w == "wheel") :]
    shape, skip_value = [], False
    for word in words:
        if skip_value:
            shape.append("<dir>")
            skip_value = False
        elif word in ("--quiet", "-q", "--no-cache-dir"):
            continue
        elif word in ("--wheel-dir", "-w"):
            shape.append("--wheel-dir")
            skip_value = True
        else:
            shape.append(word)
    return shape


def makefile_recipe(target: str) -> list[str]:
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{target}:"))
    recipe = []
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    return recipe


@pytest.fixture(scope="module")
def built() -> list[Stage]:
    return stages((ROOT / "Containerfile").read_text())


@pytest.fixture(scope="module")
def runtime(built: list[Stage]) -> Stage:
    return built[-1]


@pytest.fixture(scope="module")
def builder(built: list[Stage], runtime: Stage) -> Stage:
    (source,) = [args for args in runtime.all("COPY") if args.startswith("--from=")]
    name = source.split()[0].removeprefix("--from=")
    (stage,) = [stage for stage in built[:-1] if stage.name == name]
    return stage


def test_parser_joins_continuations_and_skips_comments() -> None:
    text = "FROM a AS b\n# note\nRUN one \\\n  # inside\n  two\nUSER 1:1\n"
    assert stages(text) == [
        Stage("a", "b", [Instruction("RUN", "one two"), Instruction("USER", "1:1")])
    ]


def test_two_stages_on_slim_python(built: list[Stage]) -> None:
    assert len(built) >= 2
    assert all(stage.base == "python:3.12-slim" for stage in built)


def test_the_base_is_one_build_argument() -> None:
    """The node tests build from a local base (``--build-arg BASE=...``, tests/node/images.sh): both
    stages must take it, and a plain build the public image."""
    text = (ROOT / "Containerfile").read_text()
    assert global_args(text) == {"BASE": "python:3.12-slim"}
    bases = [i.args.split()[0] for i in instructions(text) if i.keyword == "FROM"]
    assert bases == ["${BASE}"] * len(bases)


def test_runtime_installs_the_wheel_the_builder_made(builder: Stage, runtime: Stage) -> None:
    (build,) = [run for run in builder.all("RUN") if "pip wheel" in run]
    wheel_dir = shlex.split(build)[shlex.split(build).index("--wheel-dir") + 1]
    (copy,) = [args for args in runtime.all("COPY") if args.startswith("--from=")]
    source, target = copy.split()[1:]
    assert source.rstrip("/") == wheel_dir.rstrip("/")
    installs = [run for run in runtime.all("RUN") if "pip install" in run]
    assert installs, "the runtime stage installs nothing"
    assert all(f"{target.rstrip('/')}/*.whl" in run for run in installs)
    assert all("--no-cache-dir" in run for run in installs)


def test_the_wheel_is_built_as_make_wheel_builds_it(builder: Stage) -> None:
    (make,) = [line for line in makefile_recipe("wheel") if "pip wheel" in line]
    (build,) = [run for run in builder.all("RUN") if "pip wheel" in run]
    assert (
        pip_wheel_shape(build)
        == pip_wheel_shape(make)
        == [
            "wheel",
            "--no-deps",
            "--wheel-dir",
            "<dir>",
            ".",
        ]
    )


def test_builder_copies_what_the_wheel_is_made_of(builder: Stage) -> None:
    copied = {word.rstrip("/") for args in builder.all("COPY") for word in args.split()[:-1]}
    assert {"pyproject.toml", "README.md", "reloader"} <= copied  # README: pyproject's readme


def test_no_build_tools_in_the_runtime_stage(runtime: Stage) -> None:
    for run in runtime.all("RUN"):
        words = set(re.split(r"[\s;&|]+", run))
        assert not words & BUILD_TOOLS, run


def test_runs_as_a_numeric_non_root_user(runtime: Stage) -> None:
    (user,) = runtime.all("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0
    assert not gid or (gid.isdigit() and int(gid) != 0)
    assert user == "65532:65532"  # the runAsUser/runAsGroup of manifests/base/deployment.yaml


def test_entrypoint_is_exec_form_reloader(runtime: Stage) -> None:
    (entrypoint,) = runtime.all("ENTRYPOINT")
    assert json.loads(entrypoint) == ["reloader"]
    assert not runtime.all("CMD")
    assert runtime.all("EXPOSE") == ["9090"]


def test_labels_agree_with_pyproject(runtime: Stage) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found = labels(runtime)
    prefix = "org.opencontainers.image."
    assert found[prefix + "title"] == project["name"]
    assert found[prefix + "version"] == project["version"]
    assert found[prefix + "licenses"] == project["license"]
    assert found[prefix + "source"].startswith("https://")
    assert found[prefix + "description"]


def test_context_leaves_out_the_virtualenv_and_git() -> None:
    patterns = {
        line.strip().rstrip("/")
        for line in (ROOT / ".containerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", ".git", "dist", "bench/results"} <= patterns
