"""Benchmark: the fleet-shared token cache against the caches a plain MSAL app has.

For each replica count it runs these scenarios over the same window, one after the other (``--modes``):

* **shared** — R processes running graphsync's real ``TokenCaches`` against a local Azurite container (fresh per
  scenario, AES-GCM envelope as in the example config) and a local fake Entra;
* **library** — R processes each with a plain ``msal.ConfidentialClientApplication`` whose ``token_cache`` is
  graphsync's ``BlobTokenCache`` on one blob of a fresh container (same key);
* **persisted** — the same with msal-extensions' ``PersistedTokenCache`` on one shared file (its file lock);
* **baseline** — R processes each with a plain ``msal.ConfidentialClientApplication`` and its default in-memory cache.

Every process acquires a token about every ``--interval`` seconds. It reports, once at the end, its latency samples
by source and (shared) its prometheus counters, so storage calls can be counted per acquisition; identity-provider
requests are counted by the fake Entra itself. Timings are printed, never asserted.

Run from the repository root: ``.venv/bin/python bench/token_cache.py`` (or ``make bench``). Needs the test extras
(trustme, pytest) and Azurite (``npm ci``), like the tests.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import math
import os
import platform
import random
import select
import shlex
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (
    REPO_ROOT,
    BenchFailure,
    add_json_option,
    bench_parser,
    command_line,
    dump_json,
    package_version,
    positive_int_list,
    run_line,
    start_azurite,
    stderr_tail,
    write_test_ca,
)

TENANTS = ["contoso.onmicrosoft.com"]
SCOPES = ["https://graph.microsoft.com/.default"]
MSAL_EXPIRY_MARGIN = 300  # MSAL treats a token with under 300 s left as expired
MODES = ("shared", "library", "persisted", "baseline")
READY_TIMEOUT = 90.0  # 20 Python processes importing pydantic, azure and msal on 2 cores
START_DELAY = 0.5  # the common start instant is this far after the last child said "ready"


# -- child processes ---------------------------------------------------------------------------------------


def _child_main(args: argparse.Namespace) -> None:
    """One replica: set up, say ``ready``, wait for ``go START``, acquire until the window ends, report once."""
    if args.child == "shared":
        acquire, counters = _shared_replica(Path(args.config))
    else:
        acquire, counters = _msal_replica(args)
    print("ready", flush=True)
    command = sys.stdin.readline().split()
    if len(command) != 2 or command[0] != "go":
        raise SystemExit(f"expected 'go START' on stdin, got {command!r}")
    start = float(command[1])
    end = start + args.duration
    time.sleep(max(0.0, start - time.time()))
    samples: list[list[Any]] = []  # [tenant, source, seconds, started (unix), expires_on]
    while time.time() < end:
        for tenant in TENANTS:
            started_at = time.time()
            began = time.perf_counter()
            source, expires_on = acquire(tenant)
            samples.append([tenant, source, time.perf_counter() - began, started_at, expires_on])
        # Jitter, so replicas that started at the same instant drift apart as real ones would.
        time.sleep(args.interval * random.uniform(0.9, 1.1))
    print(json.dumps({"pid": os.getpid(), "samples": samples, "counters": counters()}), flush=True)


def _shared_replica(config: Path) -> tuple[Any, Any]:
    from graphsync.config import load_settings
    from graphsync.logs import configure_logging
    from graphsync.metrics import IDENTITY_PROVIDER_REQUESTS, STORAGE_OPERATIONS
    from graphsync.storage import BlobStore
    from graphsync.tokencache import TokenCaches

    settings = load_settings(config)
    configure_logging(settings.log_level, json_output=False)
    caches = TokenCaches.from_settings(settings, BlobStore.from_settings(settings.storage))

    def acquire(tenant: str) -> tuple[str, int]:
        token = caches.acquire(tenant)
        return token.source, token.expires_on

    def counters() -> dict[str, Any]:
        storage: dict[str, dict[str, float]] = {}
        for metric in STORAGE_OPERATIONS.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    by_result = storage.setdefault(sample.labels["operation"], {})
                    by_result[sample.labels["result"]] = sample.value
        idp: dict[str, float] = {}
        for metric in IDENTITY_PROVIDER_REQUESTS.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    idp[sample.labels["result"]] = idp.get(sample.labels["result"], 0) + sample.value
        return {"storage": storage, "identity_provider_requests": idp}

    return acquire, counters


def _msal_cache(args: argparse.Namespace) -> Any:
    """The ``token_cache`` of a plain MSAL app in this mode: ``None`` is MSAL's own in-memory cache."""
    if args.child == "persisted":
        from msal_extensions import FilePersistence, PersistedTokenCache

        return PersistedTokenCache(FilePersistence(args.cache_file))
    if args.child == "library":
        from azure.storage.blob import BlobClient

        from graphsync.tokencache import BlobTokenCache

        blob = BlobClient.from_connection_string(
            args.connection_string, args.container, "token-cache.json", connection_timeout=2, read_timeout=5
        )
        return BlobTokenCache(blob, encryption_key=base64.b64decode(Path(args.key_file).read_text()))
    return None


def _msal_replica(args: argparse.Namespace) -> tuple[Any, Any]:
    """A plain MSAL app per tenant (the baseline, library and persisted modes differ only in its cache)."""
    import msal

    cache = _msal_cache(args)
    applications = {
        tenant: msal.ConfidentialClientApplication(
            args.client_id,
            client_credential=args.client_secret,
            authority=f"{args.authority}/{tenant}",
            instance_discovery=False,
            timeout=10,
            token_cache=cache,
        )
        for tenant in TENANTS
    }
    fetched: Counter[str] = Counter()

    def acquire(tenant: str) -> tuple[str, int]:
        result = applications[tenant].acquire_token_for_client(SCOPES)
        if "access_token" not in result:
            raise RuntimeError(f"MSAL failed for {tenant}: {result.get('error')}: {result.get('error_description')}")
        source = "cache" if result.get("token_source") == "cache" else "identity_provider"
        fetched[source] += 1
        return source, int(time.time()) + int(result["expires_in"])

    def counters() -> dict[str, Any]:
        return {"storage": {}, "identity_provider_requests": {"ok": fetched["identity_provider"]}}

    return acquire, counters


# -- orchestration -----------------------------------------------------------------------------------------


@dataclass
class Child:
    index: int
    process: subprocess.Popen[str]
    stderr_path: Path

    def stderr_tail(self) -> str:
        tail = stderr_tail(self.stderr_path)
        return "(no stderr)" if tail is None else tail or "(empty stderr)"


@dataclass
class Scenario:
    mode: str  # shared | library | persisted | baseline
    replicas: int
    window: float
    lifetimes: int
    samples: list[list[Any]] = field(default_factory=list)
    storage: dict[str, Counter[str]] = field(default_factory=dict)
    child_idp_requests: int = 0
    idp_requests: dict[str, int] = field(default_factory=dict)  # by tenant, as the fake Entra saw them
    idp_errors: int = 0
    discoveries: int = 0
    ready_seconds: float = 0.0

    @property
    def acquisitions(self) -> int:
        return len(self.samples)

    @property
    def idp_total(self) -> int:
        return sum(self.idp_requests.values())

    @property
    def idp_per_lifetime_per_tenant(self) -> float:
        return self.idp_total / (self.lifetimes * len(TENANTS))

    @property
    def hit(self) -> str:
        """What a cache hit is called: the daemon tells memory from blob, MSAL says "cache" for either."""
        return "memory" if self.mode == "shared" else "cache"

    def sources(self) -> Counter[str]:
        return Counter(sample[1] for sample in self.samples)

    def latencies(self, source: str) -> list[float]:
        return [sample[2] for sample in self.samples if sample[1] == source]

    def storage_calls(self, operation: str) -> int:
        return int(sum(self.storage.get(operation, Counter()).values()))

    def per_acquisition(self, operation: str) -> float | None:
        if self.mode != "shared" or not self.acquisitions:
            return None
        return self.storage_calls(operation) / self.acquisitions

    def usable_lifetime(self) -> float | None:
        """Mean usable life of the tokens fetched from the identity provider (expiry - 300 s - fetch time)."""
        fresh = [s[4] - MSAL_EXPIRY_MARGIN - s[3] for s in self.samples if s[1] == "identity_provider"]
        return sum(fresh) / len(fresh) if fresh else None

    def to_json(self) -> dict[str, Any]:
        hit = self.hit
        latency = {
            source: {"n": len(values), "p50_seconds": percentile(values, 50), "p99_seconds": percentile(values, 99)}
            for source in ([hit, "blob", "identity_provider"] if self.mode == "shared" else [hit, "identity_provider"])
            for values in [self.latencies(source)]
        }
        return {
            "mode": self.mode,
            "replicas": self.replicas,
            "window_seconds": self.window,
            "lifetimes_begun": self.lifetimes,
            "acquisitions": self.acquisitions,
            "acquisitions_by_source": dict(self.sources()),
            "identity_provider_requests": self.idp_total,
            "identity_provider_requests_by_tenant": self.idp_requests,
            "identity_provider_errors": self.idp_errors,
            "identity_provider_requests_reported_by_children": self.child_idp_requests,
            "openid_discoveries": self.discoveries,
            "identity_provider_requests_per_lifetime_per_tenant": self.idp_per_lifetime_per_tenant,
            "storage_operations": {op: dict(results) for op, results in self.storage.items()},
            "storage_reads_per_acquisition": self.per_acquisition("read"),
            "storage_writes_per_acquisition": self.per_acquisition("write"),
            "storage_leases_per_acquisition": self.per_acquisition("lease"),
            "latency": latency,
            "mean_usable_lifetime_seconds": self.usable_lifetime(),
            "children_ready_seconds": self.ready_seconds,
        }


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


class Bench:
    def __init__(
        self, args: argparse.Namespace, workdir: Path, azurite: Any, entra: Any, ca_bundle: Path, key_file: Path
    ) -> None:
        self.args = args
        self.workdir = workdir
        self.azurite = azurite
        self.entra = entra
        self.key_file = key_file
        self.window = (args.lifetimes - 0.5) * args.lifetime
        self.env = {name: value for name, value in os.environ.items() if not name.startswith("GRAPHSYNC_")}
        self.env |= {"REQUESTS_CA_BUNDLE": str(ca_bundle), "PYTHONUNBUFFERED": "1"}
        self.live: list[Child] = []

    def run(self, mode: str, replicas: int) -> Scenario:
        from tests.fakes.entra import CLIENT_ID, CLIENT_SECRET

        name = f"{mode}-{replicas}"
        base = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            mode,
            "--duration",
            repr(self.window),
            "--interval",
            repr(self.args.interval),
        ]
        if mode == "shared":
            base += ["--config", str(self._write_config(name))]
        else:
            base += [
                "--authority",
                self.entra.authority_host,
                "--client-id",
                CLIENT_ID,
                "--client-secret",
                CLIENT_SECRET,
            ]
        if mode == "library":
            base += ["--connection-string", self.azurite.connection_string, "--container", self._container(name)]
            base += ["--key-file", str(self.key_file)]
        if mode == "persisted":
            base += ["--cache-file", str(self.workdir / f"{name}.msal-cache.json")]
        scenario = Scenario(mode, replicas, self.window, self.args.lifetimes)
        self.entra.reset()
        spawned = time.monotonic()
        children = [self._spawn(base, name, index) for index in range(replicas)]
        try:
            self._wait_ready(children)
            scenario.ready_seconds = time.monotonic() - spawned
            start = time.time() + START_DELAY
            for child in children:
                assert child.process.stdin is not None
                child.process.stdin.write(f"go {start!r}\n")
                child.process.stdin.flush()  # communicate() closes it
            deadline = time.monotonic() + START_DELAY + self.window + 90
            reports = [self._collect(child, deadline) for child in children]
        finally:
            self._stop(children)
        for report in reports:
            scenario.samples += report["samples"]
            for operation, results in report["counters"]["storage"].items():
                scenario.storage.setdefault(operation, Counter()).update(
                    {result: int(value) for result, value in results.items()}
                )
            scenario.child_idp_requests += int(sum(report["counters"]["identity_provider_requests"].values()))
        requests = self.entra.token_requests()
        scenario.idp_requests = dict(Counter(r.tenant for r in requests))
        scenario.idp_errors = sum(r.status != 200 for r in requests)
        scenario.discoveries = self.entra.discovery_requests()
        return scenario

    def _container(self, name: str) -> str:
        """A fresh container for one scenario, so no scenario starts with another's tokens."""
        from azure.storage.blob import BlobServiceClient

        container = f"bench-{name}-{uuid.uuid4().hex[:8]}"
        with BlobServiceClient.from_connection_string(self.azurite.connection_string) as service:
            service.create_container(container)
        return container

    def _write_config(self, name: str) -> Path:
        from tests.conftest import dumps_toml
        from tests.fakes.entra import CLIENT_ID, CLIENT_SECRET

        container = self._container(name)
        path = self.workdir / f"{name}.toml"
        path.write_text(
            dumps_toml(
                {
                    "log_level": "INFO",
                    "identity": {
                        "client_id": CLIENT_ID,
                        "tenants": TENANTS,
                        "authority_host": self.entra.authority_host,
                        "client_secret": CLIENT_SECRET,
                        "scopes": SCOPES,
                    },
                    "storage": {
                        "connection_string": self.azurite.connection_string,
                        "container": container,
                        "encryption_key_file": self.key_file,
                    },
                }
            )
        )
        return path

    def _spawn(self, base: list[str], name: str, index: int) -> Child:
        stderr_path = self.workdir / f"{name}.{index}.stderr"
        with stderr_path.open("w") as stderr:
            process = subprocess.Popen(
                base,
                cwd=REPO_ROOT,
                env=self.env,
                text=True,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
            )
        child = Child(index, process, stderr_path)
        self.live.append(child)
        return child

    def _wait_ready(self, children: list[Child]) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        for child in children:
            assert child.process.stdout is not None
            readable, _, _ = select.select([child.process.stdout], [], [], max(0.0, deadline - time.monotonic()))
            line = child.process.stdout.readline() if readable else ""
            if line.strip() == "ready":
                continue
            if not readable:
                why = f"was not ready after {READY_TIMEOUT:g} s"
            elif not line:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.process.wait(timeout=5)
                why = f"exited with code {child.process.returncode} before it was ready"
            else:
                why = f"said {line.strip()!r} instead of 'ready'"
            raise self._failure(child, why)

    def _collect(self, child: Child, deadline: float) -> dict[str, Any]:
        try:
            stdout, _ = child.process.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise self._failure(child, "did not finish in time") from None
        if child.process.returncode != 0:
            raise self._failure(child, f"exited with code {child.process.returncode}")
        try:
            return json.loads(stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            raise self._failure(child, f"printed no summary (stdout: {stdout[-300:]!r})") from None

    def _failure(self, child: Child, why: str) -> BenchFailure:
        # Popen.args is typed as any command form (str, bytes, paths); the bench always passes a list of str.
        command = shlex.join(child.process.args)  # type: ignore[arg-type]
        return BenchFailure(
            f"child {child.index} (pid {child.process.pid}) {why}\n  command: {command}\n"
            f"  stderr tail:\n{child.stderr_tail()}"
        )

    def _stop(self, children: list[Child]) -> None:
        """End our own children (by their Popen handles), waiting briefly; those still alive are killed."""
        for child in children:
            if child.process.poll() is None:
                child.process.terminate()
        for child in children:
            try:
                child.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()
            for stream in (child.process.stdin, child.process.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError, ValueError):
                        stream.close()
            if child in self.live:
                self.live.remove(child)


# -- report ------------------------------------------------------------------------------------------------


def fmt_seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1e-3:
        return f"{value * 1e6:.0f} µs"
    if value < 1:
        return f"{value * 1e3:.2f} ms"
    return f"{value:.2f} s"


def fmt_number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def fmt_ratio(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or not denominator:
        return "-"
    return f"{numerator / denominator:.2f}x"


def report(args: argparse.Namespace, scenarios: list[Scenario], context: dict[str, str]) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    # Wide enough that no header wraps (the tables are Markdown, to paste into a note); lines never wrap.
    console = Console(width=max(Console().width, 160), highlight=False, soft_wrap=True)
    console.print("[bold]graphsync token cache benchmark[/bold]")
    for key, value in context.items():
        console.print(f"  {key}: {value}", markup=False)

    console.print()
    first = Table(
        title="Identity provider and storage (acquisitions by source: memory/cache, blob, IdP)",
        box=box.MARKDOWN,
        title_justify="left",
    )
    for heading in (
        "mode",
        "R",
        "acquisitions",
        "memory/cache",
        "blob",
        "IdP",
        "IdP requests",
        "IdP req/lifetime/tenant",
        "reads/acq",
        "writes/acq",
        "leases/acq",
    ):
        first.add_column(heading, justify="left" if heading == "mode" else "right", no_wrap=True)
    for s in scenarios:
        sources = s.sources()
        first.add_row(
            s.mode,
            str(s.replicas),
            str(s.acquisitions),
            str(sources[s.hit]),
            str(sources["blob"]) if s.mode == "shared" else "-",
            str(sources["identity_provider"]),
            str(s.idp_total),
            fmt_number(s.idp_per_lifetime_per_tenant, 2),
            fmt_number(s.per_acquisition("read")),
            fmt_number(s.per_acquisition("write")),
            fmt_number(s.per_acquisition("lease")),
        )
    console.print(first)

    second = Table(
        title="Acquisition latency, pooled over all replicas of a scenario", box=box.MARKDOWN, title_justify="left"
    )
    for heading in ("mode", "R", "source", "n", "p50", "p99"):
        second.add_column(heading, justify="left" if heading in ("mode", "source") else "right", no_wrap=True)
    for s in scenarios:
        for source in [s.hit, "blob", "identity_provider"] if s.mode == "shared" else [s.hit, "identity_provider"]:
            values = s.latencies(source)
            second.add_row(
                s.mode,
                str(s.replicas),
                source,
                str(len(values)),
                fmt_seconds(percentile(values, 50)),
                fmt_seconds(percentile(values, 99)),
            )
    console.print(second)

    third = Table(
        title="Against the baseline (plain MSAL, in-memory cache) of the same R", box=box.MARKDOWN, title_justify="left"
    )
    for heading in (
        "mode",
        "R",
        "IdP req/lifetime/tenant",
        "p50 all acquisitions",
        "p50 hit",
        "p99 hit",
        "IdP requests baseline/mode",
        "hit p50 mode/baseline",
    ):
        third.add_column(heading, justify="left" if heading == "mode" else "right", no_wrap=True)
    by_key = {(s.mode, s.replicas): s for s in scenarios}
    for s in scenarios:
        baseline = by_key.get(("baseline", s.replicas))
        hits, every = s.latencies(s.hit), [sample[2] for sample in s.samples]
        third.add_row(
            s.mode,
            str(s.replicas),
            fmt_number(s.idp_per_lifetime_per_tenant, 2),
            fmt_seconds(percentile(every, 50)),
            fmt_seconds(percentile(hits, 50)),
            fmt_seconds(percentile(hits, 99)),
            fmt_ratio(baseline.idp_total, s.idp_total) if baseline else "-",
            fmt_ratio(percentile(hits, 50), percentile(baseline.latencies("cache"), 50)) if baseline else "-",
        )
    console.print(third)

    usable = [u for s in scenarios if (u := s.usable_lifetime()) is not None]
    notes = [
        f"IdP req/lifetime/tenant = IdP token requests (as the fake Entra counted them) / ({args.lifetimes} "
        f"lifetimes begun in the window, counting the initial fill, x {len(TENANTS)} tenant). "
        "Ideal: 1 for shared and library, R for baseline.",
        f"The window is (lifetimes - 1/2) x lifetime = {(args.lifetimes - 0.5) * args.lifetime:g} s, so it ends "
        "mid-lifetime rather than on a refresh boundary. MSAL keeps expiries in whole seconds, so a token's usable "
        f"life is a little under {args.lifetime:g} s"
        + (f" (measured mean {sum(usable) / len(usable):.2f} s)." if usable else "."),
        "reads = conditional GETs (200, 304, 404); writes = conditional PUTs incl. 409/412 conflicts and the "
        "lock-blob creation; leases = lease attempts incl. 'held by another replica' (counted for shared only). "
        "Baseline does no storage I/O; persisted reads and writes one local file under its file lock.",
        "A blob hit includes any wait (polls from 0.25 s, backing off to 2 s) for the replica holding the "
        "refresh lease; a shared IdP acquisition includes the lease, MSAL's lazy tenant discovery on first use "
        "and the conditional write. "
        "The baseline builds its MSAL client (discovery) before the window starts.",
        "Azurite and the fake Entra run on loopback: blob and IdP latencies lack real network round trips; memory "
        "and cache hits do no I/O. All replicas of a scenario share this machine's CPUs, so compare within a run.",
    ]
    for s in scenarios:
        if s.child_idp_requests != s.idp_total:
            notes.append(
                f"{s.mode} x{s.replicas}: the replicas counted {s.child_idp_requests} IdP requests, the "
                f"fake Entra {s.idp_total}."
            )
        if s.idp_errors:
            notes.append(f"{s.mode} x{s.replicas}: {s.idp_errors} IdP requests failed.")
    console.print("Notes:")
    for note in notes:
        console.print(f"  - {note}", markup=False)


# -- main --------------------------------------------------------------------------------------------------


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError("must be > 0")
        return value

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = bench_parser(__doc__)
    parser.add_argument(
        "--lifetime",
        type=_positive(int),
        default=10,
        help="usable token lifetime in seconds (the fake issues expires_in = 300 + this); default 10",
    )
    parser.add_argument(
        "--lifetimes",
        type=_positive(int),
        default=3,
        help="token lifetimes begun per scenario; the window is (N - 0.5) x lifetime; default 3",
    )
    parser.add_argument(
        "--replicas",
        type=positive_int_list("1,5,20"),
        default=[1, 5, 20],
        help="comma-separated replica counts; default 1,5,20",
    )
    parser.add_argument(
        "--interval",
        type=_positive(float),
        default=0.2,
        help="seconds between acquisitions in each replica (±10%% jitter); default 0.2",
    )
    parser.add_argument(
        "--modes",
        type=lambda text: [mode for mode in text.split(",") if mode],
        default=list(MODES),
        help=f"comma-separated scenarios among {','.join(MODES)}; default all",
    )
    add_json_option(parser)
    # Internal: one replica process.
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--duration", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--authority", help=argparse.SUPPRESS)
    parser.add_argument("--client-id", help=argparse.SUPPRESS)
    parser.add_argument("--client-secret", help=argparse.SUPPRESS)
    parser.add_argument("--connection-string", help=argparse.SUPPRESS)
    parser.add_argument("--container", help=argparse.SUPPRESS)
    parser.add_argument("--key-file", help=argparse.SUPPRESS)
    parser.add_argument("--cache-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if unknown := set(args.modes) - set(MODES):
        parser.error(f"--modes: unknown {', '.join(sorted(unknown))}; choose among {', '.join(MODES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        _child_main(args)
        return 0

    from tests.fakes.azurite import azurite_version
    from tests.fakes.entra import CLIENT_ID, CLIENT_SECRET, FakeEntra

    started = time.monotonic()
    scenarios: list[Scenario] = []
    bench: Bench | None = None
    with contextlib.ExitStack() as stack:
        try:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="graphsync-bench-")))
            ca, ca_bundle = write_test_ca(workdir)
            key_file = workdir / "cache-key"
            key_file.write_text(base64.b64encode(os.urandom(32)).decode())
            azurite = start_azurite(stack, workdir)
            entra = stack.enter_context(
                FakeEntra(
                    ca, client_id=CLIENT_ID, client_secret=CLIENT_SECRET, expires_in=MSAL_EXPIRY_MARGIN + args.lifetime
                )
            )
            bench = Bench(args, workdir, azurite, entra, ca_bundle, key_file)
            for replicas in args.replicas:
                for mode in args.modes:
                    print(f"running {mode} x{replicas} for {bench.window:g} s ...", file=sys.stderr, flush=True)
                    scenarios.append(bench.run(mode, replicas))
        except (BenchFailure, RuntimeError) as exc:  # RuntimeError: Azurite did not start
            print(f"benchmark failed: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        finally:
            if bench is not None:
                bench._stop(list(bench.live))

    context = {
        "command": command_line(argv),
        "parameters": (
            f"replicas {','.join(map(str, args.replicas))}; usable lifetime {args.lifetime:g} s "
            f"(expires_in {MSAL_EXPIRY_MARGIN + args.lifetime}); {args.lifetimes} lifetimes; "
            f"window {(args.lifetimes - 0.5) * args.lifetime:g} s per scenario; acquisition every "
            f"{args.interval:g} s ±10 % per replica; {len(TENANTS)} tenant"
        ),
        "setup": (
            "each replica a separate process started together; shared = graphsync TokenCaches on Azurite "
            "(fresh container per scenario, encrypted envelope); library, persisted, baseline = "
            "msal.ConfidentialClientApplication with graphsync's BlobTokenCache (same storage and key), "
            "msal-extensions' PersistedTokenCache on one file, or its default in-memory cache; "
            "fake Entra on loopback HTTPS"
        ),
        "machine": (
            f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, Python "
            f"{platform.python_version()}, msal {package_version('msal')}, azure-storage-blob "
            f"{package_version('azure-storage-blob')}, Azurite {azurite_version()}"
        ),
        "run": run_line(started),
    }
    report(args, scenarios, context)
    if args.json:
        document = {"context": context, "scenarios": [s.to_json() for s in scenarios]}
        dump_json(args.json, document)
    return 0


if __name__ == "__main__":
    sys.exit(main())
