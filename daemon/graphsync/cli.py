"""The ``graphsync`` command line: parse arguments, load configuration, dispatch to a command.

Exit codes (documented in the README): 0 success, 1 a command ran and failed, 2 configuration or usage error,
3 a job is running on another replica.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from graphsync import __version__
from graphsync.limits import MAX_CONCURRENCY

# Only the standard library above: ``--version``, ``--help`` and a usage error answer without importing pydantic,
# azure, msal or rich (scripts call the command line per request). Each command imports what it uses when it runs.
if TYPE_CHECKING:
    from graphsync.config import JobSettings, Settings
    from graphsync.graph import GraphClient
    from graphsync.jobs import JobRunner
    from graphsync.storage import BlobStore
    from graphsync.tokencache import TokenCaches

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_BUSY = 3


class UsageError(Exception):
    """A command-line value that does not fit the configuration; exits 2 like a configuration error."""


def build_parser() -> argparse.ArgumentParser:
    # --config sits on the main parser and on every subcommand, so it works before or after the subcommand.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="TOML configuration file (default: $GRAPHSYNC_CONFIG, else /etc/graphsync/config.toml "
        "if it exists, else environment variables only)",
    )
    parser = argparse.ArgumentParser(
        prog="graphsync",
        parents=[common],
        description="Export Microsoft Graph collections with a fleet-shared token cache.",
    )
    parser.add_argument("--version", action="version", version=f"graphsync {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    token = commands.add_parser(
        "token",
        parents=[common],
        help="acquire a token through the shared cache and say where it came from (the token itself only when "
        "asked with --access-token)",
    )
    token.add_argument("--tenant", help="tenant to acquire for (default: the only configured tenant)")
    token.add_argument("--json", action="store_true", help="end with one JSON object: tenant, source, expires_on")
    token.add_argument(
        "--access-token",
        action="store_true",
        help="print the access token itself on standard output, for scripts: "
        '`curl -H "Authorization: Bearer $(graphsync token --access-token)"`; with --json, as "access_token"',
    )
    run = commands.add_parser(
        "run", parents=[common], help="run the daemon: every job on its schedule, coordinated with the other replicas"
    )
    run.set_defaults(command="run")

    sync = commands.add_parser(
        "sync", parents=[common], help="run jobs now and exit (for a container job, a systemd oneshot, or by hand)"
    )
    sync.add_argument("--job", action="append", help="job name (repeatable; default: every job)")
    sync.add_argument("--tenant", help="only this tenant (default: each job's tenants)")
    sync.add_argument(
        "--wait",
        action="store_true",
        help="wait for a run on another replica to finish instead of exiting with status 3",
    )
    sync.add_argument(
        "--parallel",
        type=_parallel,
        metavar="N",
        help="(tenant, job) runs at once (default: [run] concurrency; 1 runs them one after the other)",
    )

    status = commands.add_parser("status", parents=[common], help="token cache and job state, fleet-wide")
    status.add_argument("--json", action="store_true", help="print one JSON object")

    check = commands.add_parser(
        "check",
        parents=[common],
        help="preflight: configuration, storage, a token per "
        "tenant, Graph access per job — each failure with its likely fix",
    )
    check.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _parallel(text: str) -> int:
    """``--parallel``: a whole number within the bounds of ``[run] concurrency``."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_CONCURRENCY:
        raise argparse.ArgumentTypeError(f"expected a whole number from 1 to {MAX_CONCURRENCY}, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from graphsync.config import ConfigError, find_config_file, load_settings
    from graphsync.logs import configure_logging

    try:
        args.config_file = find_config_file(getattr(args, "config", None))
        settings = load_settings(args.config_file)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"graphsync: configuration error: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(settings.log_level)
    try:
        return COMMANDS[args.command](args, settings)
    except UsageError as exc:
        print(f"graphsync: {exc}", file=sys.stderr)
        return EXIT_CONFIG


def _tenant(args: argparse.Namespace, settings: Settings) -> str:
    tenants = settings.identity.tenants
    if args.tenant is None:
        if len(tenants) == 1:
            return tenants[0]
        raise UsageError(f"--tenant is required: identity.tenants lists {len(tenants)} tenants ({', '.join(tenants)})")
    tenant: str = args.tenant.lower()  # tenant ids and domain names are case-insensitive; configuration lower-cases
    if tenant not in tenants:
        raise UsageError(f"--tenant {args.tenant} is not in identity.tenants ({', '.join(tenants)})")
    return tenant


def _token_caches(settings: Settings) -> tuple[BlobStore, TokenCaches]:
    """Storage and the shared token caches on it: what every command that needs a token starts from."""
    from graphsync.storage import BlobStore
    from graphsync.tokencache import TokenCaches

    store = BlobStore.from_settings(settings.storage)
    return store, TokenCaches.from_settings(settings, store)


def _job_runner(settings: Settings) -> JobRunner:
    """The composition root of a sync: token caches, the Graph client, the output, the job locks."""
    return _runner_parts(settings)[0]


def _runner_parts(settings: Settings) -> tuple[JobRunner, GraphClient, BlobStore]:
    """The runner, and the Graph client and storage it runs on (the notification companion shares them)."""
    from graphsync.graph import GraphClient
    from graphsync.jobs import JobRunner
    from graphsync.sinks import sink_from_settings
    from graphsync.tables import tables_from_settings
    from graphsync.workstore import WorkStores

    store, caches = _token_caches(settings)
    graph = GraphClient(
        settings.graph.endpoint,
        settings.graph.api_version,
        caches,
        timeout=settings.graph.timeout_seconds,
        max_retries=settings.graph.max_retries,
    )
    stores = WorkStores(settings.output.work_directory)
    tables = tables_from_settings(settings)
    runner = JobRunner(graph=graph, sink=sink_from_settings(settings), locks=store, stores=stores, tables=tables)
    return runner, graph, store


def cmd_token(args: argparse.Namespace, settings: Settings) -> int:
    from graphsync.identity import TokenError
    from graphsync.timestamps import display_utc

    tenant = _tenant(args, settings)
    _, caches = _token_caches(settings)
    try:
        token = caches.acquire(tenant)
    except TokenError as exc:
        print(f"graphsync: {exc}", file=sys.stderr)
        return EXIT_FAILED
    # The token goes to standard output only when asked for, and never to a log or to standard error.
    if args.json:
        report: dict[str, object] = {"tenant": tenant, "source": token.source, "expires_on": token.expires_on}
        if args.access_token:
            report["access_token"] = token.token
        print(json.dumps(report))
    elif args.access_token:
        print(token.token)
    else:
        expires = display_utc(token.expires_on)
        print(f"tenant {tenant}: token from {token.source.replace('_', ' ')}, expires {expires}")
    return EXIT_OK


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    if not settings.jobs:
        raise UsageError("no [[jobs]] are configured: nothing to schedule")
    from graphsync.health import HealthServer
    from graphsync.scheduler import Daemon

    runner, graph, store = _runner_parts(settings)
    host, port = settings.metrics.host, settings.metrics.port
    health = (
        (lambda daemon: HealthServer(host, port, live=daemon.live, ready=daemon.ready)) if port is not None else None
    )
    companion = None
    if settings.notifications is not None:
        from graphsync.notify import NotificationService

        def companion(daemon: Daemon) -> NotificationService:
            return NotificationService(settings, daemon.hurry, graph, store, replica=runner.replica)

    upkeep = None
    if settings.output.tables:
        from graphsync.sinks import sink_from_settings
        from graphsync.tables import table_names, tables_from_settings
        from graphsync.upkeep import UpkeepRunner

        tables, sink = tables_from_settings(settings), sink_from_settings(settings)
        upkeep = UpkeepRunner(tables=tables, names=table_names(settings), sink=sink, locks=store)
    return Daemon(settings, runner, health=health, companion=companion, upkeep=upkeep).run()


def _selected(args: argparse.Namespace, settings: Settings) -> list[tuple[JobSettings, str]]:
    names = {job.name for job in settings.jobs}
    if unknown := sorted(set(args.job or []) - names):
        raise UsageError(f"--job {', '.join(unknown)}: not configured (jobs: {', '.join(sorted(names)) or 'none'})")
    tenant = _tenant(args, settings) if args.tenant else None
    pairs = [
        (job, t)
        for job in settings.jobs
        if not args.job or job.name in args.job
        for t in settings.job_tenants(job)
        if tenant is None or t == tenant
    ]
    if not pairs:
        raise UsageError("nothing to sync: no configured job matches --job/--tenant")
    return pairs


def cmd_sync(args: argparse.Namespace, settings: Settings) -> int:
    import signal
    import threading

    from graphsync.console import SyncProgress, print_summary
    from graphsync.jobs import RunResult
    from graphsync.pool import STOP_GRACE_SECONDS, RunPool, Try, exit_now

    pairs = _selected(args, settings)
    runner = _job_runner(settings)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    results: dict[tuple[str, str], RunResult] = {}
    terminal = sys.stdout.isatty()
    with SyncProgress(enabled=terminal, total=len(pairs)) as progress:

        def run(attempt: Try) -> None:
            progress.begin(attempt.tenant, attempt.job.name)
            result = runner.run(attempt.job, attempt.tenant, wait=args.wait, stop=stop, progress=progress.update)
            results[attempt.pair] = result
            progress.end(attempt.tenant, attempt.job.name, result.status)

        pool = RunPool(
            run,
            concurrency=args.parallel or settings.run.concurrency,
            per_tenant=settings.run.per_tenant,
            stop=stop,
            name="sync",
        )
        for job, tenant in pairs:
            pool.put(Try(job, tenant))
        pool.close()
        pool.start()
        while not pool.join(timeout=0.2) and not stop.is_set():
            pass
        finished = pool.join(timeout=STOP_GRACE_SECONDS)  # after a stop, runs end at their next page
        stuck = pool.running()
    for tenant, job_name in stuck:
        message = "still inside a Graph or storage call when the process stopped; it published nothing"
        results[tenant, job_name] = RunResult(tenant, job_name, "stopped", message=message)
    order = {(tenant, job.name): index for index, (job, tenant) in enumerate(pairs)}
    print_summary(sorted(results.values(), key=lambda r: order[r.tenant, r.job]), terminal=terminal)
    if any(r.status in ("failed", "stopped") for r in results.values()) or len(results) < len(pairs):
        code = EXIT_FAILED
    else:
        code = EXIT_BUSY if any(r.status == "busy" for r in results.values()) else EXIT_OK
    if not finished:
        exit_now(code)
    return code


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    import time

    from graphsync.console import print_status
    from graphsync.sinks import sink_from_settings
    from graphsync.status import fleet_status
    from graphsync.workstore import WorkStores

    store, caches = _token_caches(settings)
    stores = WorkStores(settings.output.work_directory)
    report = fleet_status(settings, caches, sink_from_settings(settings), store, stores, time.time())
    if args.json:
        print(json.dumps(report))
    else:
        print_status(report)
    return EXIT_OK


def cmd_check(args: argparse.Namespace, settings: Settings) -> int:
    from graphsync.preflight import run_checks, setup_warnings

    checks = []
    for check in run_checks(settings, args.config_file):
        checks.append(check)
        if not args.json:
            print(f"{'✓' if check.ok else '✗'} {check.name}: {check.detail}", flush=True)
            if check.fix:
                print(f"    fix: {check.fix}", flush=True)
    ok = all(check.ok for check in checks)
    warnings = setup_warnings(settings)
    if args.json:
        checked = [check.as_dict() for check in checks]
        print(json.dumps({"ok": ok, "checks": checked, "warnings": [warning.as_dict() for warning in warnings]}))
    else:
        # On stderr: a warning is not a check, and scripts that read the check lines on stdout keep working.
        for warning in warnings:
            print(f"! {warning.name}: {warning.detail}\n    fix: {warning.fix}", file=sys.stderr, flush=True)
    return EXIT_OK if ok else EXIT_FAILED


COMMANDS: dict[str, Callable[[argparse.Namespace, Settings], int]] = {
    "check": cmd_check,
    "token": cmd_token,
    "run": cmd_run,
    "sync": cmd_sync,
    "status": cmd_status,
}
