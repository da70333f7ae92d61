"""Log a synthetic study to a real MLflow store exactly as docs/TRACKING.md specifies.

Parent run per sweep (``moue.kind = study`` and the provenance tags), one child run per trial
(``mlflow.parentRunId``, ``moue.kind = trial``, ``moue.schema``, ``moue.trial_id``, ``moue.status``,
``moue.stop_reason``, ``moue.seed``), params flat and dotted (strings; with ``typed_config`` also
the typed ``config.json`` param the writer logs), derived counts, learning curves with ``step`` =
tokens seen, ``final/*`` metrics, everything through ``log_batch``.

The losses follow a known virtual-width law (``vw_multiplicative``) with multiplicative noise, so
tests know the truth.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, field

import numpy as np

TRUE = {"E": 1.6, "A": 60.0, "alpha": 0.32, "gamma": 0.12, "B": 300.0, "beta": 0.30}


def true_loss(N, D, V, params=TRUE):
    return (params["E"] + params["A"] / (N ** params["alpha"] * V ** params["gamma"])
            + params["B"] / D ** params["beta"])


@dataclass
class Trial:
    d_model: int
    n_layers: int
    window: int
    pool_size: int
    tokens: int
    seed: int = 0
    status: str = "finished"
    params_extra: dict = field(default_factory=dict)

    @property
    def n_active(self) -> float:
        # 12 d^2 per layer (attention + top-2 experts of hidden 2d), the counting module's idea.
        return 12.0 * self.d_model**2 * self.n_layers

    @property
    def virtual_width(self) -> int:
        return self.n_layers * self.window


def default_trials() -> list[Trial]:
    """A 4 (size) x 3 (tokens) x 4 (window) grid: 48 trials."""
    out = []
    for (d, L), tokens, w in itertools.product(
        [(64, 4), (128, 4), (256, 6), (512, 6)], [20_000_000, 120_000_000, 720_000_000],
        [2, 4, 8, 16],
    ):
        out.append(Trial(d_model=d, n_layers=L, window=w, pool_size=16, tokens=tokens))
    return out


def log_study(
    tracking_uri: str,
    experiment: str,
    trials: list[Trial],
    *,
    artifact_root: str,
    corpus_fingerprint: str = "sha256:stdlib-3.11",
    convention: str = "6N+attn",
    loss_fn=true_loss,
    noise: float = 0.004,
    rng_seed: int = 0,
    n_marks: int = 5,
    typed_config: bool = False,
) -> str:
    """Log one sweep (parent + children); returns the parent run id."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(
        experiment, artifact_location=f"file://{artifact_root}")
    parent = client.create_run(exp_id, run_name=f"{experiment}-sweep", tags={
        "moue.kind": "study", "moue.schema": "1", "moue.study": experiment,
        "moue.spec_sha256": "ab" * 32, "moue.git_sha": "0123456789abcdef",
        "moue.git_dirty": "false",
        "moue.corpus_fingerprint": corpus_fingerprint, "moue.search": "grid",
        "moue.scheduler": "fifo", "moue.ray_storage": f"{artifact_root}/ray",
    })
    pid = parent.info.run_id
    rng = np.random.default_rng(rng_seed)
    now = int(time.time() * 1000)
    for i, t in enumerate(trials):
        run = client.create_run(exp_id, run_name=f"trial-{i:03d}", tags={
            "mlflow.parentRunId": pid, "moue.kind": "trial", "moue.schema": "1",
            "moue.trial_id": f"t{i:03d}", "moue.seed": str(t.seed),
        })
        rid = run.info.run_id
        N, D, V = t.n_active, float(t.tokens), float(t.virtual_width)
        final = float(loss_fn(N, D, V) * np.exp(noise * rng.standard_normal()))
        flops_per_token = 6.0 * N * 1.05
        params = {
            "model.d_model": t.d_model, "model.n_layers": t.n_layers,
            "model.pool_size": t.pool_size, "model.window": t.window, "model.stride": 1,
            "model.group": 1, "model.top_k": 2, "model.expert_hidden": 2 * t.d_model,
            "model.n_shared": 0, "model.router": "softmax", "model.balance": "pool",
            "model.balance_coef": 0.01, "train.tokens": t.tokens, "train.lr": 3e-3,
            "train.batch_tokens": 65536, "train.seq_len": 256, "data.corpus": "stdlib",
            "count.convention": convention,
            "derived.n_params_total": N * 3, "derived.n_params_active": N,
            "derived.n_params_embedding": 2 * 256 * t.d_model,
            "derived.flops_per_token": flops_per_token, "derived.virtual_width": t.virtual_width,
            "derived.physical_width": t.pool_size, "derived.reuse": V / t.pool_size,
            "derived.log10_paths": t.n_layers * float(np.log10(t.window * (t.window - 1) / 2 + 1)),
            "derived.exposure_min": 1, "derived.exposure_max": t.n_layers,
            "train.use_compile": False,
            **t.params_extra,
        }
        if typed_config:  # as moue.studies.callbacks.trial_params logs it
            params["config.json"] = json.dumps(params, sort_keys=True)
        marks = np.linspace(t.tokens / n_marks, t.tokens, n_marks).astype(np.int64)
        metrics = []
        for j, step in enumerate(marks):
            curve = float(loss_fn(N, float(step), V) * np.exp(noise * rng.standard_normal()))
            if t.status == "diverged" and j >= 2:
                curve = float("nan")
            for key, value in (("train/loss", curve * 0.98), ("val/loss", curve),
                               ("lr", 3e-3), ("grad_norm", 1.0), ("tokens_per_s", 1e5),
                               ("balance/loss", 0.01), ("balance/load_cv", 0.1),
                               ("balance/dead_frac", 0.0), ("router/entropy", 1.5),
                               ("router/z", 2.0)):
                metrics.append(Metric(key, value, now + j, int(step)))
            if t.status == "diverged" and j >= 2:
                break
        stop_reason = {"finished": "", "early_stopped": "asha", "diverged": "non-finite loss",
                       "failed": "RuntimeError"}.get(t.status, "")
        if t.status in ("finished", "early_stopped"):
            last = int(marks[-1])
            for key, value in (("final/val_loss", final), ("final/tokens", float(t.tokens)),
                               ("final/flops", flops_per_token * t.tokens),
                               ("final/wall_s", 12.5), ("final/train_s", 10.0)):
                metrics.append(Metric(key, value, now + 99, last))
        tags = [RunTag("moue.stop_reason", stop_reason)]
        if t.status != "running":
            tags.append(RunTag("moue.status", t.status))
        client.log_batch(rid, metrics=metrics,
                         params=[Param(k, str(v)) for k, v in params.items()], tags=tags)
        if t.status != "running":
            client.set_terminated(rid, "FINISHED" if t.status != "failed" else "FAILED")
    client.set_terminated(pid, "FINISHED")
    return pid
