"""Static checks of the three image Dockerfiles (no Docker engine needed): multi-stage, pinned, non-root, small, and
the trainer and chat images sharing their torch layer.

A tiny parser: comment lines dropped, backslash continuations joined, one (INSTRUCTION, arguments) pair per
instruction, stages split on FROM, global ARGs (before the first FROM) substituted into FROM lines with their
defaults. Enough for these files; not a general Dockerfile parser.
"""

from __future__ import annotations

import re
import shlex
from importlib import metadata

import pytest
from devkit.paths import REPO_ROOT as ROOT
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

DOCKERFILES = ["operator/Dockerfile", "trainer_image/Dockerfile", "chat_image/Dockerfile"]

Instruction = tuple[str, str]


def parse(text: str) -> list[Instruction]:
    instructions: list[Instruction] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # Docker drops comment lines, even inside a continuation
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        keyword, _, args = current.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        current = ""
    assert not current, "dangling backslash continuation at end of file"
    return instructions


def global_args(instructions: list[Instruction]) -> dict[str, str]:
    """The ARGs before the first FROM, with their defaults: the only ones a FROM line may use."""
    defaults: dict[str, str] = {}
    for keyword, args in instructions:
        if keyword == "FROM":
            break
        assert keyword == "ARG", f"{keyword} before the first FROM"
        name, _, default = args.partition("=")
        defaults[name] = default
    return defaults


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    """The instructions of each stage, FROM first, with global ARGs substituted into the FROM lines."""
    defaults = global_args(instructions)
    result: list[list[Instruction]] = []
    for keyword, args in instructions[len(defaults):]:
        if keyword == "FROM":
            args = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: defaults[m.group(1) or m.group(2)], args)
            result.append([])
        result[-1].append((keyword, args))
    return result


def words(args: str) -> list[str]:
    """The arguments without --flags (shell form only; these files use no JSON-form COPY)."""
    return [w for w in shlex.split(args) if not w.startswith("--")]


@pytest.fixture(params=DOCKERFILES)
def dockerfile(request) -> tuple[str, list[list[Instruction]]]:
    path = ROOT / request.param
    return request.param, stages(parse(path.read_text(encoding="utf-8")))


# The operator builds its venv in a `builder` stage and copies it out; the trainer and chat images start from the
# shared `torch` stage and install the rest in place (a copy of the venv would copy torch's ~4 GB into a layer of
# their own).
FIRST_STAGE = {"operator/Dockerfile": "builder", "trainer_image/Dockerfile": "torch", "chat_image/Dockerfile": "torch"}
TORCH_IMAGES = ["trainer_image/Dockerfile", "chat_image/Dockerfile"]


def test_multi_stage(dockerfile):
    name, parsed = dockerfile
    assert len(parsed) >= 2, f"{name}: expected a first stage and a runtime stage"
    assert words(parsed[0][0][1])[-2:] == ["AS", FIRST_STAGE[name]], f"{name}: first stage should be `AS ...`"


def test_every_from_has_an_explicit_tag(dockerfile):
    name, parsed = dockerfile
    aliases: set[str] = set()
    for stage in parsed:
        image, *rest = words(stage[0][1])
        if image not in aliases:  # `FROM builder` reuses an earlier stage
            tag = image.split("@")[0].rpartition("/")[2].partition(":")[2]
            assert tag and tag != "latest", f"{name}: FROM {image} needs an explicit, non-latest tag"
        if len(rest) == 2 and rest[0].upper() == "AS":
            aliases.add(rest[1])


def test_base_image_is_a_build_argument_defaulting_to_the_public_slim_image():
    # One base for every stage (the venv's python symlink must resolve in the runtime stage), replaceable with a
    # local one on the real node's path (devkit/base-image/build.sh).
    for name in DOCKERFILES:
        instructions = parse((ROOT / name).read_text(encoding="utf-8"))
        assert global_args(instructions) == {"BASE_IMAGE": "python:3.11.7-slim-bookworm"}, name
        froms = [args for keyword, args in instructions if keyword == "FROM"]
        runtime = "${BASE_IMAGE}" if FIRST_STAGE[name] == "builder" else "torch"
        assert froms == [f"${{BASE_IMAGE}} AS {FIRST_STAGE[name]}", runtime], name


def test_trainer_and_chat_share_the_torch_stage():
    """Word for word the same, so a layer cache builds it once and both images carry the same layer."""
    trainer, chat = (stages(parse((ROOT / name).read_text(encoding="utf-8")))[0] for name in TORCH_IMAGES)
    assert trainer == chat
    installs = [args for keyword, args in trainer if keyword == "RUN" and "pip install" in args]
    assert installs[-1].endswith("pip install --no-deps -r /opt/requirements-torch.txt"), installs


def _pins(path: str) -> dict[str, str]:
    lines = (ROOT / path).read_text(encoding="utf-8").splitlines()
    pairs = [line.split("==") for line in lines if line.strip() and not line.startswith("#")]
    return {canonicalize_name(name): version for name, version in pairs}


def _closure(name: str, extras: frozenset[str] = frozenset(), seen: dict | None = None) -> dict[str, str]:
    """Every distribution `name` installs here (this venv is built from the same pins), with the extras asked for."""
    seen = {} if seen is None else seen
    key, wanted = canonicalize_name(name), set(extras)
    if key in seen and wanted <= seen[key][1]:
        return {k: v for k, (v, _) in seen.items()}
    dist = metadata.distribution(name)
    seen.setdefault(key, (dist.version, set()))[1].update(wanted)
    environments = [{"extra": extra} for extra in ("", *seen[key][1])]
    for line in dist.requires or []:
        requirement = Requirement(line)
        if not requirement.marker or any(requirement.marker.evaluate(env) for env in environments):
            _closure(requirement.name, frozenset(requirement.extras), seen)
    return {k: v for k, (v, _) in seen.items()}


def test_torch_layer_is_torch_and_its_whole_closure_as_constrained():
    torch_layer = _pins("requirements-torch.txt")
    assert torch_layer == _closure("torch")  # installed --no-deps: a missing package would not come
    constrained = _pins("constraints.txt")
    assert {k: v for k, v in torch_layer.items() if k != "setuptools"} == {
        k: constrained[k] for k in torch_layer if k != "setuptools"}


# Debian bookworm's base-passwd (group.master, passwd.master): every Debian-based image, python:slim included, has
# these, so groupadd/useradd of one of them fails the build (the operator image's `operator` group did).
DEBIAN_GROUPS = {"root", "daemon", "bin", "sys", "adm", "tty", "disk", "lp", "mail", "news", "uucp", "man", "proxy",
    "kmem", "dialout", "fax", "voice", "cdrom", "floppy", "tape", "sudo", "audio", "dip", "www-data", "backup",
    "operator", "list", "irc", "src", "shadow", "utmp", "video", "sasl", "plugdev", "staff", "games", "users",
    "nogroup"}
DEBIAN_USERS = {"root", "daemon", "bin", "sys", "sync", "games", "man", "lp", "mail", "news", "uucp", "proxy",
    "www-data", "backup", "list", "irc", "_apt", "nobody"}


def test_created_user_and_group_are_new_to_debian(dockerfile):
    name, parsed = dockerfile
    runs = [args for keyword, args in parsed[-1] if keyword == "RUN"]
    created = [cmd.split() for run in runs for cmd in run.split("&&") if cmd.split()[:1] in (["groupadd"], ["useradd"])]
    assert len(created) == 2, f"{name}: expected one groupadd and one useradd, got {created}"
    for command in created:
        taken = DEBIAN_GROUPS if command[0] == "groupadd" else DEBIAN_USERS
        assert command[-1] not in taken, f"{name}: {command[0]} {command[-1]}: Debian's base-passwd has it already"


def test_final_stage_runs_as_numeric_non_root_user(dockerfile):
    name, parsed = dockerfile
    users = [args for keyword, args in parsed[-1] if keyword == "USER"]
    assert users, f"{name}: the final stage sets no USER"
    match = re.fullmatch(r"(\d+)(?::(\d+))?", users[-1])
    assert match, f"{name}: USER {users[-1]} should be numeric uid:gid (runAsNonRoot checks need a number)"
    assert int(match.group(1)) != 0, f"{name}: the final USER is root"


def test_copy_sources_exist(dockerfile):
    name, parsed = dockerfile
    for stage in parsed:
        for keyword, args in stage:
            if keyword in ("COPY", "ADD") and "--from=" not in args:
                for source in words(args)[:-1]:
                    assert (ROOT / source).exists(), f"{name}: {keyword} source {source} is not in the repository"


def test_final_stage_installs_only_into_the_venv_and_puts_it_on_path(dockerfile):
    name, parsed = dockerfile
    final = parsed[-1]
    inherited = parsed[0] if FIRST_STAGE[name] == "torch" else []  # `FROM torch` keeps that stage's ENV
    env = " ".join(args for keyword, args in [*inherited, *final] if keyword == "ENV")
    assert "PATH=/opt/venv/bin:$PATH" in env, f"{name}: `python` must resolve to /opt/venv/bin/python"
    assert "PIP_NO_CACHE_DIR=1" in env, f"{name}: no pip cache in the final image"
    copies = [args for keyword, args in final if keyword == "COPY"]
    if FIRST_STAGE[name] == "builder":
        assert copies == ["--from=builder /opt/venv /opt/venv"], f"{name}: the runtime stage should copy only the venv"
        assert not [args for keyword, args in final if keyword == "RUN" and "pip install" in args], (
            f"{name}: the runtime stage should install nothing with pip")
    else:
        assert not [c for c in copies if "--from=" in c], f"{name}: a copy from a stage duplicates its layers"


def test_pip_installs_use_the_constraints_file(dockerfile):
    name, parsed = dockerfile
    installs = [args for stage in parsed for keyword, args in stage if keyword == "RUN" and "pip install" in args]
    requirement_installs = [args for args in installs if " -r " in args]
    assert requirement_installs, f"{name}: no `pip install -r` found"
    for args in requirement_installs:  # under constraints.txt, or --no-deps of the fully pinned torch layer
        assert re.search(r"-c \S*constraints\.txt", args) or args.endswith(
            "--no-deps -r /opt/requirements-torch.txt"), f"{name}: `{args}` ignores constraints.txt"
    for args in installs:  # the rest: pip itself (pinned) or the package (no unpinned dependencies)
        if args not in requirement_installs:
            assert "pip==" in args or "--no-deps" in args, f"{name}: `{args}` installs something unpinned"
