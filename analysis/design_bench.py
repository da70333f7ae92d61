"""``moue bench design``: the adaptive design (``moue.analysis.design``) against the fixed grid of
the same candidates, on **simulated** trials whose loss comes from a known law plus seed noise.

It is a benchmark of the design algorithm, not a substitute for training: the truth is known, so
each repetition can say whether the design's final interval covers it. Both policies run the same
looks and stop by the same rules (``Design(policy="adaptive")`` proposes by the variance shrink per
FLOP, ``policy="grid"`` in the grid's seed-major order), so the compute each spends until it stops
is "the compute to reach the same target precision".

**Scenarios** (the noise scales are the ones measured in this project's real studies):

- ``family``: a paired target (``family:MoUE-style``): a reference and a variant arm at 4 sizes
  with the quickstart ladder's costs (1, 4.39, 12.8, 29.8 x 0.832e11 FLOPs), up to 60 seeds per
  size, decided at a 1% margin. The reference's loss is the quickstart's ``compute_power`` law at the
  size's compute with 1% log noise per run; the variant's is the reference's times
  ``1 + effect + e`` with ``e ~ N(0, 2.4%)``, the pair-to-pair sd of the positive control's pilot
  (studies/LOG.md, 2026-12-07). So a pair's relative difference has mean ``effect`` exactly. The
  effect is -1.3% (the MoUE paper's claim) for the compute ratio and the coverage, and 0 (a true
  null) for the false detection rate.
- ``exponent``: ``exponent:compute_power.alpha`` with ``L = A C^-alpha``, ``A = 70.04``,
  ``alpha = 0.133`` (the quickstart's fit, studies/results/quickstart_report.json), 5 sizes (the
  ladder's 4 and one of 60 x 0.83e11 FLOPs) by 24 seeds, 1% log noise per run (the seed scale of
  the quickstart-size runs: the E = 8 arm's seed sd in the pilot above), half-width 0.003 (about
  15 looks). Why 24 seeds: with 12, 5% of the repetitions ran out of candidates before either
  design reached the precision (the grid needs 7-8 of its seeds on average), where "the compute to
  reach the precision" is undefined; and the adaptive design's choice per FLOP (the cheapest size
  and a middle one: for a slope, spread per cost) used up the cheapest size's 12 seeds, so the
  candidate set rather than the criterion bounded it (ratio 0.80 with 12 seeds, 0.49 with 24, 150
  repetitions each). The grid spends the same either way: it stops at the same seed.

The budget of each is its whole grid, so a design stops undecided only when the candidates run out.
**Common random numbers**: each candidate's outcome is drawn once per repetition from a generator
seeded by (seed, scenario, repetition), so both policies see the same loss for the same trial and
their compute difference is the policies' alone.

**Figures.** ``compute_ratio`` = mean adaptive compute at the stop / mean grid compute at the stop
(also against the whole grid's compute); ``truth_coverage`` = the share of repetitions whose final
95% interval covers the truth (the grid's too, for reference); ``false_detection_rate`` = the share
of null repetitions that end ``detected`` (and the share ``ruled_out``). Monte Carlo standard
errors: ``sqrt(p (1 - p) / n)`` for a rate; for the ratio of means, by the delta method on the
paired repetitions, ``sd(a_i - R g_i) / (sqrt(n) mean(g))`` (Cochran 1977, Sampling Techniques,
section 6.4). Goals (issue 34): compute_ratio <= 0.6, truth_coverage >= 0.90,
false_detection_rate <= 0.07. Expect the paired scenario's ratio near 0.77, not 0.6: with equal
pair sds, Cochran's optimum allocation over strata of costs ``c_s`` spends
``(sum sqrt(c_s))^2 / (S sum c_s)`` of equal allocation's compute for the same variance, 0.767 for
this ladder (Cochran 1977, section 5.5); the grid allocates equally.

Repetitions run in ``workers`` processes (each repetition is seeded alone, so the figures do not
depend on how many).
"""

from __future__ import annotations

import functools
import json as _json
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import TextIO

import numpy as np

from moue.analysis.design import Candidate, Design, DesignSpec, Look
from moue.analysis.errors import AnalysisError

__all__ = ["GOALS", "SCENARIOS", "Scenario", "exponent_scenario", "family_scenario", "measure", "run_design_bench",
           "simulate"]

FLOP_UNIT = 0.832e11  # the quickstart ladder's smallest trial, FLOPs
LADDER = (1.0, 4.39, 12.8, 29.8)  # the quickstart ladder's costs in FLOP_UNIT
LAW_A, LAW_ALPHA = 70.04, 0.133  # the quickstart's compute_power fit (studies/results/quickstart_report.json)
SEED_LOG_SD = 0.01  # log-loss sd of one run: the seed scale of the quickstart-size runs
PAIR_SD = 0.024  # sd of a pair's relative difference: the positive control's pilot (studies/LOG.md 2026-12-07)
PAPER_EFFECT = -0.013  # the MoUE paper's claimed improvement
GOALS = {"compute_ratio": 0.6, "truth_coverage": 0.90, "false_detection_rate": 0.07}
DEFAULT_REPS = 300  # about 3.5 minutes on two cores (a 2-core AMD EPYC VM)


@dataclass(frozen=True, kw_only=True)
class Scenario:
    """A simulated study: its design spec, candidates, the truth its target estimates, and how one
    repetition's outcomes are drawn (``draw(rng) -> {candidate index: (loss,)}``)."""

    name: str
    spec: DesignSpec
    candidates: tuple[Candidate, ...]
    truth: float
    draw: Callable[[np.random.Generator], dict[int, tuple[float, ...]]]

    @property
    def grid_compute(self) -> float:
        return sum(c.cost for c in self.candidates)


def family_scenario(effect: float = PAPER_EFFECT, *, seeds: int = 60) -> Scenario:
    """The paired scenario: ``effect`` is the variant's relative difference (a fraction)."""
    cands, refs = [], []
    for seed in range(seeds):
        for s, unit in enumerate(LADDER):
            for arm in ("reference", "variant"):
                cands.append(Candidate(index=len(cands), cost=unit * FLOP_UNIT, seed=seed, arm=arm, stratum=(s,),
                                       setting=(s, arm), label=f"size{s} {arm} seed{seed}"))
            refs.append(len(cands) - 2)
    law = np.array([LAW_A * (LADDER[s] * FLOP_UNIT) ** -LAW_ALPHA for s in range(len(LADDER))] * seeds)

    def draw(rng: np.random.Generator) -> dict[int, tuple[float, ...]]:
        ref = law * np.exp(rng.normal(0.0, SEED_LOG_SD, law.size))
        var = ref * (1.0 + effect + rng.normal(0.0, PAIR_SD, law.size))
        out = {}
        for i, r, v in zip(refs, ref, var):
            out[i], out[i + 1] = (float(r),), (float(v),)
        return out

    spec = DesignSpec(target="family:MoUE-style", precision=0.01, budget_flops=sum(c.cost for c in cands), batch=2)
    name = "family" if effect else "family_null"
    return Scenario(name=name, spec=spec, candidates=tuple(cands), truth=100.0 * effect, draw=draw)


def exponent_scenario(*, seeds: int = 24, precision: float = 0.003) -> Scenario:
    """The law scenario: ``alpha`` of ``compute_power`` on 5 sizes by ``seeds`` seeds."""
    costs = [unit * FLOP_UNIT for unit in (*LADDER, 60.0)]
    cands = tuple(Candidate(index=seed * len(costs) + s, cost=c, seed=seed, rows=({"C": c},), setting=(s,),
                            label=f"size{s} seed{seed}")
                  for seed in range(seeds) for s, c in enumerate(costs))
    law = np.array([LAW_A * c.cost ** -LAW_ALPHA for c in cands])

    def draw(rng: np.random.Generator) -> dict[int, tuple[float, ...]]:
        loss = law * np.exp(rng.normal(0.0, SEED_LOG_SD, law.size))
        return {c.index: (float(x),) for c, x in zip(cands, loss)}

    spec = DesignSpec(target="exponent:compute_power.alpha", precision=precision,
                      budget_flops=sum(c.cost for c in cands), batch=2)
    return Scenario(name="exponent", spec=spec, candidates=cands, truth=LAW_ALPHA, draw=draw)


def simulate(scenario: Scenario, policy: str, outcomes: dict[int, tuple[float, ...]], *, seed: int = 0) -> Look:
    """Run one design to its stop on the drawn ``outcomes``; its last look."""
    d = Design(spec=scenario.spec, candidates=scenario.candidates, policy=policy, seed=seed)
    d.initial()
    while True:
        for i in d.pending:
            d.observe(i, outcomes[i])
        look = d.step()
        if look.stop:
            return look


SCENARIOS: dict[str, Callable[[], Scenario]] = {
    "family": family_scenario, "family_null": lambda: family_scenario(0.0), "exponent": exponent_scenario}


@functools.cache
def scenario(name: str) -> Scenario:
    """The named scenario (built once per process)."""
    return SCENARIOS[name]()


def repetition(name: str, rep: int, seed: int) -> tuple[Look, Look, float]:
    """Repetition ``rep`` of scenario ``name``: both policies on one draw of the outcomes (common
    random numbers); their last looks and the CPU seconds they took."""
    sc = scenario(name)
    outcomes = sc.draw(np.random.default_rng([seed, list(SCENARIOS).index(name), rep]))
    t = time.process_time()
    looks = [simulate(sc, policy, outcomes, seed=rep) for policy in ("adaptive", "grid")]
    return looks[0], looks[1], time.process_time() - t


def _run_all(names: list[str], reps: int, seed: int, workers: int) -> dict[str, list]:
    """Every repetition of every named scenario, in ``workers`` processes."""
    jobs = [(name, rep) for name in names for rep in range(reps)]
    args = ([n for n, _ in jobs], [r for _, r in jobs], [seed] * len(jobs))
    if workers <= 1:
        results = list(map(repetition, *args))
    else:  # spawned, not forked: a parent that has run the fit's parallel kernels may hold their threads
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(repetition, *args, chunksize=4))
    out: dict[str, list] = {name: [] for name in names}
    for (name, _), result in zip(jobs, results):
        out[name].append(result)
    return out


def _rate(hits: list[bool]) -> dict:
    p = float(np.mean(hits))
    return {"rate": p, "mc_se": math.sqrt(p * (1 - p) / len(hits)), "count": int(sum(hits)), "n": len(hits)}


def _policy_summary(looks: list[Look], truth: float) -> dict:
    compute = np.array([lk.compute for lk in looks])
    verdicts = [lk.verdict for lk in looks]
    return {"mean_compute_flops": float(compute.mean()), "mean_trials": float(np.mean([lk.n_trials for lk in looks])),
            "mean_looks": float(np.mean([lk.round + 1 for lk in looks])),
            "verdicts": {v: verdicts.count(v) for v in sorted(set(verdicts))},
            "coverage": _rate([lk.lo <= truth <= lk.hi for lk in looks]),
            "detected": _rate([v == "detected" for v in verdicts]),
            "ruled_out": _rate([v == "ruled_out" for v in verdicts])}


def _summary(scenario: Scenario, results: list[tuple[Look, Look, float]]) -> dict:
    """One scenario's figures: each policy's, and the compute ratio with its delta-method SE."""
    a = np.array([r[0].compute for r in results])
    g = np.array([r[1].compute for r in results])
    ratio = float(a.mean() / g.mean())
    se = float(np.std(a - ratio * g, ddof=1) / (math.sqrt(a.size) * g.mean()))
    return {"target": scenario.spec.target, "precision": scenario.spec.precision, "truth": scenario.truth,
            "reps": int(a.size), "n_candidates": len(scenario.candidates),
            "grid_compute_flops": scenario.grid_compute,
            "compute_ratio": {"ratio": ratio, "mc_se": se},
            "compute_ratio_to_whole_grid": float(a.mean() / scenario.grid_compute),
            "adaptive": _policy_summary([r[0] for r in results], scenario.truth),
            "grid": _policy_summary([r[1] for r in results], scenario.truth),
            "cpu_s": float(sum(r[2] for r in results))}


def _goals(s: dict) -> dict:
    """The issue's goals against the figures: compute and coverage on the scenarios with an effect,
    false detections on the null."""
    out = {}
    for name in ("family", "exponent"):
        out[f"compute_ratio[{name}]"] = (s[name]["compute_ratio"]["ratio"], "<=", GOALS["compute_ratio"])
        out[f"truth_coverage[{name}]"] = (s[name]["adaptive"]["coverage"]["rate"], ">=", GOALS["truth_coverage"])
    out["false_detection_rate[family_null]"] = (s["family_null"]["adaptive"]["detected"]["rate"], "<=",
                                                GOALS["false_detection_rate"])
    return {k: {"value": v, "goal": f"{op} {goal:g}", "met": bool(v <= goal if op == "<=" else v >= goal)}
            for k, (v, op, goal) in out.items()}


def measure(reps: int = DEFAULT_REPS, seed: int = 0, *, names: tuple[str, ...] = tuple(SCENARIOS),
            workers: int | None = None) -> dict:
    """The benchmark's figures: ``reps`` repetitions of each named scenario, both policies, in
    ``workers`` processes (default: one per CPU)."""
    from moue.analysis.bench import machine

    if not (isinstance(reps, int) and reps >= 2):
        raise AnalysisError("--reps", reps, "must be a whole number >= 2")
    unknown = set(names) - set(SCENARIOS)
    if unknown:
        raise AnalysisError("scenarios", sorted(unknown), "must be among " + ", ".join(SCENARIOS))
    workers = (os.cpu_count() or 1) if workers is None else workers
    t0 = time.perf_counter()
    runs = _run_all(list(names), reps, seed, workers)
    out: dict = {"simulated": True, "seed": seed, "workers": workers,
                 "scenarios": {name: _summary(scenario(name), runs[name]) for name in names}}
    if set(SCENARIOS) <= set(names):
        out["goals"] = _goals(out["scenarios"])
    out["wall_s"] = time.perf_counter() - t0
    out.update(machine())
    return out


def run_design_bench(json: bool = False, *, reps: int = DEFAULT_REPS, seed: int = 0,
                     workers: int | None = None, stream: TextIO | None = None) -> dict:
    """Run the benchmark, print it (human-readable or one JSON object) and return the figures."""
    result = measure(reps, seed, workers=workers)
    (stream or sys.stdout).write((_json.dumps(result) if json else describe(result)) + "\n")
    return result


def _shown(rate: dict) -> str:
    return f"{rate['rate']:.3f} ({rate['count']} of {rate['n']}; +/- {rate['mc_se']:.3f})"


def _policy_line(name: str, p: dict) -> str:
    verdicts = ", ".join(f"{k} {v}" for k, v in p["verdicts"].items())
    cov = p["coverage"]
    return (f"    {name:8s} compute {p['mean_compute_flops']:.3g} FLOPs, {p['mean_trials']:.1f} trials, "
            f"{p['mean_looks']:.1f} looks; {verdicts}; truth in the final 95% interval {_shown(cov)}")


def describe(result: dict) -> str:
    """The human-readable form of the figures."""
    lines = ["Adaptive design vs the fixed grid, on SIMULATED trials (a known law plus seed noise: 1% log "
             "noise per run, the quickstart runs' seed scale;",
             "pair-to-pair sd 2.4%, the positive control's pilot, studies/LOG.md 2026-12-07; A = 70.04, "
             "alpha = 0.133, the quickstart's compute_power fit)",
             f"CPU {result['cpu']} ({result['cpu_count']} cores; processes: {result['workers']}), "
             f"seed {result['seed']}, wall {result['wall_s']:.1f} s; +/-: Monte Carlo standard errors"]
    for name, s in result["scenarios"].items():
        r = s["compute_ratio"]
        lines += [f"  {name}: {s['target']}, precision {s['precision']:g}, truth {s['truth']:g}, "
                  f"{s['reps']} repetitions, {s['n_candidates']} candidates "
                  f"({s['grid_compute_flops']:.3g} FLOPs in all), {s['cpu_s']:.0f} CPU s",
                  _policy_line("adaptive", s["adaptive"]), _policy_line("grid", s["grid"]),
                  f"    compute_ratio {r['ratio']:.3f} (+/- {r['mc_se']:.3f}); adaptive / whole grid "
                  f"{s['compute_ratio_to_whole_grid']:.3f}"]
        if s["truth"] == 0:
            a = s["adaptive"]
            lines.append(f"    false_detection_rate {_shown(a['detected'])}; ruled_out {_shown(a['ruled_out'])}")
    for name, g in result.get("goals", {}).items():
        lines.append(f"  goal {name} {g['goal']}: {g['value']:.3f} {'met' if g['met'] else 'NOT MET'}")
    return "\n".join(lines)
