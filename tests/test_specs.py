"""Study specs: validation before anything starts (exit 2, one line naming the field), dry runs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moue.errors import ConfigError
from moue.studies.cli import app
from moue.studies.spec import load_study, shipped_studies

ROOT = Path(__file__).resolve().parent.parent
SMOKE = (ROOT / "studies" / "smoke.toml").read_text()
runner = CliRunner()


def edit(old: str, new: str) -> str:
    assert old in SMOKE, old
    return SMOKE.replace(old, new, 1)


BAD_SPECS = [
    (edit('name = "smoke"', 'name = "smoke test"'), "name"),
    ("bogus = 1\n" + SMOKE, "bogus"),
    (edit('space = "virtual_width"', 'space = "widths"'), "search.space"),
    (edit('algorithm = "grid"', 'algorithm = "bayes"'), "search.algorithm"),
    (edit('algorithm = "grid"', 'algorithm = "tpe"'), "search.num_samples"),
    (edit('algorithm = "grid"', 'algorithm = "grid"\nnum_samples = 5'), "search.num_samples"),
    (edit("seeds = [0, 1]", "seeds = [0, 0]"), "search.seeds"),
    (edit("seeds = [0, 1]", 'seeds = "0"'), "search.seeds"),
    (edit('kind = "asha"', 'kind = "hyperband"'), "scheduler.kind"),
    (edit("grace_tokens = 1024", "grace_tokens = 100000"), "scheduler.grace_tokens"),
    (edit("reduction_factor = 2", "reduction_factor = 1"), "scheduler.reduction_factor"),
    (edit("tokens = 4096", "tokens = -5"), "budget.tokens"),
    (edit("marks = 4", "marks = 0"), "budget.marks"),
    (edit("cpus = 1", "cpus = 0"), "resources.cpus"),
    (edit('laws = ["compute"]', 'laws = ["kaplan"]'), "analysis.laws"),
    (edit("d_model = 32", "d_model = 0"), "fixed.model.d_model"),
    (edit("lr = 3e-3", "lr = -1.0"), "fixed.train.lr"),
    (edit("lr = 3e-3", 'lr = "fast"'), "fixed.train.lr"),
    (edit("val_tokens = 2048", 'val_tokens = 2048\ncorpus = "/no/such/corpus"'), "fixed.data.corpus"),
    (edit("[fixed.data]", "[fixed.optim]"), "fixed.optim"),
    (edit("experts_per_layer = [2]", "experts_per_layer = [2]\nwidth = 3"), "space.width"),
    (edit("[budget]", "[budget]\nepochs = 3"), "budget.epochs"),
    (edit("[fixed.train]", "[fixed.train]\ntokens = 100"), "fixed.train.tokens"),
    (edit("\nseq_len = 32", "\nseq_len = 64"), "fixed.train.seq_len"),
    # several token budgets: a grid axis, never with ASHA or a sampler
    (edit("tokens = 4096", "tokens = []"), "budget.tokens"),
    (edit("tokens = 4096", "tokens = [4096, 4096]"), "budget.tokens"),
    (edit("tokens = 4096", 'tokens = [2048, "4096"]'), "budget.tokens"),
    (edit("tokens = 4096", "tokens = [2048, 4096]"), "scheduler.kind"),
    (edit('kind = "asha"', 'kind = "none"').replace('algorithm = "grid"', 'algorithm = "tpe"\nnum_samples = 2')
     .replace("tokens = 4096", "tokens = [2048, 4096]"), "budget.tokens"),
]


@pytest.mark.parametrize("text,field", BAD_SPECS, ids=[f for _, f in BAD_SPECS])
def test_bad_spec_exits_2_naming_the_field_and_creates_nothing(text: str, field: str, tmp_path) -> None:
    spec = tmp_path / "bad.toml"
    spec.write_text(text)
    ws = tmp_path / "ws"
    out = runner.invoke(app, ["sweep", str(spec), "--workspace", str(ws)])
    assert out.exit_code == 2, out.output
    lines = [ln for ln in out.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {field} ("), lines
    assert not ws.exists(), "nothing launched or written"


def test_there_are_at_least_fifteen_bad_specs() -> None:
    assert len({f for _, f in BAD_SPECS}) >= 15


def test_missing_and_broken_spec_files(tmp_path) -> None:
    out = runner.invoke(app, ["sweep", str(tmp_path / "none.toml")])
    assert out.exit_code == 2 and "must be an existing study TOML file" in out.output
    broken = tmp_path / "broken.toml"
    broken.write_text("name = [")
    out = runner.invoke(app, ["sweep", str(broken)])
    assert out.exit_code == 2 and "is not valid TOML" in out.output


@pytest.mark.parametrize("path", shipped_studies(), ids=lambda p: p.stem)
def test_shipped_specs_load_and_dry_run(path: Path) -> None:
    for smoke in (False, True):
        study = load_study(path, smoke=smoke)
        out = runner.invoke(app, ["sweep", str(path), "--dry-run", *(["--smoke"] if smoke else [])])
        assert out.exit_code == 0, out.output
        n = len(study.points) if study.search.algorithm == "grid" else study.search.num_samples
        assert f"total: {n} trials" in out.output
        if study.lr_stage is not None:  # the LR stage's trials are listed first
            n += len(load_study(path, smoke=smoke, stage="lr").points)
        assert out.output.count("  #") == n
        rows = [line.split() for line in out.output.splitlines() if line.startswith("  #")]
        assert all(r[1] in ("layerwise", "unipool", "rotational") for r in rows)  # each trial's family
        assert "estimated wall time: ~" in out.output  # studies/estimate.py, timed here


def test_dry_run_counts_and_compute_are_the_counting_module_s() -> None:
    from moue import ModelConfig, count
    from moue.studies.runner import dry_run, resolve_trial

    study = load_study(ROOT / "studies" / "vw_grid.toml")
    rows, totals = dry_run(study)
    assert len(rows) == 18 and totals["trials"] == 18
    for row in rows[:3]:
        flat = resolve_trial(study, row["point"])
        cfg = ModelConfig.from_dict({k[6:]: v for k, v in flat.items() if k.startswith("model.")})
        c = count(cfg, seq_len=flat["train.seq_len"])
        assert row["active"] == c.n_params_active and row["virtual_width"] == c.virtual_width
        assert row["compute"] == c.flops_per_token * study.budget_tokens
    assert totals["compute"] == sum(r["compute"] for r in rows)


def test_several_budgets_make_a_grid_axis() -> None:
    from moue.studies.runner import dry_run, resolve_trial

    study = load_study(ROOT / "studies" / "vw_scaling.toml")
    assert study.budgets == (614_400, 1_228_800, 2_457_600) and study.budget_tokens == 2_457_600
    by_budget: dict[int, list] = {}
    for point in study.points:
        by_budget.setdefault(point["train.tokens"], []).append(point)
    assert sorted(by_budget) == list(study.budgets)
    strip = [[{k: v for k, v in p.items() if k != "train.tokens"} for p in pts] for pts in by_budget.values()]
    assert strip[0] == strip[1] == strip[2] and len(strip[0]) == 9  # the same 9 models at every budget
    rows, totals = dry_run(study)
    batch = study.fixed["train.batch_tokens"]
    for row in rows:
        flat = resolve_trial(study, {"point": row["point"]})
        assert flat["train.tokens"] == row["tokens"] == row["point"]["train.tokens"]
        assert flat["train.eval_every_tokens"] == row["tokens"] // batch // study.marks * batch
    same_model = [r for r in rows if r["point"]["model.n_layers"] == 2 and r["point"]["model.router"] == "softmax"]
    assert [r["compute"] / same_model[0]["compute"] for r in same_model] == [1.0, 2.0, 4.0]
    assert totals["tokens"] == 9 * sum(study.budgets)


def test_boolean_space_options_reach_the_space(tmp_path) -> None:
    text = (ROOT / "studies" / "pool_size.toml").read_text().replace("[analysis]", "[space]\ninclude_layerwise = false\n\n[analysis]")
    spec = tmp_path / "pool.toml"
    spec.write_text(text)
    without = load_study(spec)
    with_layerwise = load_study(ROOT / "studies" / "pool_size.toml")
    assert without.space_options["include_layerwise"] is False
    assert len(without.points) < len(with_layerwise.points)


def test_smoke_overrides_apply_in_order() -> None:
    full = load_study(ROOT / "studies" / "vw_grid.toml")
    smoke = load_study(ROOT / "studies" / "vw_grid.toml", smoke=True)
    assert full.budget_tokens == 1_228_800 and smoke.budget_tokens == 2048
    assert full.fixed["model.d_model"] == 64 and smoke.fixed["model.d_model"] == 32
    assert len(full.points) == 18 and len(smoke.points) == 3
    assert smoke.space_options["experts_per_layer"] == [2]


def test_tpe_study_validates_sampled_points_before_launch(tmp_path) -> None:
    spec = tmp_path / "lr.toml"
    # d_model 60 with 4 heads gives an odd head size: only a sampled point shows it
    text = (ROOT / "studies" / "lr.toml").read_text().replace("[fixed.model]", "[space]\nd_models = [60]\n\n[fixed.model]")
    spec.write_text(text)
    with pytest.raises(ConfigError, match="head size"):
        load_study(spec)


CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


def _log_quickstart_runs(uri: str) -> dict[str, str]:
    """The first four trials of the quickstart, logged as a sweep logs them (parent, children,
    params, final metrics). Returns the parent's and the children's run names."""
    from moue.studies.tracking import Tracker

    study = load_study(ROOT / "studies" / "quickstart.toml")
    tracker = Tracker(tracking_uri=uri, experiment=study.experiment, description=study.description)
    tracker.start_parent(sweep_id=study.name, study=study.name, spec_text=study.source, spec_sha256=study.sha256,
                         tags={}, environment={})
    children = []
    for i, plan in enumerate(study.plans[:4]):
        tracker.trial_run(f"t{i}", params=dict(plan.params), tags=dict(plan.tags), run_name=plan.run_name)
        tracker.log_metrics(f"t{i}", {"val/loss": 3.0 - 0.1 * i}, step=plan.tokens)
        tracker.finish_trial(f"t{i}", status="finished", final={"final/val_loss": 3.0 - 0.1 * i,
                                                                "final/tokens": float(plan.tokens)})
        children.append(plan.run_name)
    tracker.flush()
    tracker.finish_parent()
    return {"parent": study.name, "children": children}


def _chromium(url: str, *args: str) -> str:
    import subprocess

    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1600,1000",
           "--virtual-time-budget=30000", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180).stdout


def _check_the_runs_in_chromium(view: str, names: dict, tmp_path: Path) -> None:
    """MLflow's UI in a real browser: the study's view is the model-training runs table with the
    key axes as columns and every trial; the plain runs table nests the trials under the sweep."""
    import re

    def text(url: str) -> str:
        return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", _chromium(url, "--dump-dom")))

    shown = text(view)
    assert "You're viewing a shared view" in shown, shown[-3000:]
    assert "Model registry" in shown and "Observability" not in shown  # model training, not GenAI
    for column in ("family", "derived.n_params_active", "derived.virtual_width", "model.pool_size", "final/val_loss"):
        assert column in shown, column
    assert all(name in shown for name in names["children"]), names
    for family in ("layerwise", "rotational", "unipool"):
        assert family in shown
    plain = text(view.split("?")[0] + "?workflowType=machine_learning")
    assert names["parent"] in plain and "5 matching runs" in plain
    assert not any(name in plain for name in names["children"]), "the trials are folded under their sweep"
    shots = Path(os.environ.get("MOUE_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    for name, url in (("mlflow_study_view.png", view), ("mlflow_runs_nested.png", view.split("?")[0] + "?workflowType=machine_learning")):
        _chromium(url, f"--screenshot={shots / name}")
        assert (shots / name).stat().st_size > 20_000, name  # a rendered page, not a blank one


@pytest.mark.slow
def test_moue_ui_serves_the_workspace_store_on_loopback(tmp_path) -> None:
    import os
    import shutil
    import signal
    import socket
    import subprocess
    import sys
    import urllib.request

    import mlflow

    ws = tmp_path / "ws"
    ws.mkdir()
    names = _log_quickstart_runs(f"sqlite:///{ws / 'mlflow.db'}")
    mlflow.MlflowClient(f"sqlite:///{ws / 'mlflow.db'}").create_experiment("probe")  # not a study: no view
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", "from moue.studies.cli import main; main()", "ui", "--workspace",
                             str(ws), "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        line = proc.stdout.readline()  # the URL, printed only once the server answers
        assert line.strip() == f"MLflow UI on http://127.0.0.1:{port} (Ctrl-C stops it)", line
        view = proc.stdout.readline().strip()  # then each study's runs, in the model-training view
        assert view.startswith(f"quickstart: http://127.0.0.1:{port}/#/experiments/") and "workflowType=machine_learning" in view
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            assert r.status == 200
        out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout
        if out.strip():  # iproute2 present: the listening socket is on loopback only
            assert all("127.0.0.1" in line for line in out.strip().splitlines()), out
        if shutil.which("pgrep"):  # MLflow's GenAI job runner and its huey consumers are not started
            jobs = subprocess.run(["pgrep", "-g", str(proc.pid), "-f", "mlflow.server.jobs"], capture_output=True, text=True)
            assert not jobs.stdout.strip(), "the MLflow UI started its job runner: " + jobs.stdout
        if CHROMIUM:
            _check_the_runs_in_chromium(view.split(": ", 1)[1], names, tmp_path)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
    missing = runner.invoke(app, ["ui", "--workspace", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "has no mlflow.db" in missing.output
    ui = [sys.executable, "-c", "from moue.studies.cli import main; main()", "ui", "--workspace"]
    with socket.socket() as busy:  # the port is taken: an error before any server starts, no URL
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        r = subprocess.run([*ui, str(ws), "--port", str(taken)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "http://" not in r.stdout, r.stdout
    assert r.stderr.strip() == (f"error: --port ({taken}) cannot be listened on at 127.0.0.1 (Address already in use); "
                                "choose a free port")
    r = subprocess.run([*ui, str(ws), "--host", "no-such-host.invalid"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: --host ('no-such-host.invalid') is not an address"), r.stderr
    r = subprocess.run([*ui, str(ws), "--port", "70000"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip() == "error: --port (70000) must be in 1..65535", r.stderr
    junk = tmp_path / "junk"  # a server that starts and dies (not a database): its own error, no URL
    junk.mkdir()
    (junk / "mlflow.db").write_text("not a database")
    with socket.socket() as s:  # a fresh port: the killed server's may not be free yet
        s.bind(("127.0.0.1", 0))
        fresh = s.getsockname()[1]
    r = subprocess.run([*ui, str(junk), "--port", str(fresh), "--wait-s", "60"], capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 1 and "http://" not in r.stdout, r.stdout
    assert r.stderr.startswith(f"error: the MLflow UI on 127.0.0.1:{fresh} exited before it answered (exit "), r.stderr


def test_progress_line_estimates_time_left_from_tokens() -> None:
    """Trials of different budgets: the estimate follows tokens trained, not trials done, and a
    trial stopped early takes its unused budget out of the plan."""
    import io
    from types import SimpleNamespace

    from moue.studies.runner import ProgressCallback

    budgets = {"a": 1000, "b": 1000, "c": 8000}
    trial = {k: SimpleNamespace(trial_id=k, config={"point": {"train.tokens": v}}, last_result={})
             for k, v in budgets.items()}
    cb = ProgressCallback(total=3, concurrency=1, stream=io.StringIO(), total_tokens=sum(budgets.values()),
                          default_budget=8000)
    cb.t0 -= 100.0  # 100 s elapsed
    for k in "ab":
        cb.on_trial_start(0, [], trial[k])
        cb.on_trial_result(0, [], trial[k], {"tokens": 1000, "val/loss": 2.0})
        trial[k].last_result = {"status": "finished"}
        cb.on_trial_complete(0, [], trial[k])
    # 2 of 3 trials done but only 2,000 of 10,000 tokens: 400 s left, not 50 s
    assert round(cb.eta_s()) == 400, cb._line()
    cb.on_trial_start(0, [], trial["c"])
    cb.on_trial_result(0, [], trial["c"], {"tokens": 2000, "val/loss": 1.5})
    trial["c"].last_result = {"status": "running"}  # stopped by the scheduler at 2,000 of 8,000
    cb.on_trial_complete(0, [], trial["c"])
    assert cb.planned == 4000 and round(cb.eta_s()) == 0 and "1 early-stopped" in cb._line()
    assert "best val 1.5000" in cb._line()
    # a resumed sweep: the rate counts only tokens trained since this driver started
    cb.planned = 8000
    cb.setup()
    cb.t0 -= 10.0
    cb.on_trial_result(0, [], trial["c"], {"tokens": 3000, "val/loss": 1.4})  # 1,000 tokens in 10 s
    assert round(cb.eta_s()) == 30, cb._line()  # 8,000 planned - 5,000 trained at 100 tokens/s


def test_progress_line_weights_tokens_by_their_trial_s_cost() -> None:
    """With each point's planned work (tokens x seconds per token, ``token_cost``), a token of a
    large model counts for more than a small one's: after the small trials the time left is the
    large trial's cost, not its share of tokens."""
    import io
    from types import SimpleNamespace

    from moue.studies.callbacks import point_key
    from moue.studies.runner import ProgressCallback

    points = {"small": {"train.tokens": 1000, "model.d_model": 32}, "large": {"train.tokens": 1000, "model.d_model": 128}}
    cost = {"small": 0.01, "large": 0.09}  # seconds per token
    work = {point_key(p): p["train.tokens"] * cost[k] for k, p in points.items()}
    trial = {k: SimpleNamespace(trial_id=k, config={"point": p}, last_result={}) for k, p in points.items()}
    cb = ProgressCallback(total=2, concurrency=1, stream=io.StringIO(), total_tokens=2000, default_budget=1000,
                          token_cost=work)
    assert cb.planned == 100.0
    cb.t0 -= 10.0  # the small trial took 10 s: its 1,000 tokens at 0.01 s
    cb.on_trial_start(0, [], trial["small"])
    cb.on_trial_result(0, [], trial["small"], {"tokens": 1000, "val/loss": 2.0})
    trial["small"].last_result = {"status": "finished"}
    cb.on_trial_complete(0, [], trial["small"])
    assert round(cb.eta_s()) == 90, cb._line()  # tokens alone would say 10 s


def test_dry_run_says_why_active_can_exceed_total(tmp_path) -> None:
    """A MoUE-style model of 4 layers reuses its pool experts across depth:
    active (per application, the N of C = 6ND) exceeds total, and the dry run says why."""
    spec = tmp_path / "deep.toml"
    spec.write_text((ROOT / "studies" / "smoke.toml").read_text().replace("n_layers = 2", "n_layers = 4"))
    out = runner.invoke(app, ["sweep", str(spec), "--dry-run"])
    assert out.exit_code == 0, out.output
    rows = [line.split() for line in out.output.splitlines() if line.startswith("  #")]
    over = [r for r in rows if int(r[3].replace(",", "")) > int(r[5].replace(",", ""))]
    assert over and all(r[1] == "rotational" for r in over)
    assert "note: active counts a weight once per layer that applies it" in out.output
    ladder = runner.invoke(app, ["sweep", str(ROOT / "studies" / "quickstart.toml"), "--dry-run"])
    assert ladder.exit_code == 0 and "note: active counts" not in ladder.output  # active < total there
