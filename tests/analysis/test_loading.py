"""The loader against a real MLflow SQLite store populated as docs/TRACKING.md specifies."""

from __future__ import annotations

import polars as pl
import pytest

from moue.analysis import AnalysisError, load_runs
from moue.analysis.loading import default_tracking_uri


def test_one_typed_row_per_finished_trial(logged_study):
    uri, exp, pid, _ = logged_study
    runs = load_runs(exp, tracking_uri=uri)
    df = runs.frame
    assert df.height == 48
    assert runs.excluded == {"diverged": 2, "failed": 1, "early_stopped": 1, "unfinished": 1}
    assert "48 trials loaded" in runs.summary() and "2 diverged" in runs.summary()
    assert df.schema["model.d_model"] == pl.Int64
    assert df.schema["train.lr"] == pl.Float64
    assert df.schema["train.use_compile"] == pl.Boolean
    assert df.schema["model.router"] == pl.String
    assert df.schema["derived.n_params_active"] == pl.Float64
    assert df.schema["final/val_loss"] == pl.Float64
    assert set(df.get_column("parent_run_id")) == {pid}
    assert set(df.get_column("corpus_fingerprint")) == {"sha256:stdlib-3.11"}
    assert df.get_column("run_id").n_unique() == 48
    assert runs.parents[0].run_id == pid
    assert runs.parents[0].tags["moue.git_sha"] == "0123456789abcdef"
    # the derived virtual width is what the study logged: n_layers * window
    assert (df.get_column("derived.virtual_width")
            == df.get_column("model.n_layers") * df.get_column("model.window")).all()


def test_include_statuses_and_parent_filter(logged_study):
    uri, exp, pid, _ = logged_study
    runs = load_runs(exp, tracking_uri=uri, parent_run_id=pid,
                     include_statuses=("finished", "early_stopped"))
    assert runs.frame.height == 49
    assert "early_stopped" not in runs.excluded
    with pytest.raises(AnalysisError, match="parent_run_id"):
        load_runs(exp, tracking_uri=uri, parent_run_id="nope")
    with pytest.raises(AnalysisError, match="include_statuses"):
        load_runs(exp, tracking_uri=uri, include_statuses=("done",))


def test_curves_in_bulk(logged_study):
    uri, exp, _, _ = logged_study
    runs = load_runs(exp, tracking_uri=uri, curves=True)
    c = runs.curves
    assert set(c.get_column("key")) == {"train/loss", "val/loss"}
    per_run = c.filter(pl.col("key") == "val/loss").group_by("run_id").agg(
        pl.len().alias("n"), pl.col("step").max().alias("last"))
    assert per_run.height == 48 and set(per_run.get_column("n")) == {5}
    joined = per_run.join(runs.frame.select("run_id", "train.tokens"), on="run_id")
    assert (joined.get_column("last") == joined.get_column("train.tokens")).all()


def test_unknown_experiment_and_schema(logged_study, tmp_path):
    uri, exp, _, _ = logged_study
    with pytest.raises(AnalysisError, match=r"experiment \('nope'\) is not in .*vw_study"):
        load_runs("nope", tracking_uri=uri)
    from mlflow import MlflowClient

    other = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=other)
    eid = client.create_experiment("future", artifact_location=f"file://{tmp_path}/a")
    client.create_run(eid, tags={"moue.kind": "trial", "moue.schema": "2"})
    with pytest.raises(AnalysisError, match=r"moue.schema \(2\) .* newer than this loader"):
        load_runs("future", tracking_uri=other)
    eid = client.create_experiment("noschema", artifact_location=f"file://{tmp_path}/b")
    client.create_run(eid, tags={"moue.kind": "trial"})
    with pytest.raises(AnalysisError, match=r"moue.schema \(None\) .* missing"):
        load_runs("noschema", tracking_uri=other)


def test_mixed_corpora_and_conventions_are_refused(tmp_path):
    from study_log import default_trials, log_study

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    trials = default_trials()[:6]
    p1 = log_study(uri, "mixed", trials, artifact_root=str(tmp_path / "a"))
    log_study(uri, "mixed", trials, artifact_root=str(tmp_path / "a"),
              corpus_fingerprint="sha256:other")
    with pytest.raises(AnalysisError, match=r"corpus_fingerprint .* mixes corpora"):
        load_runs("mixed", tracking_uri=uri)
    assert load_runs("mixed", tracking_uri=uri, parent_run_id=p1).frame.height == 6
    log_study(uri, "conv", trials, artifact_root=str(tmp_path / "a"))
    log_study(uri, "conv", trials, artifact_root=str(tmp_path / "a"), convention="6N")
    with pytest.raises(AnalysisError, match=r"count.convention .* mixes counting conventions"):
        load_runs("conv", tracking_uri=uri)


def test_default_tracking_uri_is_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert default_tracking_uri() == f"sqlite:///{tmp_path.resolve()}/moue_runs/mlflow.db"


def test_param_types_come_from_the_typed_config(tmp_path):
    """``config.json`` decides each column's type where the string guess would get it wrong (a
    string param of numeric-looking values, a list) and is not a column itself; the same runs
    logged without it (older runs) fall back to guessing from the strings."""
    from study_log import default_trials, log_study

    uri = f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"
    trials = default_trials()[:6]
    for i, t in enumerate(trials):
        t.params_extra = {"data.shard": f"{i:03d}", "model.balance_depth_weights": [0.5, 1.0],
                          "data.vocab_size": None}
    log_study(uri, "typed", trials, artifact_root=str(tmp_path / "a"), typed_config=True)
    log_study(uri, "guessed", trials, artifact_root=str(tmp_path / "a"))

    typed = load_runs("typed", tracking_uri=uri).frame
    assert "config.json" not in typed.columns
    assert typed.schema["data.shard"] == pl.String
    assert sorted(typed.get_column("data.shard").to_list()) == [f"{i:03d}" for i in range(6)]
    assert typed.schema["model.balance_depth_weights"] == pl.String
    assert set(typed.get_column("model.balance_depth_weights")) == {"[0.5, 1.0]"}
    assert typed.get_column("data.vocab_size").null_count() == 6
    # where the guess is right, the typed config agrees with it
    for col, dtype in (("model.d_model", pl.Int64), ("train.lr", pl.Float64),
                       ("train.use_compile", pl.Boolean), ("model.router", pl.String),
                       ("derived.n_params_active", pl.Float64)):
        assert typed.schema[col] == dtype, col

    guessed = load_runs("guessed", tracking_uri=uri).frame
    assert guessed.schema["data.shard"] == pl.Int64  # "001" read back as the number 1
    assert sorted(guessed.get_column("data.shard").to_list()) == list(range(6))
    assert guessed.drop("data.shard").schema == typed.drop("data.shard").schema


def _both_ways(monkeypatch, **kwargs):
    """``load_runs`` through the SQLite read (the default for a SQLite file) and through MLflow's
    search API (the read turned off)."""
    import moue.analysis.loading as loading

    fast = load_runs(**kwargs)
    calls = []
    real = loading._sqlite_runs
    monkeypatch.setattr(loading, "_sqlite_runs", lambda *a: calls.append(real(*a)) or None)
    slow = load_runs(**kwargs)
    monkeypatch.undo()
    assert calls and all(c is not None for c in calls), "the SQLite read did not answer"
    return fast, slow


def test_the_sqlite_read_returns_what_mlflow_search_does(logged_study, tmp_path, monkeypatch):
    """10,000 runs load in seconds, not a minute (moue bench scale), by reading the SQLite file
    directly: the same frame, exclusions and parents as MLflow's API, also for a deleted run, a
    NaN final metric, a run of another kind and a second parent."""
    import shutil

    from mlflow import MlflowClient

    uri0, exp, pid, _ = logged_study
    db = tmp_path / "copy.db"
    shutil.copy(uri0.removeprefix("sqlite:///"), db)
    uri = f"sqlite:///{db}"
    client = MlflowClient(tracking_uri=uri)
    e = client.get_experiment_by_name(exp)
    runs = sorted(load_runs(exp, tracking_uri=uri).frame.get_column("run_id"))
    client.delete_run(runs[0])  # deleted: left out both ways
    client.log_metric(runs[1], "final/val_loss_extra", float("nan"))  # NaN: is_nan in the table
    other = client.create_run(e.experiment_id, tags={"moue.kind": "note"})  # another kind
    client.set_terminated(other.info.run_id)
    for kwargs in ({}, {"parent_run_id": pid}, {"include_statuses": ("finished", "early_stopped", "diverged")}):
        fast, slow = _both_ways(monkeypatch, experiment=exp, tracking_uri=uri, **kwargs)
        assert fast.frame.equals(slow.frame, null_equal=True), kwargs
        assert fast.excluded == slow.excluded and fast.parents == slow.parents, kwargs
    assert fast.frame.height == 48 - 1 + 1  # a deleted run out, the early-stopped one in (diverged: no final/*)
    assert fast.excluded.get("no final metrics") == 2
    nan = fast.frame.filter(pl.col("run_id") == runs[1]).get_column("final/val_loss_extra")[0]
    assert nan != nan  # NaN both ways


def test_the_sqlite_read_steps_aside_for_other_stores(tmp_path):
    from moue.analysis.loading import _sqlite_runs

    assert _sqlite_runs("http://127.0.0.1:5000", "1", "trial", None) is None
    assert _sqlite_runs(f"sqlite:///{tmp_path / 'missing.db'}", "1", "trial", None) is None
    (tmp_path / "other.db").write_bytes(b"")  # a SQLite file without MLflow's tables
    assert _sqlite_runs(f"sqlite:///{tmp_path / 'other.db'}", "1", "trial", None) is None
