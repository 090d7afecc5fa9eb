"""Shared fixtures: a test CA, the fake Entra, Azurite, daemon config files and daemon runs.

Everything talks real protocols on loopback so the daemon, run as a subprocess, sees the
same endpoints the in-process test code does.  The only hand-off a subprocess needs is the
environment returned by ``tls_env`` (trust for the test CA).
"""

from __future__ import annotations

import math
import os
import platform
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import pytest
import trustme
from azure.storage.blob import BlobServiceClient

from tests.fakes.azurite import AZURITE_KEY, REPO_ROOT, Azurite, azurite_executable, free_port
from tests.fakes.entra import CLIENT_ID, CLIENT_SECRET, FakeEntra
from tests.fakes.graph import fake_graph  # noqa: F401  (a fixture, registered by importing it here)

__all__ = ["AZURITE_KEY", "REPO_ROOT", "Azurite"]  # re-exported: tests import them from here


# -- test tiers --------------------------------------------------------------------------
#
# `make test-fast` runs `-m "not integration"`: tests that need neither Azurite nor a child process. Which tests are
# integration is decided here, from what they use, rather than by remembering a decorator: a test that asks for
# one of these fixtures (directly or through another fixture) starts Azurite or a process.
INTEGRATION_FIXTURES = frozenset(
    {
        "azurite",  # a node subprocess
        "blob_container",
        "graphsync_config",  # writes a config that points at Azurite
        "run_graphsync",  # `python -m graphsync`, to completion
        "start_graphsync",  # ... or in the background
        "replicas",  # test_daemon: daemon replicas
        "build_context",  # test_packaging: the wheel build and its install, run as the image and the units would
        "wheelhouse",
        "installed",
        "unit_sandbox",
        "sandbox_factory",
    }
)
# Modules whose tests all start processes of their own (pty.fork, Popen) without one of those fixtures. A test in
# another module that does so carries @pytest.mark.integration itself (test_packaging's systemd-analyze and
# hadolint checks, test_fakes' standalone Entra).
INTEGRATION_MODULES = frozenset({"test_daemon.py", "test_terminal.py"})

# What starting a process raises as an audit event (PEP 578): a fast test that gets here fails, naming itself.
_PROCESS_EVENTS = frozenset(
    {"subprocess.Popen", "os.system", "os.exec", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn"}
)
_fast_test: str | None = None  # the node id of the running test when it is not integration
_guard_installed = False


def _refuse_processes_in_fast_tests(event: str, args: tuple[Any, ...]) -> None:
    if _fast_test is not None and event in _PROCESS_EVENTS:
        raise RuntimeError(
            f"{_fast_test} starts a process ({event} {args[0]!r}) but is not marked integration: add the fixture "
            "that starts it to INTEGRATION_FIXTURES in tests/conftest.py, or mark the test @pytest.mark.integration"
        )


def pytest_configure(config: pytest.Config) -> None:
    global _guard_installed
    if not _guard_installed:  # audit hooks cannot be removed: one per process
        # azure-identity's import calls platform.platform(), whose processor() runs `uname -p` once per process:
        # run it now, so that a fast test which happens to import azure.identity first is not blamed for it.
        platform.processor()
        sys.addaudithook(_refuse_processes_in_fast_tests)
        _guard_installed = True


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        uses = INTEGRATION_FIXTURES.intersection(getattr(item, "fixturenames", ()))
        if uses or item.path.name in INTEGRATION_MODULES:
            item.add_marker(pytest.mark.integration)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """Setup, call and teardown of a fast test run with the process guard on."""
    global _fast_test
    _fast_test = None if item.get_closest_marker("integration") else item.nodeid
    try:
        return (yield)
    finally:
        _fast_test = None


# -- TLS ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    """One CA per session signs every fake's server certificate."""
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_bundle(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CA certificate as a PEM file, for REQUESTS_CA_BUNDLE and subprocesses."""
    path = tmp_path_factory.mktemp("tls") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
def tls_env(ca_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Trust the test CA in this process and return the env a subprocess needs to do so.

    REQUESTS_CA_BUNDLE overrides any ``verify=True`` in requests (and so in MSAL), which is
    also why this has to be set rather than passing a CA to each client.
    """
    env = {"REQUESTS_CA_BUNDLE": str(ca_bundle)}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


# -- Azurite -----------------------------------------------------------------------------


def _installed_azurite() -> str:
    try:
        return azurite_executable()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    """A session-wide Azurite blob service on a free loopback port."""
    base = tmp_path_factory.mktemp("azurite")
    location = base / "data"
    location.mkdir()
    server = Azurite(_installed_azurite(), location, base, free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def blob_container(azurite: Azurite) -> Iterator[str]:
    """A fresh, uniquely named container, so tests never see each other's cache blobs."""
    if not azurite.running:  # an earlier test may have simulated an outage
        azurite.start()
    name = f"t-{uuid.uuid4().hex[:12]}"
    with BlobServiceClient.from_connection_string(azurite.connection_string) as service:
        service.create_container(name)
    yield name
    if not azurite.running:
        return
    try:
        with BlobServiceClient.from_connection_string(
            azurite.connection_string, retry_total=0, connection_timeout=2, read_timeout=5
        ) as service:
            service.delete_container(name)
    except Exception:  # cleanup is best effort; the data dir is temporary anyway
        pass


# -- fake Entra --------------------------------------------------------------------------


@pytest.fixture
def fake_entra(ca: trustme.CA, tls_env: dict[str, str]) -> Iterator[FakeEntra]:
    """A started fake Entra knowing the app CLIENT_ID / CLIENT_SECRET.

    Depends on ``tls_env`` because the fake is unusable without trusting its CA.
    """
    with FakeEntra(ca, client_id=CLIENT_ID, client_secret=CLIENT_SECRET) as fake:
        yield fake


# -- daemon config -----------------------------------------------------------------------

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}

TomlScalar = str | int | float | bool | os.PathLike[str]


def _toml_string(text: str) -> str:
    escaped = "".join(
        _TOML_ESCAPES.get(ch) or (f"\\u{ord(ch):04X}" if ord(ch) < 0x20 or ord(ch) == 0x7F else ch) for ch in text
    )
    return f'"{escaped}"'


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else _toml_string(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, os.PathLike):
        return _toml_string(os.fspath(value))
    if isinstance(value, Sequence):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, Mapping):  # inside a list, e.g. [[jobs]] written as jobs = [{...}]
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} to TOML: {value!r}")


def dumps_toml(document: Mapping[str, Any], _table: tuple[str, ...] = ()) -> str:
    """Write str/int/float/bool/path scalars, lists of scalars and nested tables as TOML.

    Hand-rolled because only ``tomllib`` (read-only) is in the stdlib and the config is tiny.
    """
    lines = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in document.items() if not isinstance(v, Mapping)]
    for key, value in document.items():
        if isinstance(value, Mapping):
            table = (*_table, key)
            lines += ["", "[" + ".".join(_toml_key(part) for part in table) + "]", dumps_toml(value, table)]
    return "\n".join(lines).strip("\n") + "\n"


def deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``extra`` into ``base`` table by table; a None value removes the key."""
    merged = dict(base)
    for key, value in extra.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class WriteConfig(Protocol):
    def __call__(
        self,
        path: str | Path | None = None,
        *,
        tenants: Sequence[str] = ...,
        extra: Mapping[str, Any] | None = None,
    ) -> Path: ...


@pytest.fixture
def graphsync_config(tmp_path: Path, fake_entra: FakeEntra, azurite: Azurite, blob_container: str) -> WriteConfig:
    """Factory writing a daemon TOML config wired to this test's fake Entra and container.

    ``path`` defaults to ``tmp_path/graphsync.toml`` (relative paths are under tmp_path);
    ``extra`` is deep-merged, e.g. ``{"cache": {"lease_seconds": 15}}`` or
    ``{"identity": {"client_secret": None}}`` to drop a key.
    """

    def write_config(
        path: str | Path | None = None,
        *,
        tenants: Sequence[str] = ("contoso.onmicrosoft.com",),
        extra: Mapping[str, Any] | None = None,
    ) -> Path:
        target = tmp_path / (path if path is not None else "graphsync.toml")
        document: dict[str, Any] = {
            "identity": {
                "client_id": CLIENT_ID,
                "tenants": list(tenants),
                "authority_host": fake_entra.authority_host,
                "client_secret": CLIENT_SECRET,
            },
            "storage": {
                "connection_string": azurite.connection_string,
                "container": blob_container,
            },
        }
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(dumps_toml(deep_merge(document, extra or {})))
        return target

    return write_config


# -- running the daemon ------------------------------------------------------------------


@pytest.fixture(autouse=True)
def own_work_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test is its own host: working stores go under its tmp dir (the default follows XDG_CACHE_HOME),
    inherited by the graphsync processes it starts."""
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "graphsync" / "work"


def _daemon_command(args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "graphsync", *args]


def _daemon_env(tls_env: Mapping[str, str], env: Mapping[str, str] | None) -> dict[str, str]:
    # Unbuffered so a long-running daemon's log lines reach the test as they happen.
    return {**os.environ, "PYTHONUNBUFFERED": "1", **tls_env, **(env or {})}


class RunGraphsync(Protocol):
    def __call__(
        self, *args: str, env: Mapping[str, str] | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]: ...


class StartGraphsync(Protocol):
    def __call__(self, *args: str, env: Mapping[str, str] | None = None) -> subprocess.Popen[str]: ...


@pytest.fixture
def run_graphsync(tls_env: dict[str, str]) -> RunGraphsync:
    """Run ``python -m daemon ARGS`` to completion from the repo root, capturing text output."""

    def run(*args: str, env: Mapping[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            _daemon_command(args),
            cwd=REPO_ROOT,
            env=_daemon_env(tls_env, env),
            text=True,
            capture_output=True,
            timeout=timeout,
            check=False,
        )

    return run


@pytest.fixture
def start_graphsync(tls_env: dict[str, str]) -> Iterator[StartGraphsync]:
    """Start ``python -m daemon ARGS`` in the background; stopped at teardown.

    stdout/stderr are pipes: read them (or ``communicate()``) in the test, since a daemon
    that fills a 64 KiB pipe nobody reads blocks on its next log line.
    """
    processes: list[subprocess.Popen[str]] = []

    def start(*args: str, env: Mapping[str, str] | None = None) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            _daemon_command(args),
            cwd=REPO_ROOT,
            env=_daemon_env(tls_env, env),
            text=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        processes.append(process)
        return process

    yield start

    for process in processes:
        _stop_process(process)


def _stop_process(process: subprocess.Popen[str], grace: float = 10) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; drains pipes so shutdown logging can't block."""
    if process.poll() is None:
        process.terminate()
        try:
            process.communicate(timeout=grace)
        except (subprocess.TimeoutExpired, ValueError):  # ValueError: the test closed the pipes
            process.kill()
            process.wait(timeout=5)
    for stream in (process.stdout, process.stderr):
        if stream is not None:
            stream.close()
