"""What an operator sees when running `graphsync sync` by hand on a terminal (a real pseudo-terminal here)."""

from __future__ import annotations

import os
import pty
import sys
from typing import TYPE_CHECKING

from tests.conftest import REPO_ROOT
from tests.fakes.graph import FakeGraph, populate

if TYPE_CHECKING:
    from tests.conftest import WriteConfig


def _run_on_a_terminal(argv: list[str], env: dict[str, str]) -> tuple[int, str]:
    pid, fd = pty.fork()
    if pid == 0:  # the child: stdin, stdout and stderr are the terminal
        os.chdir(REPO_ROOT)
        os.execve(argv[0], argv, env | {"COLUMNS": "120", "TERM": "xterm"})
    output = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), output.decode(errors="replace")


def test_sync_on_a_terminal_shows_progress_and_a_summary_table(
    graphsync_config: WriteConfig, fake_graph: FakeGraph, tls_env: dict[str, str], tmp_path
) -> None:
    tenant = "contoso.onmicrosoft.com"
    populate(fake_graph, tenant, users=450, groups=0)
    fake_graph.page_size = 100
    fake_graph.slow_pages = 0.2  # long enough for the progress display to refresh
    config = graphsync_config(
        extra={
            "graph": {"endpoint": fake_graph.base_url},
            "output": {"directory": str(tmp_path / "out")},
            "jobs": [{"name": "users", "resource": "users", "delta": True, "every": "1h"}],
        }
    )
    code, screen = _run_on_a_terminal(
        [sys.executable, "-m", "graphsync", "sync", "--config", str(config)], os.environ | tls_env
    )
    assert code == 0, screen
    assert "pages" in screen and "records" in screen, screen  # the progress line
    assert "5 pages, 450 records" in screen
    assert "┏" in screen and "graphsync sync" in screen  # the rich summary table, not tab-separated lines
    assert f"{tenant}" in screen and "ok" in screen
