"""Azurite, the storage emulator, as a subprocess that can be stopped and started again (an outage on demand).

Used by the test fixtures, the demo and the benchmarks; installed by `make setup` (npm, pinned in package-lock.json).
"""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
# The emulator's fixed, publicly documented development account.
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""


class Azurite:
    """An Azurite blob service subprocess that can be stopped and started again.

    Data is persisted under ``location`` and the port never changes, so a stop/start is a
    storage outage the daemon should survive, not a new, empty account.
    """

    host = "127.0.0.1"

    def __init__(self, executable: str, location: Path, log_dir: Path, port: int) -> None:
        self.executable = executable
        self.location = location
        self.port = port
        self._stdout = log_dir / "azurite.stdout.log"
        self._stderr = log_dir / "azurite.stderr.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def connection_string(self) -> str:
        return (
            "DefaultEndpointsProtocol=http;"
            f"AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
            f"BlobEndpoint=http://{self.host}:{self.port}/{AZURITE_ACCOUNT};"
        )

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 20) -> None:
        """Start on the same port and location; return once Azurite answers HTTP there."""
        if self.running:
            return
        command = [
            self.executable,
            "--blobHost", self.host,
            "--blobPort", str(self.port),
            "--location", str(self.location),
            "--skipApiVersionCheck",  # Azurite 3.37 rejects azure-storage-blob 12.31's API version
            "--disableTelemetry",
            "--loose",
        ]  # fmt: skip
        with self._stdout.open("ab") as out, self._stderr.open("ab") as err:
            self._process = subprocess.Popen(command, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self._process.poll()
            if code is not None:
                raise RuntimeError(f"Azurite exited with code {code} during startup:\n{_tail(self._stderr)}")
            if self._answers():
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(
            f"Azurite did not answer on {self.host}:{self.port} within {timeout} s:\n{_tail(self._stderr)}"
        )

    def _answers(self) -> bool:
        """True once *Azurite* answers HTTP on the port (not some other process that holds it)."""
        connection = http.client.HTTPConnection(self.host, self.port, timeout=1)
        try:
            connection.request("GET", "/")
            return connection.getresponse().getheader("Server", "").startswith("Azurite-Blob")
        except (OSError, http.client.HTTPException):
            return False
        finally:
            connection.close()

    def stop(self, timeout: float = 10) -> None:
        """Terminate (Azurite flushes its metadata on SIGTERM) and wait; kill if it hangs."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def azurite_executable() -> str:
    local = REPO_ROOT / "node_modules" / ".bin" / "azurite-blob"
    if local.exists():
        return str(local)
    on_path = shutil.which("azurite-blob")
    if on_path:
        return on_path
    raise RuntimeError(f"Azurite is not installed (no {local} and no azurite-blob on PATH); run `make setup`")


def azurite_version() -> str:
    """The installed Azurite's version, for benchmark reports."""
    try:
        return json.loads((REPO_ROOT / "node_modules" / "azurite" / "package.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        return "?"
