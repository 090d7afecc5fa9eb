"""Keeps secrets out of every line graphsync writes.

Code that handles a secret (the client secret, an access token) registers it here; the log formatter and the
error printer pass their output through :func:`redact`. A JWT-shaped pattern catches tokens that were never
registered, such as one quoted back in a library's error message.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict

_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*")
_SAS_SIGNATURE = re.compile(r"(\bsig=)[^&\s'\"]+", re.IGNORECASE)
_MAX_REMEMBERED = 512  # a long-running daemon sees a new token per lifetime per tenant; old ones age out

_secrets: OrderedDict[str, None] = OrderedDict()  # tokens: the most recent ones
_permanent: set[str] = set()  # configured credentials: never forgotten, however many tokens come after
_lock = threading.Lock()


def register_secret(value: str | None, *, permanent: bool = False) -> None:
    """Remember ``value`` so that it is replaced by ``[redacted]`` wherever it would be printed.

    ``permanent`` is for configured credentials (a client secret): they must outlive any number of tokens.
    """
    if not value or len(value) < 6:  # a very short "secret" would redact ordinary words
        return
    with _lock:
        if permanent:
            _permanent.add(value)
            return
        _secrets[value] = None
        _secrets.move_to_end(value)
        while len(_secrets) > _MAX_REMEMBERED:
            _secrets.popitem(last=False)


def redact(text: str) -> str:
    with _lock:
        known = [*_permanent, *_secrets]
    for secret in known:
        if secret in text:
            text = text.replace(secret, "[redacted]")
    return _SAS_SIGNATURE.sub(r"\1[redacted]", _JWT.sub("[redacted-jwt]", text))
