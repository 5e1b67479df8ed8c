"""Rollout settings of a model job: rate, abort threshold, per-relay timeout.

They map one to one onto CreateJob's ``jobExecutionsRolloutConfig``,
``abortConfig`` and ``timeoutConfig`` (AWS IoT API reference):

* rate: ``max_per_minute`` relays notified per minute (constant), or an
  exponential rate starting at ``base_per_minute`` and multiplied by
  ``increment_factor`` each time ``step_things`` more relays were notified
  (``step_on="notified"``) or succeeded (``step_on="succeeded"``), capped
  by ``max_per_minute``;
* abort: cancel the job once ``abort_percent`` % of the executions that
  finished are of ``abort_on`` (FAILED, REJECTED, TIMED_OUT or ALL), and at
  least ``abort_min_executed`` finished;
* timeout: an execution still IN_PROGRESS after ``timeout_minutes`` becomes
  TIMED_OUT.

Bounds are AWS's: 1..1000 per minute, increment factor 1.1..5, abort
percentage up to 100, timeout 1 minute..7 days.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ABORT_TYPES = ("FAILED", "REJECTED", "TIMED_OUT", "ALL")
STEP_ON = ("notified", "succeeded")
_MAX_TIMEOUT_MINUTES = 7 * 24 * 60


class RolloutSettingsError(ValueError):
    """An invalid rollout setting; names it, the value and the rule."""

    def __init__(self, key: str, value: object, rule: str) -> None:
        super().__init__(f"{key}={value!r}: {rule}")
        self.key = key


@dataclass(frozen=True)
class RolloutSettings:
    """See the module doc; None leaves a setting out (AWS defaults)."""

    max_per_minute: int | None = None
    base_per_minute: int | None = None
    increment_factor: float | None = None
    step_things: int | None = None
    step_on: str = "succeeded"
    abort_percent: float | None = None
    abort_min_executed: int = 1
    abort_on: str = "FAILED"
    timeout_minutes: int | None = None

    def __post_init__(self) -> None:
        for key in ("max_per_minute", "base_per_minute"):
            value = getattr(self, key)
            if value is not None and not 1 <= value <= 1000:
                raise RolloutSettingsError(key, value, "must be 1..1000 per minute")
        exponential = (self.base_per_minute, self.increment_factor, self.step_things)
        if any(v is not None for v in exponential) and None in exponential:
            raise RolloutSettingsError(
                "base_per_minute",
                exponential,
                "an exponential rate needs base_per_minute, increment_factor and "
                "step_things together",
            )
        if self.increment_factor is not None and not (
            1.1 <= self.increment_factor <= 5
        ):
            raise RolloutSettingsError(
                "increment_factor", self.increment_factor, "must be 1.1..5"
            )
        if self.step_things is not None and self.step_things < 1:
            raise RolloutSettingsError("step_things", self.step_things, "must be >= 1")
        if self.step_on not in STEP_ON:
            raise RolloutSettingsError("step_on", self.step_on, f"one of {STEP_ON}")
        if self.abort_percent is not None and not 0 < self.abort_percent <= 100:
            raise RolloutSettingsError(
                "abort_percent", self.abort_percent, "must be in (0, 100]"
            )
        if self.abort_min_executed < 1:
            raise RolloutSettingsError(
                "abort_min_executed", self.abort_min_executed, "must be >= 1"
            )
        if self.abort_on not in ABORT_TYPES:
            raise RolloutSettingsError(
                "abort_on", self.abort_on, f"one of {ABORT_TYPES}"
            )
        if self.timeout_minutes is not None and not (
            1 <= self.timeout_minutes <= _MAX_TIMEOUT_MINUTES
        ):
            raise RolloutSettingsError(
                "timeout_minutes",
                self.timeout_minutes,
                f"must be 1..{_MAX_TIMEOUT_MINUTES} minutes",
            )

    def create_job_arguments(self) -> dict[str, Any]:
        """The CreateJob keyword arguments these settings stand for."""
        args: dict[str, Any] = {}
        rollout: dict[str, Any] = {}
        if self.max_per_minute is not None:
            rollout["maximumPerMinute"] = self.max_per_minute
        if self.base_per_minute is not None:
            key = (
                "numberOfSucceededThings"
                if self.step_on == "succeeded"
                else "numberOfNotifiedThings"
            )
            rollout["exponentialRate"] = {
                "baseRatePerMinute": self.base_per_minute,
                "incrementFactor": self.increment_factor,
                "rateIncreaseCriteria": {key: self.step_things},
            }
        if rollout:
            args["jobExecutionsRolloutConfig"] = rollout
        if self.abort_percent is not None:
            args["abortConfig"] = {
                "criteriaList": [
                    {
                        "failureType": self.abort_on,
                        "action": "CANCEL",
                        "thresholdPercentage": float(self.abort_percent),
                        "minNumberOfExecutedThings": self.abort_min_executed,
                    }
                ]
            }
        if self.timeout_minutes is not None:
            args["timeoutConfig"] = {"inProgressTimeoutInMinutes": self.timeout_minutes}
        return args
