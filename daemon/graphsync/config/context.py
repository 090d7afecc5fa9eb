"""The load_settings call in progress, as seen by the settings sources and the path-resolving validators.

pydantic-settings asks ``Settings.settings_customise_sources`` for its sources through a classmethod with a fixed
signature, and BaseSettings passes no validation context to validators, so the call's inputs travel in a
ContextVar: each load sees the environ and config file of its own call, and only of its own call.
"""

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

from pydantic_settings import PydanticBaseSettingsSource

# systemd's LoadCredential= puts credential files here and exports the directory.
_CREDENTIALS_VARIABLE = "CREDENTIALS_DIRECTORY"


@dataclass(frozen=True)
class Load:
    """The inputs of one load_settings call."""

    config_file: Path | None
    environ: Mapping[str, str]
    sources: tuple[PydanticBaseSettingsSource, ...] = ()

    def resolve(self, path: Path) -> Path:
        """Anchor a relative *_file path where a deployment keeps such files.

        systemd's LoadCredential= exposes credentials in $CREDENTIALS_DIRECTORY under the names
        the config uses; otherwise paths are relative to the config file, so a config and its
        secrets can be moved together; with no file (environment-only), to the working directory.
        """
        if path.is_absolute():
            return path
        credentials = self.environ.get(_CREDENTIALS_VARIABLE)
        if credentials:
            base = Path(credentials)
        elif self.config_file is not None:
            base = self.config_file.parent
        else:
            base = Path.cwd()
        return (base / path).absolute()


_LOAD: ContextVar[Load | None] = ContextVar("graphsync_config_load", default=None)


def current_load() -> Load:
    """The running load_settings call; for a Settings() built directly, the process environment and no file."""
    return _LOAD.get() or Load(None, os.environ)


@contextmanager
def load_in_progress(load: Load) -> Iterator[None]:
    """Make ``load`` the call that sources and validators see until the block ends."""
    token = _LOAD.set(load)
    try:
        yield
    finally:
        _LOAD.reset(token)
