"""Where settings come from besides the TOML file: GRAPHSYNC_* variables, and Azure workload identity's AZURE_*.

Each source records which key each variable set, so the error report can name the variable to edit.
"""

from collections.abc import Mapping, Sequence
from types import UnionType
from typing import Any, TypeGuard, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource
from pydantic_settings.sources.utils import parse_env_vars

from graphsync.config.errors import ConfigError, dotted
from graphsync.config.models import CREDENTIAL_KEYS, ENV_DELIMITER, ENV_PREFIX

# Names the config file itself (see loading.find_config_file), so it is not a setting.
CONFIG_VARIABLE = "GRAPHSYNC_CONFIG"

# Variables Azure workload identity injects into a pod, by the [identity] key they fill.
WORKLOAD_VARIABLES = {
    "client_id": "AZURE_CLIENT_ID",
    "tenants": "AZURE_TENANT_ID",
    "authority_host": "AZURE_AUTHORITY_HOST",
    "federated_token_file": "AZURE_FEDERATED_TOKEN_FILE",
}


def is_model(annotation: Any) -> TypeGuard[type[BaseModel]]:
    """Whether an annotation is a model (a section, or the item of a list of tables) rather than a value."""
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _nests(annotation: Any) -> bool:
    """Whether pydantic-settings puts GRAPHSYNC_<FIELD>__* variables into this field (not so for a scalar).

    An optional section (``NotificationSettings | None``) nests like a required one.
    """
    if get_origin(annotation) in (Union, UnionType):
        return any(_nests(arg) for arg in get_args(annotation) if arg is not type(None))
    return is_model(annotation) or get_origin(annotation) is list


def variable_name(path: Sequence[str]) -> str:
    """The GRAPHSYNC_* variable that sets the key at ``path``."""
    return ENV_PREFIX + ENV_DELIMITER.join(path).upper()


class EnvironSource(EnvSettingsSource):
    """GRAPHSYNC_* variables from an explicit mapping, reporting unknown names and bad JSON by variable.

    The stock source reads os.environ, silently drops a variable whose first segment names no
    field (GRAPHSYNC_IDENTTY__CLIENT_ID, which would look like a missing value instead of a
    typo), and reports bad JSON only per section. Unknown variables are passed on under their
    name after the prefix, so ``extra="forbid"`` reports them like unknown keys in the file.
    """

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)
        fields = settings_cls.model_fields
        #: Key path each variable sets -> the variable's name as given.
        self.variables: dict[tuple[str, ...], str] = {}
        for name in environ:
            if not name.upper().startswith(ENV_PREFIX) or name.upper() == CONFIG_VARIABLE:
                continue
            rest = name[len(ENV_PREFIX) :].lower()
            path = tuple(rest.split(ENV_DELIMITER))
            field = fields.get(path[0])
            if field is None or (len(path) > 1 and not _nests(field.annotation)):
                path = (rest,)
            self.variables[path] = name
        self._paths = {name.lower(): path for path, name in self.variables.items()}

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(self._environ, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str)

    def __call__(self) -> dict[str, Any]:
        data = super().__call__()
        for path, name in self.variables.items():
            if path[0] not in self.settings_cls.model_fields:
                data[path[0]] = self._environ[name]
        return data

    def prepare_field_value(self, field_name: str, field: FieldInfo, value: Any, value_is_complex: bool) -> Any:
        try:
            return super().prepare_field_value(field_name, field, value, value_is_complex)
        except ValueError as exc:  # GRAPHSYNC_<FIELD> itself is not JSON (nested variables are named below)
            raise self._invalid_json((field_name,), exc) from None

    def explode_env_vars(self, field_name: str, field: FieldInfo, env_vars: Mapping[str, str | None]) -> dict[str, Any]:
        try:
            return super().explode_env_vars(field_name, field, env_vars)
        except ValueError:
            for name, value in env_vars.items():
                try:
                    super().explode_env_vars(field_name, field, {name: value})
                except ValueError as exc:
                    raise self._invalid_json(self._paths[name], exc) from None
            raise

    def _invalid_json(self, path: tuple[str, ...], exc: ValueError) -> ConfigError:
        return ConfigError(
            [
                f"{dotted(path)} (from env {self.variables[path]}): not valid JSON ({exc}); "
                'lists and tables set from the environment are JSON, e.g. ["a", "b"]'
            ]
        )


class WorkloadIdentitySource(PydanticBaseSettingsSource):
    """Fill [identity] from the AZURE_* variables workload identity injects into a pod.

    Lowest precedence, key by key: a value from the file or GRAPHSYNC_* always wins, and the
    federated token file is only used when no credential is configured at all. Nothing is filled
    when a managed identity is the credential: there AZURE_CLIENT_ID conventionally names the
    managed identity (for DefaultAzureCredential), not the app registration graphsync signs in as.
    """

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        self._environ = environ
        #: Key path filled -> the variable it came from.
        self.filled: dict[tuple[str, ...], str] = {}

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        # Required by the base class; this source fills keys inside [identity] in __call__ instead.
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        identity = self.current_state.get("identity", {})
        if not isinstance(identity, Mapping) or "managed_identity_client_id" in identity:
            return {}
        has_credential = any(key in identity for key in CREDENTIAL_KEYS)
        values: dict[str, Any] = {}
        for key, variable in WORKLOAD_VARIABLES.items():
            value = self._environ.get(variable)
            if not value or key in identity or (key == "federated_token_file" and has_credential):
                continue
            values[key] = [value] if key == "tenants" else value
            self.filled[("identity", key)] = variable
        return {"identity": values} if values else {}
