"""How a configuration problem is expressed: ConfigError for the caller, custom pydantic errors for validators.

A model validator can only fail as a whole, at the model's location; the custom error types here carry the keys
involved, so the report (:mod:`graphsync.config.report`) can still name each key and where its value came from.
"""

from collections.abc import Sequence
from typing import TypeAlias

from pydantic import BaseModel
from pydantic_core import PydanticCustomError

# Custom pydantic error types, recognised by the report.
CHOICE_ERROR = "graphsync_choice"
KEY_ERRORS = "graphsync_key_errors"

# A key's location: field names and list indexes, as in pydantic's errors.
Loc: TypeAlias = tuple[str | int, ...]


class ConfigError(Exception):
    """The configuration cannot be used; ``problems`` holds one readable line per problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def dotted(loc: Sequence[str | int]) -> str:
    """A location as the operator writes it: ``jobs[1].every``."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else part
    return text


def require_one(model: BaseModel, keys: tuple[str, ...], what: str, *, required: bool = True) -> None:
    """Fail unless exactly one of ``keys`` is set (or none, when not ``required``)."""
    found = tuple(key for key in keys if getattr(model, key) is not None)
    if len(found) > 1 or (required and not found):
        quantity = "exactly one" if required else "at most one"
        raise PydanticCustomError(
            CHOICE_ERROR,
            "expected {quantity} {what} of {keys}",
            {"quantity": quantity, "what": what, "keys": keys, "found": found},
        )


def key_errors(problems: list[tuple[Loc, str]]) -> PydanticCustomError:
    """One error for problems found by a model validator, each located under the model."""
    summary = "; ".join(f"{dotted(loc)}: {message}" for loc, message in problems)
    return PydanticCustomError(KEY_ERRORS, "{summary}", {"summary": summary, "problems": tuple(problems)})
