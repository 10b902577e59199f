"""The ``mlcanary`` command: the same code as the Airflow tasks, for scripts, CI and debugging.

Exit codes of ``analyze`` and ``guardrails``: 0 PASS, 1 FAIL, 3 INCONCLUSIVE, 4 INVALID; 2 for bad input.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine

from mlcanary import registry, report_page
from mlcanary import replay as replays
from mlcanary.analysis import AnalysisWindow, analyze
from mlcanary.audit import record_checks
from mlcanary.guardrails import evaluate_guardrails
from mlcanary.metrics import change, difference
from mlcanary.plan import MetricPlan, plan
from mlcanary.preflight import check_warehouse
from mlcanary.report import format_report, format_table, recent_rollouts, rollout_report
from mlcanary.routers.base import Split
from mlcanary.routers.warehouse import WarehouseRouter
from mlcanary.simulator import FAULT_KINDS, Fault, LiveSimulator, SimConfig, simulate_batch
from mlcanary.sources import MetricSourceError, source_for
from mlcanary.spec import VERSION_PATTERN, RolloutSpec, SpecError, load_spec, parse_duration, spec_files
from mlcanary.verdict import CheckResult, Verdict
from mlcanary.warehouse.engine import make_engine, naive_utc, utcnow
from mlcanary.warehouse.schema import create_schema
from mlcanary.words import took

EXIT_CODES = {Verdict.PASS: 0, Verdict.FAIL: 1, Verdict.INCONCLUSIVE: 3, Verdict.INVALID: 4}


class UsageError(Exception):
    pass


def _time(text: str) -> datetime:
    try:
        return naive_utc(datetime.fromisoformat(text.replace("Z", "+00:00")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time (e.g. 2026-11-26T12:00:00Z)") from None


def _seconds(text: str) -> float:
    value = parse_duration(text)
    if hasattr(value, "total_seconds"):
        return value.total_seconds()
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 30s, 5m, 1h)") from None


def _split_percent(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < 100:  # also rejects NaN
        raise argparse.ArgumentTypeError(f"{text!r} is not a percentage strictly between 0 and 100")
    return value


def _fault(text: str) -> Fault:
    try:
        return Fault.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _warehouse(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--warehouse",
        default=os.environ.get("MLCANARY_WAREHOUSE"),
        help="SQLAlchemy URL of the warehouse, e.g. sqlite:///warehouse.db or "
        "postgresql://user@host/db (default: $MLCANARY_WAREHOUSE)",
    )


def _engine(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    if not args.warehouse:
        raise UsageError("--warehouse is required (or set MLCANARY_WAREHOUSE)")
    return make_engine(args.warehouse)


def _print_checks(checks: list[CheckResult]) -> None:
    rows = [[c.verdict.value, c.check, c.segment, c.reason] for c in checks]
    print(format_table(rows, ["verdict", "check", "segment", "reason"]))


def cmd_analyze(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    if args.end <= args.start:
        raise UsageError("--end must be after --start")
    window = AnalysisWindow(args.start, args.end, args.label_asof or utcnow())
    engine = _engine(args)
    with engine.connect() as conn:
        result = analyze(conn, spec, args.baseline_version, args.canary_version, window)
    if args.record:
        with engine.begin() as conn:
            record_checks(
                conn,
                result.checks,
                model=spec.model,
                rollout_id=args.rollout_id,
                stage=None,
                baseline_version=args.baseline_version,
                canary_version=args.canary_version,
            )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(
            f"{spec.model}: {args.baseline_version} vs {args.canary_version}, "
            f"rows in [{window.start}, {window.end}), labels as of {window.label_asof}"
        )
        _print_checks(result.checks)
        for flag in result.flags:
            print(f"flag: {flag}")
        print(f"\nverdict: {result.verdict.value}: {result.reason}")
    return EXIT_CODES[result.verdict]


def cmd_guardrails(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    at = args.at or utcnow()
    prometheus = spec.guardrails.source.kind == "prometheus"
    if prometheus and not args.prometheus_url:
        raise UsageError(
            f"{args.spec}: the guardrails read Prometheus: give --prometheus-url (or MLCANARY_PROMETHEUS_URL)"
        )
    source = source_for(spec, None if prometheus else _engine(args), args.prometheus_url)
    try:
        result = evaluate_guardrails(
            source, spec, args.canary_version, at, args.baseline_version, canary_percent=args.canary_percent
        )
    except MetricSourceError as exc:
        raise UsageError(f"cannot read the guardrail metrics: {exc}") from None
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(f"{spec.model}: canary {args.canary_version} in [{result.window_start}, {result.window_end})")
        _print_checks(result.checks)
        print(f"\nverdict: {result.verdict.value}: {result.reason}")
    return EXIT_CODES[result.verdict]


def cmd_simulate(args: argparse.Namespace) -> int:
    engine = _engine(args)
    create_schema(engine)
    config = SimConfig(
        model=args.model,
        base_ctr=args.base_ctr,
        error_rate=args.error_rate,
        seed=args.seed,
        faults=args.fault,
        label_delay=timedelta(seconds=args.label_delay),
    )
    say = (lambda _msg: None) if args.json else (lambda msg: print(msg, flush=True))
    if args.mode == "batch":
        if not (args.start and args.end and args.canary_version):
            raise UsageError("batch mode needs --start, --end, --baseline-version and --canary-version")
        split = Split(args.model, args.baseline_version, args.canary_version, args.canary_percent)
        n = simulate_batch(
            engine, config, args.start, args.end, args.rate, split, labels_asof=args.labels_asof, progress=say
        )
        summary: dict[str, Any] = {"mode": "batch", "rows": n}
    else:
        router = WarehouseRouter(engine)
        if router.get_split(args.model) is None:
            router.set_split(Split(args.model, args.baseline_version, None, 0.0), None)
            say(f"routing table: {args.model} → {args.baseline_version} 100 %")
        sim = LiveSimulator(engine, config, args.rate, tick=args.tick)
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends a live run normally
            sim.run(args.duration, progress=say)
        summary = {"mode": "live", "rows": sim.rows_written, "labels": sim.labels_written}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"wrote {summary['rows']:,} prediction rows")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    if args.html and not args.rollout:
        raise UsageError("--html writes one rollout's page: name it with --rollout ID")
    with _engine(args).connect() as conn:
        if args.html:
            data = report_page.load(conn, args.rollout)
            if data is None:
                raise UsageError(f"no rollout {args.rollout!r} in this warehouse (see `mlcanary report`)")
            page = report_page.render(data)
            out = Path(args.html)
            try:
                out.write_text(page, encoding="utf-8")
            except OSError as exc:
                raise UsageError(f"cannot write {out}: {exc.strerror}") from exc
            print(f"wrote {out} ({len(page.encode()) / 1024:,.0f} KB): open it in a browser")
            return 0
        if args.rollout:
            report = rollout_report(conn, args.rollout)
            if report is None:
                raise UsageError(f"no rollout {args.rollout!r} in this warehouse")
            print(json.dumps(report, indent=2) if args.json else format_report(report))
            return 0
        rows = recent_rollouts(conn, args.model, args.limit)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(
            format_table(
                [
                    [
                        r["rollout_id"],
                        r["model"],
                        r["canary_version"],
                        r["stage_reached"],
                        r["status"],
                        (r["reason"] or "")[:100],
                    ]
                    for r in rows
                ],
                ["rollout", "model", "candidate", "stage", "status", "reason"],
            )
        )
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    """Re-run a rollout's decisions on recorded data under a spec; nothing is written, no traffic moves."""
    spec = load_spec(args.spec)
    engine = _engine(args)
    say = (lambda _msg: None) if args.json else (lambda msg: print(f"  {msg}", flush=True))
    try:
        if args.all_rollouts:
            return _replay_all(args, spec, engine, say)
        with engine.connect() as conn:
            if args.rollout:
                timeline = replays.recorded_timeline(conn, args.rollout)
            else:
                if not (args.baseline_version and args.canary_version and args.start):
                    raise UsageError(
                        "give --rollout ID, or --baseline-version, --canary-version and --start (and --end), "
                        "or --all-rollouts"
                    )
                end = args.end or utcnow()
                timeline = replays.planned_timeline(spec, args.baseline_version, args.canary_version, args.start, end)
        if timeline.model != spec.model:
            raise UsageError(
                f"{args.rollout} rolled out model {timeline.model!r}, but {args.spec} is for {spec.model!r}"
            )
        result = replays.replay(engine, spec, timeline, progress=say)
    except replays.ReplayError as exc:
        raise UsageError(str(exc)) from None
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print("\n".join(replays.describe(result)))
    return 0


def _replay_all(args: argparse.Namespace, spec: RolloutSpec, engine: Engine, say: Callable[[str], None]) -> int:
    """Every ended rollout of ``--model`` (default: the spec's) replayed under ``spec``, as a table."""
    model = args.model or spec.model
    with engine.connect() as conn:
        ids = replays.recorded_rollouts(conn, model)
        timelines = [replays.recorded_timeline(conn, i) for i in ids]
    if not timelines:
        raise UsageError(f"no ended rollout of {model!r} that moved traffic is recorded in this warehouse")
    results = []
    for i, timeline in enumerate(timelines, 1):
        result = replays.replay(engine, spec, timeline)
        results.append(result)
        say(
            f"{i}/{len(timelines)} {timeline.rollout_id}: recorded {timeline.recorded_status}, "
            f"replayed {result.decision}"
        )
    summary = replays.compare(results)
    if args.json:
        print(json.dumps({"summary": summary, "rollouts": [r.to_dict() for r in results]}, indent=2))
        return 0
    rows = [
        [
            r.timeline.rollout_id or "",
            r.timeline.canary_version,
            r.timeline.recorded_status or "",
            _after(r.timeline.recorded_at, r.timeline.started_at),
            r.decision,
            _after(r.decided_at, r.timeline.started_at),
            r.reason[:90],
        ]
        for r in results
    ]
    print(format_table(rows, ["rollout", "candidate", "recorded", "after", "replayed", "after", "replayed reason"]))
    print(
        f"\n{summary['rollouts']} rollouts of {model} under {spec.name}: {summary['agree']} decided alike; "
        f"{summary['false_rollbacks']} false rollbacks (promoted, replayed rolled back); "
        f"{summary['missed']} missed (rolled back, replayed promoted); "
        f"{summary['undecided']} undecided on the recorded data; {summary['other']} other (asked a person, "
        "or a recorded end that was neither)"
    )
    return 0


def _after(at: datetime | None, start: datetime) -> str:
    return "-" if at is None else took(at - start)


def cmd_plan(args: argparse.Namespace) -> int:
    """Per stage and metric, what the look at the end of the bake resolves with the planned power."""
    spec = load_spec(args.spec)
    try:
        plans = plan(spec, args.rate, args.baseline_ctr, args.power, args.segment_values)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.json:
        print(json.dumps([_plan_dict(p) for p in plans], indent=2))
        return 0
    a = spec.analysis
    kind = f"confidence sequence (n* = {a.sequential_n_star:,})" if a.sequential else "fixed-horizon interval"
    print(
        f"{spec.name}: {args.rate:g} requests/s, baseline CTR {args.baseline_ctr:g}, power {args.power:g}, "
        f"alpha {a.alpha:g}"
        + (f" / {1 + args.segment_values}" if args.segment_values else "")
        + f", {kind}; each stage's last look: label delay {took(a.label_delay)}, window {took(a.window)}"
    )
    rows = [
        [
            str(p.rows.stage),
            f"{p.rows.percent:g} %",
            took(p.rows.bake),
            f"{p.rows.canary:,.0f} / {p.rows.baseline:,.0f}",
            f"{p.metric} ({p.kind})",
            f"{100 * p.tolerance:g} %" if p.relative else f"{p.tolerance:g}",
            *_plan_cells(p),
        ]
        for p in plans
    ]
    header = ["stage", "share", "bake", "canary / baseline rows", "metric", "tolerance", "fails at", "passes at"]
    print(format_table(rows, [*header, "for no change to pass"]))
    print(
        f"fails at: a change at least this bad FAILs with probability {args.power:g}; passes at: a change at least "
        f"this good PASSes with it; the last column: the rows (and this stage's bake) at which no change PASSes "
        f"with it (and a change one tolerance past the limit FAILs). The overall check; a segment has its share "
        f"of the rows."
    )
    return 0


def _plan_cells(p: MetricPlan) -> list[str]:
    if p.fails_at is None or p.passes_at is None:
        return ["-", "-", p.note]
    if p.rows_needed is None:
        needed = "never"
    elif p.bake_needed is None:
        needed = f"{p.rows_needed:,.0f} canary rows: more than the window holds"
    else:
        needed = f"{p.rows_needed:,.0f} canary rows, a bake of {took(p.bake_needed)}"
    shown = change if p.relative else difference
    return [shown(p.fails_at), shown(p.passes_at), needed]


def _plan_dict(p: MetricPlan) -> dict[str, Any]:
    return {
        "stage": p.rows.stage,
        "percent": p.rows.percent,
        "bake_s": p.rows.bake.total_seconds(),
        "canary_rows": p.rows.canary,
        "baseline_rows": p.rows.baseline,
        "metric": p.metric,
        "kind": p.kind,
        "relative": p.relative,
        "tolerance": p.tolerance,
        "se": p.se,
        "fails_at": p.fails_at,
        "passes_at": p.passes_at,
        "rows_needed": p.rows_needed,
        "bake_needed_s": None if p.bake_needed is None else p.bake_needed.total_seconds(),
        "note": p.note,
    }


def cmd_validate(args: argparse.Namespace) -> int:
    paths: list[Path] = []
    for p in map(Path, args.paths):
        paths.extend(spec_files(p) if p.is_dir() else [p])
    bad = 0
    for path in paths:
        try:
            spec = load_spec(path)
            print(f"ok    {path}  (dag {spec.dag_id}, {len(spec.stages)} stages)")
        except SpecError as exc:
            bad += 1
            print(f"error {exc}", file=sys.stderr)
    return 1 if bad else 0


def cmd_check(args: argparse.Namespace) -> int:
    """The pre-flight check ``validate_and_lock`` runs: exit 0 when a rollout may start, 1 when not."""
    spec = load_spec(args.spec)
    engine = _engine(args)
    baseline = args.baseline_version
    if baseline is None and spec.router.kind == "warehouse":  # what the routing table says serves
        with contextlib.suppress(Exception):
            split = WarehouseRouter(engine).get_split(spec.model)
            baseline = split.baseline_version if split else None
    with engine.connect() as conn:
        found = check_warehouse(conn, spec, baseline)
    if args.json:
        print(
            json.dumps(
                {
                    "ok": not found.errors,
                    "baseline_version": baseline,
                    "findings": [f.to_dict() for f in found.findings],
                },
                indent=2,
            )
        )
    else:
        print(found.summary())
        if baseline is None:
            print("(no baseline version given or found in the routing table: its recent rows were not checked)")
    return 1 if found.errors else 0


def cmd_registry(args: argparse.Namespace) -> int:
    engine = _engine(args)
    create_schema(engine, contract=False)
    if args.action == "add":
        if not (args.model and args.version):
            raise UsageError("registry add needs --model and --version")
        if not re.fullmatch(VERSION_PATTERN, args.version):
            raise UsageError(f"--version {args.version!r} is not a version (letters, digits, . _ : + -)")
        try:
            entry = registry.register(engine, args.model, args.version, args.note)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        entries = [entry]
    else:
        with engine.connect() as conn:
            entries = registry.entries(conn, args.model)
    rows = [
        {
            "model": e.model,
            "version": e.version,
            "status": e.status,
            "registered_at": e.registered_at.isoformat(),
            "updated_at": e.updated_at.isoformat(),
            "rollout_id": e.rollout_id,
            "note": e.note,
        }
        for e in entries
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(
            format_table(
                [
                    [r["model"], r["version"], r["status"], r["registered_at"][:19], (r["note"] or "")[:80]]
                    for r in rows
                ],
                ["model", "version", "status", "registered", "note"],
            )
        )
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    create_schema(_engine(args))
    print("warehouse tables are in place")
    return 0


Commands = Any  # argparse's sub-parsers action, which has no public type


def build_parser(extend: Callable[[Commands], None] | None = None) -> argparse.ArgumentParser:
    """The command line; ``extend`` adds commands of a higher layer (``status``, ``abort``)."""
    parser = argparse.ArgumentParser(
        prog="mlcanary", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def versions(p: argparse.ArgumentParser, canary_required: bool = True) -> None:
        p.add_argument("--baseline-version", required=True)
        p.add_argument("--canary-version", required=canary_required)

    p = sub.add_parser("analyze", help="slow ML analysis of a window (baseline vs canary)")
    p.add_argument("--spec", required=True, type=Path)
    _warehouse(p)
    versions(p)
    p.add_argument("--start", required=True, type=_time, help="window start (ISO 8601, UTC if naive)")
    p.add_argument("--end", required=True, type=_time, help="window end, exclusive")
    p.add_argument("--label-asof", type=_time, help="count labels observed by then (default: now)")
    p.add_argument("--record", action="store_true", help="store the measurements in the audit table")
    p.add_argument("--rollout-id", help="with --record: the rollout the measurements belong to")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("guardrails", help="fast guardrails of the canary at a moment")
    p.add_argument("--spec", required=True, type=Path)
    _warehouse(p)
    versions(p)
    p.add_argument("--at", type=_time, help="end of the guardrail window (default: now)")
    p.add_argument(
        "--canary-percent",
        type=_split_percent,
        metavar="P",
        help="the canary's configured share of traffic (0 < P < 100): also check the arms' request counts "
        "in the window against it (sample ratio mismatch, unless the spec sets guardrails.srm: false): "
        "INVALID, exit 4, when the split is off. Without it, no such check",
    )
    p.add_argument(
        "--prometheus-url",
        default=os.environ.get("MLCANARY_PROMETHEUS_URL"),
        help="base URL of Prometheus, for specs whose guardrails read it (default: $MLCANARY_PROMETHEUS_URL)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_guardrails)

    p = sub.add_parser(
        "simulate",
        help="write simulated traffic (live, following the split, or batch)",
        epilog="fault kinds: " + "; ".join(f"{k}: {v}" for k, v in FAULT_KINDS.items()),
    )
    p.add_argument("mode", choices=["live", "batch"])
    _warehouse(p)
    p.add_argument("--model", default="demo-ranker")
    p.add_argument("--rate", type=float, default=200.0, help="requests per second (default 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base-ctr", type=float, default=0.2)
    p.add_argument("--error-rate", type=float, default=0.001, help="baseline share of failed requests")
    p.add_argument("--label-delay", type=_seconds, default=5.0, help="e.g. 5s, 10m (default 5s)")
    p.add_argument(
        "--fault",
        type=_fault,
        action="append",
        default=[],
        help="VERSION:KIND=VALUE[;segment=COL:VAL][;min_percent=P], repeatable",
    )
    p.add_argument("--baseline-version", default="v1")
    p.add_argument("--canary-version")
    p.add_argument("--canary-percent", type=float, default=10.0, help="batch: canary share (default 10)")
    p.add_argument("--start", type=_time, help="batch: first timestamp")
    p.add_argument("--end", type=_time, help="batch: end timestamp, exclusive")
    p.add_argument("--labels-asof", type=_time, help="batch: labels observed by then (default now)")
    p.add_argument("--duration", type=_seconds, help="live: stop after this long (default: Ctrl-C)")
    p.add_argument("--tick", type=_seconds, default=1.0, help="live: write interval (default 1s)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("report", help="a rollout's report, or the list of recent rollouts")
    _warehouse(p)
    p.add_argument("--rollout", help="rollout id (dag_id/run_id); default: list recent rollouts")
    p.add_argument("--model")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--json", action="store_true")
    p.add_argument("--html", metavar="FILE", help="with --rollout: write the report page (plots included) to FILE")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "check",
        help="pre-flight check of the warehouse for a spec (what validate_and_lock runs)",
        description="Tables and columns exist with usable types, timestamps compare right, an index serves the "
        "polls, and the baseline has recent rows. Exit 0: a rollout may start; 1: it would be refused.",
    )
    p.add_argument("--spec", required=True, type=Path)
    _warehouse(p)
    p.add_argument("--baseline-version", help="the version serving (default: the warehouse routing table's)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser(
        "replay",
        help="re-run a rollout's decisions on recorded data under a spec (what-if); changes nothing",
        description="Every guardrail poll and analysis look at the moment it would have happened, on the rows "
        "the warehouse recorded: per stage when each check first failed, the decision and when. With another "
        "spec: would it have caught that incident, and how soon? With --all-rollouts: how many of the model's "
        "past rollouts it would have decided differently (false rollbacks, missed ones). Nothing is written.",
    )
    p.add_argument("--spec", required=True, type=Path, help="the spec to replay under (the rollout's own, or another)")
    _warehouse(p)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--rollout", help="a recorded rollout (dag_id/run_id): its stages from the traffic history")
    which.add_argument("--all-rollouts", action="store_true", help="every ended rollout of --model that moved traffic")
    p.add_argument("--model", help="with --all-rollouts (default: the spec's model)")
    p.add_argument("--baseline-version", help="without --rollout: the baseline")
    p.add_argument("--canary-version", help="without --rollout: the candidate")
    p.add_argument("--start", type=_time, help="without --rollout: when stage 1 began (ISO 8601, UTC if naive)")
    p.add_argument("--end", type=_time, help="without --rollout: no data after this is read (default: now)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser(
        "plan",
        help="power planner: the changes each stage's look can detect at a request rate and baseline CTR",
        description="Per stage and metric: the labelled rows of the look at the end of the bake, the change that "
        "FAILs and the one that PASSes with the planned power, and the rows and bake at which a canary with no "
        "change PASSes with it, from the spec's confidence sequence. Kinds that need the scores' distribution "
        "(auc, precision, recall, calibration, ece, means of the score or error) are listed but not planned.",
    )
    p.add_argument("--spec", required=True, type=Path)
    p.add_argument("--rate", required=True, type=float, help="the model's requests per second (both arms)")
    p.add_argument("--baseline-ctr", required=True, type=float, help="the baseline's rate metric, e.g. 0.05")
    p.add_argument("--power", type=float, default=0.8, help="default 0.8")
    p.add_argument(
        "--segment-values",
        type=int,
        default=0,
        help="segment values compared beside the overall check: Holm tests it at alpha / (1 + this)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("validate", help="validate rollout spec files or folders")
    p.add_argument("paths", nargs="+")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser(
        "registry",
        help="candidates for scheduled rollouts: add one, or list the registry",
        description="A training pipeline adds each new version as a candidate; a scheduled rollout takes the "
        "newest one. Statuses: candidate, rolling_out, baseline, retired, rejected, failed.",
    )
    p.add_argument("action", choices=["add", "list"])
    _warehouse(p)
    p.add_argument("--model")
    p.add_argument("--version")
    p.add_argument("--note", help="add: a note kept with the candidate (e.g. the training run)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_registry)

    p = sub.add_parser("init", help="create the warehouse tables (idempotent)")
    _warehouse(p)
    p.set_defaults(func=cmd_init)
    if extend is not None:
        extend(sub)
    return parser


def main(argv: Sequence[str] | None = None, extend: Callable[[Commands], None] | None = None) -> int:
    parser = build_parser(extend)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (SpecError, UsageError) as exc:
        print(f"mlcanary {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
