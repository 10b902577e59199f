"""The metric-source interface: one version's health over a window, from wherever it is measured."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, Protocol


class MetricSourceError(RuntimeError):
    """The source could not be read (unreachable, refused, or a malformed answer)."""


@dataclass(frozen=True)
class ArmHealth:
    """What one version looked like in the window."""

    requests: int
    failures: int
    p99_latency_ms: float | None
    resource_samples: int
    cpu: float | None
    memory: float | None

    @property
    def success_rate(self) -> float | None:
        return 1 - self.failures / self.requests if self.requests else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "success_rate": self.success_rate}


class MetricSource(Protocol):
    def measure(self, version: str, start: datetime, end: datetime) -> ArmHealth:
        """Requests, failures, P99 latency and mean resource use of ``version`` in ``[start, end)``."""

    def slower_than(self, version: str, start: datetime, end: datetime, latency_ms: float) -> int:
        """How many of the version's requests in ``[start, end)`` took longer than ``latency_ms``."""


def measure_counts(source: MetricSource, version: str, start: datetime, end: datetime) -> ArmHealth:
    """Only the requests and failures of ``version`` in ``[start, end)`` (the other fields empty): what
    the stage-level count tests need over a range as long as the stage.

    A source may offer ``request_counts(version, start, end) -> (requests, failures)``, which skips
    the P99 and resource means of :meth:`MetricSource.measure` (the warehouse sorts the range's
    latencies for the P99); otherwise this is ``measure``.
    """
    counts = getattr(source, "request_counts", None)
    if counts is None:
        return source.measure(version, start, end)
    requests, failures = counts(version, start, end)
    return ArmHealth(requests, failures, None, 0, None, None)
