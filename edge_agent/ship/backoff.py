"""Exponential backoff with full jitter between failed shipping rounds."""

from __future__ import annotations

import random


class Backoff:
    """Delays of ``uniform(0, min(cap, base * 2**n))`` for the n-th failure.

    Full jitter spreads the retries of many relays hitting the same
    throttled stream; :meth:`reset` after a fully successful round.
    """

    def __init__(
        self, base_s: float, cap_s: float, rng: random.Random | None = None
    ) -> None:
        if base_s <= 0 or cap_s < base_s:
            raise ValueError(
                f"backoff needs 0 < base <= cap, got base={base_s} cap={cap_s}"
            )
        self.base_s = base_s
        self.cap_s = cap_s
        self.failures = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        """Count one more failure and return the seconds to wait."""
        # The exponent is capped so 2**n cannot overflow a float.
        ceiling = min(self.cap_s, self.base_s * 2 ** min(self.failures, 60))
        self.failures += 1
        return self._rng.uniform(0, ceiling)

    def reset(self) -> None:
        """Forget past failures."""
        self.failures = 0
