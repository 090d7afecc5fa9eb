"""Where the tables live, under the output, and the storage options delta-rs needs to reach them.

    <output directory>/tables/<table>/                  a local path
    az://<output container>/tables/<table>/             the output container, in the [storage] account

delta-rs has its own storage client (Rust's object_store), so the account is handed over as options rather than as
the Python SDK's client: account name and key (or SAS) from the connection string, and its blob endpoint when it is
not Azure's default (Azurite: ``http://127.0.0.1:<port>/devstoreaccount1``, with ``allow_http``). With
``account_url`` there is no secret to pass: object_store then signs in like azure-identity does, from the
``AZURE_*`` workload identity variables or the managed identity. The options hold secrets: never log them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from graphsync.config import Settings, StorageSettings

TABLES = "tables"


@dataclass(frozen=True)
class TableLocation:
    """The root the tables live under, and what delta-rs needs to reach it."""

    root: str  # a local directory, or az://<container>/tables
    storage_options: dict[str, str] = field(default_factory=dict, repr=False)  # secrets: kept out of repr

    def uri(self, table: str) -> str:
        return f"{self.root}/{table}"

    @property
    def local(self) -> bool:
        """A directory on this host, not a container."""
        return not self.root.startswith("az://")

    def describe(self) -> str:
        """The root without any secret, for logs and ``status``."""
        return self.root


def table_location(settings: Settings) -> TableLocation:
    """The tables under ``[output]``: its directory, else its container (with ``[storage]``'s account)."""
    if settings.output.directory is not None:
        return TableLocation(str(Path(settings.output.directory).absolute() / TABLES))
    assert settings.output.container is not None  # the configuration sets one of the two
    return TableLocation(f"az://{settings.output.container}/{TABLES}", azure_options(settings.storage))


def azure_options(storage: StorageSettings) -> dict[str, str]:
    """object_store's Azure options for the ``[storage]`` account."""
    if storage.connection_string is None:
        assert storage.account_url is not None  # the configuration sets one of the two
        return _endpoint_options(storage.account_url, account=urlsplit(storage.account_url).hostname or "")
    parts = _connection_string(storage.connection_string.get_secret_value())
    options: dict[str, str] = {}
    if "AccountKey" in parts:
        options["account_key"] = parts["AccountKey"]
    if "SharedAccessSignature" in parts:
        options["sas_token"] = parts["SharedAccessSignature"]
    if "BlobEndpoint" in parts:
        return options | _endpoint_options(parts["BlobEndpoint"], account=parts.get("AccountName", ""))
    return options | {"account_name": parts.get("AccountName", "")}


def _endpoint_options(endpoint: str, *, account: str) -> dict[str, str]:
    """An explicit endpoint: Azurite's path-style one (account in the path), or an account's own host."""
    url = urlsplit(endpoint)
    path_account = url.path.strip("/").split("/")[0]
    name = path_account or account.split(".")[0]
    options = {"account_name": name, "endpoint": endpoint.rstrip("/")}
    if url.scheme == "http":
        options["allow_http"] = "true"
    return options


def _connection_string(text: str) -> dict[str, str]:
    """``Key=Value;...`` as a dict; values may contain ``=`` (base64 keys, SAS tokens)."""
    pairs = (part.split("=", 1) for part in text.split(";") if "=" in part)
    return {key.strip(): value.strip() for key, value in pairs}
