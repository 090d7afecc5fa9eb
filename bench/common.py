"""What both benchmarks need the same way: the repo on sys.path, services to run against, options, the report's
context lines and the JSON dump.

Imported as ``common`` (``python bench/X.py`` puts bench/ first on sys.path). Only the standard library at import
time: a benchmark's child process imports this too, and ``sync.py`` measures its child's memory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # for tests.fakes and, without an installed package, graphsync

STDERR_TAIL = 3000  # characters of a failed child's stderr quoted in the failure


class BenchFailure(Exception):
    """A service, a child or a check failed; the message says which and carries the child's stderr tail."""


def stderr_tail(path: Path) -> str | None:
    """The end of a child's stderr file, or None when it cannot be read."""
    try:
        return path.read_text(errors="replace")[-STDERR_TAIL:].rstrip()
    except OSError:
        return None


# -- services ---------------------------------------------------------------------------------------------


def write_test_ca(workdir: Path) -> tuple[Any, Path]:
    """A trustme CA for the fakes' certificates, and its PEM bundle for REQUESTS_CA_BUNDLE."""
    import trustme

    ca = trustme.CA()
    bundle = workdir / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    return ca, bundle


def start_azurite(stack: contextlib.ExitStack, workdir: Path) -> Any:
    """Azurite on a free port with its data under ``workdir``, stopped when ``stack`` closes."""
    from tests.fakes.azurite import Azurite, azurite_executable, free_port

    (workdir / "azurite").mkdir()
    azurite = Azurite(azurite_executable(), workdir / "azurite", workdir, free_port())
    azurite.start()
    stack.callback(azurite.stop)
    return azurite


# -- options ----------------------------------------------------------------------------------------------


def bench_parser(doc: str | None) -> argparse.ArgumentParser:
    """A parser described by the first paragraph of the benchmark's docstring."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0] if doc else None)


def positive_int_list(example: str) -> Callable[[str], list[int]]:
    """An argparse type for ``1,5,20`` (``_`` allowed as in ``100_000``), in the order given."""

    def parse(text: str) -> list[int]:
        try:
            values = [int(part.replace("_", "")) for part in text.split(",") if part.strip()]
        except ValueError:
            values = []
        if not values or any(value < 1 for value in values):
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of positive integers, e.g. {example}")
        return values

    return parse


def add_json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="PATH",
        help="also dump the results as JSON, to PATH or (without PATH) to stdout",
    )


# -- report -----------------------------------------------------------------------------------------------


def package_version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "?"


def command_line(argv: list[str] | None) -> str:
    """The command as run (``argv`` None: this process's own), to paste into a note."""
    return shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(argv)


def run_line(started: float) -> str:
    """When the run happened and how long it took, from its ``time.monotonic()`` start."""
    return f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {time.monotonic() - started:.0f} s wall clock"


def machine_line(load_before: tuple[float, float, float]) -> str:
    """The machine and its load average before the run and now: a shared machine's figures say how loaded it was."""
    return (
        f"{platform.system()} {platform.release()}, {os.cpu_count()} CPUs, load average "
        f"{load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after (shared with other work)"
    )


def dump_json(destination: str, document: dict[str, Any]) -> None:
    """``--json``: to stdout for ``-``, else to the file named."""
    text = json.dumps(document, indent=2)
    if destination == "-":
        print(text)
    else:
        Path(destination).write_text(text + "\n")
        print(f"results written to {destination}", file=sys.stderr)
