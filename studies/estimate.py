"""The wall time a study's sweep will take here, estimated before it runs (``moue sweep --dry-run``).

A trial's time is its training tokens times a per-token cost that grows with the model,
``c(f) = c0 + f / R`` for a model of ``f`` training FLOPs per token: ``c0`` is what does not scale
with the model (the step's fixed overhead: kernel launches, the optimizer's per-tensor work,
Python), ``R`` the FLOP rate the arithmetic reaches. Both are measured on this machine, not assumed:
a few optimizer steps of the study's smallest and largest model (by ``f``) on random tokens, at the
trial's threads and batch, give two costs and so the line. Added to each trial: its evaluations
(``marks`` passes over the validation tokens, and one per cooldown branch, at a third of a
training token's cost: forward only), its branches' cooldown steps, and a fixed start-up
(``STARTUP_S``: the Ray worker, the corpus, the MLflow run). The sweep's wall time is the trials
scheduled in grid order on ``concurrency`` slots, each to the first free slot (Ray's FIFO
placement), so a long last trial shows.

It is an estimate: trials that share the machine slow each other (memory bandwidth), ASHA stops
trials early (the estimate is then an upper bound), and a machine under other load is slower.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["STARTUP_S", "Estimate", "cost_line", "estimate_sweep", "human_duration", "on_gpu", "step_cost", "trial_tokens"]

STARTUP_S = 3.0  # per trial: worker, corpus load, MLflow run (moue bench sweep's overhead, 2 CPUs)


@dataclass(frozen=True)
class Estimate:
    wall_s: float
    trial_s: tuple[float, ...]  # per trial, in plan order
    concurrency: int
    c0: float  # seconds per token that do not scale with the model
    rate: float  # FLOP/s of the arithmetic
    basis: str  # what was timed

    def line(self) -> str:
        total = sum(self.trial_s)
        return (f"estimated wall time: ~{human_duration(self.wall_s)} ({human_duration(total)} of trials on {self.concurrency} "
                f"slot{'s' if self.concurrency != 1 else ''}; {self.basis})")


def human_duration(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


def step_cost(cfg, *, steps: int = 3) -> float:
    """Seconds per training token of ``cfg`` (a ``TrialConfig``): the median of ``steps`` timed
    AdamW steps on random tokens after one untimed, at the trial's threads."""
    import torch

    from moue.bench import synthetic_step
    from moue.runtime import set_threads

    tc = cfg.train
    threads = torch.get_num_threads()
    set_threads(tc.threads or None)
    try:
        _, step = synthetic_step(cfg)
        times = []
        for i in range(steps + 1):
            t0 = time.perf_counter()
            step()
            if i:
                times.append(time.perf_counter() - t0)
    finally:
        set_threads(threads)
    return sorted(times)[len(times) // 2] / tc.batch_tokens


def trial_tokens(plan, marks: int) -> float:
    """Training-token equivalents of a trial: its tokens, its branches' cooldown steps, and its
    evaluations at a third of a training token each."""
    tc, val = plan.config.train, plan.config.data.val_tokens
    branch = sum(max(1, round(tc.cooldown_frac * (t // tc.batch_tokens))) * tc.batch_tokens for t in tc.cooldown_at)
    evals = (marks + 1 + len(tc.cooldown_at)) * val / 3
    return tc.tokens + branch + evals


def on_gpu(plans: Sequence) -> bool:
    """Whether the trials of ``plans`` train on a GPU here (``cuda``, or ``auto`` with one present):
    then timed CPU steps say nothing about them."""
    devices = {p.config.train.device for p in plans}
    if "cuda" in devices:
        return True
    if "auto" in devices:
        import torch

        return torch.cuda.is_available()
    return False


def cost_line(plans: Sequence, *, cost=step_cost) -> tuple[float, float, str]:
    """``(c0, R, basis)`` of the per-token cost ``c0 + f / R`` through the smallest and largest
    model of ``plans`` (by ``flops_per_token``), timed by ``cost(cfg)``; one size: ``c0 = 0``."""
    f = [p.counts.flops_per_token for p in plans]
    lo, hi = min(range(len(f)), key=f.__getitem__), max(range(len(f)), key=f.__getitem__)
    c_lo = cost(plans[lo].config)
    if f[hi] > 1.2 * f[lo]:
        c_hi = cost(plans[hi].config)
        rate = (f[hi] - f[lo]) / max(c_hi - c_lo, 1e-12)
        c0 = max(0.0, c_lo - f[lo] / rate)
        return c0, rate, (f"timed steps of the smallest and largest model here: {c0 * 1e6:.3g} us/token + "
                          f"{rate / 1e9:.3g} GFLOP/s")
    rate = f[lo] / c_lo  # one size: all of the cost scales with it
    return 0.0, rate, f"timed steps of the model here: {rate / 1e9:.3g} GFLOP/s"


def estimate_sweep(plans: Sequence, *, concurrency: int, marks: int, cost=step_cost,
                   line: tuple[float, float, str] | None = None) -> Estimate:
    """The wall time of ``plans`` (``TrialPlan``s, in the order the sweep launches them) on
    ``concurrency`` slots; ``cost(cfg)`` is seconds per training token (``step_cost``), or
    ``line`` is ``cost_line``'s result, timed already."""
    if not plans:
        return Estimate(0.0, (), concurrency, 0.0, math.inf, "no trials")
    c0, rate, basis = line or cost_line(plans, cost=cost)
    per = tuple(STARTUP_S + trial_tokens(p, marks) * (c0 + p.counts.flops_per_token / rate) for p in plans)
    slots = [0.0] * max(1, min(concurrency, len(per)))
    for s in per:  # each trial to the first free slot
        heapq.heapreplace(slots, slots[0] + s)
    return Estimate(max(slots), per, len(slots), c0, rate, basis)
