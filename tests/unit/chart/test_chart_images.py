"""The component images, checked without a Docker engine: each Dockerfile copies only paths
that exist and are in the build context, installs only its own workspace member with the
locked dependencies, runs as a non-root user with the member's entry point, and `make images`
builds exactly the images the chart's defaults run."""

from __future__ import annotations

import fnmatch
import re
import shlex
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from chart_render import ROOT, base_values, render

#: component directory -> (workspace member, its module, the chart's values section)
COMPONENTS = {
    "smtp-gateway": ("mailkube-gateway", "mailkube_gateway", "gateway"),
    "delivery-worker": ("mailkube-worker", "mailkube_worker", "worker"),
    "operator": ("mailkube-operator", "mailkube_operator", "operator"),
}


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)


def parse_dockerfile(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages) with continuation lines joined and comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, f"{path}: dangling continuation"
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = rest.split()
            image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(image, name))
        elif keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        else:
            assert stages, f"{path}: {keyword} before FROM"
            stages[-1].instructions.append((keyword, rest))
    return args, stages


def copies(stage: Stage) -> list[tuple[list[str], str]]:
    """(sources, destination) of the stage's COPY instructions from the build context."""
    found = []
    for keyword, rest in stage.instructions:
        if keyword in ("COPY", "ADD"):
            words = shlex.split(rest)
            if any(w.startswith("--from=") for w in words):
                continue
            words = [w for w in words if not w.startswith("--")]
            found.append((words[:-1], words[-1]))
    return found


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore keeps `path` (or a directory above it) out of the context."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        assert not pattern.startswith("!"), "exceptions are not modelled here"
        for prefix in prefixes:
            if fnmatch.fnmatchcase(prefix, pattern):
                return True
            if pattern.startswith("**/") and fnmatch.fnmatchcase(
                prefix.rsplit("/", 1)[-1], pattern[3:]
            ):
                return True
    return False


def pyproject(path: Path) -> dict[str, object]:
    return tomllib.loads(path.read_text())


WORKSPACE: dict[str, object] = pyproject(ROOT / "pyproject.toml")
MEMBERS: list[str] = WORKSPACE["tool"]["uv"]["workspace"]["members"]  # type: ignore[index]


@pytest.mark.parametrize("directory", sorted(COMPONENTS))
def test_dockerfile_copies_existing_paths_of_the_context(directory: str) -> None:
    _, stages = parse_dockerfile(ROOT / directory / "Dockerfile")
    patterns = dockerignore_patterns()
    sources = [s for stage in stages for sources, _ in copies(stage) for s in sources]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), f"{directory}/Dockerfile copies missing {source}"
        assert not ignored(source, patterns), f"{source} is excluded by .dockerignore"
    # the context leaves out what is big or private
    for heavy in (".venv", ".git", ".run", "tests", "charts", "core/src/x/__pycache__/a.pyc"):
        assert ignored(heavy, patterns), heavy


@pytest.mark.parametrize("directory", sorted(COMPONENTS))
def test_dockerfile_installs_only_its_member_from_the_lock(directory: str) -> None:
    member, module, _ = COMPONENTS[directory]
    member_project = pyproject(ROOT / directory / "pyproject.toml")
    assert member_project["project"]["name"] == member  # type: ignore[index]
    _, stages = parse_dockerfile(ROOT / directory / "Dockerfile")
    *builders, runtime = stages
    uv, build = builders
    assert re.fullmatch(r"ghcr\.io/astral-sh/uv:\d+\.\d+\.\d+", uv.image), uv.image
    assert re.fullmatch(r"python:3\.11[.\d]*-slim(-\w+)?", build.image), build.image
    assert runtime.image == build.image  # the environment's python links to the same interpreter

    syncs = [rest for keyword, rest in build.instructions if keyword == "RUN" and "uv sync" in rest]
    assert len(syncs) == 2
    for command in syncs:
        words = command.split()
        assert {"--frozen", "--no-dev"} <= set(words), command
        assert words[words.index("--package") + 1] == member, command
    assert "--no-install-workspace" in syncs[0]
    assert "--no-editable" in syncs[1]

    copied = {s.rstrip("/") for sources, _ in copies(build) for s in sources}
    assert {"pyproject.toml", "uv.lock"} <= copied
    # every member's pyproject (the workspace must resolve), but the sources of this member and
    # of the workspace members it depends on only
    assert {f"{m}/pyproject.toml" for m in MEMBERS} <= copied
    depends = {
        dep.split(">")[0].split("=")[0].split("[")[0].strip()
        for dep in member_project["project"]["dependencies"]  # type: ignore[index]
    }
    member_dirs = {pyproject(ROOT / m / "pyproject.toml")["project"]["name"]: m for m in MEMBERS}  # type: ignore[index]
    wanted = {f"{member_dirs[name]}/src" for name in depends if name in member_dirs}
    wanted.add(f"{directory}/src")
    assert {s for s in copied if s.endswith("/src")} == wanted
    assert wanted == {"core/src", f"{directory}/src"}

    # the runtime stage: the environment only, a non-root user, the member's entry point
    runtime_copies = [rest for keyword, rest in runtime.instructions if keyword == "COPY"]
    assert runtime_copies == ["--from=build /app/.venv /app/.venv"]
    (user,) = [rest for keyword, rest in runtime.instructions if keyword == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit()
    assert int(uid) > 0
    (entrypoint,) = [rest for keyword, rest in runtime.instructions if keyword == "ENTRYPOINT"]
    scripts = member_project["project"]["scripts"]  # type: ignore[index]
    assert entrypoint == f'["{member}"]'
    assert scripts[member].startswith(f"{module}.")  # type: ignore[index]
    env = " ".join(rest for keyword, rest in runtime.instructions if keyword == "ENV")
    assert "PATH=/app/.venv/bin:$PATH" in env


@pytest.mark.parametrize("directory", sorted(COMPONENTS))
def test_exposed_ports_and_user_match_the_chart(directory: str) -> None:
    _, _, section = COMPONENTS[directory]
    _, stages = parse_dockerfile(ROOT / directory / "Dockerfile")
    runtime = stages[-1]
    (exposed,) = [rest for keyword, rest in runtime.instructions if keyword == "EXPOSE"]
    result = render(base_values())
    ports = set()
    uids = set()
    for owner, pod in result.pod_specs():
        if owner["metadata"]["labels"]["app.kubernetes.io/component"] == section:
            ports |= {p["containerPort"] for c in pod["containers"] for p in c["ports"]}
            uids.add(pod["securityContext"]["runAsUser"])
    assert {int(p) for p in exposed.split()} == ports
    (user,) = [rest for keyword, rest in runtime.instructions if keyword == "USER"]
    assert uids == {int(user.split(":")[0])}


def test_make_images_builds_the_images_the_chart_runs() -> None:
    dry_run = subprocess.run(
        ["make", "-n", "images"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    built = {}
    for line in dry_run.splitlines():
        words = shlex.split(line)
        if words[:2] != ["docker", "build"]:
            continue
        assert words[-1] == ".", line  # the repository root is the context
        dockerfile = words[words.index("-f") + 1]
        built[dockerfile] = words[words.index("-t") + 1]
    assert set(built) == {f"{d}/Dockerfile" for d in COMPONENTS}

    result = render(base_values())
    running = {}
    for owner, pod in result.pod_specs():
        component = owner["metadata"]["labels"]["app.kubernetes.io/component"]
        for container in pod["containers"]:
            running.setdefault(component, set()).add(container["image"])
    for directory, (_, _, section) in COMPONENTS.items():
        assert running[section] == {built[f"{directory}/Dockerfile"]}, section
    # the helm test pod runs the gateway's image
    assert running["test"] == running["gateway"]
