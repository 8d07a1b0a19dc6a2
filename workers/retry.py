"""Backoff with jitter, shared by task retries and database conflict retries."""

from __future__ import annotations

import random


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with 'equal jitter': half the step is fixed, half is random.

    Attempt 0 waits between base/2 and base; each further attempt doubles that, up to `cap`.
    The random half spreads retries of many tasks that failed together (a gateway outage, a
    deadlock storm) so they do not come back at the same instant.
    """
    step = min(cap, base * (2 ** max(attempt, 0)))
    return step / 2 + (rng or random).uniform(0, step / 2)
