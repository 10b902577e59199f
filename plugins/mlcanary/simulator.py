"""Traffic simulator: predictions and resource metrics for a baseline and a canary, with faults.

Live mode follows the routing table (the split the rollout sets) and writes at a given rate;
batch mode writes a historical range at a fixed split. Both are reproducible with a seed and write
the default warehouse contract. Labels arrive after a delay: in live mode they are written later
with an UPDATE, in batch mode a label is present only if it was observed by ``labels_asof``.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from mlcanary.routers.base import Router, Split
from mlcanary.routers.warehouse import WarehouseRouter
from mlcanary.warehouse.engine import utcnow
from mlcanary.warehouse.schema import (
    FEATURE_COLUMNS,
    decisions,
    predictions,
    resource_metrics,
    rollouts,
    traffic_history,
)

FAULT_KINDS = {
    "latency_ms": "add this many ms to every request's latency",
    "error_rate": "fraction of requests that fail",
    "cpu": "CPU utilisation of the version's hosts (0-1)",
    "memory": "memory utilisation of the version's hosts (0-1)",
    "ctr_drop": "relative drop of the click probability (0.3 = 30 % fewer clicks)",
    "recall_drop": "fraction of positives the model scores as negatives",
    "miscalibration": "added to the score's logit (0.85 turns 50 % into 70 %)",
    "input_drift": "shift of feature f1, in standard deviations",
}

SEGMENTS: dict[str, tuple[list[str], list[float]]] = {
    "user_cohort": (["new", "returning", "power"], [0.25, 0.5, 0.25]),
    "device": (["ios", "android", "web"], [0.4, 0.4, 0.2]),
    "region": (["na", "eu", "apac"], [0.4, 0.35, 0.25]),
}
_COHORT_EFFECT = {"new": -0.4, "returning": 0.0, "power": 0.5}


@dataclass(frozen=True)
class Fault:
    """A fault of one version: ``VERSION:KIND=VALUE[;segment=COLUMN:VALUE][;min_percent=P]``.

    ``min_percent`` makes the fault load-dependent: it shows only while the version receives at
    least that share of traffic (a latency fault that appears at the 50 % stage, say).
    """

    version: str
    kind: str
    value: float
    segment: tuple[str, str] | None = None
    min_percent: float = 0.0

    @classmethod
    def parse(cls, text: str) -> Fault:
        try:
            head, *options = text.split(";")
            version, assignment = head.split(":", 1)
            kind, value = assignment.split("=", 1)
            kwargs: dict[str, Any] = {}
            for option in options:
                key, val = option.split("=", 1)
                if key == "segment":
                    column, seg_value = val.split(":", 1)
                    kwargs["segment"] = (column.strip(), seg_value.strip())
                elif key == "min_percent":
                    kwargs["min_percent"] = float(val)
                else:
                    raise ValueError(f"unknown option {key!r}")
            fault = cls(version.strip(), kind.strip(), float(value), **kwargs)
        except ValueError as exc:
            raise ValueError(
                f"bad fault {text!r} ({exc}); expected VERSION:KIND=VALUE[;segment=COL:VAL][;min_percent=P]"
            ) from None
        if fault.kind not in FAULT_KINDS:
            raise ValueError(f"bad fault {text!r}: kind must be one of {', '.join(FAULT_KINDS)}")
        if fault.segment and fault.segment[0] not in SEGMENTS:
            raise ValueError(f"bad fault {text!r}: segment column must be one of {', '.join(SEGMENTS)}")
        return fault


@dataclass
class SimConfig:
    model: str = "demo-ranker"
    base_ctr: float = 0.2
    latency_median_ms: float = 60.0
    error_rate: float = 0.001
    label_delay: timedelta = timedelta(seconds=5)
    hosts_per_version: int = 2
    scrape_interval: float = 2.0  # seconds between resource samples of each host
    seed: int = 0
    faults: list[Fault] = field(default_factory=list)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class TrafficGenerator:
    """Vectorised generator of prediction rows and resource samples."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.rng = np.random.default_rng(config.seed)
        self._base_logit = math.log(config.base_ctr / (1 - config.base_ctr))

    def _faults(self, version: str, share: float) -> list[Fault]:
        return [f for f in self.config.faults if f.version == version and share >= f.min_percent]

    def requests(
        self, version: str, n: int, t0: datetime, t1: datetime, share: float, id_prefix: str
    ) -> dict[str, np.ndarray]:
        """``n`` requests served by ``version`` at times in ``[t0, t1)``, as column arrays."""
        rng, cfg = self.rng, self.config
        span = (t1 - t0).total_seconds()
        offsets = np.sort(rng.uniform(0.0, span, n))
        ts = np.datetime64(t0, "us") + (offsets * 1e6).astype("timedelta64[us]")
        cols: dict[str, np.ndarray] = {
            name: rng.choice(values, size=n, p=probs) for name, (values, probs) in SEGMENTS.items()
        }
        feats = rng.standard_normal((n, len(FEATURE_COLUMNS)))
        faults = self._faults(version, share)

        def scope(f: Fault) -> np.ndarray:
            if f.segment is None:
                return np.ones(n, dtype=bool)
            return cols[f.segment[0]] == f.segment[1]

        for f in faults:
            if f.kind == "input_drift":
                feats[:, 0] += f.value * scope(f)
        cohort = np.vectorize(_COHORT_EFFECT.get, otypes=[float])(cols["user_cohort"])
        logit = self._base_logit + 0.8 * feats[:, 0] + 0.5 * feats[:, 1] - 0.3 * feats[:, 2] + cohort
        p_click = _sigmoid(logit)
        score_logit = logit + rng.normal(0.0, 0.3, n)
        for f in faults:
            if f.kind == "ctr_drop":
                p_click = np.where(scope(f), p_click * (1 - f.value), p_click)
            elif f.kind == "miscalibration":
                score_logit = score_logit + f.value * scope(f)
        label = (rng.uniform(size=n) < p_click).astype(float)
        for f in faults:
            if f.kind == "recall_drop":
                hit = scope(f) & (label == 1) & (rng.uniform(size=n) < f.value)
                score_logit = np.where(hit, score_logit - 4.0, score_logit)
        latency = rng.lognormal(math.log(cfg.latency_median_ms), 0.35, n)
        fail_p = np.full(n, cfg.error_rate)
        for f in faults:
            if f.kind == "latency_ms":
                latency = latency + f.value * scope(f)
            elif f.kind == "error_rate":
                fail_p = np.where(scope(f), f.value, fail_p)
        success = (rng.uniform(size=n) >= fail_p).astype(int)
        delay = cfg.label_delay.total_seconds() * rng.uniform(0.5, 1.0, n)
        label_ts = ts + (delay * 1e6).astype("timedelta64[us]")
        cols.update(
            request_id=np.array([f"{id_prefix}{i}" for i in range(n)], dtype=object),
            ts=ts,
            model_version=np.full(n, version, dtype=object),
            score=_sigmoid(score_logit),
            label=label,
            label_ts=label_ts,
            latency_ms=latency,
            success=success,
        )
        for j, name in enumerate(FEATURE_COLUMNS):
            cols[name] = feats[:, j]
        return cols

    def resources(self, version: str, at: datetime, share: float) -> list[dict[str, Any]]:
        """One CPU / memory sample per host of ``version``."""
        cpu = 0.25 + 0.4 * share / 100
        mem = 0.55
        for f in self._faults(version, share):
            if f.kind == "cpu":
                cpu = f.value
            elif f.kind == "memory":
                mem = f.value
        return [
            dict(
                ts=at,
                model=self.config.model,
                model_version=version,
                host=f"{version}-host-{h}",
                cpu_util=float(np.clip(cpu + self.rng.normal(0, 0.02), 0, 1)),
                mem_util=float(np.clip(mem + self.rng.normal(0, 0.01), 0, 1)),
            )
            for h in range(self.config.hosts_per_version)
        ]


def _rows(cols: dict[str, np.ndarray], model: str, labels_asof: datetime | None) -> list[dict[str, Any]]:
    """Column arrays to insert rows; labels not observed by ``labels_asof`` are NULL."""
    n = len(cols["request_id"])
    names = [k for k in cols if k not in ("ts", "label_ts", "label")]
    ts = cols["ts"].astype("datetime64[us]").tolist()
    label_ts = cols["label_ts"].astype("datetime64[us]").tolist()
    asof = np.datetime64(labels_asof, "us") if labels_asof is not None else None
    seen = (cols["label_ts"] <= asof) if asof is not None else np.zeros(n, dtype=bool)
    label = cols["label"].tolist()
    listed = {k: cols[k].tolist() for k in names}
    out = []
    for i in range(n):
        row = {k: listed[k][i] for k in names}
        row["model"] = model
        row["ts"] = ts[i]
        row["label"] = label[i] if seen[i] else None
        row["label_ts"] = label_ts[i] if seen[i] else None
        out.append(row)
    return out


def simulate_batch(
    engine: Engine,
    config: SimConfig,
    start: datetime,
    end: datetime,
    rate: float,
    split: Split,
    labels_asof: datetime | None = None,
    chunk_seconds: float = 60.0,
    progress: Callable[[str], None] | None = None,
) -> int:
    """Write ``[start, end)`` at ``rate`` requests/s under a fixed ``split``; returns rows written."""
    gen = TrafficGenerator(config)
    return _write_span(engine, gen, split, start, end, rate, labels_asof or utcnow(), "b", chunk_seconds, progress)


def _write_span(
    engine: Engine,
    gen: TrafficGenerator,
    split: Split,
    start: datetime,
    end: datetime,
    rate: float,
    labels_asof: datetime,
    prefix: str,
    chunk_seconds: float = 60.0,
    progress: Callable[[str], None] | None = None,
    before: int = 0,
) -> int:
    """Write ``[start, end)`` chunk by chunk; returns the rows written (``before`` counts in the progress)."""
    total, t, chunk = 0, start, timedelta(seconds=chunk_seconds)
    while t < end:
        t1 = min(t + chunk, end)
        ids = f"{prefix}{gen.config.seed}-{t:%Y%m%d%H%M%S}-"
        total += _write_tick(engine, gen, split, t, t1, rate, labels_asof, ids)[0]
        if progress:
            progress(f"{t1:%Y-%m-%d %H:%M:%S}  {before + total:,} rows")
        t = t1
    return total


@dataclass(frozen=True)
class PastRollout:
    """A rollout that happened, for :func:`simulate_rollout`: its stages' shares and how long each
    held, and how it ended (``rolled_back`` or ``promoted``, with the reason recorded)."""

    rollout_id: str
    spec_name: str
    baseline_version: str
    canary_version: str
    stages: list[tuple[float, timedelta]]  # (canary percent, how long the split held)
    status: str = "rolled_back"
    reason: str = "simulated"


def simulate_rollout(
    engine: Engine,
    config: SimConfig,
    start: datetime,
    rate: float,
    past: PastRollout,
    lead: timedelta = timedelta(minutes=10),
    progress: Callable[[str], None] | None = None,
) -> datetime:
    """Write a past rollout as the warehouse would hold it: ``lead`` of the baseline alone, then each
    stage's traffic at its split, then the baseline alone again (or the candidate, promoted) for
    ``lead``; and its records: the rollout's row, its ``advance`` decisions and traffic history, and
    the end. Labels arrive after the configured delay (all observed by now). Returns the end."""
    gen = TrafficGenerator(config)
    model, base, can = config.model, past.baseline_version, past.canary_version
    promoted = past.status == "promoted"
    labels_asof = utcnow()
    stages = [(Split(model, base, can, pct), held) for pct, held in past.stages]
    after = Split(model, can, None, 0.0) if promoted else Split(model, base, None, 0.0)
    t, total = start - lead, 0
    history: list[dict[str, Any]] = []
    decided = [dict(action="start", stage=None, reason=f"{can} against {base}", decided_at=start, decision_key="start")]
    previous = 0.0
    for number, (split, held) in enumerate([(Split(model, base, None, 0.0), lead), *stages, (after, lead)]):
        if number == len(stages) + 1:  # the end: the rollback or the promotion
            ended, to, action = t, (100.0 if promoted else 0.0), ("promote" if promoted else "rollback")
            history.append(dict(from_percent=previous, to_percent=to, applied_at=t, note=f"{past.status}: simulated"))
            decided.append(
                dict(action=action, stage=len(stages), reason=past.reason, decided_at=t, decision_key=action)
            )
        elif number:
            pct = split.canary_percent
            note = f"stage {number}: canary to {pct:g} %"
            history.append(dict(from_percent=previous, to_percent=pct, applied_at=t, note=note))
            reason = f"traffic to canary {pct:g} %"
            decided.append(
                dict(action="advance", stage=number, reason=reason, decided_at=t, decision_key=f"advance:{number}")
            )
            previous = pct
        total += _write_span(engine, gen, split, t, t + held, rate, labels_asof, "r", progress=progress, before=total)
        t += held
    ours = dict(model=model, rollout_id=past.rollout_id)
    with engine.begin() as conn:
        conn.execute(
            sa.insert(rollouts).values(
                **ours,
                spec_name=past.spec_name,
                baseline_version=base,
                canary_version=can,
                dry_run=False,
                status=past.status,
                stage_reached=len(stages),
                canary_percent=100.0 if promoted else 0.0,
                started_at=start,
                ended_at=ended,
                reason=past.reason,
                active_model=None,
            )
        )
        versions = dict(baseline_version=base, canary_version=can, applied=True)
        conn.execute(sa.insert(traffic_history), [{**ours, **versions, **h} for h in history])
        conn.execute(sa.insert(decisions), [{**ours, "verdict": None, **d} for d in decided])
    return t


def _scrape_times(t0: datetime, t1: datetime, every: float) -> list[datetime]:
    """The scrape moments in ``[t0, t1)``: multiples of ``every`` seconds since the epoch."""
    epoch = datetime(1970, 1, 1)
    first = math.ceil((t0 - epoch).total_seconds() / every)
    last = math.ceil((t1 - epoch).total_seconds() / every)
    return [epoch + timedelta(seconds=k * every) for k in range(first, last)]


def _write_tick(
    engine: Engine,
    gen: TrafficGenerator,
    split: Split,
    t0: datetime,
    t1: datetime,
    rate: float,
    labels_asof: datetime | None,
    id_prefix: str,
) -> tuple[int, list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """Write one slice of traffic; returns the rows written and the labels still to arrive."""
    seconds = (t1 - t0).total_seconds()
    n = int(gen.rng.poisson(rate * seconds))
    canary_pct = split.canary_percent if split.canary_version else 0.0
    n_canary = int(gen.rng.binomial(n, canary_pct / 100)) if canary_pct else 0
    arms = [(split.baseline_version, n - n_canary, 100 - canary_pct)]
    if split.canary_version:
        arms.append((split.canary_version, n_canary, canary_pct))
    rows: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = []
    pending = []
    for version, count, share in arms:
        if share <= 0:
            continue
        if count:
            cols = gen.requests(version, count, t0, t1, share, f"{id_prefix}{version}-")
            rows.extend(_rows(cols, gen.config.model, labels_asof))
            unseen = (
                np.ones(count, dtype=bool)
                if labels_asof is None
                else cols["label_ts"] > np.datetime64(labels_asof, "us")
            )
            pending.append((cols["label_ts"][unseen], cols["request_id"][unseen], cols["label"][unseen]))
        for at in _scrape_times(t0, t1, gen.config.scrape_interval):
            samples.extend(gen.resources(version, at, share))
    with engine.begin() as conn:
        if rows:
            conn.execute(sa.insert(predictions), rows)
        if samples:
            conn.execute(sa.insert(resource_metrics), samples)
    return len(rows), pending


class LiveSimulator:
    """Writes traffic every ``tick`` seconds at the split the routing table currently holds.

    Rows are written without labels; each label is written when its time comes.
    """

    def __init__(
        self, engine: Engine, config: SimConfig, rate: float, tick: float = 1.0, router: Router | None = None
    ) -> None:
        self.engine, self.config, self.rate, self.tick = engine, config, rate, tick
        self.gen = TrafficGenerator(config)
        self.router = router or WarehouseRouter(engine)  # the serving layer follows this router's split
        self.stop_event = threading.Event()
        self.rows_written = 0
        self.labels_written = 0
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._ticks = 0

    def step(self, t0: datetime, t1: datetime, split: Split | None) -> None:
        """Write the traffic of ``[t0, t1)`` routed by ``split`` (None: nothing serves), and the labels
        that have arrived by ``t1``."""
        if split is not None:
            self._ticks += 1
            prefix = f"l{self.config.seed}-{t0:%Y%m%d%H%M%S%f}-{self._ticks}-"
            n, pending = _write_tick(self.engine, self.gen, split, t0, t1, self.rate, None, prefix)
            self.rows_written += n
            self._pending.extend(pending)
        self._deliver_labels(t1)

    def _deliver_labels(self, now: datetime) -> None:
        due_at = np.datetime64(now, "us")
        updates: list[dict[str, Any]] = []
        keep = []
        for label_ts, ids, labels in self._pending:
            due = label_ts <= due_at
            if due.any():
                updates.extend(
                    {"rid": rid, "label": lab, "label_ts": lts}
                    for rid, lab, lts in zip(
                        ids[due].tolist(),
                        labels[due].tolist(),
                        label_ts[due].astype("datetime64[us]").tolist(),
                        strict=True,
                    )
                )
            if (~due).any():
                keep.append((label_ts[~due], ids[~due], labels[~due]))
        self._pending = keep
        if updates:
            stmt = (
                sa.update(predictions)
                .where(predictions.c.request_id == sa.bindparam("rid"))
                .values(label=sa.bindparam("label"), label_ts=sa.bindparam("label_ts"))
            )
            with self.engine.begin() as conn:
                conn.execute(stmt, updates)
            self.labels_written += len(updates)

    def run(self, duration: float | None = None, progress: Callable[[str], None] | None = None) -> None:
        """Run until ``duration`` seconds have passed or :attr:`stop_event` is set."""
        end = time.monotonic() + duration if duration else math.inf
        t0 = utcnow()
        while not self.stop_event.is_set() and time.monotonic() < end:
            # requests are routed as they arrive: a tick's rows follow the split in force when it
            # began, and a change shows from the next tick on (never in rows stamped before it)
            split = self.router.get_split(self.config.model)
            self.stop_event.wait(self.tick)
            t1 = utcnow()
            self.step(t0, t1, split)
            if progress and split is not None:
                progress(
                    f"{t1:%H:%M:%S} {self.rows_written:,} rows, {self.labels_written:,} labels; "
                    f"{split.baseline_version} {split.share(split.baseline_version):g} % / "
                    f"{split.canary_version or '-'} {split.share(split.canary_version or ''):g} %"
                )
            t0 = t1
