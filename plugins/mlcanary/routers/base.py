"""The router interface: apply a split, read it back."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from mlcanary.redact import redact


class TrafficShiftError(RuntimeError):
    """The split could not be applied, or did not read back as requested."""


@dataclass(frozen=True)
class Split:
    """Who gets which share of a model's traffic. ``owner`` is the rollout that set the split, as the
    platform records it (None: nobody, or the platform cannot say); it does not take part in ``==``."""

    model: str
    baseline_version: str
    canary_version: str | None
    canary_percent: float
    owner: str | None = field(default=None, compare=False)

    def share(self, version: str) -> float:
        """The percentage of traffic ``version`` receives under this split."""
        canary = self.canary_percent if self.canary_version else 0.0
        if version == self.canary_version:
            return canary
        return 100.0 - canary if version == self.baseline_version else 0.0

    def same_traffic(self, other: Split | None, tolerance: float = 0.01) -> bool:
        """Whether ``other`` sends the same share to each of this split's versions.

        Platforms that do not know which version is the baseline (SageMaker weights, say) read a
        finished promotion back as "the candidate alone": the traffic is the same, so this is equal.
        """
        if other is None or other.model != self.model:
            return False
        versions = {self.baseline_version, other.baseline_version} | {
            v for v in (self.canary_version, other.canary_version) if v
        }
        return all(abs(self.share(v) - other.share(v)) <= tolerance for v in versions)


class Router(Protocol):
    """Applies traffic splits on a serving platform. Implementations must be idempotent."""

    def get_split(self, model: str) -> Split | None:
        """The split currently in force, as the platform reports it, with the rollout that set it
        (None: the platform has no split for this model)."""

    def set_split(self, split: Split, rollout_id: str | None) -> None:
        """Apply ``split`` on behalf of ``rollout_id``, and record that rollout as its owner.
        Applying the split already in force changes nothing."""


T = TypeVar("T")


def with_retries(call: Callable[[], T], retries: int, transient: Callable[[BaseException], bool], what: str) -> T:
    """``call``, retried ``retries`` times after transient errors, waiting 0.5, 1, 2 ... s (at most 10 s)."""
    retrying = Retrying(
        stop=stop_after_attempt(retries + 1),
        wait=wait_exponential(multiplier=0.5, max=10),
        retry=retry_if_exception(transient),
        reraise=True,
    )
    try:
        return retrying(call)
    except TrafficShiftError:
        raise
    except Exception as exc:
        attempts = retrying.statistics.get("attempt_number", 1)
        tried = f"after {attempts} attempts" if attempts > 1 else "(not retried: not a transient error)"
        raise TrafficShiftError(redact(f"{what} failed {tried}: {type(exc).__name__}: {exc}")) from exc
