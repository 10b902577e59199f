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
    # rows that break the data's rules, each naming the column, the rule and how many: the
    # comparison is INVALID, never PASS (``success`` holding status codes, latency < 0, CPU in %)
    problems: tuple[str, ...] = ()

    @property
    def success_rate(self) -> float | None:
        return 1 - self.failures / self.requests if self.requests else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "success_rate": self.success_rate}


class MetricSource(Protocol):
    def measure(self, version: str, start: datetime, end: datetime) -> ArmHealth:
        """Requests, failures, P99 latency and mean resource use of ``version`` in ``[start, end)``."""

    def request_counts(self, version: str, start: datetime, end: datetime) -> tuple[int, int]:
        """Requests and failed requests of ``version`` in ``[start, end)`` only (no P99, no resources):
        what the stage-level count tests need over a range as long as the stage."""

    def slower_than(self, version: str, start: datetime, end: datetime, latency_ms: float) -> int:
        """How many of the version's requests in ``[start, end)`` took longer than ``latency_ms``."""
