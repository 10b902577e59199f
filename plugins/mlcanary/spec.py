"""Rollout spec: the YAML a team writes for one model, validated with pydantic.

A broken spec raises :class:`SpecError`, whose message names the file and the field, e.g.
``include/rollouts/feed.yaml: stages.1.percent: Input should be less than or equal to 100``.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from string import Template
from typing import Annotated, Any, Literal

import yaml
from croniter import croniter
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    field_validator,
    model_validator,
)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
IDENTIFIER = r"^[A-Za-z_][A-Za-z0-9_]*$"
# the whole string: ``$(?!\n)`` refuses the trailing newline Python's ``$`` lets through (JSON Schema too)
VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}$(?!\n)"


def parse_duration(value: Any) -> Any:
    """Accept ``"30s"``, ``"20m"``, ``"1.5h"``, plain seconds, or ISO 8601 (``"PT30S"``)."""
    if isinstance(value, str) and (m := _DURATION.match(value)):
        return timedelta(seconds=float(m.group(1)) * _UNIT_SECONDS[m.group(2)])
    return value


def show_duration(td: timedelta) -> str:
    """``90s`` as ``1.5m``, ``7200s`` as ``2h``: a duration as a spec would write it."""
    seconds = td.total_seconds()
    for unit in ("d", "h", "m"):
        if seconds >= _UNIT_SECONDS[unit] and seconds % (_UNIT_SECONDS[unit] / 4) == 0:
            return f"{seconds / _UNIT_SECONDS[unit]:g}{unit}"
    return f"{seconds:g}s"


Duration = Annotated[
    timedelta,
    BeforeValidator(parse_duration),
    PlainSerializer(lambda td: f"{td.total_seconds():g}s", return_type=str),
]


def _positive(value: timedelta) -> timedelta:
    if value <= timedelta(0):
        raise ValueError("must be longer than 0 s")
    return value


def _not_negative(value: timedelta) -> timedelta:
    if value < timedelta(0):
        raise ValueError("must not be negative")
    return value


PositiveDuration = Annotated[Duration, AfterValidator(_positive)]  # a wait, a period, a timeout
Margin = Annotated[Duration, AfterValidator(_not_negative)]  # an allowance that may be zero
Identifier = Annotated[str, Field(pattern=IDENTIFIER, max_length=63)]
Fraction = Annotated[float, Field(gt=0, lt=1)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PredictionColumns(_Model):
    request_id: Identifier = "request_id"
    ts: Identifier = "ts"
    model: Identifier = "model"
    version: Identifier = "model_version"
    score: Identifier = "score"
    label: Identifier = "label"
    label_ts: Identifier = "label_ts"
    latency_ms: Identifier = "latency_ms"
    success: Identifier = "success"


class ResourceColumns(_Model):
    ts: Identifier = "ts"
    model: Identifier = "model"
    version: Identifier = "model_version"
    host: Identifier = "host"
    cpu: Identifier = "cpu_util"
    memory: Identifier = "mem_util"


class PredictionsTable(_Model):
    table: Identifier = "predictions"
    db_schema: Identifier | None = Field(default=None, alias="schema")
    columns: PredictionColumns = PredictionColumns()


class ResourceTable(_Model):
    table: Identifier = "resource_metrics"
    db_schema: Identifier | None = Field(default=None, alias="schema")
    columns: ResourceColumns = ResourceColumns()


class WarehouseSpec(_Model):
    conn_id: str = "mlcanary_warehouse"
    predictions: PredictionsTable = PredictionsTable()
    resource_metrics: ResourceTable = ResourceTable()


class _RouterBase(_Model):
    conn_id: str | None = None  # the Airflow connection with the platform's address and credentials
    timeout: PositiveDuration = timedelta(seconds=10)  # per request to the platform
    retries: Annotated[int, Field(ge=0, le=10)] = 3  # per request, with exponential backoff
    settle: Margin = timedelta(minutes=5)  # how long a platform may take to show the new split


class WarehouseRouterSpec(_RouterBase):
    """The routing table ``mlcanary_traffic_split`` in the warehouse (the simulator follows it)."""

    kind: Literal["warehouse"] = "warehouse"  # conn_id defaults to the warehouse connection


class WebhookRouterSpec(_RouterBase):
    """Your own traffic service: ``POST`` the split as JSON, ``GET`` it back (see the README).

    The connection holds the URL (host, or the extra ``url``) and the HMAC-SHA256 secret (password).
    """

    kind: Literal["webhook"]


class SageMakerRouterSpec(_RouterBase):
    """Production-variant weights of one SageMaker endpoint; each model version is a variant."""

    kind: Literal["sagemaker"]
    endpoint_name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")]
    variant_name: str = "{version}"  # the variant of a version; {version} is replaced


class KServeRouterSpec(_RouterBase):
    """``canaryTrafficPercent`` of a KServe InferenceService: the latest revision is the canary."""

    kind: Literal["kserve"]
    namespace: Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)] = "default"
    inference_service: Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)]
    storage_uri: str | None = None  # e.g. s3://models/ranker/{version}: the canary's model is deployed too


RouterSpec = Annotated[
    WarehouseRouterSpec | WebhookRouterSpec | SageMakerRouterSpec | KServeRouterSpec, Field(discriminator="kind")
]


class Stage(_Model):
    percent: Annotated[float, Field(gt=0, le=100)]
    bake: PositiveDuration


class PrometheusQueries(_Model):
    """PromQL templates, run as instant queries at the end of each guardrail window.

    ``$model``, ``$version`` and ``$window`` (the window as a PromQL duration, e.g. ``120s``) are
    substituted; the model and version are escaped for a PromQL string. Each query must return one
    number (a scalar, or a vector of one sample); an empty result means no data.
    """

    requests: str  # requests in the window, e.g. sum(increase(requests_total{...}[$window]))
    failures: str  # failed requests in the window
    p99_latency_ms: str | None = None  # e.g. 1000 * histogram_quantile(0.99, sum by (le) (increase(..._bucket[...])))
    latency_buckets: str | None = None  # sum by (le) (increase(..._bucket{...}[$window])), seconds: relative latency
    cpu: str | None = None  # mean CPU utilisation (0-1) of the version's hosts
    memory: str | None = None  # mean memory utilisation (0-1)

    @field_validator("*")
    @classmethod
    def _renders(cls, template: str | None) -> str | None:
        """Rendered now with stand-in values, so a placeholder it cannot fill fails here, not mid-rollout."""
        if template is not None:
            try:
                Template(template).substitute(model="m", version="v", window="60s")
            except KeyError as exc:
                raise ValueError(f"unknown placeholder ${exc.args[0]}: use $model, $version and $window") from None
            except ValueError as exc:  # a lone $ or ${
                raise ValueError(f"{exc}; write $$ for a literal dollar sign") from None
        return template


class MetricSourceSpec(_Model):
    """Where the fast guardrails read their metrics: the warehouse (default) or Prometheus."""

    kind: Literal["warehouse", "prometheus"] = "warehouse"
    conn_id: str | None = None  # prometheus: the Airflow connection with its URL (default prometheus_default)
    timeout: PositiveDuration = timedelta(seconds=10)
    queries: PrometheusQueries | None = None

    @model_validator(mode="after")
    def _queries_for_prometheus(self) -> MetricSourceSpec:
        if self.kind == "prometheus" and self.queries is None:
            raise ValueError("a prometheus source needs queries (PromQL templates for requests and failures)")
        if self.kind == "warehouse" and self.queries is not None:
            raise ValueError("queries apply to a prometheus source only")
        return self

    @property
    def prometheus_conn_id(self) -> str:
        return self.conn_id or "prometheus_default"


class BaselineChecks(_Model):
    """The canary against the baseline arm in the same window (off unless the spec has this section)."""

    error_rate_ratio_max: Annotated[float, Field(gt=1)] | None = 2.0  # canary error rate / baseline's, tested
    p99_latency_ratio_max: Annotated[float, Field(gt=1)] | None = 1.25  # canary P99 / baseline P99, tested
    # An absolute breach the baseline shows too in the same window (a shared outage) holds the stage
    # instead of failing the canary; the relative checks above still fail a canary that is worse.
    excuse_shared_breach: bool = False

    @model_validator(mode="after")
    def _something_to_check(self) -> BaselineChecks:
        if self.error_rate_ratio_max is None and self.p99_latency_ratio_max is None and not self.excuse_shared_breach:
            raise ValueError("baseline checks are all off: remove the section or set a ratio")
        return self


class GuardrailSpec(_Model):
    interval: PositiveDuration = timedelta(seconds=30)
    window: PositiveDuration = timedelta(minutes=2)
    min_requests: Annotated[int, Field(ge=1)] = 100
    success_rate_min: Fraction | None = 0.99
    p99_latency_ms_max: Annotated[float, Field(gt=0)] | None = 500.0
    cpu_max: Fraction | None = 0.90
    memory_max: Fraction | None = 0.95
    # Level of the count tests (error budget, baseline comparisons), per stage, anytime-valid: a stage
    # whose canary sits at its SLO fails with probability <= alpha however many polls it takes (each
    # test on the stage's cumulative counts). Without the stage's start (the command line): per poll.
    alpha: Fraction = 0.01
    # Sample ratio mismatch: the arms' request counts against the split in force (when the caller
    # gives it); a mismatch makes the comparison INVALID and the spec's invalid policy decides.
    srm: bool = True
    srm_alpha: Fraction = 0.001  # level of the anytime-valid multinomial test (GrowthBook's default)
    # ... and how far off the observed share must be, relative to the smaller configured share
    # (0.1: 10 % of 10 % = 1 point): large lopsided splits flag tiny harmless deviations otherwise. 0: off.
    srm_min_deviation: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.1
    consecutive_breaches: Annotated[int, Field(ge=1)] = 1
    no_data_limit: Annotated[int, Field(ge=1)] = 5  # polls in a row without enough data ...
    no_data_policy: Literal["fail", "hold"] = "fail"  # ... then fail the stage, or hold it until the deadline
    error_limit: Annotated[int, Field(ge=1)] = 4  # metric-source errors in a row before failing closed
    deadline_margin: Margin = timedelta(minutes=10)
    source: MetricSourceSpec = MetricSourceSpec()
    baseline: BaselineChecks | None = None

    @model_validator(mode="after")
    def _window_covers_interval(self) -> GuardrailSpec:
        if self.window < self.interval:
            raise ValueError("window must be at least one interval long")
        q = self.source.queries
        if q is not None:
            for name, limit in (
                ("p99_latency_ms", self.p99_latency_ms_max),
                ("cpu", self.cpu_max),
                ("memory", self.memory_max),
            ):
                if limit is not None and getattr(q, name) is None:
                    raise ValueError(f"source.queries.{name} is needed for the {name} limit (or set the limit to null)")
            if self.baseline and self.baseline.p99_latency_ratio_max is not None:
                missing = [n for n in ("p99_latency_ms", "latency_buckets") if getattr(q, n) is None]
                if missing:
                    raise ValueError(
                        f"baseline.p99_latency_ratio_max with a prometheus source needs source.queries.{missing[0]}"
                    )
        return self


MetricKind = Literal["rate", "mean", "auc", "precision", "recall", "calibration", "ece"]


class MetricSpec(_Model):
    """One comparison of canary against baseline, per segment.

    ``tolerance`` is relative for ``rate``, ``mean``, ``precision`` and ``recall`` (0.05: the canary
    may be 5 % worse) and absolute for ``auc`` (a drop in AUC), ``calibration`` (growth of
    |mean score - mean label|) and ``ece`` (growth of the expected calibration error).

    - ``rate``: mean of the 0/1 label (CTR, conversion);
    - ``mean``: mean of ``value`` (``abs_error`` = |score - label|, the error of a regressor);
    - ``precision`` / ``recall``: at the decision ``threshold`` on the score;
    - ``auc``: from score-quantile bins with the unpaired DeLong variance;
    - ``calibration``: calibration-in-the-large; ``ece``: expected calibration error, equal-mass bins.
    """

    name: Identifier
    kind: MetricKind = "rate"
    value: Literal["label", "score", "abs_error", "squared_error"] = "label"
    tolerance: Annotated[float, Field(gt=0, lt=1)]
    threshold: Fraction = 0.5
    higher_is_better: bool = True
    critical: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> MetricSpec:
        if self.kind == "rate" and self.value != "label":
            raise ValueError("a rate metric is the mean of the 0/1 label: value must be 'label'")
        if self.kind != "mean" and self.value != "label":
            raise ValueError(f"value applies to kind 'mean' only, not {self.kind!r}")
        if self.kind in ("auc", "precision", "recall") and not self.higher_is_better:
            raise ValueError(f"{self.kind} is higher-is-better by definition")
        return self


class CriticalSegment(_Model):
    column: Identifier
    value: str
    tolerance: Fraction


class DriftSpec(_Model):
    """Distribution drift between the arms. Input drift means the split is biased: INVALID."""

    features: list[Identifier] = []
    bins: Annotated[int, Field(ge=2, le=100)] = 10
    input_threshold: Annotated[float, Field(gt=0)] = 0.2  # PSI or KL above it: comparison invalid
    output: Literal["off", "report", "fail"] = "report"  # drift of the score between the arms
    output_threshold: Annotated[float, Field(gt=0)] = 0.2


class AnalysisSpec(_Model):
    interval: PositiveDuration = timedelta(minutes=20)
    window: PositiveDuration = timedelta(minutes=20)
    label_delay: Margin = timedelta(minutes=5)
    alpha: Fraction = 0.05
    min_samples: Annotated[int, Field(ge=1)] = 1000
    sequential: bool = True  # anytime-valid confidence sequences: looking often costs no false alarms
    sequential_n_star: Annotated[int, Field(ge=10)] = 10000  # canary samples where they are tightest
    correction: Literal["holm", "bh", "none"] = "holm"  # across the segments of each metric
    consecutive_fails: Annotated[int, Field(ge=1)] = 1  # failing looks in a row before FAIL
    # What a stage before the last needs from its gate look after the bake: PASS only, or PASS or
    # INCONCLUSIVE. Under ``pass`` a stage that is not yet PASS looks again every interval, up to
    # ``policies.max_extension``, then rolls back. (The last stage is decided by ``policies``.)
    advance_on: Literal["pass", "pass_or_inconclusive"] = "pass_or_inconclusive"
    # Each stage's bake must leave at least this much label-complete traffic of its own to look at:
    # bake >= label_delay + min_label_window, unless ``allow_short_bakes`` (the guardrails alone gate
    # such a stage; its analysis sees only what earlier stages left).
    min_label_window: Margin = timedelta(minutes=5)
    allow_short_bakes: bool = False
    score_bins: Annotated[int, Field(ge=20, le=1000)] = 100
    edge_sample: Annotated[int, Field(ge=1000)] = 50000  # rows the bin edges are taken from
    segments: list[Identifier] = []
    # Per segment column, the most values compared one by one (the most frequent); the rest are one
    # segment, "(other)", so cost and audit rows stay bounded whatever the column's cardinality.
    max_segment_values: Annotated[int, Field(ge=1, le=10_000)] = 50
    critical_segments: list[CriticalSegment] = []
    metrics: Annotated[list[MetricSpec], Field(min_length=1)]
    drift: DriftSpec = DriftSpec()

    @model_validator(mode="after")
    def _window_covers_interval(self) -> AnalysisSpec:
        if self.window < self.interval:
            raise ValueError("window must be at least one interval long")
        return self

    @model_validator(mode="after")
    def _critical_segments_are_segments(self) -> AnalysisSpec:
        for i, seg in enumerate(self.critical_segments):
            if seg.column not in self.segments:
                raise ValueError(f"critical_segments.{i}.column {seg.column!r} is not listed in segments")
        names = [m.name for m in self.metrics]
        if len(names) != len(set(names)):
            raise ValueError("metric names must be unique")
        return self


Policy = Literal["rollback", "extend", "ask"]


class Policies(_Model):
    """What an INCONCLUSIVE or INVALID final analysis leads to.

    ``extend``: look again every analysis interval, up to ``max_extension``, then roll back unless it
    passed. ``ask``: a person chooses Promote, Extend (as ``extend``, then decided automatically) or
    Roll back in Airflow's Required Actions; no answer within ``ask_timeout`` rolls back.
    """

    inconclusive: Policy = "rollback"
    invalid: Policy = "rollback"
    max_extension: Margin = timedelta(minutes=30)
    ask_timeout: PositiveDuration = timedelta(hours=1)

    @property
    def asks(self) -> bool:
        return "ask" in (self.inconclusive, self.invalid)

    def for_verdict(self, invalid: bool) -> Policy:
        """The policy for an INVALID (``invalid``) or an INCONCLUSIVE final verdict."""
        return self.invalid if invalid else self.inconclusive


class ApprovalSpec(_Model):
    """A person approves the last traffic step (Airflow's Approve / Reject); no answer in time rejects."""

    before_final_stage: bool = False
    timeout: PositiveDuration = timedelta(hours=1)
    assignees: list[Annotated[str, Field(min_length=1)]] = []  # Airflow user ids who may answer (and ask decisions)


NotifyEvent = Literal["rollback", "promote", "approval"]


class SlackNotification(_Model):
    conn_id: str = "slack_default"  # an incoming-webhook connection: the webhook URL (or its token) is the password


class EmailNotification(_Model):
    conn_id: str = "smtp_default"
    to: Annotated[list[Annotated[str, Field(pattern=r"^[^@\s]+@[^@\s]+$")]], Field(min_length=1)]
    from_email: str | None = None


class NotificationsSpec(_Model):
    """Messages on a rollback (or a failed one), a promotion, and when a person must decide."""

    slack: SlackNotification | None = None
    email: EmailNotification | None = None
    events: list[NotifyEvent] = ["rollback", "promote", "approval"]

    @property
    def channels(self) -> bool:
        return self.slack is not None or self.email is not None


class MlflowSpec(_Model):
    """On promotion, point an MLflow registered model's alias at the promoted version."""

    conn_id: str = "mlflow_default"  # tracking URI: the extra tracking_uri, or host (+ login/password)
    registered_model: Annotated[str, Field(min_length=1)]
    alias: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,255}$")] = "champion"
    version: str = "{version}"  # the MLflow version number inside a rollout version, e.g. v{version}

    @field_validator("version")
    @classmethod
    def _one_placeholder(cls, value: str) -> str:
        if value.count("{version}") != 1:
            raise ValueError("must contain {version} once")
        return value


class RegistrySpec(_Model):
    mlflow: MlflowSpec | None = None


class TaskRetries(_Model):
    """Airflow retries of the tasks that talk to the router (each request is retried by the router too)."""

    traffic: Annotated[int, Field(ge=0, le=10)] = 3  # shift_traffic and promote
    rollback: Annotated[int, Field(ge=1, le=20)] = 5  # the rollback teardown, waiting twice as long each time
    delay: PositiveDuration = timedelta(seconds=5)  # before the first retry


# Airflow's cron presets (airflow.sdk.definitions.timetables._cron.CRON_PRESETS); @once is not periodic
CRON_PRESETS = {
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
    "@quarterly": "0 0 1 */3 *",
    "@yearly": "0 0 1 1 *",
}


def _date_as_midnight(value: Any) -> Any:
    if isinstance(value, date) and not isinstance(value, datetime):
        return datetime(value.year, value.month, value.day)
    return value


def _as_utc(value: datetime) -> datetime:
    """A naive time taken as UTC, an aware one converted to UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class PosthocSpec(_Model):
    """The post-hoc DAG ``posthoc__<name>``: the slow analysis of each ``schedule`` interval since
    ``since``, one run per interval (backfillable), for the versions the traffic history says served."""

    schedule: str = "0 * * * *"  # cron, 5 fields, UTC (or a preset such as @hourly): a window between two ticks
    # The DAG's start_date: an ISO date or time, naive ones in UTC. Backfills may reach back before it.
    since: Annotated[datetime, BeforeValidator(_date_as_midnight), AfterValidator(_as_utc)]

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str) -> str:
        expression = CRON_PRESETS.get(value.strip(), value.strip())
        if len(expression.split()) != 5 or not croniter.is_valid(expression):
            raise ValueError(
                f"{value!r} is not a cron expression of 5 fields (minute hour day month weekday) "
                f"or one of {', '.join(CRON_PRESETS)}"
            )
        return expression


class RolloutSpec(_Model):
    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,62}$")]
    model: Annotated[str, Field(min_length=1, max_length=128)]
    description: str = ""
    owner: str = "mlcanary"
    schedule: str | None = None
    tags: list[str] = []
    warehouse: WarehouseSpec = WarehouseSpec()
    router: RouterSpec = WarehouseRouterSpec()
    stages: Annotated[list[Stage], Field(min_length=1)]
    guardrails: GuardrailSpec = GuardrailSpec()
    analysis: AnalysisSpec
    policies: Policies = Policies()
    approval: ApprovalSpec = ApprovalSpec()
    notifications: NotificationsSpec = NotificationsSpec()
    registry: RegistrySpec = RegistrySpec()
    retries: TaskRetries = TaskRetries()
    posthoc: PosthocSpec | None = None  # the post-hoc analysis DAG; none without this section

    @field_validator("stages")
    @classmethod
    def _stages_increase(cls, stages: list[Stage]) -> list[Stage]:
        for i in range(1, len(stages)):
            if stages[i].percent <= stages[i - 1].percent:
                raise ValueError(
                    f"stage {i} percent {stages[i].percent:g} must be above "
                    f"stage {i - 1} percent {stages[i - 1].percent:g}"
                )
        return stages

    @model_validator(mode="after")
    def _whole_percentages_for_kserve(self) -> RolloutSpec:
        if self.router.kind == "kserve":
            for i, stage in enumerate(self.stages):
                if stage.percent != int(stage.percent):
                    raise ValueError(f"stages.{i}.percent {stage.percent:g}: KServe takes whole percentages")
        return self

    @model_validator(mode="after")
    def _bakes_see_labels(self) -> RolloutSpec:
        a = self.analysis
        if a.allow_short_bakes:
            return self
        need = a.label_delay + a.min_label_window
        short = [f"stages.{i}.bake {show_duration(s.bake)}" for i, s in enumerate(self.stages) if s.bake < need]
        if short:
            raise ValueError(
                f"{', '.join(short)} shorter than analysis.label_delay {show_duration(a.label_delay)} + "
                f"analysis.min_label_window {show_duration(a.min_label_window)}: the analysis could never see "
                "label-complete rows of that stage's own traffic; bake longer, or set analysis.allow_short_bakes: "
                "true to let the guardrails alone gate it"
            )
        return self

    @property
    def dag_id(self) -> str:
        return f"rollout__{self.name}"

    @property
    def posthoc_dag_id(self) -> str:
        return f"posthoc__{self.name}"

    @property
    def router_conn_id(self) -> str:
        """The router's connection: its own, else the usual one of its kind (the warehouse's for the table)."""
        defaults = {"webhook": "mlcanary_router", "sagemaker": "aws_default", "kserve": "kubernetes_default"}
        return self.router.conn_id or defaults.get(self.router.kind, self.warehouse.conn_id)


class SpecError(ValueError):
    """A spec that cannot be used; the message names the file and each bad field."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__("\n".join(f"{source}: {p}" for p in problems))


def _field_path(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def _problem(error: Any) -> str:
    """``field.path: message``; a check across fields names its fields in its message."""
    if not error["loc"] and error["type"] == "value_error":
        return str(error["msg"]).removeprefix("Value error, ")
    return f"{_field_path(error['loc'])}: {error['msg']}"


def parse_spec(data: Any, source: str = "<spec>") -> RolloutSpec:
    """Validate a spec already loaded from YAML or JSON."""
    if not isinstance(data, dict):
        raise SpecError(source, [f"(top level): expected a mapping, got {type(data).__name__}"])
    try:
        return RolloutSpec.model_validate(data)
    except ValidationError as exc:
        problems = [_problem(e) for e in exc.errors()]
        raise SpecError(source, problems) from None


def load_spec(path: str | Path) -> RolloutSpec:
    """Read and validate one YAML spec file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise SpecError(str(path), [f"cannot read: {exc.strerror}"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "YAML"
        raise SpecError(str(path), [f"{where}: {getattr(exc, 'problem', exc)}"]) from None
    return parse_spec(data, str(path))


def spec_files(directory: str | Path) -> list[Path]:
    """The spec files of a folder, in a stable order."""
    directory = Path(directory)
    return sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")])


def load_specs(directory: str | Path) -> tuple[list[tuple[Path, RolloutSpec]], list[SpecError]]:
    """Load every spec of a folder; a broken one is returned as an error, never raised."""
    specs: list[tuple[Path, RolloutSpec]] = []
    errors: list[SpecError] = []
    seen: dict[str, Path] = {}
    for path in spec_files(directory):
        try:
            spec = load_spec(path)
        except SpecError as exc:
            errors.append(exc)
            continue
        if spec.name in seen:
            errors.append(SpecError(str(path), [f"name: {spec.name!r} is already used by {seen[spec.name]}"]))
            continue
        seen[spec.name] = path
        specs.append((path, spec))
    return specs, errors
