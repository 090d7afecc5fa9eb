"""Benchmark: how long the ``graphsync`` command line takes to answer, one fresh process per invocation.

Commands timed: ``--version``, ``--help``, ``sync --help``, a configuration error (a key missing from the file), a
missing config file, ``token`` with a valid token in the shared cache blob (Azurite; seeded once from the fake
identity provider before timing, so every timed run finds it there), and ``status``; next to them, the floor:
the interpreter alone, and importing the libraries a configuration error and ``token`` cannot do without. Each is
timed with ``hyperfine`` when it is on PATH (``apt-get install hyperfine``), else by a loop of ``--runs`` runs; the
median is reported, with the peak RSS of one extra (warm-up) run, from ``getrusage`` of a helper's children.

``--source DIR`` times the ``graphsync`` package found in ``DIR`` (put first on ``PYTHONPATH``) instead of the
installed one, so one interpreter times a before and an after: ``git archive main | tar -x -C /tmp/main`` then
``--source /tmp/main/daemon``. Children may write bytecode (``PYTHONDONTWRITEBYTECODE`` is dropped) and each command
has a warm-up run, so the timings are those of an installed package, not of compiling its sources. Figures are
printed, never asserted.

    .venv/bin/python bench/cli.py                   # --runs 10 --source /tmp/main/daemon --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from common import (
    REPO_ROOT,
    BenchFailure,
    add_json_option,
    bench_parser,
    command_line,
    dump_json,
    machine_line,
    run_line,
    start_azurite,
    write_test_ca,
)

# Exit codes each timed command must end with (a wrong one means the timing measured the wrong thing).
EXPECTED_EXIT = {"--version": 0, "--help": 0, "sync --help": 0, "config error": 2, "missing file": 2}


def _commands(config: Path, bad: Path, workdir: Path) -> dict[str, list[str]]:
    """Interpreter arguments by label: graphsync commands, and the imports no graphsync code can avoid (the floor)."""
    graphsync = {
        "--version": ["--version"],
        "--help": ["--help"],
        "sync --help": ["sync", "--help"],
        "config error": ["token", "--config", str(bad)],
        "missing file": ["token", "--config", str(workdir / "absent.toml")],
        "token (cached in blob)": ["token", "--config", str(config)],
        "status": ["status", "--config", str(config)],
    }
    floors = {
        "floor: python": "pass",
        "floor: config libraries": "import pydantic_settings",
        "floor: token libraries": "import pydantic_settings, msal, azure.storage.blob",
    }
    return {label: ["-m", "graphsync", *args] for label, args in graphsync.items()} | {
        label: ["-c", code] for label, code in floors.items()
    }


def _write_configs(workdir: Path, azurite: Any, entra: Any) -> tuple[Path, Path]:
    from azure.storage.blob import BlobServiceClient

    from tests.conftest import dumps_toml
    from tests.fakes.entra import CLIENT_ID, CLIENT_SECRET

    container = f"bench-cli-{uuid.uuid4().hex[:10]}"
    with BlobServiceClient.from_connection_string(azurite.connection_string) as service:
        service.create_container(container)
    document = {
        "identity": {
            "client_id": CLIENT_ID,
            "tenants": ["contoso.onmicrosoft.com"],
            "authority_host": entra.authority_host,
            "client_secret": CLIENT_SECRET,
        },
        "storage": {"connection_string": azurite.connection_string, "container": container},
        "output": {"directory": str(workdir / "out")},
    }
    config, bad = workdir / "graphsync.toml", workdir / "bad.toml"
    config.write_text(dumps_toml(document))
    identity = {key: value for key, value in document["identity"].items() if key != "client_id"}
    bad.write_text(dumps_toml(document | {"identity": identity}))  # identity.client_id (not set): exit 2
    return config, bad


def _child_env(source: Path | None, ca_bundle: Path, workdir: Path) -> dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("GRAPHSYNC_") and name != "PYTHONDONTWRITEBYTECODE"
    }
    env |= {"REQUESTS_CA_BUNDLE": str(ca_bundle), "XDG_CACHE_HOME": str(workdir / "cache")}
    if source is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(source.resolve()), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _time_loop(command: list[str], env: dict[str, str], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, check=False)
        times.append(time.perf_counter() - started)
    return times


def _time_hyperfine(command: list[str], env: dict[str, str], runs: int, workdir: Path) -> list[float]:
    export = workdir / f"hyperfine-{uuid.uuid4().hex[:8]}.json"
    subprocess.run(
        [
            "hyperfine",
            "--style",
            "none",
            "-N",
            "-i",
            "-w",
            "1",
            "-r",
            str(runs),
            "--export-json",
            str(export),
            subprocess.list2cmdline(command),
        ],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        check=True,
    )
    times: list[float] = json.loads(export.read_text())["results"][0]["times"]
    return times


def _peak_rss_kib(command: list[str], env: dict[str, str]) -> tuple[int, int]:
    """One run's exit code and peak RSS: RUSAGE_CHILDREN's maximum, which a fresh helper process starts at 0."""
    probe = (
        "import resource, subprocess, sys; "
        "code = subprocess.run(sys.argv[1:], capture_output=True).returncode; "
        "print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, *command], env=env, cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    return int(out[0]), int(out[1])


def measure(
    args: argparse.Namespace, workdir: Path, env: dict[str, str], commands: dict[str, list[str]]
) -> list[dict[str, Any]]:
    hyperfine = shutil.which("hyperfine") is not None
    rows = []
    for label, arguments in commands.items():
        command = [sys.executable, *arguments]
        code, rss = _peak_rss_kib(command, env)
        expected = EXPECTED_EXIT.get(label, 0)
        if code != expected:
            raise BenchFailure(f"{label}: exit {code}, expected {expected}")
        times = _time_hyperfine(command, env, args.runs, workdir) if hyperfine else _time_loop(command, env, args.runs)
        rows.append(
            {"command": label, "median_s": statistics.median(times), "min_s": min(times), "rss_mib": rss / 1024}
        )
        print(f"  {label}: {statistics.median(times):.3f} s", file=sys.stderr)
    return rows


def report(rows: list[dict[str, Any]], context: dict[str, str]) -> None:
    for key, value in context.items():
        print(f"{key}: {value}")
    print()
    print(f"| {'command':<24} | median s | min s | peak RSS MiB |")
    print(f"|{'-' * 26}|---------:|------:|-------------:|")
    for row in rows:
        print(f"| {row['command']:<24} | {row['median_s']:8.3f} | {row['min_s']:5.3f} | {row['rss_mib']:12.1f} |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = bench_parser(__doc__)
    parser.add_argument("--source", type=Path, help="directory holding the graphsync package to time")
    parser.add_argument("--runs", type=int, default=10, help="timed runs per command (median reported)")
    add_json_option(parser)
    return parser.parse_args(argv)


def _token(config: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``graphsync token --json``: seeds the cache blob before the timings, and checks afterwards they used it."""
    return subprocess.run(
        [sys.executable, "-m", "graphsync", "token", "--json", "--config", str(config)],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from tests.fakes.entra import CLIENT_ID, CLIENT_SECRET, FakeEntra

    started = time.monotonic()
    load_before = os.getloadavg()
    with contextlib.ExitStack() as stack:
        try:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="graphsync-bench-cli-")))
            ca, ca_bundle = write_test_ca(workdir)
            azurite = start_azurite(stack, workdir)
            entra = stack.enter_context(FakeEntra(ca, client_id=CLIENT_ID, client_secret=CLIENT_SECRET))
            config, bad = _write_configs(workdir, azurite, entra)
            env = _child_env(args.source, ca_bundle, workdir)
            seeded = _token(config, env)
            if '"identity_provider"' not in seeded.stdout:
                raise BenchFailure(f"seeding the cache blob failed: {seeded.stderr[-2000:]}")
            rows = measure(args, workdir, env, _commands(config, bad, workdir))
            check = _token(config, env)
            if '"blob"' not in check.stdout:
                raise BenchFailure(f"token did not come from the blob: {check.stdout} {check.stderr[-2000:]}")
        except (BenchFailure, RuntimeError, subprocess.CalledProcessError) as exc:
            print(f"benchmark failed: {exc}", file=sys.stderr)
            return 1
    context = {
        "command": command_line(argv),
        "graphsync": str(args.source or "installed package"),
        "timer": f"hyperfine, {args.runs} runs after 1 warm-up"
        if shutil.which("hyperfine")
        else f"loop of {args.runs}",
        "machine": machine_line(load_before),
        "run": run_line(started),
    }
    report(rows, context)
    if args.json:
        dump_json(args.json, {"context": context, "results": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
