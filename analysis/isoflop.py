"""IsoFLOP profiles: Hoffmann et al. 2022's Approach 2, for any table of (loss, N, C).

1. **Budgets.** Runs are grouped by compute: sorted by ``log10 C``, a run joins the current group
   while it is within ``tol_dex`` of the group's first run (``C`` within a factor ``10**tol_dex``),
   else starts a new one; a group needs ``min_points`` runs with at least 3 distinct ``N`` (a
   parabola has 3 parameters). Studies designed as IsoFLOP suites have exact budgets; data read
   off a figure (Epoch's Chinchilla points) are grouped by the tolerance.
2. **Profiles.** Per budget, a least-squares parabola ``loss = p0 + p1 x + p2 x^2`` in ``x = ln N``;
   its vertex is ``N_opt(C) = exp(-p1 / (2 p2))``, ``D_opt = C / (6 N_opt)`` unless a ``D`` column is
   given (then ``D_opt`` comes from a parabola in ``ln D``, the same way).
3. **Exponents.** Least squares of ``ln N_opt = a ln C + k_N`` and ``ln D_opt = b ln C + k_D`` over the
   usable budgets.
4. **Intervals.** A bootstrap that resamples runs within each budget (with replacement) and
   repeats 2-3; 95% percentile intervals of ``a`` and ``b``. A budget whose resampled parabola has
   no minimum is left out of that resample (counted); a budget that loses it in over 20% of its
   resamples is flagged ``unstable`` (more than a third of the budgets unstable: not identified).

Known biases are flagged per budget (``flags``) and summarised in ``notes``:

- ``no-minimum``: the parabola opens downward (or is flat): the budget is not used;
- ``minimum-outside-range``: the vertex lies outside the sampled ``N`` of the budget (an
  extrapolated optimum); the budget is used but flagged;
- ``off-centre``: fewer than 2 sampled ``N`` on one side of the vertex (the curvature, and so the
  vertex, rest on one side);
- ``wide``: the sampled ``N`` span more than ``wide_dex`` decades (a parabola in ``ln N`` is a local
  approximation; over wide spans its vertex is biased towards the denser side).

The verdict is ``identified`` only with at least 3 usable budgets spanning at least 1 decade of
``C``, no budget's optimum outside its range, and intervals narrower than the estimates.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from moue.analysis.errors import AnalysisError

__all__ = ["Budget", "IsoFlopResult", "isoflop", "group_budgets"]


@dataclass(frozen=True)
class Budget:
    compute: float  # geometric mean of the group's C
    n_points: int
    n_range: tuple[float, float]
    n_opt: float
    d_opt: float
    loss_opt: float
    curvature: float  # p2 of the parabola in ln N (> 0 for a minimum)
    used: bool
    flags: tuple[str, ...]
    n: tuple[float, ...] = ()  # the budget's runs (the figure draws them with the parabola)
    loss: tuple[float, ...] = ()
    parabola: tuple[float, float, float, float] = (math.nan,) * 4  # (p2, p1, p0, centre): loss in u = ln N - centre


@dataclass(frozen=True)
class IsoFlopResult:
    a: float
    a_ci: tuple[float, float]
    b: float
    b_ci: tuple[float, float]
    budgets: tuple[Budget, ...]
    n_bootstrap: int
    n_bootstrap_dropped: int  # budget resamples whose parabola had no minimum (out of n_bootstrap x used budgets)
    identified: bool
    reasons: tuple[str, ...]
    notes: tuple[str, ...] = field(default=())

    def as_dict(self) -> dict:
        """JSON-ready: tuples as lists, NaN (a budget without a minimum) as ``None``."""
        def clean(v):
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return [clean(x) for x in v]
            if isinstance(v, float) and not math.isfinite(v):
                return None
            return v
        return clean(asdict(self))


def group_budgets(log_c: np.ndarray, tol_dex: float) -> list[np.ndarray]:
    """Indices of each compute group (module docstring, step 1), smallest compute first."""
    order = np.argsort(log_c, kind="stable")
    groups, current, start = [], [], None
    for i in order:
        if start is None or log_c[i] - start > tol_dex:
            if current:
                groups.append(np.array(current))
            current, start = [], log_c[i]
        current.append(i)
    if current:
        groups.append(np.array(current))
    return groups


def _parabola(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float, float]:
    """(p2, p1, p0, centre) of the least-squares parabola in ``x - centre`` (centred, for conditioning)."""
    m = float(x.mean())
    p2, p1, p0 = np.polyfit(x - m, y, 2)
    return float(p2), float(p1), float(p0), m


def _vertex(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(vertex x, vertex y, curvature p2) of the least-squares parabola in ``x`` (centred, for
    conditioning); the vertex is NaN without a minimum or with fewer than 3 distinct ``x``."""
    if len(np.unique(x)) < 3:
        return math.nan, math.nan, math.nan
    p2, p1, p0, m = _parabola(x, y)
    if not p2 > 0:
        return math.nan, math.nan, float(p2)
    u = -p1 / (2 * p2)
    return float(m + u), float(p0 + p1 * u + p2 * u * u), float(p2)


def _budget(loss, ln_n, ln_d, c, idx, wide_dex) -> Budget:
    x, y = ln_n[idx], loss[idx]
    xv, yv, p2 = _vertex(x, y)
    lo, hi = float(x.min()), float(x.max())
    flags = []
    if math.isnan(xv) or xv - hi > 20 or lo - xv > 20:  # no vertex, or one e^20 beyond the data
        xv = math.nan
    if math.isnan(xv):
        flags.append("no-minimum")
    else:
        if not lo <= xv <= hi:
            flags.append("minimum-outside-range")
        elif min((x < xv).sum(), (x > xv).sum()) < 2:
            flags.append("off-centre")
    if (hi - lo) / math.log(10) > wide_dex:
        flags.append("wide")
    ln_c = float(np.log(c[idx]).mean())
    if ln_d is None:  # D = C / (6 N) at the optimum
        ln_d_opt = ln_c - math.log(6) - xv
    else:
        ln_d_opt = _vertex(ln_d[idx], y)[0]
    return Budget(compute=math.exp(ln_c), n_points=len(idx), n_range=(math.exp(lo), math.exp(hi)),
                  n_opt=float(np.exp(xv)), d_opt=float(np.exp(ln_d_opt)), loss_opt=yv, curvature=p2,
                  used="no-minimum" not in flags and math.isfinite(ln_d_opt), flags=tuple(flags),
                  n=tuple(float(v) for v in np.exp(x)), loss=tuple(float(v) for v in y),
                  parabola=_parabola(x, y) if len(np.unique(x)) >= 3 else (math.nan,) * 4)


def _slopes(budgets) -> tuple[float, float]:
    ln_c = np.log([b.compute for b in budgets])
    with np.errstate(divide="ignore", over="ignore"):
        a = np.polyfit(ln_c, np.log([b.n_opt for b in budgets]), 1)[0]
        b = np.polyfit(ln_c, np.log([b.d_opt for b in budgets]), 1)[0]
    return float(a), float(b)


def isoflop(loss, n, c, d=None, *, tol_dex: float = 0.1, min_points: int = 5, wide_dex: float = 1.5,
            bootstrap: int = 1000, seed: int = 0) -> IsoFlopResult:
    """Approach 2 on arrays ``loss``, ``n`` (parameters), ``c`` (FLOPs) and optionally ``d`` (tokens)."""
    loss, n, c = (np.asarray(v, dtype=float) for v in (loss, n, c))
    d = None if d is None else np.asarray(d, dtype=float)
    arrays = {"loss": loss, "N": n, "C": c} | ({} if d is None else {"D": d})
    for name, v in arrays.items():
        if v.shape != loss.shape:
            raise AnalysisError(name, f"{v.size} values", f"must have one per loss value ({loss.size})")
        if not np.isfinite(v).all() or (name != "loss" and not (v > 0).all()):
            raise AnalysisError(name, "a non-finite or non-positive value",
                                f"must be finite{'' if name == 'loss' else ' and > 0'} in every row "
                                "(filter rows first, e.g. --where)")
    ln_n, ln_d, log_c = np.log(n), None if d is None else np.log(d), np.log10(c)
    groups = [g for g in group_budgets(log_c, tol_dex) if len(g) >= min_points and len(np.unique(n[g])) >= 3]
    if not groups:
        raise AnalysisError("C", f"{len(c)} runs", f"must form a compute budget of {min_points} runs with 3 "
                            f"distinct N (runs within {tol_dex} decades of C form a budget)")
    budgets = tuple(_budget(loss, ln_n, ln_d, c, g, wide_dex) for g in groups)
    used = [b for b in budgets if b.used]
    if len(used) < 2:
        raise AnalysisError("loss", f"{len(used)} of {len(budgets)} budgets with a minimum",
                            "must give at least 2 budgets whose parabola in ln N has a minimum")
    a, b = _slopes(used)
    rng = np.random.default_rng(seed)
    used_groups = [g for g, bud in zip(groups, budgets) if bud.used]
    samples, lost = [], np.zeros(len(used_groups), dtype=int)
    for _ in range(bootstrap):
        boot = [_budget(loss, ln_n, ln_d, c, rng.choice(g, size=len(g), replace=True), wide_dex) for g in used_groups]
        lost += [not bb.used for bb in boot]
        ok = [bb for bb in boot if bb.used]
        if len(ok) >= 2:
            samples.append(_slopes(ok))
    dropped = int(lost.sum())
    if bootstrap:  # a budget whose minimum vanishes in over 20% of its resamples is unstable
        unstable = iter(lost > 0.2 * bootstrap)
        budgets = tuple(replace(bud, flags=bud.flags + ("unstable",)) if bud.used and next(unstable) else bud
                        for bud in budgets)
        used = [bud for bud in budgets if bud.used]
    arr = np.array(samples) if samples else np.full((1, 2), np.nan)
    a_ci = tuple(float(v) for v in np.percentile(arr[:, 0], [2.5, 97.5]))
    b_ci = tuple(float(v) for v in np.percentile(arr[:, 1], [2.5, 97.5]))
    reasons = _verdict(used, a, a_ci, b, b_ci)
    notes = tuple(f"budget C={bb.compute:.3g}: {', '.join(bb.flags)}" for bb in budgets if bb.flags)
    return IsoFlopResult(a=a, a_ci=a_ci, b=b, b_ci=b_ci, budgets=budgets, n_bootstrap=bootstrap,
                         n_bootstrap_dropped=dropped, identified=not reasons, reasons=reasons, notes=notes)


def _verdict(used, a, a_ci, b, b_ci) -> tuple[str, ...]:
    reasons = []
    if len(used) < 3:
        reasons.append(f"only {len(used)} budgets with a minimum (at least 3 are needed)")
    span = math.log10(max(u.compute for u in used) / min(u.compute for u in used))
    if span < 1:
        reasons.append(f"the budgets span {span:.2f} decades of compute (at least 1 is needed)")
    outside = [u for u in used if "minimum-outside-range" in u.flags]
    if outside:
        reasons.append(f"{len(outside)} budget(s) have their optimum outside the sampled N")
    for name, est, (lo, hi) in (("a", a, a_ci), ("b", b, b_ci)):
        if not (math.isfinite(lo) and hi - lo < abs(est)):
            reasons.append(f"{name}'s 95% interval [{lo:.3g}, {hi:.3g}] is wider than its estimate {est:.3g}")
    unstable = [u for u in used if "unstable" in u.flags]
    if len(unstable) > len(used) / 3:
        reasons.append(f"{len(unstable)} of {len(used)} budgets lose their minimum in over 20% of bootstrap "
                       "resamples (more than a third)")
    return tuple(reasons)
