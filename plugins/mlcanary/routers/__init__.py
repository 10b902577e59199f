"""Traffic routers: where the split between baseline and canary is applied and read back."""

from mlcanary.routers.base import Router, Split, TrafficShiftError

__all__ = ["Router", "Split", "TrafficShiftError"]
