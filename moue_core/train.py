"""One trial: ``train(config, sink) -> TrialResult`` (ARCHITECTURE.md, "the path of one trial").

Knows nothing of Ray or MLflow. The sink receives metrics at fixed token marks (TRACKING.md names,
``step`` = tokens seen) with a checkpoint at each mark, and a last report with the trial's status.

The loop is one straight line. At every mark (every ``train.eval_every_tokens`` tokens and at the
end): evaluate on the fixed validation set, report, checkpoint; the last mark's report also carries
the ``final/*`` metrics and ``status = "finished"`` (one report, so a scheduler that stops trials at
the budget cannot cut it off). Between marks: forward, backward,
clip, optimizer step, expert-bias update (outside the forward pass), window widening.

Divergence (a non-finite loss or gradient norm, or a loss above ``train.max_loss``) ends the trial
at once with status ``diverged`` and a reason; nothing raises. Resume: pass the last checkpoint
(``resume=``) and the run continues with the same batches, schedule, optimizer and RNG state, so
its loss curve equals an uninterrupted run's.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F

from moue_core.config import ModelConfig
from moue_core.convert import WindowSchedule
from moue_core.counting import Counts, count
from moue_core.data import BatchSampler, Corpus, load_corpus, validation_set
from moue_core.errors import ConfigError
from moue_core.model import MoUEModel
from moue_core.trial_config import TrainConfig, TrialConfig, lr_at

__all__ = ["TrainConfig", "TrialConfig", "TrialResult", "Sink", "NullSink", "train", "lr_at",
           "CHECKPOINT_VERSION"]

CHECKPOINT_VERSION = 1


class Sink(Protocol):
    def report(self, metrics: dict[str, Any], step: int, checkpoint: dict | None = None) -> None: ...


class NullSink:
    """Keeps every report in memory (tests, direct use); checkpoints are deep copies.

    A sink must persist (or copy) a checkpoint before ``report`` returns: its tensors are the live
    model and optimizer state.
    """

    def __init__(self) -> None:
        self.reports: list[tuple[int, dict[str, Any]]] = []
        self.checkpoints: list[tuple[int, dict]] = []

    def report(self, metrics: dict[str, Any], step: int, checkpoint: dict | None = None) -> None:
        self.reports.append((step, dict(metrics)))
        if checkpoint is not None:
            self.checkpoints.append((step, copy.deepcopy(checkpoint)))


@dataclass(frozen=True, kw_only=True)
class TrialResult:
    status: Literal["finished", "diverged"]
    stop_reason: str
    tokens: int
    final_val_loss: float | None
    flops: int
    wall_s: float
    train_s: float
    eval_s: float
    tokens_per_s: float
    counts: Counts
    corpus_fingerprint: str
    val_sha256: str


def _param_groups(model: MoUEModel, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay on norms, biases, scalars and the input embedding."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.dim() < 2 or name.startswith("embed.") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def _evaluate(model: MoUEModel, val, batch: int, device: torch.device, autocast) -> float:
    model.eval()
    total, n = 0.0, 0
    for x, y in val.batches(batch):
        with autocast():
            logits = model(x.to(device)).logits
        total += F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), reduction="sum").item()
        n += y.numel()
    model.train()
    return total / n


def _resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device", name, "needs a CUDA device; this machine has none (use cpu or auto)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def train(
    cfg: TrialConfig,
    sink: Sink | None = None,
    *,
    cache_dir: str | Path,
    resume: dict | None = None,
) -> TrialResult:
    """Train one trial; report to ``sink`` at every mark; return how it ended.

    Changes no process-wide state: a process that runs trials opts in once to the allocator
    tuning and its thread count with ``moue_core.runtime.configure_process(cfg.train.threads)``
    (the sweep's workers, ``moue train`` and the benchmarks do)."""
    t_start = time.perf_counter()
    sink = sink or NullSink()
    tc, mc = cfg.train, cfg.model
    device = _resolve_device(tc.device)
    if device.type == "cuda" and tc.gpu_memory_fraction:
        # fractional-GPU trials (e.g. 4 per card) cannot starve each other of memory
        torch.cuda.set_per_process_memory_fraction(tc.gpu_memory_fraction, device)
    corpus: Corpus = load_corpus(cfg.data, cache_dir=cache_dir)
    if corpus.vocab_size > mc.vocab_size:
        raise ConfigError("model.vocab_size", mc.vocab_size,
                          f"must be >= the corpus vocabulary ({corpus.vocab_size})")
    val = validation_set(corpus, seq_len=tc.seq_len, n_tokens=cfg.data.val_tokens)
    sampler = BatchSampler(corpus, batch_size=tc.batch_size, seq_len=tc.seq_len, seed=cfg.data.seed)
    counts = count(mc, seq_len=tc.seq_len)

    torch.manual_seed(tc.seed)
    model = MoUEModel(mc).to(device)
    schedule = None
    if tc.init_from:
        blob = torch.load(tc.init_from, map_location="cpu", weights_only=True)
        if ModelConfig.from_dict(blob["config"]) != mc:
            raise ConfigError("train.init_from", tc.init_from, "holds a model whose config differs from model.*")
        model.load_state_dict(blob["model"])
        start = int(blob.get("start_window", mc.window))
        if tc.widen_tokens:
            schedule = WindowSchedule(start=start, end=mc.window, start_step=0,
                                      end_step=max(1, tc.widen_tokens // tc.batch_tokens))
        else:
            model.set_window(start)
    optimizer = torch.optim.AdamW(_param_groups(model, tc.weight_decay), lr=tc.lr,
                                  betas=(tc.beta1, tc.beta2), fused=device.type == "cuda")
    step = 0
    timers = {"train": 0.0, "eval": 0.0}
    if resume is not None:
        if resume.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"checkpoint version {resume.get('version')!r}, expected {CHECKPOINT_VERSION}")
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        sampler.load_state_dict(resume["sampler"])
        torch.set_rng_state(resume["rng"])
        step = int(resume["step"])
        timers = dict(resume["timers"])
    forward = torch.compile(model) if tc.compile else model
    use_bf16 = device.type == "cuda"

    def autocast():
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16)

    base = dict(status="finished", stop_reason="", counts=counts, corpus_fingerprint=corpus.fingerprint,
                val_sha256=val.sha256)
    reachable_P = (torch.tensor(mc.topology.exposure) > 0) if mc.ffn == "moe" else None
    window_sums = _Window(reachable_P)
    mark_train_s = timers["train"]
    resumed_at = step if resume is not None else None  # that mark was reported before the checkpoint
    val_loss = resume["val_loss"] if resume is not None else math.nan
    while True:
        at_mark = step % tc.eval_every_steps == 0 or step == tc.steps
        if at_mark and step != resumed_at:
            t0 = time.perf_counter()
            val_loss = _evaluate(model, val, tc.eval_batch, device, autocast)
            timers["eval"] += time.perf_counter() - t0
            interval_train_s = timers["train"] - mark_train_s
            metrics = {"val/loss": val_loss, "lr": lr_at(min(step, tc.steps - 1), tc), **window_sums.means(),
                       "tokens_per_s": window_sums.tokens / interval_train_s if interval_train_s > 0 else 0.0,
                       "time/train_s": timers["train"], "time/eval_s": timers["eval"]}
            if not math.isfinite(val_loss):
                return _diverged(sink, step * tc.batch_tokens, f"validation loss is {val_loss}", timers, t_start, base)
            ckpt = {"version": CHECKPOINT_VERSION, "step": step, "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(), "sampler": sampler.state_dict(),
                    "rng": torch.get_rng_state(), "timers": dict(timers), "val_loss": val_loss}
            if step == tc.steps:  # the last mark carries the final metrics and the status
                metrics.update({"final/val_loss": val_loss, "final/tokens": step * tc.batch_tokens,
                                "final/flops": counts.compute(step * tc.batch_tokens),
                                "final/wall_s": time.perf_counter() - t_start, "final/train_s": timers["train"],
                                "final/eval_s": timers["eval"], "status": "finished"})
            sink.report(metrics, step * tc.batch_tokens, checkpoint=ckpt)
            window_sums = _Window(reachable_P)
            mark_train_s = timers["train"]
        if step == tc.steps:
            break

        # ---- one training step: the hot path
        t0 = time.perf_counter()
        if schedule is not None:
            model.set_window(schedule.window_at(step))
        lr = lr_at(step, tc)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = next(sampler)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast():
            out = forward(x)
            loss = F.cross_entropy(out.logits.float().flatten(0, 1), y.flatten())
            total = loss + out.aux_loss
        total.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or math.inf)
        loss_v, gn_v = loss.item(), grad_norm.item()  # sync point: the divergence check needs them
        if not (math.isfinite(loss_v) and math.isfinite(gn_v)) or loss_v > tc.max_loss:
            optimizer.zero_grad(set_to_none=True)
            timers["train"] += time.perf_counter() - t0
            what = "loss" if not math.isfinite(loss_v) or loss_v > tc.max_loss else "gradient norm"
            value = loss_v if what == "loss" else gn_v
            return _diverged(sink, (step + 1) * tc.batch_tokens,
                             f"{what} {value:.4g} at step {step + 1} (lr {lr:.3g})", timers, t_start, base)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if out.stats is not None and mc.expert_bias:
            model.moe.router.update_bias(out.stats.load_Lw)
        step += 1
        timers["train"] += time.perf_counter() - t0
        window_sums.add(loss_v, gn_v, out.stats, tc.batch_tokens)

    wall = time.perf_counter() - t_start
    flops = counts.compute(tc.steps * tc.batch_tokens)
    return TrialResult(tokens=tc.steps * tc.batch_tokens, final_val_loss=val_loss, flops=flops,
                       wall_s=wall, train_s=timers["train"], eval_s=timers["eval"],
                       tokens_per_s=tc.steps * tc.batch_tokens / max(timers["train"], 1e-9), **base)


def _diverged(sink: Sink, tokens: int, reason: str, timers, t_start, base) -> TrialResult:
    sink.report({"status": "diverged", "stop_reason": reason}, tokens)
    wall = time.perf_counter() - t_start
    return TrialResult(**{**base, "status": "diverged", "stop_reason": reason}, tokens=tokens,
                       final_val_loss=None, flops=base["counts"].compute(tokens), wall_s=wall,
                       train_s=timers["train"], eval_s=timers["eval"],
                       tokens_per_s=tokens / max(timers["train"], 1e-9))


class _Window:
    """Running sums of the training metrics between two marks.

    ``balance/load_cv`` and ``balance/dead_frac`` are over the pool: the tokens each reachable
    expert processed in the interval, summed over layers (coefficient of variation; fraction of
    reachable experts that processed none).
    """

    def __init__(self, reachable_P: torch.Tensor | None) -> None:
        self.n = 0
        self.tokens = 0
        self.sums: dict[str, float] = {}
        self.reachable_P = reachable_P
        self.load_P: torch.Tensor | None = None

    def add(self, loss: float, grad_norm: float, stats, tokens: int) -> None:
        self.n += 1
        self.tokens += tokens
        vals = {"train/loss": loss, "grad_norm": grad_norm}
        if stats is not None:
            load_P = stats.load_LP.sum(dim=0)
            self.load_P = load_P if self.load_P is None else self.load_P + load_P
            vals.update({"balance/loss": float(stats.balance_loss), "router/entropy": float(stats.entropy_L.mean()),
                         "router/z": float(stats.lse_L.mean())})
        for k, v in vals.items():
            self.sums[k] = self.sums.get(k, 0.0) + v

    def means(self) -> dict[str, float]:
        if not self.n:
            return {}
        out = {k: v / self.n for k, v in self.sums.items()}
        if self.load_P is not None:
            load = self.load_P[self.reachable_P].float()
            out["balance/load_cv"] = float(load.std(unbiased=False) / load.mean().clamp_min(1e-9))
            out["balance/dead_frac"] = float((load == 0).float().mean())
        return out
