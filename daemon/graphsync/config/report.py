"""The error report: each problem as one line naming the key, where its value came from, and what to do.

Keys are named in dotted form (``jobs[1].every``) with their origin (the TOML file or the environment variable to
edit), so that an operator can fix a daemon that refuses to start without reading a traceback. Values are never
echoed, because several keys hold secrets and startup errors end up in logs.
"""

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import ErrorDetails

from graphsync.config.errors import CHOICE_ERROR, KEY_ERRORS, Loc, dotted
from graphsync.config.models import ENV_PREFIX, Settings
from graphsync.config.sources import WORKLOAD_VARIABLES, is_model, variable_name


def _model_at(loc: Sequence[str | int]) -> type[BaseModel] | None:
    """The model holding the keys under ``loc`` (list indexes step into the list's item model)."""
    model: type[BaseModel] = Settings
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        annotation = field.annotation
        if get_origin(annotation) is list:
            (annotation,) = get_args(annotation)
        if not is_model(annotation):
            return None
        model = annotation
    return model


def _settings_variables(model: type[BaseModel] = Settings, path: tuple[str, ...] = ()) -> list[str]:
    """Every GRAPHSYNC_* variable that sets a key, for "did you mean" suggestions."""
    names: list[str] = []
    for name, field in model.model_fields.items():
        if is_model(field.annotation):
            names += _settings_variables(field.annotation, (*path, name))
        else:
            names.append(variable_name((*path, name)))
    return names


def _closest(word: str, candidates: Sequence[str]) -> str | None:
    return next(iter(difflib.get_close_matches(word, candidates, n=1)), None)


@dataclass(frozen=True)
class Origins:
    """Where each key's value came from, so a problem points at the file or variable to edit."""

    config_file: Path | None
    file_data: Mapping[str, Any]
    variables: Mapping[tuple[str, ...], str]
    workload: Mapping[tuple[str, ...], str]

    def of(self, loc: Loc) -> str:
        """Describe the source of the value at ``loc``, in source precedence order."""
        variable = self._covering(self.variables, loc)
        if variable is not None:
            return f"from env {variable}"
        below = [name for path, name in self.variables.items() if path[: len(loc)] == loc]
        if below:
            return "from env " + ", ".join(below)
        if self._in_file(loc):
            return f"from {self.config_file}"
        variable = self._covering(self.workload, loc)
        if variable is not None:
            return f"from env {variable}"
        return "not set"

    def line(self, loc: Loc, message: str) -> str:
        return f"{dotted(loc)} ({self.of(loc)}): {message}"

    def where_to_set(self, loc: Loc) -> str:
        """Where a missing key can be given: the variable holding its enclosing JSON, or the file and its variable."""
        variable = self._covering(self.variables, loc)
        if variable is not None:
            return f"add it to {variable}"
        hint = f"set {dotted(loc)} in {self._places(loc, '')}"
        if loc[:-1] == ("identity",) and loc[-1] in WORKLOAD_VARIABLES:
            hint += f" (or {WORKLOAD_VARIABLES[str(loc[-1])]} for Azure workload identity)"
        return hint

    def _places(self, loc: Loc, variable_suffix: str) -> str:
        """The config file, and the variable for ``loc`` unless it lies inside a list (no variable reaches that)."""
        places = [str(self.config_file) if self.config_file is not None else "the config file"]
        if all(isinstance(part, str) for part in loc):
            places.append(variable_name([str(part) for part in loc]) + variable_suffix)
        return " or ".join(places)

    def describe(self, error: ErrorDetails) -> list[str]:
        loc = tuple(error["loc"])
        ctx = error.get("ctx", {})
        kind = error["type"]
        if kind == KEY_ERRORS:
            return [self.line((*loc, *inner), message) for inner, message in ctx["problems"]]
        if kind == CHOICE_ERROR:
            return [self._choice(loc, ctx["quantity"], ctx["what"], ctx["keys"], ctx["found"])]
        if kind == "missing":
            return [f"{dotted(loc)} (not set): required; {self.where_to_set(loc)}"]
        if kind == "extra_forbidden":
            return [self.line(loc, "unknown key" + self._suggestion(loc))]
        if kind == "value_error":
            return [self.line(loc, str(ctx["error"]))]
        # pydantic's own messages say what is expected and leave the input out.
        return [self.line(loc, error["msg"])]

    def _choice(self, loc: Loc, quantity: str, what: str, keys: tuple[str, ...], found: tuple[str, ...]) -> str:
        options = ", ".join(dotted((*loc, key)) for key in keys)
        if found:
            conflicting = " and ".join(f"{dotted((*loc, key))} ({self.of((*loc, key))})" for key in found)
            return f"{dotted(loc)}: conflicting keys {conflicting}; set {quantity} {what}: {options}"
        return f"{dotted(loc)} (not set): no {what}; set one of {options} in {self._places(loc, '__<KEY>')}"

    def _suggestion(self, loc: Loc) -> str:
        variable = self.variables.get(tuple(str(part) for part in loc))
        if variable is not None:
            known = [name[len(ENV_PREFIX) :] for name in _settings_variables()]
            match = _closest(variable[len(ENV_PREFIX) :].upper(), known)
            return f"; did you mean {ENV_PREFIX}{match}?" if match else ""
        model = _model_at(loc[:-1])
        match = _closest(str(loc[-1]), list(model.model_fields)) if model is not None else None
        return f"; did you mean {dotted((*loc[:-1], match))}?" if match else ""

    @staticmethod
    def _covering(paths: Mapping[tuple[str, ...], str], loc: Loc) -> str | None:
        """The variable setting ``loc`` or a table or list containing it (the most specific one)."""
        covering = [path for path in paths if loc[: len(path)] == path]
        return paths[max(covering, key=len)] if covering else None

    def _in_file(self, loc: Loc) -> bool:
        node: Any = self.file_data
        for part in loc:
            if isinstance(node, dict):
                if part not in node:
                    return False
            elif isinstance(node, list):
                if not isinstance(part, int) or part >= len(node):
                    return False
            else:  # the problem lies inside a value the file does give
                return True
            node = node[part]
        return bool(loc) and self.config_file is not None
