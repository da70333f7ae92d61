"""Adaptive designs: which trial to train next, and when a study's question is answered
(docs/FITTING.md, "Adaptive designs").

A study with a ``[design]`` table names one **target** and the **precision** that answers it:

- ``family:<name>`` (a family against the layerwise MoE) or ``comparison:<name>`` (one of the
  study's ``[[analysis.comparisons]]``): the paired effect in percent of the reference loss, decided
  at the margin ``precision`` (a fraction: 0.01 is 1%);
- ``exponent:<law>.<param>`` or ``term:<law>.<param>``: a parameter of a fitted law, answered when
  its 95% interval's half-width (from the bootstrap's sd, :func:`law_half_width`) is at most
  ``precision`` (in the parameter's units).

The study's grid is the **candidate set** (sizes, seeds, token budgets, families: whatever its
space enumerates). :class:`Design` is the state machine a Tune searcher drives (``moue.studies.
adaptive``): an initial round, then after each round a **look** (:class:`Look`) refits the target on
what has finished, decides whether to stop, and proposes the next ``batch`` trials.

**The criterion: the expected shrink of the target's variance per FLOP**, greedy over a batch.

- A paired effect is estimated stratified: the mean over strata (the candidates' settings other
  than the arm and the seed: the sizes of a ladder) of each stratum's mean relative difference,
  with one pooled pair-to-pair sd, so ``Var = sd^2 / S^2 * sum_s 1 / n_s``. Another pair in stratum
  ``s`` lowers it by ``sd^2 / S^2 / (n_s (n_s + 1))`` at the cost of the arms it still lacks: the
  greedy sequence of the best ratio is the optimum allocation of stratified sampling with costs,
  ``n_s ~ 1 / sqrt(c_s)`` for equal sds (Cochran 1977, Sampling Techniques, section 5.5).
- A law parameter ``g`` is linearised at the current fit: ``Var(g) = grad^T M^-1 grad`` with the
  information ``M = sum_i J_i J_i^T`` of the finished rows (``J``: the law's Jacobian on its own
  scale, the noise variance a common factor); a candidate adds its rows' ``J``. The best ratio of
  ``Var - Var'`` to the candidate's FLOPs is a sequential, locally c-optimal design (Chernoff 1953,
  Ann. Math. Stat. 24:586; Atkinson, Donev & Tobias 2007, Optimum Experimental Designs, ch. 10 and
  17). The expected half-width it reports is the bootstrap's scaled by ``sqrt(Var' / Var)``.

**Stopping keeps the error rates.** Stopping when a test first turns significant inflates false
detections (Armitage, McPherson & Rowe 1969), so:

- a paired effect is judged on **repeated confidence intervals** (Jennison & Turnbull 1989; 2000,
  ch. 9): at look ``k`` the interval is ``estimate +/- c_k se`` with ``c_k`` the Lan-DeMets
  O'Brien-Fleming boundary (``moue.analysis.sequential``) at the information fraction
  ``t_k = (se_max / se_k)^2``, ``se_max = margin / (2 z_0.975)`` (the precision at which a 95%
  interval of width ``margin`` always decides). The intervals cover the truth at every look at once
  with probability 95%, so the study may stop at the first that decides: ``detected`` (it excludes
  0) or ``ruled_out`` (it lies inside +/- margin); at ``t >= 1`` the last of the alpha is spent and
  the study stops whatever the verdict;
- the information fraction is estimated (``se_k`` from the pooled pair sd ``s``): ``t_k`` is the
  true fraction times ``sigma^2 / s^2``, and ``s^2 / sigma^2 ~ chi^2_df / df``. With the initial
  round's single degree of freedom that factor exceeds 10 a quarter of the time, so a look on 5
  pairs could claim full information and spend all of alpha exactly when ``s`` is small, which
  is when its t statistic is large: 4% of simulated null studies were "detected" at that first
  look (``moue bench design``). So no analysis before the pair sd has ``MIN_DF = 10`` degrees of
  freedom (the design keeps proposing by its criterion, which needs no estimate): from
  there ``t_k`` is over 2x (3x) too large with probability 0.11 (0.03), and that early, O'Brien-
  Fleming spending at even 3x the true fraction spends almost nothing (internal-pilot designs
  likewise re-estimate the variance only from a pilot of some size: Wittes & Brittain 1990,
  Stat. Med. 9:65; Denne & Jennison 2000, Biometrika 87:125);
- a law parameter stops on the width of its interval alone, which does not look at the estimate:
  ``estimate +/- t_{0.975, k-p} sqrt(k / (k - p)) sd*`` from the bootstrap's sd ``sd*`` over ``k``
  runs and ``p`` parameters (:func:`law_half_width` says why not the percentile interval), once
  ``k - p >= MIN_DF``: the law's near-L1 fit (Huber, ``delta`` a tenth of the seed noise) passes
  through ``p`` of the points, so on a handful of runs many resamples reproduce the same fit and
  ``sd*`` can be near 0 (simulated stops on 5-9 runs covered the truth 1 time in 4).

Either stops when the budget (``budget_flops``) or the candidates run out: ``undecided``, said so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np

from moue.analysis.decide import decide
from moue.analysis.errors import AnalysisError

__all__ = ["TARGET_KINDS", "Candidate", "Design", "DesignSpec", "Look", "Proposal", "law_half_width", "parse_target"]

TARGET_KINDS = ("family", "comparison", "exponent", "term")
PAIRED_KINDS = ("family", "comparison")
Z975 = 1.959963984540054
LOOK_STEP = 0.1  # a paired target is analysed (spends alpha) when its information fraction grew this much
DESIGN_BOOTSTRAP = 200  # resamples of a law target's fit at each look (the report's own fit uses 1,000)
MIN_DF = 10  # a look decides only on a noise estimate with this many degrees of freedom (module docstring)


def parse_target(target: str, field: str = "design.target") -> tuple[str, str, str | None]:
    """``"family:MoUE-style"`` -> ``("family", "MoUE-style", None)``; ``"exponent:compute_power.alpha"``
    -> ``("exponent", "compute_power", "alpha")``."""
    kind, sep, rest = str(target).partition(":")
    if not sep or kind not in TARGET_KINDS or not rest.strip():
        raise AnalysisError(field, target, "must be KIND:NAME with KIND one of " + ", ".join(TARGET_KINDS)
                            + " (e.g. family:MoUE-style, exponent:compute_power.alpha)")
    rest = rest.strip()
    if kind in PAIRED_KINDS:
        return kind, rest, None
    law, dot, param = rest.partition(".")
    if not dot or not law or not param:
        raise AnalysisError(field, target, f"must name a law and its parameter: {kind}:LAW.PARAM")
    from moue.analysis.laws import LAWS

    if law not in LAWS:
        raise AnalysisError(field, target, "names no law; known: " + ", ".join(sorted(LAWS)))
    if param not in LAWS[law].natural:
        raise AnalysisError(field, target, f"names no parameter of {law}; it has " + ", ".join(LAWS[law].natural))
    return kind, law, param


@dataclass(frozen=True, kw_only=True)
class DesignSpec:
    """A study's ``[design]`` table."""

    target: str
    precision: float  # paired: the margin as a fraction (0.01 = 1%); a law parameter: the half-width
    budget_flops: float
    batch: int = 2
    alpha: float = 0.05

    def __post_init__(self) -> None:
        parse_target(self.target)
        if not (isinstance(self.precision, (int, float)) and self.precision > 0 and math.isfinite(self.precision)):
            raise AnalysisError("design.precision", self.precision, "must be a positive number")
        if self.kind in PAIRED_KINDS and self.precision >= 1:
            raise AnalysisError("design.precision", self.precision,
                                "is the margin as a fraction of the reference loss: below 1 (0.01 is 1%)")
        if not (isinstance(self.budget_flops, (int, float)) and self.budget_flops > 0):
            raise AnalysisError("design.budget_flops", self.budget_flops, "must be a positive number of FLOPs")
        if not (isinstance(self.batch, int) and not isinstance(self.batch, bool) and self.batch >= 1):
            raise AnalysisError("design.batch", self.batch, "must be a whole number >= 1")

    @property
    def kind(self) -> str:
        return parse_target(self.target)[0]

    @property
    def margin_pct(self) -> float:
        """A paired target's margin in percent."""
        return 100.0 * self.precision


@dataclass(frozen=True, kw_only=True)
class Candidate:
    """One trial the design may run: its index among the study's points, its cost, the rows it adds
    to a law's fit (law variable -> value, one per point it yields: the final one, cooldown branches)
    and, for a paired target, its arm and stratum."""

    index: int
    cost: float  # FLOPs
    seed: int
    rows: tuple[Mapping[str, float], ...] = ()
    arm: str = ""  # paired targets: "variant", "reference" or "" (not part of the comparison)
    stratum: tuple = ()
    setting: tuple = ()  # the point without its seed: candidates of one setting differ by seed only
    label: str = ""  # for the record: the point in short


@dataclass(frozen=True, kw_only=True)
class Proposal:
    """A trial the design chose, and why."""

    index: int
    label: str
    cost: float
    expected_half_width: float  # the target's, once this (and the batch's earlier picks) finish
    gain_per_flop: float  # variance shrink per FLOP (relative to the look's variance)
    reason: str

    def to_json(self) -> dict:
        return {"index": self.index, "label": self.label, "cost_flops": self.cost,
                "expected_half_width": self.expected_half_width, "gain_per_flop": self.gain_per_flop,
                "reason": self.reason}


@dataclass(frozen=True, kw_only=True)
class Look:
    """What the design saw after a round, and what it did: the target's estimate and interval (the
    repeated confidence interval for a paired target), its verdict, and the next proposals or the
    reason it stopped."""

    round: int
    n_trials: int  # finished (failed ones included)
    compute: float  # FLOPs of the finished trials
    estimate: float
    lo: float
    hi: float
    verdict: str  # detected / ruled_out / undecided (paired); reached / undecided (a law parameter)
    fraction: float = math.nan  # paired: information fraction t_k
    boundary: float = math.nan  # paired: the look's z boundary c_k
    analysed: bool = False  # paired: an interim analysis (alpha spent here); a law target: always
    lo95: float = math.nan  # paired: the plain 95% t-interval (for the record; the design stops on lo, hi)
    hi95: float = math.nan
    stop: str = ""  # why the design stopped ("" : it goes on)
    proposals: tuple[Proposal, ...] = ()
    note: str = ""

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2

    def to_json(self) -> dict:
        out = {"round": self.round, "n_trials": self.n_trials, "compute_flops": self.compute,
               "estimate": self.estimate, "lo": self.lo, "hi": self.hi, "half_width": self.half_width,
               "verdict": self.verdict, "stop": self.stop, "proposals": [p.to_json() for p in self.proposals]}
        if math.isfinite(self.fraction):
            out.update(fraction=self.fraction, boundary=self.boundary, analysed=self.analysed)
        if math.isfinite(self.lo95):
            out.update(lo95=self.lo95, hi95=self.hi95)
        if self.note:
            out["note"] = self.note
        return out


@dataclass
class Design:
    """The state of an adaptive design over ``candidates``: what was proposed, what finished (the
    loss of each of its rows; ``None``: failed or diverged) and the looks so far. A parameter
    target's law is the one its target names, fitted on the rows ``moue.analysis.report.law_rows``
    keeps. ``batch``: trials per round for a law target, pairs per round for a paired one."""

    spec: DesignSpec
    candidates: tuple[Candidate, ...]
    proposed: list[int] = field(default_factory=list)
    results: dict[int, tuple[float, ...] | None] = field(default_factory=dict)
    looks: list[Look] = field(default_factory=list)
    seed: int = 0
    policy: str = "adaptive"  # or "grid": the fixed order, same looks and stops (the benchmark's baseline)

    def __post_init__(self) -> None:
        kind = self.spec.kind
        if kind in PAIRED_KINDS:
            arms = {c.arm for c in self.candidates}
            if not {"variant", "reference"} <= arms:
                raise AnalysisError("design.target", self.spec.target,
                                    "has no variant or no reference among the study's trials")
            units: dict[tuple, list[str]] = {}
            for c in self.candidates:
                if c.arm:
                    units.setdefault((c.stratum, c.seed), []).append(c.arm)
            crowded = [k for k, a in units.items() if a.count("variant") > 1 or a.count("reference") > 1]
            if crowded:
                raise AnalysisError("design.target", self.spec.target,
                                    f"pairs its runs by size and seed, but {crowded[0][0]} seed {crowded[0][1]} has "
                                    "several runs of one arm (the study varies another setting): give each setting "
                                    "its own study, or name a comparison whose pair columns tell them apart")
            if not any({"variant", "reference"} <= set(a) for a in units.values()):
                raise AnalysisError("design.target", self.spec.target,
                                    "has no variant and reference run that share a size and seed (no pair to compare)")
        if len({c.index for c in self.candidates}) != len(self.candidates):
            raise AnalysisError("design", "candidates", "must have distinct indices")

    # ------------------------------------------------------------------ bookkeeping

    @property
    def by_index(self) -> dict[int, Candidate]:
        return {c.index: c for c in self.candidates}

    @property
    def stopped(self) -> str:
        return self.looks[-1].stop if self.looks else ""

    @property
    def pending(self) -> list[int]:
        return [i for i in self.proposed if i not in self.results]

    def spent(self) -> float:
        """FLOPs of every proposed trial (finished or running): what the budget is charged."""
        by = self.by_index
        return sum(by[i].cost for i in self.proposed)

    def observe(self, index: int, losses: Sequence[float] | None) -> None:
        """A proposed trial finished: the loss of each of its rows (``None``: it failed). A trial
        whose final loss (the first row) is not finite failed; a diverged cooldown branch (NaN) is
        only that row missing."""
        if index not in self.proposed:
            raise AnalysisError("design", index, "was not proposed")
        ok = losses is not None and len(losses) > 0 and math.isfinite(losses[0])
        self.results[index] = tuple(float(x) for x in losses) if ok else None

    # ------------------------------------------------------------------ the rounds

    def initial(self) -> list[int]:
        """The first round: every setting at its lowest seed (a paired target: every stratum's first
        pair, and a second pair in the cheapest stratum, so the pair-to-pair sd has a degree of
        freedom); within the budget, cheapest first."""
        if self.proposed:
            return []
        if self.spec.kind in PAIRED_KINDS:
            units = self._pair_units()
            firsts: dict[tuple, tuple] = {}
            for (stratum, seed), members in sorted(units.items(), key=lambda kv: kv[0][1]):
                firsts.setdefault(stratum, (seed, members))
            chosen = [m for _, m in firsts.values()]
            cheapest = min(firsts, key=lambda s: sum(c.cost for c in firsts[s][1]))
            second = sorted((seed, m) for (s, seed), m in units.items() if s == cheapest and seed != firsts[cheapest][0])
            if second:
                chosen.append(second[0][1])
            groups = sorted(chosen, key=lambda m: sum(c.cost for c in m))  # whole pairs
        else:
            first: dict[tuple, Candidate] = {}
            for c in sorted(self.candidates, key=lambda c: c.seed):
                first.setdefault(c.setting, c)
            groups = [(c,) for c in sorted(first.values(), key=lambda c: c.cost)]
        out, budget = [], self.spec.budget_flops
        for group in groups:
            if self.spent() + sum(c.cost for c in group) > budget:
                break
            out += [c.index for c in group]
            self.proposed += [c.index for c in group]
        return out

    def step(self) -> Look:
        """A look: refit the target on what finished, decide whether to stop, propose the next batch
        (recorded in ``proposed``); call when no proposed trial is pending."""
        if self.pending:
            raise AnalysisError("design", f"{len(self.pending)} trials running", "a look needs every proposed trial finished")
        est = (self._paired_look if self.spec.kind in PAIRED_KINDS else self._law_look)()
        look = replace(est, round=len(self.looks), n_trials=len(self.results),
                       compute=sum(self.by_index[i].cost for i in self.results))
        if not look.stop:
            proposals = self._next_batch(est)
            if not proposals:
                left = [c for c in self.candidates if c.index not in self.proposed]
                why = ("budget spent: the next trial would exceed budget_flops" if left
                       else "candidates exhausted")
                look = replace(look, stop=why)
            else:
                self.proposed.extend(p.index for p in proposals)
                look = replace(look, proposals=tuple(proposals))
        self.looks.append(look)
        return look

    # ------------------------------------------------------------------ a paired target

    def _pair_units(self) -> dict[tuple, tuple[Candidate, ...]]:
        """(stratum, seed) -> the candidates of its arms."""
        units: dict[tuple, list[Candidate]] = {}
        for c in self.candidates:
            if c.arm:
                units.setdefault((c.stratum, c.seed), []).append(c)
        return {k: tuple(v) for k, v in units.items() if {c.arm for c in v} == {"variant", "reference"}}

    def _pairs(self) -> dict[tuple, list[float]]:
        """stratum -> the relative differences (percent) of its finished pairs."""
        out: dict[tuple, list[float]] = {}
        for (stratum, _seed), members in self._pair_units().items():
            loss = {}
            for c in members:
                r = self.results.get(c.index)
                if r is not None:
                    loss[c.arm] = r[0]
            if len(loss) == 2:
                out.setdefault(stratum, []).append(100.0 * (loss["variant"] - loss["reference"]) / loss["reference"])
        return out

    def _paired_look(self) -> Look:
        """The look of a paired target: its repeated confidence interval (what it stops on) and,
        for the record, the plain 95% t-interval of the same estimate."""
        from scipy import stats

        est, se, df = stratified(self._pairs())
        look = self._paired_rci(est, se, df)
        if df >= 1 and math.isfinite(se):
            half = float(stats.t.isf(self.spec.alpha / 2, df)) * se
            look = replace(look, lo95=est - half, hi95=est + half)
        return look

    def _paired_rci(self, est: float, se: float, df: int) -> Look:
        from moue.analysis.sequential import boundary, rci

        margin = self.spec.margin_pct
        if not (math.isfinite(se) and se > 0 and df >= MIN_DF):
            return Look(round=0, n_trials=0, compute=0.0, estimate=est, lo=-math.inf, hi=math.inf,
                        verdict="undecided", note=f"the pair-to-pair sd has {df} degrees of freedom: "
                        f"analysed from {MIN_DF}")
        previous = [lk.fraction for lk in self.looks if lk.analysed]
        t = (margin / (2 * Z975) / se) ** 2
        final = t >= 1
        if previous and t < previous[-1] + LOOK_STEP and not final:
            # not an analysis: the interval at the last analysis's boundary, for the record only
            lo, hi = rci(est, se, self.looks[-1].boundary, df) if self.looks else (-math.inf, math.inf)
            return Look(round=0, n_trials=0, compute=0.0, estimate=est, lo=lo, hi=hi, verdict="undecided",
                        fraction=t, boundary=self.looks[-1].boundary, analysed=False,
                        note=f"information fraction {t:.3f}: analysed again at {previous[-1] + LOOK_STEP:.3f}")
        c = boundary(previous, min(t, 1.0), alpha=self.spec.alpha)
        lo, hi = rci(est, se, c, df)
        verdict = decide(est, (lo, hi), margin)
        stop = ""
        if verdict != "undecided":
            stop = f"decided: {verdict} at the {margin:g}% margin"
        elif final:
            stop = "full information reached: the last of the alpha is spent"
        return Look(round=0, n_trials=0, compute=0.0, estimate=est, lo=lo, hi=hi, verdict=verdict,
                    fraction=t, boundary=c, stop=stop, analysed=True)

    def _paired_batch(self, look: Look) -> list[Proposal]:
        units = self._pair_units()
        done = {s: len(v) for s, v in self._pairs().items()}
        strata = sorted({s for s, _ in units})
        n = {s: done.get(s, 0) for s in strata}
        # a pair already under way counts as done (its trials are proposed)
        taken = set(self.proposed)
        for (s, _seed), members in units.items():
            if all(c.index in taken for c in members) and not all(c.index in self.results for c in members):
                n[s] += 1
        budget_left = self.spec.budget_flops - self.spent()
        var_now = sum(1.0 / max(k, 1) for k in n.values())
        ratio = (look.hi - look.lo) / 2 / math.sqrt(var_now) if math.isfinite(look.hi - look.lo) else math.nan
        out = []
        for _ in range(self.spec.batch):
            best = None
            for (s, seed), members in sorted(units.items(), key=lambda kv: (kv[0][1], str(kv[0][0]))):
                todo = [c for c in members if c.index not in taken]
                if not todo:
                    continue
                cost = sum(c.cost for c in todo)
                if cost > budget_left:
                    continue
                k = n[s]
                gain = math.inf if k == 0 else 1.0 / (k * (k + 1))
                score = gain / cost
                if best is None or score > best[0]:
                    best = (score, s, seed, todo, cost, gain)
            if best is None:
                break
            score, s, seed, todo, cost, gain = best
            n[s] += 1
            budget_left -= cost
            taken.update(c.index for c in todo)
            var_after = sum(1.0 / max(k, 1) for k in n.values())
            half = ratio * math.sqrt(var_after)
            for c in todo:
                out.append(Proposal(index=c.index, label=c.label, cost=c.cost, expected_half_width=half,
                                    gain_per_flop=score,
                                    reason=(f"pair {len(out) // 2 + 1} of the round: stratum {_short(s)} seed {seed} "
                                            f"({n[s] - 1} pairs there), the largest variance shrink per FLOP")))
            if len(out) >= self.spec.batch:
                break
        return out

    # ------------------------------------------------------------------ a law parameter

    def law_frame(self):
        """The finished trials' rows as a frame of the law's columns (``moue.analysis.fitting.
        DEFAULT_COLUMNS``), clustered by trial (``run_id``), final points first."""
        import polars as pl

        from moue.analysis.fitting import DEFAULT_COLUMNS, DEFAULT_LOSS

        cols: dict[str, list] = {name: [] for name in (*DEFAULT_COLUMNS.values(), DEFAULT_LOSS, "run_id", "point")}
        for i, losses in sorted(self.results.items()):
            if losses is None:
                continue
            c = self.by_index[i]
            for j, (row, loss) in enumerate(zip(c.rows, losses)):
                if not math.isfinite(loss):
                    continue  # a diverged cooldown branch
                for v, name in DEFAULT_COLUMNS.items():
                    cols[name].append(float(row.get(v, math.nan)))
                cols[DEFAULT_LOSS].append(loss)
                cols["run_id"].append(str(i))
                cols["point"].append("final" if j == 0 else f"branch{j}")
        return pl.DataFrame(cols, schema={k: (pl.Utf8 if k in ("run_id", "point") else pl.Float64) for k in cols})

    def fit(self):
        """The target law's fit on the finished rows (``None`` when it cannot be fitted yet)."""
        from moue.analysis.fitting import DEFAULT_COLUMNS, assemble, fit_bootstrap, fit_point, prepare
        from moue.analysis.laws import get_law
        from moue.analysis.report import law_rows

        _, law_name, _ = parse_target(self.spec.target)
        law = get_law(law_name)
        rows, _, _ = law_rows(self.law_frame(), law_name)
        if rows.height < law.n_params + 1:
            return None
        try:  # fit's stages without its noise model and hold-out, which a look does not use
            with _one_thread():
                problem = prepare(rows, law=law, variables={v: DEFAULT_COLUMNS[v] for v in law.variables})
                point = fit_point(problem)
                samples = fit_bootstrap(problem, point, n_bootstrap=DESIGN_BOOTSTRAP, seed=self.seed)
            return assemble(problem, point, samples, seed=self.seed)
        except AnalysisError:
            return None

    def _law_look(self) -> Look:
        r = self.fit()
        self._fit = r
        if r is None:
            return Look(round=0, n_trials=0, compute=0.0, estimate=math.nan, lo=-math.inf, hi=math.inf,
                        verdict="undecided", note="too few rows to fit the law")
        _, _, param = parse_target(self.spec.target)
        est, half = r.params[param], law_half_width(r, param, self.spec.alpha)
        lo, hi = est - half, est + half
        on_bound = param in r.diagnostics.on_bound
        df = r.provenance.n_clusters - len(r.params)
        reached = math.isfinite(half) and half <= self.spec.precision and not on_bound and df >= MIN_DF
        note = (f"{param} is on a bound of the law" if on_bound else
                f"{df} degrees of freedom (runs less parameters): a width stop from {MIN_DF}" if df < MIN_DF else "")
        return Look(round=0, n_trials=0, compute=0.0, estimate=est, lo=lo, hi=hi,
                    verdict="reached" if reached else "undecided",
                    stop=f"precision reached: half-width {half:.3g} <= {self.spec.precision:g}" if reached else "",
                    note=note)

    def _law_batch(self, look: Look) -> list[Proposal]:
        r = getattr(self, "_fit", None)
        left = [c for c in self.candidates if c.index not in self.proposed]
        budget_left = self.spec.budget_flops - self.spent()
        left = [c for c in left if c.cost <= budget_left]
        if not left:
            return []
        if r is None:  # nothing to linearise at: the cheapest settings not yet run
            first: dict[tuple, Candidate] = {}
            for c in sorted(left, key=lambda c: (c.seed, c.cost)):
                first.setdefault(c.setting, c)
            picks = sorted(first.values(), key=lambda c: c.cost)[: self.spec.batch]
            return [Proposal(index=c.index, label=c.label, cost=c.cost, expected_half_width=math.nan,
                             gain_per_flop=math.nan, reason="the law cannot be fitted yet: the cheapest setting not yet run")
                    for c in picks]
        _, _, param = parse_target(self.spec.target)
        law = r.law_spec
        theta = np.asarray(r.theta, dtype=np.float64)
        grad = _natural_gradient(law, theta, law.natural.index(param))
        done = [self.by_index[i] for i, x in self.results.items() if x is not None]
        info = _information(law, theta, [row for c in done for row in _fitted_rows(law, c.rows)])
        var_now = _variance(info, grad)
        half_now = (look.hi - look.lo) / 2
        jac = {c.index: _jacobian(law, theta, _fitted_rows(law, c.rows)) for c in left}
        out = []
        for _ in range(self.spec.batch):
            best = None
            for c in left:
                if c.index in {p.index for p in out} or c.cost > budget_left:
                    continue
                J = jac[c.index]
                var = _variance(info + J.T @ J, grad)
                score = (var_now - var) / var_now / c.cost if var_now > 0 else 0.0
                if best is None or score > best[0]:
                    best = (score, c, var, J)
            if best is None or not best[0] > 0:
                break
            score, c, var, J = best
            info = info + J.T @ J
            budget_left -= c.cost
            half = half_now * math.sqrt(var / var_now)
            out.append(Proposal(index=c.index, label=c.label, cost=c.cost, expected_half_width=half,
                                gain_per_flop=score,
                                reason=(f"shrinks Var({param}) by {100 * (var_now - var) / var_now:.1f}% of this look's "
                                        f"for {c.cost:.3g} FLOPs, the most per FLOP among {len(left)} candidates")))
            var_now = var
        return out

    def _next_batch(self, look: Look) -> list[Proposal]:
        if self.policy == "grid":
            return self._grid_batch()
        return (self._paired_batch if self.spec.kind in PAIRED_KINDS else self._law_batch)(look)

    def _grid_batch(self) -> list[Proposal]:
        """The baseline of ``moue bench design``: the next candidates in the grid's own order
        (seed-major: every setting at a seed before the next seed), a paired target's pairs whole."""
        budget_left = self.spec.budget_flops - self.spent()
        order = sorted((c for c in self.candidates if c.index not in self.proposed and
                        (c.arm or self.spec.kind not in PAIRED_KINDS)), key=lambda c: (c.seed, c.index))
        out: list[Proposal] = []
        for c in order:
            if len(out) >= self.spec.batch or c.cost > budget_left:
                break
            budget_left -= c.cost
            out.append(Proposal(index=c.index, label=c.label, cost=c.cost, expected_half_width=math.nan,
                                gain_per_flop=math.nan, reason="the next trial in the grid's order"))
        return out

    # ------------------------------------------------------------------ persistence

    def state(self) -> dict:
        """What a resumed searcher needs (JSON): the proposals, the results and the looks."""
        return {"proposed": list(self.proposed),
                "results": {str(k): (list(v) if v is not None else None) for k, v in self.results.items()},
                "looks": [lk.to_json() for lk in self.looks], "seed": self.seed}

    def restore(self, state: Mapping) -> None:
        self.proposed = [int(i) for i in state["proposed"]]
        self.results = {int(k): (tuple(v) if v is not None else None) for k, v in state["results"].items()}
        self.looks = [_look_from_json(x) for x in state["looks"]]
        self.seed = int(state.get("seed", 0))


@contextmanager
def _one_thread():
    """The fit's compiled kernels on this thread alone while inside (numba's setting is per
    thread). A look's fit is small (tens of points, a few dozen starts, 200 resamples) and runs in
    the searcher beside trials that hold the cores; there numba's parallel kernels wait on busy
    cores: 3 repetitions of ``moue bench design``'s law scenario took 23-35 s on 2 threads and
    2.0 s on 1, on 2 cores that a study was also using."""
    try:
        import numba
    except ImportError:  # the numpy kernels: nothing to set
        yield
        return
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(before)


def law_half_width(r, param: str, alpha: float = 0.05) -> float:
    """The half-width of a law parameter's ``1 - alpha`` interval at a look: ``t_{1-alpha/2, k-p}
    sqrt(k / (k - p)) sd*`` with ``sd*`` the bootstrap sd, ``k`` the runs (clusters) and ``p`` the
    law's parameters (inf where ``k <= p`` or the bootstrap has under two finite samples).

    Why not the bootstrap's percentile interval: from ``k`` runs it is a z interval on a variance
    biased low by about ``(k - p) / k`` (the resampled residuals' spread; MacKinnon & White 1985,
    J. Econometrics 29:305, whose HC1 rescales by ``k / (k - p)``), so with few runs it is too
    narrow (the "narrowness bias" of Hesterberg 2015, Am. Stat. 69:371). A width stop then stops
    where the interval happened to be narrow: in ``moue bench design`` the law target's stopped
    percentile intervals covered the truth 0.89 of the time (0.62-0.67 for stops on 5-14 runs).
    The t quantile for ``k - p`` degrees of freedom and the ``k / (k - p)`` rescaling widen the
    interval most where the variance is least known, so a stop on few runs needs a convincingly
    small spread."""
    from scipy import stats

    k, p = r.provenance.n_clusters, len(r.params)
    samples = r.bootstrap[:, list(r.params).index(param)]
    samples = samples[np.isfinite(samples)]
    if k <= p or samples.size < 2:
        return math.inf
    scale = math.sqrt(k / (k - p)) * float(np.std(samples, ddof=1))
    return float(stats.t.isf(alpha / 2, k - p)) * scale


def stratified(pairs: Mapping[tuple, Sequence[float]]) -> tuple[float, float, int]:
    """The stratified mean of paired differences (each stratum's mean, averaged with equal weights),
    its standard error from the pooled within-stratum sd, and that sd's degrees of freedom."""
    groups = [np.asarray(v, dtype=np.float64) for v in pairs.values() if len(v)]
    if not groups:
        return math.nan, math.nan, 0
    est = float(np.mean([g.mean() for g in groups]))
    df = sum(g.size - 1 for g in groups)
    if df < 1:
        return est, math.nan, 0
    sd2 = sum(float(((g - g.mean()) ** 2).sum()) for g in groups) / df
    se = math.sqrt(sd2 * sum(1.0 / g.size for g in groups)) / len(groups)
    return est, se, df


def _short(stratum: tuple) -> str:
    return "/".join(str(v) for v in stratum) or "all"


def _fitted_rows(law, rows: Sequence[Mapping[str, float]]) -> Sequence[Mapping[str, float]]:
    """The rows of a trial the law's fit keeps (``moue.analysis.report.law_rows``): every row for a
    law in D; the final point only for one without D (a law of compute alone describes one
    allocation line; one of neither is fitted at a single budget)."""
    return rows if "D" in law.variables else rows[:1]


def _jacobian(law, theta: np.ndarray, rows: Sequence[Mapping[str, float]]) -> np.ndarray:
    """The law's Jacobian on its own scale (ln L or log10 L) at ``rows``, (n, P) in the fitted
    parametrisation."""
    data = {v: np.array([float(r[v]) for r in rows]) for v in law.variables}
    _, J, _ = law.forward(theta[None, :], law.prepare(data))
    return np.stack([j[0] for j in J], axis=1)


def _information(law, theta: np.ndarray, rows: Sequence[Mapping[str, float]]) -> np.ndarray:
    if not rows:
        return np.zeros((law.n_params, law.n_params))
    J = _jacobian(law, theta, rows)
    return J.T @ J


def _natural_gradient(law, theta: np.ndarray, j: int) -> np.ndarray:
    """d natural[j] / d theta, by central differences."""
    out = np.zeros(theta.size)
    for k in range(theta.size):
        h = 1e-6 * max(1.0, abs(theta[k]))
        up, down = theta.copy(), theta.copy()
        up[k] += h
        down[k] -= h
        out[k] = (law.to_natural(up)[0, j] - law.to_natural(down)[0, j]) / (2 * h)
    return out


def _variance(info: np.ndarray, grad: np.ndarray) -> float:
    """``grad^T info^-1 grad`` (a pseudo-inverse with a small ridge where info is singular)."""
    ridge = 1e-9 * max(1.0, float(np.trace(info)) / info.shape[0])
    return float(grad @ np.linalg.solve(info + ridge * np.eye(info.shape[0]), grad))


def _look_from_json(x: Mapping) -> Look:
    props = tuple(Proposal(index=p["index"], label=p["label"], cost=p["cost_flops"],
                           expected_half_width=p["expected_half_width"], gain_per_flop=p["gain_per_flop"],
                           reason=p["reason"]) for p in x.get("proposals", ()))
    return Look(round=x["round"], n_trials=x["n_trials"], compute=x["compute_flops"], estimate=x["estimate"],
                lo=x["lo"], hi=x["hi"], verdict=x["verdict"], fraction=x.get("fraction", math.nan),
                boundary=x.get("boundary", math.nan), analysed=x.get("analysed", False), lo95=x.get("lo95", math.nan), hi95=x.get("hi95", math.nan), stop=x["stop"], proposals=props, note=x.get("note", ""))
