"""JSON for the per-object path (Graph's pages, the working store, snapshot and change lines): orjson's speed with
the standard library's exact results, so what graphsync writes stays byte-identical across versions and hosts.

``json.dumps(obj, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()`` is the canonical form (a
snapshot's lines, compared as bytes by every replica). orjson with ``OPT_SORT_KEYS`` gives the same bytes for
strings (every code point, the same escapes), integers within 64 bits, booleans, null, and key order (UTF-8
byte order is code-point order) -- but not for floats: it writes 1e-05 as ``0.00001`` and 1e-07 as ``1e-7``.
And ``orjson.loads`` turns an integer beyond 64 bits into a float, and refuses what ``json.loads`` accepts
(``NaN``, a lone surrogate, a leading BOM). So:

- :func:`loads` parses with orjson, and again with :mod:`json` when orjson refuses the text or the result holds a
  float (a float, or an integer orjson could not keep exact): the result always equals ``json.loads``'.
- :func:`dumps` encodes with orjson unless the value holds a float (or orjson refuses it): then with :mod:`json`.

Graph's directory objects carry no floats, so the standard library runs only for data that needs it.
``tests/test_jsoncodec.py`` checks both claims against the standard library over generated values.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Any

import orjson

_SCALARS = frozenset({str, int, bool, type(None)})  # printed alike by both libraries
_CONTAINERS = frozenset({dict, list})


def loads(data: bytes | str) -> Any:
    """What ``json.loads(data)`` returns."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)  # the standard library's answer: a value, or its own error
    return json.loads(data) if has_float(value) else value


def dumps(value: Any) -> bytes:
    """The canonical bytes of ``value``: ``json.dumps(value, separators=(",", ":"), sort_keys=True,
    ensure_ascii=False).encode()``."""
    if not has_float(value):
        try:
            return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
        except orjson.JSONEncodeError:  # an integer beyond 64 bits, say: the standard library prints it
            pass
    return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()


def has_float(value: Any) -> bool:
    """Whether JSON data ``value`` holds a float anywhere (the one kind the two libraries print differently)."""
    kind = type(value)
    children: Collection[Any]
    if kind is dict:
        children = value.values()
    elif kind is list:
        children = value
    else:
        return kind is float
    kinds = set(map(type, children))
    if kinds <= _SCALARS:
        return False
    if float in kinds:
        return True
    return any(has_float(child) for child in children if type(child) in _CONTAINERS)
