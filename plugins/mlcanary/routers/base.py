"""The router interface: apply a split, read it back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class TrafficShiftError(RuntimeError):
    """The split could not be applied, or did not read back as requested."""


@dataclass(frozen=True)
class Split:
    model: str
    baseline_version: str
    canary_version: str | None
    canary_percent: float

    def share(self, version: str) -> float:
        """The percentage of traffic ``version`` receives under this split."""
        canary = self.canary_percent if self.canary_version else 0.0
        if version == self.canary_version:
            return canary
        return 100.0 - canary if version == self.baseline_version else 0.0


class Router(Protocol):
    """Applies traffic splits on a serving platform. Implementations must be idempotent."""

    def get_split(self, model: str) -> Split | None:
        """The split currently in force, as the platform reports it (None if unknown)."""

    def set_split(self, split: Split, rollout_id: str | None) -> None:
        """Apply ``split``. Applying the split already in force changes nothing."""
