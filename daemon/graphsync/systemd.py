"""systemd's notify protocol: READY, WATCHDOG, STOPPING as datagrams to ``$NOTIFY_SOCKET``.

The protocol is one datagram per message; writing it directly is smaller than a dependency and behaves the same
under systemd, in a container (no socket: every call is a no-op), and in tests (a socket the test listens on).
"""

from __future__ import annotations

import contextlib
import os
import socket


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        # An abstract-namespace socket is written with a leading "@" and addressed with a NUL byte.
        self._address = "\0" + address[1:] if address.startswith("@") else address
        watchdog_usec = env.get("WATCHDOG_USEC", "")
        watchdog_pid = env.get("WATCHDOG_PID", "")
        applies = not watchdog_pid or watchdog_pid == str(os.getpid())
        self.watchdog_interval = int(watchdog_usec) / 2_000_000 if watchdog_usec.isdigit() and applies else None
        """Seconds between WATCHDOG=1 messages (half of what systemd waits), or None without a watchdog."""

    def notify(self, message: str) -> None:
        if not self._address:
            return
        # systemd gone (or a test stopped listening): nothing useful to do about it
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, contextlib.suppress(OSError):
            sock.sendto(message.encode(), self._address)

    def ready(self) -> None:
        self.notify("READY=1\nSTATUS=scheduler running")

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")

    def stopping(self) -> None:
        self.notify("STOPPING=1\nSTATUS=stopping")
