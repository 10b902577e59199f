"""Warehouse tables (SQLAlchemy Core): the default data contract and mlcanary's own state and audit.

The contract tables (``predictions``, ``resource_metrics``) are what the simulator, the demo and the
tests write; a spec can point mlcanary at other tables and column names instead. The state and audit
tables are always mlcanary's own. :func:`create_schema` is idempotent.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.schema import CreateIndex

from mlcanary.redact import redact


class RedactedText(sa.TypeDecorator[str]):
    """Text with every secret masked on its way in (:func:`mlcanary.redact.redact`): reasons, notes."""

    impl = sa.Text
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: sa.Dialect) -> str | None:
        return None if value is None else redact(value)


metadata = sa.MetaData()

SEGMENT_COLUMNS = ("user_cohort", "device", "region", "city", "trip_type", "time_of_day")
FEATURE_COLUMNS = ("f1", "f2", "f3", "f4", "f5")

_VERSION = sa.String(128)

predictions = sa.Table(
    "predictions",
    metadata,
    sa.Column("request_id", sa.String(64), primary_key=True),
    sa.Column("ts", sa.DateTime, nullable=False),
    sa.Column("model", sa.String(128), nullable=False),
    sa.Column("model_version", _VERSION, nullable=False),
    *(sa.Column(name, sa.String(64)) for name in SEGMENT_COLUMNS),
    *(sa.Column(name, sa.Double) for name in FEATURE_COLUMNS),
    sa.Column("score", sa.Double),
    sa.Column("label", sa.Double),
    sa.Column("label_ts", sa.DateTime),
    sa.Column("latency_ms", sa.Double),
    sa.Column("success", sa.SmallInteger),
    sa.Index("ix_predictions_model_version_ts", "model", "model_version", "ts"),
)

resource_metrics = sa.Table(
    "resource_metrics",
    metadata,
    sa.Column("id", sa.Integer, sa.Sequence("resource_metrics_id_seq"), primary_key=True),
    sa.Column("ts", sa.DateTime, nullable=False),
    sa.Column("model", sa.String(128), nullable=False),
    sa.Column("model_version", _VERSION, nullable=False),
    sa.Column("host", sa.String(128), nullable=False),
    sa.Column("cpu_util", sa.Double),
    sa.Column("mem_util", sa.Double),
    sa.Index("ix_resource_metrics_model_version_ts", "model", "model_version", "ts"),
)

# --- mlcanary's own state and audit ---------------------------------------------------------------

rollouts = sa.Table(
    "mlcanary_rollouts",
    metadata,
    sa.Column("rollout_id", sa.String(250), primary_key=True),
    sa.Column("spec_name", sa.String(63), nullable=False),
    sa.Column("model", sa.String(128), nullable=False),
    sa.Column("baseline_version", _VERSION, nullable=False),
    sa.Column("canary_version", _VERSION, nullable=False),
    sa.Column("dry_run", sa.Boolean, nullable=False, default=False),
    # running | rolling_back | rolled_back | promoted | rollback_failed | split_mismatch (mlcanary.lifecycle)
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("stage_reached", sa.Integer, nullable=False, default=0),
    sa.Column("canary_percent", sa.Double, nullable=False, default=0.0),
    sa.Column("started_at", sa.DateTime, nullable=False),
    sa.Column("ended_at", sa.DateTime),
    sa.Column("reason", RedactedText),
    sa.Column("spec", sa.Text),  # the spec the rollout started with, as JSON: it runs on it to the end
    # The per-model lock: set while the rollout is active, NULL afterwards. UNIQUE admits many NULLs.
    sa.Column("active_model", sa.String(128), unique=True),
)

traffic_split = sa.Table(
    "mlcanary_traffic_split",
    metadata,
    sa.Column("model", sa.String(128), primary_key=True),
    sa.Column("baseline_version", _VERSION, nullable=False),
    sa.Column("canary_version", _VERSION),
    sa.Column("canary_percent", sa.Double, nullable=False, default=0.0),
    sa.Column("rollout_id", sa.String(250)),
    sa.Column("updated_at", sa.DateTime, nullable=False),
)

traffic_history = sa.Table(
    "mlcanary_traffic_history",
    metadata,
    sa.Column("id", sa.Integer, sa.Sequence("mlcanary_traffic_history_id_seq"), primary_key=True),
    sa.Column("model", sa.String(128), nullable=False),
    sa.Column("rollout_id", sa.String(250)),
    sa.Column("baseline_version", _VERSION, nullable=False),
    sa.Column("canary_version", _VERSION),
    sa.Column("from_percent", sa.Double),
    sa.Column("to_percent", sa.Double),  # NULL: the platform could not be read after a failed step
    sa.Column("applied", sa.Boolean, nullable=False),  # False: dry run or no change needed
    sa.Column("note", RedactedText),
    sa.Column("applied_at", sa.DateTime, nullable=False),
)

measurements = sa.Table(
    "mlcanary_measurements",
    metadata,
    sa.Column("id", sa.Integer, sa.Sequence("mlcanary_measurements_id_seq"), primary_key=True),
    sa.Column("rollout_id", sa.String(250), index=True),
    sa.Column("model", sa.String(128), nullable=False),
    sa.Column("tier", sa.String(20), nullable=False),  # guardrail | analysis
    sa.Column("stage", sa.Integer),
    sa.Column("check_name", sa.String(63), nullable=False),
    sa.Column("segment", sa.String(200), nullable=False),  # "*" or "column=value"
    sa.Column("baseline_version", _VERSION),
    sa.Column("canary_version", _VERSION),
    sa.Column("window_start", sa.DateTime),
    sa.Column("window_end", sa.DateTime),
    sa.Column("baseline_value", sa.Double),
    sa.Column("canary_value", sa.Double),
    sa.Column("baseline_n", sa.BigInteger),
    sa.Column("canary_n", sa.BigInteger),
    sa.Column("threshold", sa.Double),
    sa.Column("ci_low", sa.Double),
    sa.Column("ci_high", sa.Double),
    sa.Column("verdict", sa.String(16), nullable=False),
    sa.Column("reason", RedactedText, nullable=False),
    sa.Column("measured_at", sa.DateTime, nullable=False),
    sa.Column("histogram", sa.Text),  # drift checks: JSON {"baseline": [...], "canary": [...]}, counts per bin
)

decisions = sa.Table(
    "mlcanary_decisions",
    metadata,
    sa.Column("id", sa.Integer, sa.Sequence("mlcanary_decisions_id_seq"), primary_key=True),
    sa.Column("rollout_id", sa.String(250), index=True),
    sa.Column("model", sa.String(128), nullable=False),
    sa.Column("stage", sa.Integer),
    sa.Column("action", sa.String(20), nullable=False),  # start | advance | confirm | extend | ask | rollback | ...
    sa.Column("verdict", sa.String(16)),
    sa.Column("reason", RedactedText, nullable=False),
    sa.Column("decided_at", sa.DateTime, nullable=False),
    # Makes a decision idempotent: a retried task that decides the same thing again records nothing new.
    sa.Column("decision_key", sa.String(80)),
    sa.Index("ux_decisions_rollout_key", "rollout_id", "decision_key", unique=True),
)


# Where a long wait stands (a stage's guardrail counters, an analysis' failing looks and extension),
# so a restarted trigger or a retried task goes on from it. One row per rollout and wait.
progress = sa.Table(
    "mlcanary_progress",
    metadata,
    sa.Column("rollout_id", sa.String(250), primary_key=True),
    sa.Column("wait", sa.String(250), primary_key=True),
    sa.Column("state", RedactedText, nullable=False),  # JSON
    sa.Column("updated_at", sa.DateTime, nullable=False),
)


registry = sa.Table(
    "mlcanary_registry",
    metadata,
    sa.Column("model", sa.String(128), primary_key=True),
    sa.Column("version", _VERSION, primary_key=True),
    # candidate -> rolling_out -> baseline (promoted) | rejected (rolled back) | failed; baseline -> retired
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("registered_at", sa.DateTime, nullable=False),
    sa.Column("updated_at", sa.DateTime, nullable=False),
    sa.Column("rollout_id", sa.String(250)),
    sa.Column("note", RedactedText),
)


# The post-hoc analysis of one past window (mlcanary.posthoc): one row per window and pair of versions
# that served in it, replaced when the window is analysed again. The key's versions are never NULL:
# canary_version '' means no canary served (status no_canary), baseline_version '' that the traffic
# history knows of no version serving then (status no_history).
posthoc_results = sa.Table(
    "mlcanary_posthoc_results",
    metadata,
    sa.Column("spec_name", sa.String(63), primary_key=True),
    sa.Column("window_start", sa.DateTime, primary_key=True),
    sa.Column("window_end", sa.DateTime, primary_key=True),
    sa.Column("baseline_version", _VERSION, primary_key=True),
    sa.Column("canary_version", _VERSION, primary_key=True),
    sa.Column("model", sa.String(128), nullable=False),
    sa.Column("status", sa.String(20), nullable=False),  # analysed | no_canary | no_history
    sa.Column("verdict", sa.String(16)),  # PASS | FAIL | INCONCLUSIVE | INVALID; NULL unless analysed
    sa.Column("reason", RedactedText, nullable=False),
    sa.Column("baseline_n", sa.BigInteger),  # labelled rows of each arm in the window (the overall check)
    sa.Column("canary_n", sa.BigInteger),
    sa.Column("checks", RedactedText),  # JSON: the analysis result (mlcanary.analysis.AnalysisResult.to_dict)
    sa.Column("label_asof", sa.DateTime),  # labels observed by then count: window_end + analysis.label_delay
    sa.Column("versions_from", sa.String(10), nullable=False),  # history | params
    sa.Column("spec_hash", sa.String(64), nullable=False),  # of the spec's analysis settings (mlcanary.posthoc)
    sa.Column("run_id", sa.String(250)),  # the Airflow run that computed it
    sa.Column("computed_at", sa.DateTime, nullable=False),
)


def create_schema(engine: Engine, *, contract: bool = True) -> None:
    """Create the state and audit tables, and (``contract=True``) the default contract tables.

    Idempotent: existing tables are kept; columns and indexes that mlcanary's own tables gained
    since they were created are added (all of them nullable, so old rows stay valid).
    """
    own = [rollouts, traffic_split, traffic_history, measurements, decisions, registry, progress, posthoc_results]
    tables = own + ([predictions, resource_metrics] if contract else [])
    metadata.create_all(engine, tables=tables, checkfirst=True)
    _add_missing(engine, own)


def _add_missing(engine: Engine, tables: list[sa.Table]) -> None:
    """Columns and indexes of mlcanary's own tables added since a table was created (any dialect:
    the columns present are read off an empty SELECT, the indexes are created IF NOT EXISTS)."""
    preparer = engine.dialect.identifier_preparer
    with engine.begin() as conn:
        for table in tables:
            present = set(conn.execute(sa.select(sa.text("*")).select_from(table).limit(0)).keys())
            for column in table.columns:
                if column.name not in present:
                    kind = column.type.compile(dialect=engine.dialect)
                    name = preparer.quote(column.name)
                    conn.execute(sa.text(f"ALTER TABLE {preparer.format_table(table)} ADD COLUMN {name} {kind}"))
            for index in table.indexes:
                conn.execute(CreateIndex(index, if_not_exists=True))
