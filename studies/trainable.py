"""What runs in a Ray worker: one trial of a study (``trial_fn``) and its sink to Tune.

Tune's flat config -> ``TrialConfig`` -> ``moue.train``, with a sink that turns each report
into ``tune.report`` (+ a checkpoint) and resumes from the newest readable checkpoint after a
worker failure or a driver restart; a trial the MLflow record holds as done replays its result.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

from ray import tune

from moue.tracking_contract import FINAL_TOKENS, FINAL_VAL_LOSS, VAL_LOSS, is_tracked
from moue.studies.checkpoints import load_checkpoint, write_checkpoint
from moue.studies.spec import Study
from moue.studies.workspace import Workspace, sweep_name

__all__ = ["METRIC", "TIME_ATTR", "trial_fn", "train_conversion_base"]

METRIC = VAL_LOSS  # what ASHA and the searchers optimise: the tracked validation loss (inf once diverged)
TIME_ATTR = "tokens"


def trial_fn(config: dict[str, Any], *, study: Study, cache_dir: str, base_checkpoint: str | None = None,
             done: dict[str, dict[str, Any]] | None = None) -> None:
    """One Tune trial (runs in a Ray worker process). A trial the MLflow record already holds as
    done (``done``, read by a resumed driver) is not trained again: its recorded result is
    reported once, so Tune, the searcher and the summary see it, and the tracker writes nothing."""
    import ray

    from moue.train import train

    recorded = (done or {}).get(tune.get_context().get_trial_id())
    if recorded is not None:
        tune.report(_replayed(recorded))
        return

    cfg = study.plan(config).config
    if cfg.convert is not None:
        cfg = cfg.resolved(_converted_checkpoint(cfg, base_checkpoint, cache_dir))
    state, corrupt = load_checkpoint(tune.get_checkpoint())
    extra: dict[str, Any] = {"node_id": ray.get_runtime_context().get_node_id()}
    if state is not None:  # a retry after a worker failure, or a restored sweep
        extra["trial/restored_from"] = int(state["step"]) * cfg.train.batch_tokens
    if corrupt:  # recorded: checkpoints skipped as unreadable (the work since the one used is redone)
        extra["trial/corrupt_checkpoints"] = corrupt
    from moue.runtime import configure_process

    configure_process(cfg.train.threads)  # this worker process trains: allocator and threads
    train(cfg, _TuneSink(extra), cache_dir=cache_dir, resume=state)


def _replayed(recorded: dict[str, Any]) -> dict[str, Any]:
    """A done trial's last report, rebuilt from its MLflow record."""
    metrics = recorded["metrics"]
    out = {k: v for k, v in metrics.items() if is_tracked(k) or k.startswith("final/") or k.startswith("time/")}
    out.update(status=recorded["status"], stop_reason=recorded["stop_reason"], replayed=True)
    out[TIME_ATTR] = int(metrics.get(FINAL_TOKENS, 0))
    val = metrics.get(FINAL_VAL_LOSS, metrics.get(VAL_LOSS))
    out[METRIC] = math.inf if recorded["status"] == "diverged" or val is None else val
    if "final/train_s" in metrics:
        out["time/train_s"] = metrics["final/train_s"]
    return out


def _converted_checkpoint(cfg, base_checkpoint: str | None, cache_dir: str) -> str:
    """The layerwise base widened to this trial's window (written once per window and router init)."""
    import torch

    from moue.config import ModelConfig
    from moue.convert import widen_layerwise
    from moue.studies.trial import save_checkpoint

    if base_checkpoint is None:
        raise RuntimeError("a conversion trial needs the layerwise base checkpoint")
    blob = torch.load(base_checkpoint, map_location="cpu", weights_only=True)
    base = ModelConfig.from_dict(blob["config"])
    window, init = cfg.model.window, cfg.convert.router_init
    path = Path(cache_dir) / "conversion" / f"{Path(base_checkpoint).stem}-w{window}-{init}.pt"
    if not path.is_file():
        cfg, state = widen_layerwise(blob["model"], base, target_window=window, router_init=init)
        save_checkpoint(path, {"config": cfg.to_dict(), "model": state, "start_window": base.window})
    return str(path)


def train_conversion_base(study: Study, workspace: Workspace) -> str:
    """Train the conversion study's layerwise base once (on the driver) for the study's budget."""
    import dataclasses as dc

    from moue.train import NullSink, TrialConfig, train
    from moue.search_spaces import layerwise_base
    from moue.studies.trial import save_checkpoint

    point = study.points[0] if study.points else {}
    base_flat = layerwise_base({**study.fixed, **point})
    flat = {k: v for k, v in study.trial_flat(base_flat).items() if not k.startswith("convert.")}
    flat.pop("train.widen_tokens", None)
    flat.pop("train.init_from", None)
    cfg = TrialConfig.from_dict(flat)  # the base is not a trial of the study: no plan, no threads setting
    path = workspace.root / "conversion" / f"{sweep_name(study)}-base.pt"
    if path.is_file():
        return str(path)
    from moue.runtime import configure_process

    configure_process(cfg.train.threads)
    sink = NullSink()
    result = train(cfg, sink, cache_dir=workspace.cache)
    if result.status != "finished":
        raise RuntimeError(f"the layerwise base diverged: {result.stop_reason}")
    state = sink.checkpoints[-1][1]["model"]
    save_checkpoint(path, {"config": dc.asdict(cfg.model), "model": state, "val_loss": result.final_val_loss})
    return str(path)


class _TuneSink:
    """Each ``Mark`` becomes one ``tune.report``, flattened here (the edge) to tracking names, with
    the checkpoint as a directory, plus ``extra`` (the node the trial runs on; where it was
    restored from)."""

    def __init__(self, extra: dict[str, Any]) -> None:
        self.extra = extra

    def report(self, mark) -> None:
        out = {**self.extra, **mark.as_metrics(), TIME_ATTR: mark.tokens}
        if mark.result is not None and mark.result.status == "diverged":
            out[METRIC] = math.inf  # searchers see a diverged point as the worst, not as missing
        if mark.checkpoint is None:
            tune.report(out)
            return
        with tempfile.TemporaryDirectory(prefix="moue-ckpt-") as d:
            write_checkpoint(Path(d), mark.checkpoint)
            tune.report(out, checkpoint=tune.Checkpoint.from_directory(d))
