"""A stand-in for one long-running replica: acquire a token through the shared cache at a steady pace.

Run as ``python -m tests.replica --config PATH --duration S --interval S``. Each acquisition prints one JSON line
(time, tenant, source, expires_on — never the token), so tests and the benchmark can count where tokens came from
across real, separate processes. ``asked`` is the wall clock just before the call: a token's time left is promised
as of some instant inside the call, so only ``expires_on - asked`` bounds it from below on a loaded machine.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from graphsync.config import load_settings
from graphsync.logs import configure_logging
from graphsync.storage import BlobStore
from graphsync.tokencache import TokenCaches


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--interval", type=float, default=0.5)
    args = parser.parse_args()
    settings = load_settings(Path(args.config))
    configure_logging(settings.log_level, json_output=True)
    caches = TokenCaches.from_settings(settings, BlobStore.from_settings(settings.storage))
    end = time.monotonic() + args.duration
    while time.monotonic() < end:
        for tenant in caches.tenants:
            asked, started = time.time(), time.perf_counter()
            token = caches.acquire(tenant)
            print(
                json.dumps(
                    {
                        "time": time.time(),
                        "asked": asked,
                        "tenant": tenant,
                        "source": token.source,
                        "expires_on": token.expires_on,
                        "seconds": time.perf_counter() - started,
                    }
                ),
                flush=True,
            )
        time.sleep(args.interval)


if __name__ == "__main__":
    main()
