"""The ``graphsync`` command line: parse arguments, load configuration, dispatch to a command.

Exit codes (documented in the README): 0 success, 1 a command ran and failed, 2 configuration or usage error,
3 a job is running on another replica.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime

from daemon import __version__
from daemon.config import ConfigError, Settings, find_config_file, load_settings
from daemon.identity import TokenError
from daemon.logs import configure_logging
from daemon.storage import BlobStore
from daemon.tokencache import TokenCaches

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_BUSY = 3


class UsageError(Exception):
    """A command-line value that does not fit the configuration; exits 2 like a configuration error."""


def build_parser() -> argparse.ArgumentParser:
    # --config sits on the main parser and on every subcommand, so it works before or after the subcommand.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS,
                        help="TOML configuration file (default: $GRAPHSYNC_CONFIG, else /etc/graphsync/config.toml "
                             "if it exists, else environment variables only)")
    parser = argparse.ArgumentParser(prog="graphsync", parents=[common],
                                     description="Export Microsoft Graph collections with a fleet-shared token cache.")
    parser.add_argument("--version", action="version", version=f"graphsync {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    token = commands.add_parser("token", parents=[common], help="acquire a token through the shared cache and say "
                                "where it came from (never prints the token)")
    token.add_argument("--tenant", help="tenant to acquire for (default: the only configured tenant)")
    token.add_argument("--json", action="store_true", help="end with one JSON object: tenant, source, expires_on")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(find_config_file(getattr(args, "config", None)))
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
    tenant = args.tenant.lower()  # tenant ids and domain names are case-insensitive; configuration lower-cases
    if tenant not in tenants:
        raise UsageError(f"--tenant {args.tenant} is not in identity.tenants ({', '.join(tenants)})")
    return tenant


def cmd_token(args: argparse.Namespace, settings: Settings) -> int:
    tenant = _tenant(args, settings)
    caches = TokenCaches.from_settings(settings, BlobStore.from_settings(settings.storage))
    try:
        token = caches.acquire(tenant)
    except TokenError as exc:
        print(f"graphsync: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps({"tenant": tenant, "source": token.source, "expires_on": token.expires_on}))
    else:
        expires = datetime.fromtimestamp(token.expires_on, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        print(f"tenant {tenant}: token from {token.source.replace('_', ' ')}, expires {expires}")
    return EXIT_OK


COMMANDS: dict[str, Callable[[argparse.Namespace, Settings], int]] = {
    "token": cmd_token,
}
