"""Bad input is refused before anything is launched or written: exit 2, one line naming the field,
the value and what is allowed (a corpus of what a careful user throws at a study)."""

from __future__ import annotations

import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
from procs import kill_marked, launched, marked_env

from moue.errors import ConfigError
from moue.studies.spec import load_study

ROOT = Path(__file__).resolve().parent.parent
SMOKE = (ROOT / "studies" / "smoke.toml").read_text()

CASES = {  # name -> (spec bytes or text, the field the error names, a phrase of what is allowed)
    "latin-1": (SMOKE.replace('description = "', 'description = "caf\xe9 ').encode("latin-1"), "spec", "UTF-8"),
    "utf-16": (SMOKE.encode("utf-16"), "spec", "UTF-8"),
    "binary": (b"\x00\xff\xfe\x89PNG\x00\x00", "spec", "UTF-8"),
    "negative sampler seed": (SMOKE.replace("seeds = [0, 1]", "seeds = [0, 1]\nseed = -1"), "search.seed", "[0, 2**32)"),
    "huge sampler seed": (SMOKE.replace("seeds = [0, 1]", "seeds = [0, 1]\nseed = 99999999999"), "search.seed",
                          "[0, 2**32)"),
    "600-character name": (SMOKE.replace('name = "smoke"', f'name = "{"a" * 600}"'), "name", "at most 100"),
    "unknown URI scheme": (SMOKE + '\n[tracking]\ntracking_uri = "foo://bar"\n', "tracking.tracking_uri",
                           "unknown scheme"),
    "relative SQLite path": (SMOKE + '\n[tracking]\ntracking_uri = "sqlite:///rel.db"\n', "tracking.tracking_uri",
                             "absolute"),
    "not a URI": (SMOKE + '\n[tracking]\ntracking_uri = "just words"\n', "tracking.tracking_uri", "not a URI"),
    "file store": (SMOKE + '\n[tracking]\ntracking_uri = "file:///tmp/mlruns"\n', "tracking.tracking_uri",
                   "file store"),
    "cuda without a GPU share": (SMOKE.replace("[fixed.train]", '[fixed.train]\ndevice = "cuda"'),
                                 "fixed.train.device", "resources.gpu > 0"),
    "bad smoke override": (SMOKE + "\n[smoke.model]\nd_model = -4\n", "smoke.model.d_model", ">= 1"),
    "bad smoke budget": (SMOKE + "\n[smoke.budget]\ntokens = 0\n", "smoke.budget.tokens", ">= 1"),
    "absurd budget": (SMOKE.replace("tokens = 4096", "tokens = 1_000_000_000_000_000"), "budget.tokens",
                      "at most 1e+12"),
    "infinite lr": (SMOKE.replace("lr = 3e-3", "lr = inf"), "fixed.train.lr", "finite number > 0"),
    "budget below one step": (SMOKE.replace("tokens = 4096", "tokens = 255").replace('kind = "asha"', 'kind = "none"'),
                              "budget.tokens", "at least one step"),
    "tokens in fixed.train": (SMOKE.replace("[fixed.train]", "[fixed.train]\ntokens = 5"), "fixed.train.tokens",
                              "[budget]"),
    "zero margin": (SMOKE.replace("[analysis]", "[analysis]\nmargin_pct = 0"), "analysis.margin_pct", "(0, 100)"),
    "margin as a string": (SMOKE.replace("[analysis]", '[analysis]\nmargin_pct = "1%"'), "analysis.margin_pct",
                           "int or float"),
    "comparison without a reference": (SMOKE + '\n[[analysis.comparisons]]\nname = "k"\nvariant = ["model.top_k"]\n',
                                       "analysis.comparisons[0].reference", "required"),
    "comparison's pair not a list": (SMOKE + '\n[[analysis.comparisons]]\nname = "k"\nvariant = ["model.top_k"]\n'
                                     'reference = "1"\npair = 3\n', "analysis.comparisons[0].pair", "list of column"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_spec_refused_naming_the_field(case, tmp_path) -> None:
    text, field, phrase = CASES[case]
    path = tmp_path / "spec.toml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError) as err:
        load_study(path)
    assert err.value.field == field, str(err.value)
    assert phrase in err.value.allowed, str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_train_key_does_not_offer_the_budget_keys(tmp_path) -> None:
    path = tmp_path / "spec.toml"
    path.write_text(SMOKE.replace("[fixed.train]", "[fixed.train]\nbogus = 5"))
    with pytest.raises(ConfigError) as err:
        load_study(path)
    allowed = err.value.allowed.partition("allowed: ")[2].split(" (")[0].split(", ")
    assert err.value.field == "fixed.train.bogus" and "lr" in allowed
    assert "tokens" not in allowed and "eval_every_tokens" not in allowed


def test_config_errors_survive_pickling() -> None:
    """A ConfigError raised in a Ray worker reaches the driver as itself."""
    from moue.analysis.errors import AnalysisError

    for cls in (ConfigError, AnalysisError):
        back = pickle.loads(pickle.dumps(cls("train.device", "cuda", "needs CUDA")))
        assert type(back) is cls and (back.field, back.value, back.allowed) == ("train.device", "cuda", "needs CUDA")
        assert str(back) == "train.device ('cuda') needs CUDA"


def _sweep(tmp_path: Path, text: str, *extra: str) -> tuple[subprocess.CompletedProcess, float, Path]:
    spec = tmp_path / "spec.toml"
    spec.write_text(text)
    ws = tmp_path / "ws"
    mark, env = marked_env()
    env["PYTHONPATH"] = str(ROOT)
    t0 = time.time()
    try:
        proc = subprocess.run([sys.executable, "-c", "from moue.studies.cli import main; main()", "sweep", str(spec),
                               "--workspace", str(ws), *extra], env=env, cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
        started = launched(mark)
    finally:
        kill_marked(mark)
    assert not started
    return proc, time.time() - t0, ws


@pytest.mark.parametrize("text, field, phrase", [
    (SMOKE.replace("cpus = 1", "cpus = 3"), "resources.cpus", "the CPUs of this machine"),
    (SMOKE.replace("cpus = 1", "cpus = 1\ngpu = 0.5"), "resources.gpu", "it has none"),
], ids=["3 cpus", "half a GPU"])
def test_resources_the_machine_lacks_are_refused_before_launch(tmp_path, text, field, phrase) -> None:
    import os

    import torch

    if field == "resources.cpus" and (os.cpu_count() or 1) >= 3 or field == "resources.gpu" and torch.cuda.is_available():
        pytest.skip("this machine has those resources")
    proc, _, ws = _sweep(tmp_path, text)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {field} (") and phrase in lines[0], lines
    assert not ws.exists(), "nothing written"


def test_unreachable_tracking_server_fails_within_seconds(tmp_path) -> None:
    proc, seconds, ws = _sweep(tmp_path, SMOKE, "--tracking-uri", "http://127.0.0.1:1")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--tracking-uri ('http://127.0.0.1:1') does not answer" in lines[0], lines
    assert seconds < 30 and not ws.exists()


def test_a_family_pruned_entirely_is_named_at_launch(tmp_path) -> None:
    """top_k = 3 leaves the layerwise MoE (2 experts a layer) no valid point: the launch says so
    (here followed by a refusal, so nothing runs)."""
    text = SMOKE.replace("top_k = 2", "top_k = 3").replace("cpus = 1", "cpus = 64")
    proc, _, _ = _sweep(tmp_path, text)
    assert proc.returncode == 2
    assert "note: the constraints pruned every layerwise point" in proc.stderr, proc.stderr
