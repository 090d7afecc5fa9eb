"""graphsync.jsoncodec gives exactly the standard library's results, so snapshots stay byte-identical to what
earlier graphsync versions (and other hosts) write: generated values and texts, checked against ``json`` itself."""

from __future__ import annotations

import json
import random
import struct
from typing import Any

import orjson
import pytest

from graphsync.jsoncodec import dumps, has_float, loads


def canonical(value: Any) -> bytes:
    """What graphsync wrote before orjson: the definition of a snapshot line's bytes."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()


# Code points where encoders differ in practice: controls, quote and backslash, DEL, the JavaScript line separators,
# the end of the BMP and beyond it, and letters whose UTF-8 and UTF-16 orders differ (for key order).
SPECIAL = "\x00\x01\x08\t\n\x0c\r\x1f \"'/\\\x7f\x80\xa0é\u2028\u2029\ud7ff\ue000\ufeff\uffff\U00010000\U0001f600"


def _string(rng: random.Random) -> str:
    return "".join(
        rng.choice(SPECIAL) if rng.random() < 0.5 else chr(rng.randrange(0x20, 0x3000))
        for _ in range(rng.randrange(0, 12))
    )


def _float(rng: random.Random) -> float:
    kind = rng.randrange(4)
    if kind == 0:  # any finite double, subnormals included
        while True:
            value: float = struct.unpack("<d", rng.getrandbits(64).to_bytes(8, "little"))[0]
            if value == value and abs(value) != float("inf"):
                return value
    if kind == 1:  # around the exponents where repr switches notation (1e-4, 1e16)
        return rng.uniform(-10, 10) * 10.0 ** rng.randrange(-8, 20)
    if kind == 2:
        return round(rng.uniform(-1000, 1000), rng.randrange(0, 6))
    return rng.choice([0.0, -0.0, 1.0, 1e-5, 1e-7, 0.0001, 1e16, 1e22, 5e-324, 1.7976931348623157e308])


def _value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return _string(rng)
    if kind == 1:
        return rng.choice([0, 1, -1, 2**31, 2**53 + 1, 2**63 - 1, -(2**63), 2**64 - 1, 2**64, -(2**64), 10**30])
    if kind == 2:
        return _float(rng)
    if kind == 3:
        return rng.choice([True, False])
    if kind == 4:
        return None
    if kind == 5:
        return rng.randrange(-1000, 1000)
    if kind == 6:
        return [_value(rng, depth + 1) for _ in range(rng.randrange(0, 5))]
    return {_string(rng): _value(rng, depth + 1) for _ in range(rng.randrange(0, 6))}


@pytest.mark.parametrize("seed", range(2))
def test_dumps_writes_the_standard_librarys_canonical_bytes(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(1500):
        value = {"id": _string(rng), **{_string(rng): _value(rng) for _ in range(rng.randrange(0, 8))}}
        assert dumps(value) == canonical(value), value


def test_orjson_alone_would_change_floats_which_is_why_they_take_the_standard_library() -> None:
    """The reason for the fallback, kept as a fact: if orjson ever prints floats as repr does, this says so."""
    assert orjson.dumps([1e-05, 1e-07]) == b"[0.00001,1e-7]"
    assert canonical([1e-05, 1e-07]) == b"[1e-05,1e-07]"
    assert dumps([1e-05, 1e-07]) == canonical([1e-05, 1e-07])


@pytest.mark.parametrize("seed", range(2))
def test_loads_returns_what_json_loads_returns(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(800):
        value = {"id": _string(rng), "value": [_value(rng) for _ in range(rng.randrange(0, 4))]}
        for text in (canonical(value), json.dumps(value).encode(), json.dumps(value, indent=1)):
            parsed = loads(text)
            assert parsed == json.loads(text)
            assert canonical(parsed) == canonical(json.loads(text))  # same types too: 1 and 1.0, True and 1


@pytest.mark.parametrize(
    "text",
    [
        b'{"n": 123456789012345678901234567890}',  # beyond 64 bits: orjson would make it a float
        b'{"n": 18446744073709551616}',
        b'{"n": 1.0000000000000001, "m": 1E400}',  # 1E400 is inf to json, an error to orjson
        b'{"n": NaN}',
        b'{"s": "\\ud800"}',  # a lone surrogate
        b'\xef\xbb\xbf{"a": 1}',  # a UTF-8 byte order mark
        '{"s": "caf\u00e9"}',
    ],
)
def test_loads_agrees_with_json_where_orjson_alone_would_not(text: bytes | str) -> None:
    parsed, expected = loads(text), json.loads(text)
    assert repr(parsed) == repr(expected)  # repr: NaN != NaN, and the types must match


@pytest.mark.parametrize("text", [b'{"value": [{"id": "x"', b"", b"[1,]", b'{"a" 1}', b"\xff"])
def test_loads_rejects_what_json_rejects_with_a_value_error(text: bytes) -> None:
    with pytest.raises(ValueError):
        json.loads(text)
    with pytest.raises(ValueError):
        loads(text)


def test_has_float_finds_a_float_at_any_depth_and_nothing_else() -> None:
    assert not has_float({"a": "1.5", "b": [1, True, None, {"c": "e-5"}]})
    assert has_float({"a": [{"b": [0.5]}]})
    assert has_float(2.0)
    assert not has_float(2)
