"""Finding the config file and loading the configuration from it and the environment."""

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path

from pydantic import ValidationError
from pydantic_settings import SettingsError, TomlConfigSettingsSource

from graphsync.config.context import Load, load_in_progress
from graphsync.config.errors import ConfigError
from graphsync.config.fields import os_reason
from graphsync.config.models import Settings
from graphsync.config.report import Origins
from graphsync.config.sources import CONFIG_VARIABLE, EnvironSource, WorkloadIdentitySource

DEFAULT_CONFIG_PATH = Path("/etc/graphsync/config.toml")


def find_config_file(cli_path: str | None, environ: Mapping[str, str] = os.environ) -> Path | None:
    """Pick the config file: --config, else $GRAPHSYNC_CONFIG, else DEFAULT_CONFIG_PATH if present.

    None means environment-only configuration. A file named explicitly must exist: silently
    falling back to defaults would hide a typo in a path.
    """
    if cli_path is not None:
        path, origin = Path(cli_path), "--config"
    elif environ.get(CONFIG_VARIABLE):
        path, origin = Path(environ[CONFIG_VARIABLE]), CONFIG_VARIABLE
    else:
        return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.is_file() else None
    if not path.is_file():
        raise ConfigError([f"config file {path} (from {origin}): does not exist or is not a regular file"])
    return path


def _read_config_file(config_file: Path | None) -> TomlConfigSettingsSource:
    """Parse the file up front: TomlConfigSettingsSource skips a missing file silently."""
    if config_file is not None and not config_file.is_file():
        raise ConfigError([f"config file {config_file}: does not exist or is not a regular file"])
    try:
        return TomlConfigSettingsSource(Settings, toml_file=config_file)
    except OSError as exc:
        problem = f"config file {config_file}: cannot read it: {os_reason(exc)}"
    except tomllib.TOMLDecodeError as exc:  # its message gives line and column, not document text
        problem = f"config file {config_file}: invalid TOML: {exc}"
    except UnicodeDecodeError:
        problem = f"config file {config_file}: not UTF-8 text"
    raise ConfigError([problem])


def load_settings(config_file: Path | None, environ: Mapping[str, str] = os.environ) -> Settings:
    """Load and check the whole configuration, reading every referenced secret and key file.

    Raises ConfigError, one line per problem, and nothing else: the caller prints it and exits.
    The error is raised outside any ``except`` block so it carries no chained pydantic
    exception, whose text would include the offending (possibly secret) input values.
    """
    config_file = config_file.absolute() if config_file is not None else None
    file_source = _read_config_file(config_file)
    env_source = EnvironSource(Settings, environ)
    workload_source = WorkloadIdentitySource(Settings, environ)
    with load_in_progress(Load(config_file, environ, (env_source, file_source, workload_source))):
        try:
            return Settings()
        except ValidationError as exc:
            origins = Origins(config_file, file_source.toml_data, env_source.variables, workload_source.filled)
            problems = [line for error in exc.errors() for line in origins.describe(error)]
        except SettingsError as exc:  # pydantic-settings' own failures name a section, never a value
            problems = [f"environment: {exc}"]
    raise ConfigError(problems)
