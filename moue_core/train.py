"""One trial: ``train(config, sink) -> TrialResult`` (docs/ARCHITECTURE.md, "the path of one trial").

Knows nothing of Ray or MLflow. The sink receives metrics at fixed token marks (docs/TRACKING.md names,
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
import dataclasses
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F

from moue.config import ModelConfig
from moue.convert import WindowSchedule
from moue.counting import Counts, count
from moue.data import BatchSampler, load_corpus, validation_set
from moue.errors import ConfigError
from moue.model import MoUEModel
from moue.tracking_contract import FINAL_TOKENS, FINAL_VAL_LOSS, VAL_LOSS
from moue.trial_config import TrainConfig, TrialConfig, cooldown_lr, lr_at

__all__ = ["TrainConfig", "TrialConfig", "TrialResult", "Mark", "Sink", "NullSink", "train", "lr_at", "adamw",
           "CHECKPOINT_VERSION"]

CHECKPOINT_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class TrialResult:
    """How a trial ended (returned by ``train`` and carried by its last ``Mark``)."""

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

    def as_metrics(self) -> dict[str, Any]:
        """The tracking names of the end state: ``final/*`` and ``status`` for a finished trial,
        ``status`` and ``stop_reason`` for a diverged one (``moue.tracking_contract``)."""
        if self.status != "finished":
            return {"status": self.status, "stop_reason": self.stop_reason}
        return {FINAL_VAL_LOSS: self.final_val_loss, FINAL_TOKENS: self.tokens, "final/flops": self.flops,
                "final/wall_s": self.wall_s, "final/train_s": self.train_s, "final/eval_s": self.eval_s,
                "status": self.status}


@dataclass(frozen=True, kw_only=True)
class Mark:
    """One report of a trial, at ``tokens`` seen: the learning-curve metrics (tracking names), the
    checkpoint to keep, and, on the last report, how the trial ended (``result``).

    The checkpoint holds the live model and optimizer tensors: a sink persists or copies it before
    ``report`` returns."""

    tokens: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    checkpoint: dict | None = None
    result: TrialResult | None = None

    def as_metrics(self) -> dict[str, Any]:
        """The report as one flat dict of tracking names (what a sink at an edge writes)."""
        return {**self.metrics, **(self.result.as_metrics() if self.result is not None else {})}


class Sink(Protocol):
    def report(self, mark: Mark) -> None: ...


class NullSink:
    """Keeps every report in memory (tests, direct use); checkpoints are deep copies."""

    def __init__(self) -> None:
        self.marks: list[Mark] = []
        self.checkpoints: list[tuple[int, dict]] = []

    def report(self, mark: Mark) -> None:
        self.marks.append(dataclasses.replace(mark, checkpoint=None))
        if mark.checkpoint is not None:
            self.checkpoints.append((mark.tokens, copy.deepcopy(mark.checkpoint)))

    @property
    def reports(self) -> list[tuple[int, dict[str, Any]]]:
        """``(tokens, flat metrics)`` per report."""
        return [(m.tokens, m.as_metrics()) for m in self.marks]


def _param_groups(model: MoUEModel, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay on norms, biases, scalars and the input embedding."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.dim() < 2 or name.startswith("embed.") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(model: MoUEModel, tc: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """The trial's AdamW (``_param_groups``), fused into one kernel per step on CPU and CUDA.

    On CPU the fused kernel replaces the per-parameter loop of about ten ops per tensor and a
    host read of each step count: a small trial's step (2 layers, ``d = 32``, 512 tokens) took
    8.8 ms against 10.0 ms, the quickstart trial's 416 against 430 ms (2-core Xeon, alternated;
    ``studies/LOG.md``, 2026-12-07 session 16). It computes the same update to float rounding.
    A checkpoint written by the loop keeps the loop after a resume (``load_state_dict`` restores
    the saved group settings)."""
    return torch.optim.AdamW(_param_groups(model, tc.weight_decay), lr=tc.lr, betas=(tc.beta1, tc.beta2),
                             fused=device.type in ("cpu", "cuda"))


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
    """Train one trial; report a ``Mark`` to ``sink`` at every mark; return how it ended.

    Changes no process-wide state: a process that runs trials opts in once to the allocator
    tuning and its thread count with ``moue.runtime.configure_process(cfg.train.threads)``
    (the sweep's workers, ``moue train`` and the benchmarks do)."""
    run = _Run(cfg, cache_dir=cache_dir, resume=resume)
    sink = sink or NullSink()
    tc = cfg.train
    resumed_at = run.step if resume is not None else None  # that mark was reported before the checkpoint
    while True:
        if (run.step % tc.eval_every_steps == 0 or run.step == tc.steps) and run.step != resumed_at:
            mark = run.mark()
            sink.report(mark)
            if mark.result is not None:
                return mark.result
        if run.step == tc.steps:  # resumed at the last mark: it was reported before the checkpoint
            return run.result("finished", "", tc.steps * tc.batch_tokens)
        tokens_at = run.branch_steps.get(run.step)
        if tokens_at is not None and tokens_at not in run.branches:
            run.cooldown(tokens_at)
        diverged = run.train_step()
        if diverged is not None:
            sink.report(Mark(tokens=diverged.tokens, result=diverged))
            return diverged


class _Run:
    """The state of one trial between marks: model, optimizer, batches, schedule, timers."""

    def __init__(self, cfg: TrialConfig, *, cache_dir: str | Path, resume: dict | None) -> None:
        self.t_start = time.perf_counter()
        self.cfg = cfg
        tc, mc = cfg.train, cfg.model
        self.device = device = _resolve_device(tc.device)
        if device.type == "cuda" and tc.gpu_memory_fraction:
            # fractional-GPU trials (e.g. 4 per card) cannot starve each other of memory
            torch.cuda.set_per_process_memory_fraction(tc.gpu_memory_fraction, device)
        self.corpus = corpus = load_corpus(cfg.data, cache_dir=cache_dir)
        if corpus.vocab_size > mc.vocab_size:
            raise ConfigError("model.vocab_size", mc.vocab_size,
                              f"must be >= the corpus vocabulary ({corpus.vocab_size})")
        self.val = validation_set(corpus, seq_len=tc.seq_len, n_tokens=cfg.data.val_tokens)
        self.sampler = BatchSampler(corpus, batch_size=tc.batch_size, seq_len=tc.seq_len, seed=cfg.data.seed)
        self.counts = count(mc, seq_len=tc.seq_len)
        self.corpus_fingerprint = corpus.fingerprint

        torch.manual_seed(tc.seed)
        self.model = MoUEModel(mc).to(device)
        self.schedule = self._init_from(tc, mc) if tc.init_from else None
        self.optimizer = adamw(self.model, tc, device)
        self.step = 0
        self.timers = {"train": 0.0, "eval": 0.0}
        self.val_loss = math.nan
        # cooldown branches: optimizer step -> its token count; those run, and those not yet reported
        self.branch_steps = {t // tc.batch_tokens: t for t in tc.cooldown_at}
        self.branches: dict[int, dict[str, float]] = {}
        self.pending: list[int] = []
        if resume is not None:
            self._resume(resume)
        if tc.compile:  # the routing-independent parts, in place (MoUEModel.compile_regions)
            self.model.compile_regions()
        self.use_bf16 = device.type == "cuda"
        self.visible: dict[int, torch.Tensor] = {}  # active window -> experts some layer can reach
        self.window_sums = _Window()
        self.mark_train_s = self.timers["train"]

    def _init_from(self, tc: TrainConfig, mc: ModelConfig) -> WindowSchedule | None:
        """Start from a converted checkpoint; its window widens over ``widen_tokens`` (or stays)."""
        blob = torch.load(tc.init_from, map_location="cpu", weights_only=True)
        if ModelConfig.from_dict(blob["config"]) != mc:
            raise ConfigError("train.init_from", tc.init_from, "holds a model whose config differs from model.*")
        self.model.load_state_dict(blob["model"])
        start = int(blob.get("start_window", mc.window))
        self.model.set_window(start)  # also for the first mark's evaluation, before any step
        if tc.widen_tokens:
            return WindowSchedule(start=start, end=mc.window, start_step=0,
                                  end_step=max(1, tc.widen_tokens // tc.batch_tokens))
        return None

    def _resume(self, resume: dict) -> None:
        if resume.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"checkpoint version {resume.get('version')!r}, expected {CHECKPOINT_VERSION}")
        self.model.load_state_dict(resume["model"])
        self.optimizer.load_state_dict(resume["optimizer"])
        self.sampler.load_state_dict(resume["sampler"])
        torch.set_rng_state(resume["rng"])
        self.step = int(resume["step"])
        self.timers = dict(resume["timers"])
        self.val_loss = resume["val_loss"]
        self.branches = {int(t): dict(b) for t, b in resume.get("branches", {}).items()}

    def autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16)

    def result(self, status: str, reason: str, tokens: int) -> TrialResult:
        train_s = self.timers["train"]
        return TrialResult(status=status, stop_reason=reason, tokens=tokens,
                           final_val_loss=self.val_loss if status == "finished" else None,
                           flops=self.counts.compute(tokens), wall_s=time.perf_counter() - self.t_start,
                           train_s=train_s, eval_s=self.timers["eval"], tokens_per_s=tokens / max(train_s, 1e-9),
                           counts=self.counts, corpus_fingerprint=self.corpus_fingerprint, val_sha256=self.val.sha256)

    def mark(self) -> Mark:
        """Evaluate, and the report of this mark (the last one carries the result)."""
        tc, step = self.cfg.train, self.step
        t0 = time.perf_counter()
        self.val_loss = _evaluate(self.model, self.val, tc.eval_batch, self.device, self.autocast)
        self.timers["eval"] += time.perf_counter() - t0
        tokens = step * tc.batch_tokens
        if not math.isfinite(self.val_loss):
            return Mark(tokens=tokens, result=self.result("diverged", f"validation loss is {self.val_loss}", tokens))
        interval_train_s = self.timers["train"] - self.mark_train_s
        metrics = {VAL_LOSS: self.val_loss, "lr": lr_at(min(step, tc.steps - 1), tc), **self.window_sums.means(),
                   "tokens_per_s": self.window_sums.tokens / interval_train_s if interval_train_s > 0 else 0.0,
                   "time/train_s": self.timers["train"], "time/eval_s": self.timers["eval"],
                   **self.branch_metrics(final=step == tc.steps)}
        ckpt = {"version": CHECKPOINT_VERSION, "step": step, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "sampler": self.sampler.state_dict(),
                "rng": torch.get_rng_state(), "timers": dict(self.timers), "val_loss": self.val_loss,
                "branches": {str(t): b for t, b in self.branches.items()}}
        self.window_sums = _Window()
        self.mark_train_s = self.timers["train"]
        result = self.result("finished", "", tokens) if step == tc.steps else None
        return Mark(tokens=tokens, metrics=metrics, checkpoint=ckpt, result=result)

    def train_step(self) -> TrialResult | None:
        """One optimizer step (the hot path); the result when it diverged."""
        tc, step, model = self.cfg.train, self.step, self.model
        t0 = time.perf_counter()
        if self.schedule is not None:
            model.set_window(self.schedule.window_at(step))
        lr = lr_at(step, tc)
        loss_v, gn_v, out = self._step(model, self.optimizer, self.sampler, lr)
        if out is None:
            self.timers["train"] += time.perf_counter() - t0
            what = "loss" if not math.isfinite(loss_v) or loss_v > tc.max_loss else "gradient norm"
            value = loss_v if what == "loss" else gn_v
            return self.result("diverged", f"{what} {value:.4g} at step {step + 1} (lr {lr:.3g})",
                               (step + 1) * tc.batch_tokens)
        self.step += 1
        self.timers["train"] += time.perf_counter() - t0
        self.window_sums.add(loss_v, gn_v, out.stats, tc.batch_tokens, self.reach())
        return None

    def _step(self, model, optimizer, sampler, lr: float):
        """Forward, backward, clip, optimizer step, expert-bias update at ``lr``: (loss, grad
        norm, output), the output ``None`` when the step diverged (nothing was applied)."""
        tc = self.cfg.train
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = next(sampler)
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        with self.autocast():
            out = model(x)
            loss = F.cross_entropy(out.logits.float().flatten(0, 1), y.flatten())
            total = loss + out.aux_loss
        total.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or math.inf)
        loss_v, gn_v = loss.item(), grad_norm.item()  # sync point: the divergence check needs them
        if not (math.isfinite(loss_v) and math.isfinite(gn_v)) or loss_v > tc.max_loss:
            optimizer.zero_grad(set_to_none=True)
            return loss_v, gn_v, None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if out.stats is not None and self.cfg.model.expert_bias:
            model.moe.router.update_bias(out.stats.load_Lw)
        return loss_v, gn_v, out

    def cooldown(self, tokens_at: int) -> None:
        """A cooldown branch from this step (``TrainConfig.cooldown_at``): a copy of the model and
        optimizer decays the LR over ``cooldown_frac`` of the steps so far on the batches the main
        run would see next, is evaluated, and is dropped; the main run's state is untouched."""
        tc = self.cfg.train
        t0 = time.perf_counter()
        steps = max(1, round(tc.cooldown_frac * self.step))
        model = copy.deepcopy(self.model)  # eager: a copy does not keep nn.Module.compile's compiled call
        optimizer = adamw(model, tc, self.device)
        optimizer.load_state_dict(copy.deepcopy(self.optimizer.state_dict()))  # its state tensors, not the main run's
        sampler = BatchSampler(self.corpus, batch_size=tc.batch_size, seq_len=tc.seq_len, seed=self.cfg.data.seed)
        sampler.load_state_dict(self.sampler.state_dict())
        rng = torch.get_rng_state()
        peak, val = lr_at(self.step, tc), math.nan
        for i in range(steps):
            lr = cooldown_lr(i, steps, peak, tc.min_lr_ratio * tc.lr, tc.cooldown_shape)
            if self._step(model, optimizer, sampler, lr)[2] is None:
                break  # a diverged branch is recorded with a NaN loss
        else:
            val = _evaluate(model, self.val, tc.eval_batch, self.device, self.autocast)
        torch.set_rng_state(rng)
        tokens = (self.step + steps) * tc.batch_tokens
        self.branches[tokens_at] = {"val_loss": val, "tokens": tokens, "flops": self.counts.compute(tokens),
                                    "branch_tokens": steps * tc.batch_tokens}
        self.pending.append(tokens_at)
        self.timers["cooldown"] = self.timers.get("cooldown", 0.0) + time.perf_counter() - t0

    def branch_metrics(self, final: bool) -> dict[str, float]:
        """``cooldown/<t>/*`` of the branches run since the last mark, and at the last mark every
        branch again as ``final/cooldown/<t>/*`` (what the loader reads as extra (N, D) points)."""
        out = {f"cooldown/{t}/{k}": v for t in self.pending for k, v in self.branches[t].items()}
        self.pending = []
        if final:
            out.update({f"final/cooldown/{t}/{k}": v for t, b in self.branches.items() for k, v in b.items()})
        return out

    def reach(self) -> torch.Tensor | None:
        """``[L_moe, P]``: which experts each MoE layer's active window holds now (fewer while a
        window widens); an expert is visible when some layer reaches it."""
        if self.model.moe is None:
            return None
        w = self.model.moe.window
        if w not in self.visible:
            topo, P = self.cfg.model.topology, self.cfg.model.pool_size
            mask = torch.zeros(topo.n_layers, P, dtype=torch.bool)
            for layer in range(topo.n_layers):
                mask[layer, list(topo.window_ids(layer)[:w])] = True
            self.visible[w] = mask.to(self.device)
        return self.visible[w]


class _Window:
    """Running sums of the training metrics between two marks.

    ``balance/load_cv`` and ``balance/dead_frac`` are over the pool: the tokens each visible
    expert processed in the interval, summed over layers (coefficient of variation; fraction of
    visible experts that processed none). Visible: in some layer's active window at some step of
    the interval, so an expert a widening window has not reached yet is not counted as dead.

    Load metrics per MoE layer ``l`` (its index among the MoE layers) over the interval, from the
    tokens routed to each expert of its window (chosen pairs, before any capacity drop):

    - ``balance/maxvio/layer_l``: ``max_j load_j / mean_j load_j - 1`` (MaxVio, Wang et al. 2024,
      "Auxiliary-loss-free load balancing"; 0 is perfectly balanced);
    - ``balance/load_entropy/layer_l``: ``-sum_j p_j ln p_j / ln w``, ``p_j = load_j / sum load``
      (1 is uniform over the window, 0 is one expert);
    - ``balance/maxvio``: pool-wide MaxVio of each visible expert's load per layer that reached it
      (so an expert two layers share is not "overloaded" for carrying two layers' tokens);
    - ``balance/dropped_frac``: the mean fraction of chosen pairs dropped for capacity.
    """

    def __init__(self) -> None:
        self.n = 0
        self.tokens = 0
        self.sums: dict[str, float] = {}
        self.reach_LP: torch.Tensor | None = None  # steps each layer's window held each expert
        self.load_LP: torch.Tensor | None = None

    def add(self, loss: float, grad_norm: float, stats, tokens: int, reach_LP: torch.Tensor | None = None) -> None:
        self.n += 1
        self.tokens += tokens
        vals = {"train/loss": loss, "grad_norm": grad_norm}
        if stats is not None:
            load_LP = stats.load_LP
            held_LP = (torch.ones_like(load_LP) if reach_LP is None else reach_LP.to(load_LP.device, load_LP.dtype))
            self.load_LP = load_LP if self.load_LP is None else self.load_LP + load_LP
            self.reach_LP = held_LP if self.reach_LP is None else self.reach_LP + held_LP
            vals.update({"balance/loss": float(stats.balance_loss), "router/entropy": float(stats.entropy_L.mean()),
                         "router/z": float(stats.lse_L.mean()), "balance/dropped_frac": float(stats.dropped_frac)})
        for k, v in vals.items():
            self.sums[k] = self.sums.get(k, 0.0) + v

    def means(self) -> dict[str, float]:
        if not self.n:
            return {}
        out = {k: v / self.n for k, v in self.sums.items()}
        if self.load_LP is not None:
            out.update(_load_metrics(self.load_LP.float(), self.reach_LP.float()))
        return out


def _maxvio(load: torch.Tensor) -> float:
    return float(load.max() / load.mean().clamp_min(1e-9) - 1)


def _load_metrics(load_LP: torch.Tensor, reach_LP: torch.Tensor) -> dict[str, float]:
    """The pool and per-layer load metrics of ``_Window`` (its docstring)."""
    visible_P = reach_LP.sum(0) > 0
    load_P = load_LP.sum(0)[visible_P]
    out = {"balance/load_cv": float(load_P.std(unbiased=False) / load_P.mean().clamp_min(1e-9)),
           "balance/dead_frac": float((load_P == 0).float().mean())}
    # per reaching layer: an expert's load over the interval / the layer-steps its windows held it,
    # against the same for the others
    per_reach_P = load_LP.sum(0)[visible_P] / reach_LP.sum(0)[visible_P]
    out["balance/maxvio"] = _maxvio(per_reach_P)
    for layer in range(load_LP.shape[0]):
        held = reach_LP[layer] > 0
        load = load_LP[layer][held]
        p = load / load.sum().clamp_min(1e-9)
        ent = -(p * p.clamp_min(1e-30).log()).sum() / math.log(held.sum()) if held.sum() > 1 else p.new_ones(())
        out[f"balance/maxvio/layer_{layer}"] = _maxvio(load)
        out[f"balance/load_entropy/layer_{layer}"] = float(ent)
    return out
