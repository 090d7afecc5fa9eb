"""The token cache's sense of time, injected so tests can run hours of expiries and backoffs in milliseconds."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True)
class Clocks:
    """Every source of time and chance the cache consults.

    ``wall`` dates tokens (their ``expires_on`` is wall-clock seconds); ``monotonic`` times backoffs, so a wall-clock
    step neither stretches nor skips them; ``sleep`` waits (conflict jitter, polling for another replica's token,
    the background write-back); ``uniform`` is the jitter that keeps replicas from retrying in lockstep.
    """

    wall: Callable[[], float] = time.time
    monotonic: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    uniform: Callable[[float, float], float] = random.uniform


SYSTEM_CLOCKS: Final = Clocks()
"""The real clocks, what every cache uses outside tests."""
