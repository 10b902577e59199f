"""The metric kinds: one estimator each, and the scale each one is shown on."""

from __future__ import annotations

from typing import get_args

import pytest

from mlcanary.metrics import ESTIMATORS, estimator
from mlcanary.spec import MetricKind, MetricSpec


def test_every_kind_a_spec_accepts_has_its_estimator() -> None:
    assert set(ESTIMATORS) == set(get_args(MetricKind))


FIXED_UP = ("auc", "precision", "recall")  # higher is better by definition


@pytest.mark.parametrize(
    ("kind", "higher_is_better"),
    [(k, up) for k in get_args(MetricKind) for up in (True, False) if up or k not in FIXED_UP],
)
def test_the_tolerance_line_lies_on_the_bad_side_of_no_change(kind: str, higher_is_better: bool) -> None:
    est = estimator(MetricSpec(name="m", kind=kind, tolerance=0.05, higher_is_better=higher_is_better))
    line = est.tolerance_line()
    assert line == pytest.approx(est.reference - 0.05 if est.higher_is_better else est.reference + 0.05)
    worse = est.reference - 0.1 if est.higher_is_better else est.reference + 0.1
    assert (worse < line) if est.higher_is_better else (worse > line)  # a point past the line is worse
    if kind in ("calibration", "ece"):
        assert not est.higher_is_better  # whatever the spec says: an error only grows worse
