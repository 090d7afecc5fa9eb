"""graphsync configuration: one TOML file plus GRAPHSYNC_* environment variables.

pydantic-settings reads and merges the sources and pydantic validates the result. What this package adds is the
error report: every problem becomes one line naming the key in dotted form (``jobs[1].every``), where its value
came from (the TOML file or the environment variable to edit) and what is expected, so that an operator can fix a
daemon that refuses to start without reading a traceback. Values are never echoed in those lines, because several
keys hold secrets and startup errors end up in logs.

Modules, in dependency order: ``context`` (the load in progress), ``errors``, ``fields`` (value types and file
readers), ``credentials`` (the typed credential), ``jobkinds`` (what Graph serves each kind of job), ``presets`` (one
entry for a set of jobs), ``notifications`` (the ``[notifications]`` section), ``models`` (the sections and
``Settings``), ``sources`` (environment and workload identity), ``report`` (the error lines) and ``loading`` (the
entry points). The rest of graphsync imports from the package.
"""

from graphsync.config.credentials import (
    CertificateCredential,
    Credential,
    FederatedCredential,
    ManagedIdentityCredential,
    SecretCredential,
)
from graphsync.config.errors import ConfigError
from graphsync.config.loading import DEFAULT_CONFIG_PATH, find_config_file, load_settings
from graphsync.config.models import (
    DEFAULT_OUTPUT_DIRECTORY,
    CacheSettings,
    GraphSettings,
    IdentitySettings,
    JobSettings,
    MetricsSettings,
    OutputSettings,
    RunSettings,
    Settings,
    StorageSettings,
)
from graphsync.config.notifications import NotificationSettings
from graphsync.limits import MAX_CONCURRENCY

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_OUTPUT_DIRECTORY",
    "MAX_CONCURRENCY",
    "CacheSettings",
    "CertificateCredential",
    "ConfigError",
    "Credential",
    "FederatedCredential",
    "GraphSettings",
    "IdentitySettings",
    "JobSettings",
    "ManagedIdentityCredential",
    "MetricsSettings",
    "NotificationSettings",
    "OutputSettings",
    "RunSettings",
    "SecretCredential",
    "Settings",
    "StorageSettings",
    "find_config_file",
    "load_settings",
]
