"""MLflow -> polars: one typed row per finished trial of a study (docs/TRACKING.md, schema 1).

The loader reads only what docs/TRACKING.md specifies: trial runs are tagged ``moue.kind = trial`` and
``moue.schema``, children of a parent run tagged ``moue.kind = study``; final metrics are
``final/*``; learning curves have ``step`` = tokens seen.

Param types: a trial run logs its resolved config twice, as one string param per key and as one
typed JSON object in the param ``CONFIG_PARAM`` (``config.json``, not a column of the frame). A
column takes its type from the JSON values when every run that has the param has it there
(ints -> Int64, floats or ints and floats -> Float64, bools -> Boolean, strings -> String,
``null`` -> null; a list, an object or a mix of kinds -> String holding the value's JSON text,
e.g. ``[0.5, 1.0]``). Otherwise (runs logged before ``config.json`` existed) the column's type is
guessed back from the strings: all-int -> Int64, all-number -> Float64, true/false -> Boolean,
otherwise String; ``None``/empty -> null.

A trial is kept when its ``moue.status`` is ``finished`` (other statuses are listed in
``include_statuses`` to keep them) and it has ``final/val_loss``; every other run is counted under
its reason in :attr:`LoadedRuns.excluded`. Runs with a missing or newer ``moue.schema`` are refused,
as are mixed corpora or counting conventions (load one sweep with ``parent_run_id``).
"""

from __future__ import annotations

import json
import re
import types
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from moue.analysis.errors import AnalysisError
from moue.tracking_contract import (CONFIG_PARAM, CURVE_METRICS, DESIGN_TAG, DESIGN_VERDICT_TAG, FINAL_VAL_LOSS,
                                         PARENT_RUN, PARENT_TAGS, SCHEMA, SCHEMA_VERSION, SEED,
                                         STATUS, STATUSES, STOP_REASON, TRIAL_ID,
                                         default_tracking_uri, search_runs)

if TYPE_CHECKING:
    import polars as pl

__all__ = ["SCHEMA_VERSION", "LoadedRuns", "ParentRun", "default_tracking_uri", "load_runs", "with_cooldown_points",
           "study_analysis", "study_laws", "with_mark_points"]

_PARENT_TAGS = (*PARENT_TAGS, DESIGN_TAG, DESIGN_VERDICT_TAG)  # provenance, and an adaptive study's outcome
_INT = re.compile(r"^[+-]?\d+$")


@dataclass(frozen=True, kw_only=True)
class ParentRun:
    """A sweep's parent run: its id, name and the provenance tags of docs/TRACKING.md."""

    run_id: str
    name: str
    tags: Mapping[str, str]


@dataclass(frozen=True, kw_only=True)
class LoadedRuns:
    """The trials of an experiment as a typed polars frame, and what was left out and why."""

    experiment: str
    experiment_id: str
    tracking_uri: str
    frame: pl.DataFrame = field(repr=False)
    excluded: Mapping[str, int]
    parents: tuple[ParentRun, ...]
    curves: pl.DataFrame | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "excluded", types.MappingProxyType(dict(self.excluded)))

    @property
    def n_excluded(self) -> int:
        return sum(self.excluded.values())

    def summary(self) -> str:
        """One line: kept and excluded counts by reason."""
        parts = ", ".join(f"{v} {k}" for k, v in sorted(self.excluded.items()))
        return (f"{self.frame.height} trials loaded from {self.experiment}"
                + (f"; excluded: {parts}" if parts else ""))


def _cast_column(values: Sequence[str | None]):
    """Guess the type of one param column back from its strings (see module docstring)."""
    import polars as pl

    vals = [None if v is None or v == "" or v == "None" else v for v in values]
    present = [v for v in vals if v is not None]
    if not present:
        return pl.Series(vals, dtype=pl.String)
    if all(_INT.match(v) for v in present):
        return pl.Series([None if v is None else int(v) for v in vals], dtype=pl.Int64)
    try:
        floats = [None if v is None else float(v) for v in vals]
        return pl.Series(floats, dtype=pl.Float64)
    except ValueError:
        pass
    if all(v.lower() in ("true", "false") for v in present):
        return pl.Series([None if v is None else v.lower() == "true" for v in vals],
                         dtype=pl.Boolean)
    return pl.Series(vals, dtype=pl.String)


def _kind(value) -> type | None:
    for kind in (bool, int, float, str):  # bool first: a bool is an int
        if isinstance(value, kind):
            return kind
    return None  # a list, an object


def _typed_column(values: Sequence[object]):
    """One param column from the JSON values of ``config.json`` (see module docstring)."""
    import polars as pl

    kinds = {_kind(v) for v in values if v is not None}
    if kinds == {bool}:
        return pl.Series(values, dtype=pl.Boolean)
    if kinds == {int}:
        return pl.Series(values, dtype=pl.Int64)
    if kinds and kinds <= {int, float}:
        return pl.Series([None if v is None else float(v) for v in values], dtype=pl.Float64)
    return pl.Series([v if v is None or isinstance(v, str) else json.dumps(v) for v in values],
                     dtype=pl.String)


def _typed_config(run) -> dict | None:
    """The run's resolved config from ``config.json`` (``None`` for runs logged without it)."""
    raw = run.data.params.get(CONFIG_PARAM)
    if raw is None:
        return None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise AnalysisError(CONFIG_PARAM, raw[:40] + ("..." if len(raw) > 40 else ""),
                            f"of run {run.info.run_id} is not JSON ({e.msg}); it must be the "
                            "trial's config as one JSON object") from None
    if not isinstance(config, dict):
        raise AnalysisError(CONFIG_PARAM, type(config).__name__,
                            f"of run {run.info.run_id} must be a JSON object")
    return config


_UNTYPED = object()  # a run that has a param but no typed value for it


def _param_column(key: str, runs: Sequence, configs: Sequence[dict | None]):
    """The column of param ``key``: typed when every run that has it has a typed value."""
    strings = [r.data.params.get(key) for r in runs]
    typed = [_UNTYPED if c is None or key not in c else c[key] for c in configs]
    if all(t is not _UNTYPED or s is None for t, s in zip(typed, strings)):
        return _typed_column([None if t is _UNTYPED else t for t in typed])
    return _cast_column(strings)


def _search_all(client, experiment_id: str, kind: str, parent_run_id: str | None = None):
    """The runs tagged ``moue.kind = kind`` (children of ``parent_run_id`` when given), oldest
    first; a SQLite store is read with SQL (``_sqlite_runs``: MLflow's ORM builds an object per
    param, tag and metric, 36 s for 10,000 trial runs, against a few seconds), any other through
    MLflow's search."""
    runs = _sqlite_runs(client.tracking_uri, experiment_id, kind, parent_run_id)
    if runs is not None:
        return runs
    flt = f"tags.`moue.kind` = '{kind}'"
    if parent_run_id is not None:
        flt += f" and tags.`mlflow.parentRunId` = '{parent_run_id}'"
    return search_runs(client, experiment_id, flt)


def _sqlite_runs(tracking_uri: str, experiment_id: str, kind: str, parent_run_id: str | None):
    """The active runs of ``experiment_id`` tagged ``moue.kind = kind`` (and child of
    ``parent_run_id``), oldest first, as MLflow's search returns them (``info``: run_id,
    run_name, status, start_time, end_time; ``data``: tags, params, the latest value of each
    metric), read from the SQLite file with read-only queries on MLflow's tables (``runs``,
    ``tags``, ``params``, ``latest_metrics``). ``None`` when the store is not a SQLite file or its
    tables are not as expected: the caller then asks MLflow."""
    import math
    import sqlite3
    from pathlib import Path
    from types import SimpleNamespace

    if not tracking_uri.startswith("sqlite:///"):
        return None
    path = Path(tracking_uri.removeprefix("sqlite:///"))
    if not path.is_file():
        return None
    try:
        con = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    except sqlite3.Error:
        return None
    try:
        match = ("SELECT r.run_uuid FROM runs r JOIN tags k ON k.run_uuid = r.run_uuid AND k.key = 'moue.kind' "
                 "AND k.value = ? WHERE r.experiment_id = ? AND r.lifecycle_stage = 'active'")
        args: list = [kind, int(experiment_id)]
        if parent_run_id is not None:
            match += (" AND r.run_uuid IN (SELECT run_uuid FROM tags WHERE key = 'mlflow.parentRunId' "
                      "AND value = ?)")
            args.append(parent_run_id)
        con.execute("CREATE TEMP TABLE wanted (run_uuid TEXT PRIMARY KEY)")
        con.execute(f"INSERT INTO wanted {match}", args)
        runs = {}
        for rid, name, status, start, end in con.execute(
                "SELECT r.run_uuid, r.name, r.status, r.start_time, r.end_time FROM runs r "
                "JOIN wanted w ON w.run_uuid = r.run_uuid ORDER BY r.start_time ASC, r.run_uuid ASC"):
            runs[rid] = SimpleNamespace(
                info=SimpleNamespace(run_id=rid, run_name=name, status=status, start_time=start, end_time=end),
                data=SimpleNamespace(tags={}, params={}, metrics={}))
        for table in ("tags", "params"):
            for rid, key, value in con.execute(
                    f"SELECT t.run_uuid, t.key, t.value FROM {table} t JOIN wanted w ON w.run_uuid = t.run_uuid"):
                getattr(runs[rid].data, table)[key] = value
        for rid, key, value, is_nan in con.execute(
                "SELECT m.run_uuid, m.key, m.value, m.is_nan FROM latest_metrics m "
                "JOIN wanted w ON w.run_uuid = m.run_uuid"):
            runs[rid].data.metrics[key] = math.nan if is_nan else float(value)
    except (sqlite3.Error, KeyError, ValueError):
        return None
    finally:
        con.close()
    return list(runs.values())


def _schema_of(run) -> int:
    raw = run.data.tags.get(SCHEMA)
    if raw is None or not _INT.match(raw):
        raise AnalysisError(SCHEMA, raw, f"of run {run.info.run_id} is missing or not an "
                            f"integer; this loader reads schema <= {SCHEMA_VERSION}")
    if int(raw) > SCHEMA_VERSION:
        raise AnalysisError(SCHEMA, int(raw), f"of run {run.info.run_id} is newer than "
                            f"this loader ({SCHEMA_VERSION}); upgrade moue to read it")
    return int(raw)


def _experiment(client, experiment: str, tracking_uri: str):
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise AnalysisError("experiment", experiment,
                            f"is not in {tracking_uri}; experiments: {', '.join(names) or 'none'}")
    return exp


def _parents(client, exp, parent_run_id: str | None) -> list:
    """The study runs of the experiment (only ``parent_run_id`` when given), schema-checked."""
    parents = _search_all(client, exp.experiment_id, "study")
    if parent_run_id is not None:
        if parent_run_id not in {p.info.run_id for p in parents}:
            raise AnalysisError("parent_run_id", parent_run_id,
                                f"is not a study run of {exp.name}; parents: "
                                + ", ".join(p.info.run_id for p in parents))
        parents = [p for p in parents if p.info.run_id == parent_run_id]
    for p in parents:
        _schema_of(p)
    return parents


def study_laws(experiment: str, *, tracking_uri: str, parent_run_id: str | None = None) -> tuple[str, ...] | None:
    """The ``[analysis] laws`` of the study that logged ``experiment`` (its latest parent run's
    ``spec.toml``; ``["compute"]`` when the spec names none), or ``None`` when no spec is logged."""
    table = study_analysis(experiment, tracking_uri=tracking_uri, parent_run_id=parent_run_id)
    if table is None:
        return None
    laws = table.get("laws", ["compute"])
    if isinstance(laws, list) and all(isinstance(x, str) for x in laws):
        return tuple(laws)  # empty: the study fits no law (its comparisons are its result)
    return None


def study_analysis(experiment: str, *, tracking_uri: str, parent_run_id: str | None = None) -> dict | None:
    """The ``[analysis]`` table of the study that logged ``experiment`` (its latest parent run's
    ``spec.toml`` with one; ``{}`` when the spec has none), or ``None`` when no spec is logged."""
    import tempfile
    import tomllib
    from pathlib import Path

    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    parents = _parents(client, _experiment(client, experiment, tracking_uri), parent_run_id)
    for p in sorted(parents, key=lambda r: r.info.start_time or 0, reverse=True):
        try:
            with tempfile.TemporaryDirectory() as tmp:
                text = Path(client.download_artifacts(p.info.run_id, "spec.toml", tmp)).read_text()
            table = tomllib.loads(text).get("analysis", {})
        except (OSError, tomllib.TOMLDecodeError, mlflow.exceptions.MlflowException):
            continue
        if isinstance(table, dict):
            return table
    return None


def _keep(trials, include: tuple[str, ...]) -> tuple[list, Counter[str]]:
    """The trials to load, and the others counted by the reason they are left out."""
    excluded: Counter[str] = Counter()
    kept = []
    for run in trials:
        _schema_of(run)
        status = run.data.tags.get(STATUS)
        if status is None:
            excluded["unfinished"] += 1
        elif status not in STATUSES:
            excluded[f"unknown status {status!r}"] += 1
        elif status not in include:
            excluded[status] += 1
        elif run.info.status != "FINISHED":
            excluded["unfinished"] += 1
        elif FINAL_VAL_LOSS not in run.data.metrics:
            excluded["no final metrics"] += 1
        else:
            kept.append(run)
    return kept, excluded


def _trial_frame(kept: Sequence, parent_tags: Mapping[str, Mapping[str, str]]) -> pl.DataFrame:
    """One typed row per trial: ids and tags, every param (not ``config.json``), ``final/*``."""
    import polars as pl

    param_keys = sorted({k for r in kept for k in r.data.params} - {CONFIG_PARAM})
    metric_keys = sorted({k for r in kept for k in r.data.metrics if k.startswith("final/")})
    columns: dict[str, pl.Series] = {
        "run_id": pl.Series([r.info.run_id for r in kept], dtype=pl.String),
        "parent_run_id": pl.Series([r.data.tags.get(PARENT_RUN) for r in kept],
                                   dtype=pl.String),
        "trial_id": pl.Series([r.data.tags.get(TRIAL_ID) for r in kept], dtype=pl.String),
        "status": pl.Series([r.data.tags.get(STATUS) for r in kept], dtype=pl.String),
        "stop_reason": pl.Series([r.data.tags.get(STOP_REASON) for r in kept],
                                 dtype=pl.String),
        "seed": _cast_column([r.data.tags.get(SEED) for r in kept]),
        "corpus_fingerprint": pl.Series(
            [parent_tags.get(r.data.tags.get(PARENT_RUN), {}).get(
                "moue.corpus_fingerprint") for r in kept], dtype=pl.String),
    }
    configs = [_typed_config(r) for r in kept]
    for key in param_keys:
        columns[key] = _param_column(key, kept, configs)
    for key in metric_keys:
        columns[key] = pl.Series([r.data.metrics.get(key) for r in kept], dtype=pl.Float64)
    return pl.DataFrame(columns).sort("run_id")


def _refuse_mixed(frame: pl.DataFrame, experiment: str) -> None:
    for col, what in (("corpus_fingerprint", "corpora"), ("data.corpus", "corpora"),
                      ("count.convention", "counting conventions")):
        if col in frame.columns:
            found = sorted({str(v) for v in frame.get_column(col).to_list() if v is not None})
            if len(found) > 1:
                raise AnalysisError(col, found, f"mixes {what} in {experiment}; load one sweep "
                                    "with --parent RUN_ID (or filter) before fitting")


def load_runs(
    experiment: str,
    *,
    tracking_uri: str,
    parent_run_id: str | None = None,
    curves: bool = False,
    curve_metrics: Iterable[str] = CURVE_METRICS,
    include_statuses: Iterable[str] = ("finished",),
) -> LoadedRuns:
    """Load the trials of ``experiment`` (optionally one sweep: ``parent_run_id``).

    The frame has one row per kept trial: ``run_id``, ``parent_run_id``, ``trial_id``, ``status``,
    ``seed``, ``corpus_fingerprint`` (the parent's tag), every param under its dotted name
    (``model.pool_size``, ``derived.virtual_width``, ...) with its type (from ``config.json``, else
    guessed), and every ``final/*`` metric. ``curves=True`` adds a long frame (``run_id``, ``key``,
    ``step``, ``value``) of ``curve_metrics``, fetched with one bulk request per metric (per 100
    runs), not per run.
    """
    from mlflow import MlflowClient

    include = tuple(include_statuses)
    for s in include:
        if s not in STATUSES:
            raise AnalysisError("include_statuses", s, f"is not one of {', '.join(STATUSES)}")
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = _experiment(client, experiment, tracking_uri)
    parents = _parents(client, exp, parent_run_id)
    kept, excluded = _keep(_search_all(client, exp.experiment_id, "trial", parent_run_id), include)
    frame = _trial_frame(kept, {p.info.run_id: p.data.tags for p in parents})
    _refuse_mixed(frame, experiment)
    curve_frame = None
    if curves:
        curve_frame = _load_curves(client, list(frame.get_column("run_id")), tuple(curve_metrics))
    return LoadedRuns(
        experiment=experiment,
        experiment_id=exp.experiment_id,
        tracking_uri=tracking_uri,
        frame=frame,
        excluded=dict(excluded),
        parents=tuple(ParentRun(run_id=p.info.run_id, name=p.info.run_name or "",
                                tags={k: p.data.tags[k] for k in _PARENT_TAGS if k in p.data.tags})
                      for p in parents),
        curves=curve_frame,
    )


_COOLDOWN = re.compile(r"^final/cooldown/(\d+)/val_loss$")


def with_cooldown_points(frame: pl.DataFrame) -> pl.DataFrame:
    """``frame`` plus one row per cooldown branch of a run (``train.cooldown_at``): a copy of the
    run's row whose ``final/val_loss``, ``final/tokens`` and ``final/flops`` are the branch's, so
    each branch is its own (N, D) point. ``point`` says which (``final``, or ``cooldown@<t>`` for the
    branch forked at ``t`` tokens); ``run_id`` stays the run's, so a bootstrap by run resamples a
    run with its branches. A branch that diverged (NaN loss) is left out. The ``final/cooldown/*``
    columns are dropped. A frame without branches is returned as it is."""
    import polars as pl

    at = sorted({int(m.group(1)) for c in frame.columns if (m := _COOLDOWN.match(c))})
    if not at:
        return frame
    base = frame.drop([c for c in frame.columns if c.startswith("final/cooldown/")])
    parts = [base.with_columns(pl.lit("final").alias("point"))]
    for t in at:
        key = f"final/cooldown/{t}"
        rows = frame.filter(pl.col(f"{key}/val_loss").is_not_null() & pl.col(f"{key}/val_loss").is_not_nan())
        if rows.height == 0:
            continue
        branch = rows.with_columns(pl.col(f"{key}/val_loss").alias(FINAL_VAL_LOSS),
                                   pl.col(f"{key}/tokens").cast(pl.Float64).alias("final/tokens"),
                                   pl.col(f"{key}/flops").cast(pl.Float64).alias("final/flops"))
        parts.append(branch.select(base.columns).with_columns(pl.lit(f"cooldown@{t}").alias("point")))
    return pl.concat(parts, how="vertical_relaxed")


def with_mark_points(frame: pl.DataFrame, curves: pl.DataFrame | None) -> pl.DataFrame:
    """``frame`` plus one row per intermediate mark of a run's ``val/loss`` curve (``curves`` of
    ``load_runs(..., curves=True)``): a copy of the run's row whose ``final/val_loss`` is the mark's,
    ``final/tokens`` its tokens and ``final/flops`` ``derived.flops_per_token`` times them; ``point``
    is ``mark@<t>``. Marks at or beyond the run's final tokens are left out (the final row has
    them); ``run_id`` stays the run's, so a bootstrap by run resamples a run with its marks. These
    are not decayed losses (the LR has not annealed at a mark): a law fitted on them describes
    training curves, not the loss a run of that length would reach."""
    import polars as pl

    need = ("run_id", "final/tokens", "derived.flops_per_token")
    if curves is None or curves.height == 0 or not all(c in frame.columns for c in need):
        return frame
    base = frame if "point" in frame.columns else frame.with_columns(pl.lit("final").alias("point"))
    finals = base.filter(pl.col("point") == "final")
    marks = (curves.filter(pl.col("key") == "val/loss").select("run_id", "step", "value")
             .join(finals.select("run_id", "final/tokens"), on="run_id")
             .filter((pl.col("step") > 0) & (pl.col("step") < pl.col("final/tokens")) & pl.col("value").is_not_nan())
             .drop("final/tokens"))
    if marks.height == 0:
        return base
    rows = finals.join(marks, on="run_id").with_columns(
        pl.col("value").alias(FINAL_VAL_LOSS), pl.col("step").cast(pl.Float64).alias("final/tokens"),
        (pl.col("derived.flops_per_token").cast(pl.Float64) * pl.col("step")).alias("final/flops"),
        pl.format("mark@{}", pl.col("step")).alias("point"))
    return pl.concat([base, rows.select(base.columns)], how="vertical_relaxed")


def _load_curves(client, run_ids: list[str], keys: tuple[str, ...]) -> pl.DataFrame:
    """Metric histories of ``run_ids``: one bulk query per metric and 100 runs.

    Uses the tracking store's ``get_metric_history_bulk_interval`` (SQL and REST stores, MLflow
    >= 2.x) with a per-run limit above any realistic number of marks; falls back to one request
    per run and metric for stores without it.
    """
    import polars as pl

    rows: dict[str, list] = {"run_id": [], "key": [], "step": [], "value": []}
    store = getattr(getattr(client, "_tracking_client", None), "store", None)
    bulk = getattr(store, "get_metric_history_bulk_interval", None)
    for key in keys:
        for lo in range(0, len(run_ids), 100):
            chunk = run_ids[lo:lo + 100]
            try:
                if bulk is None:
                    raise NotImplementedError
                found = [(m.run_id, m) for m in bulk(chunk, key, 1_000_000, None, None)]
            except NotImplementedError:
                found = [(rid, m) for rid in chunk for m in client.get_metric_history(rid, key)]
            for rid, m in found:
                rows["run_id"].append(rid)
                rows["key"].append(key)
                rows["step"].append(int(m.step))
                rows["value"].append(float(m.value))
    return pl.DataFrame(rows, schema={"run_id": pl.String, "key": pl.String, "step": pl.Int64,
                                      "value": pl.Float64}).sort(["key", "run_id", "step"])
