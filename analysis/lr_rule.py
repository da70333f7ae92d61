"""The learning-rate rule of a ladder's LR stage: the optimum per size and ``lr = c * N^-exponent``.

Runs are grouped by size (their active parameter count ``N``). Per size, a least-squares parabola
of the final loss in ``ln lr`` gives the optimum ``lr_opt(N)`` (flagged ``edge`` when it falls
outside the scanned LRs or the lowest loss is at the largest or smallest scanned LR (the data do
not bracket the minimum), and then the best scanned LR is its optimum, not the parabola's vertex;
``no-minimum`` when the parabola opens downward: that size is not used);
then ``ln lr_opt = ln c - exponent * ln N`` by least squares. A bootstrap that resamples the runs
within each size gives the exponent's 95% interval. The rule is identified with at least 3 usable
sizes, no optimum at an edge, and an exponent interval narrower than 1 (in ``ln lr`` per ``ln N``).

``moue lr-rule`` writes the rule as JSON (``c``, ``exponent``, ``exponent_ci``, ``sizes``), which a
ladder's ``space.lr_rule`` reads (``moue.search_spaces.spaces.ladder``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from moue.analysis.errors import AnalysisError

__all__ = ["LrRule", "fit_lr_rule", "rule_of_experiment", "load_rule"]


@dataclass(frozen=True)
class LrRule:
    c: float
    exponent: float
    exponent_ci: tuple[float, float]
    sizes: tuple[dict, ...]  # n, lr_opt, loss_opt, lrs, losses, flags, used
    identified: bool
    reasons: tuple[str, ...]
    rule: str = "power"

    def as_dict(self) -> dict:
        out = asdict(self)
        out["exponent_ci"] = list(self.exponent_ci)
        return out

    def lr(self, n: float) -> float:
        return self.c * n ** -self.exponent

    def lines(self) -> list[str]:
        """The rule, each size's optimum and the verdict (as ``moue run`` and ``moue lr-rule`` print them)."""
        lo, hi = self.exponent_ci
        out = [f"lr = {self.c:.4g} * N^-{self.exponent:.3f}  (exponent 95% bootstrap interval [{lo:.3f}, {hi:.3f}])"]
        for sz in self.sizes:
            flags = f" ({', '.join(sz['flags'])})" if sz["flags"] else ""
            out.append(f"  N = {sz['n']:.4g}: lr_opt {sz['lr_opt']:.4g}, loss {sz['loss_opt']:.4g}{flags}")
        out.append("LR rule: identified" if self.identified else "LR rule: NOT identified: " + "; ".join(self.reasons))
        return out


def load_rule(path) -> LrRule:
    """A rule file written by ``moue lr-rule`` or a study's LR stage."""
    import json
    from pathlib import Path

    try:
        d = json.loads(Path(path).read_text())
        return LrRule(c=float(d["c"]), exponent=float(d["exponent"]), exponent_ci=tuple(d["exponent_ci"]),
                      sizes=tuple(d["sizes"]), identified=bool(d["identified"]), reasons=tuple(d["reasons"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise AnalysisError("--lr-rule", str(path), f"must be a rule file of moue lr-rule ({type(e).__name__})") from None


def rule_of_experiment(experiment: str, *, tracking_uri: str, parent_run_id: str | None = None,
                       bootstrap: int = 1000, seed: int = 0) -> LrRule:
    """The rule of an LR stage logged to MLflow: its finished runs' active parameters, ``train.lr``
    and final validation loss."""
    from moue.analysis.fitting import DEFAULT_COLUMNS, DEFAULT_LOSS
    from moue.analysis.loading import load_runs

    frame = load_runs(experiment, tracking_uri=tracking_uri, parent_run_id=parent_run_id).frame
    for col in (DEFAULT_COLUMNS["N"], "train.lr", DEFAULT_LOSS):
        if col not in frame.columns:
            raise AnalysisError("experiment", experiment, f"has no column {col!r} (an LR stage's runs have)")
    return fit_lr_rule(frame[DEFAULT_COLUMNS["N"]].to_numpy(), frame["train.lr"].to_numpy(),
                       frame[DEFAULT_LOSS].to_numpy(), bootstrap=bootstrap, seed=seed)


def _optimum(lr: np.ndarray, loss: np.ndarray) -> tuple[float, float, tuple[str, ...]]:
    x = np.log(lr)
    if len(np.unique(x)) < 3:
        return math.nan, math.nan, ("no-minimum",)
    m = x.mean()
    p2, p1, p0 = np.polyfit(x - m, loss, 2)
    if not p2 > 0:
        return math.nan, math.nan, ("no-minimum",)
    u = -p1 / (2 * p2)
    best = int(np.argmin(loss))
    bracketed = x.min() < x[best] < x.max()  # the lowest loss has a scanned LR on each side
    if bracketed and x.min() <= m + u <= x.max():
        return float(math.exp(m + u)), float(p0 + p1 * u + p2 * u * u), ()
    # the minimum is not bracketed by the data, or the vertex is an extrapolation: the best
    # scanned LR, flagged (the stage's bracket extension scans on past it)
    return float(lr[best]), float(loss[best]), ("edge",)


def _line(ns, lrs) -> tuple[float, float]:
    slope, intercept = np.polyfit(np.log(ns), np.log(lrs), 1)
    return float(math.exp(intercept)), float(-slope)


def fit_lr_rule(n, lr, loss, *, bootstrap: int = 1000, seed: int = 0) -> LrRule:
    """The rule from arrays of each run's active parameters ``n``, learning rate and final loss."""
    n, lr, loss = (np.asarray(v, dtype=float) for v in (n, lr, loss))
    ok = np.isfinite(n) & np.isfinite(lr) & np.isfinite(loss) & (lr > 0) & (n > 0)
    n, lr, loss = n[ok], lr[ok], loss[ok]
    groups = [np.flatnonzero(n == v) for v in np.unique(n)]
    sizes = []
    for g in groups:
        lr_opt, loss_opt, flags = _optimum(lr[g], loss[g])
        sizes.append({"n": float(n[g[0]]), "lr_opt": lr_opt, "loss_opt": loss_opt, "lrs": lr[g].tolist(),
                      "losses": loss[g].tolist(), "flags": list(flags), "used": "no-minimum" not in flags})
    used = [(s, g) for s, g in zip(sizes, groups) if s["used"]]
    if len(used) < 2:
        raise AnalysisError("runs", f"{len(used)} sizes with an LR optimum",
                            "must give at least 2 sizes whose loss has a minimum in ln lr (scan 3+ LRs per size)")
    c, e = _line([s["n"] for s, _ in used], [s["lr_opt"] for s, _ in used])
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(bootstrap):
        pts = []
        for s, g in used:
            pick = rng.choice(g, size=len(g), replace=True)
            opt = _optimum(lr[pick], loss[pick])[0]
            if math.isfinite(opt):
                pts.append((s["n"], opt))
        if len(pts) >= 2:
            boot.append(_line(*zip(*pts))[1])
    e_ci = tuple(float(v) for v in np.percentile(boot, [2.5, 97.5])) if boot else (math.nan, math.nan)
    reasons = []
    if len(used) < 3:
        reasons.append(f"only {len(used)} sizes have an LR optimum (at least 3 are needed)")
    edges = [s for s, _ in used if "edge" in s["flags"]]
    if edges:
        reasons.append(f"{len(edges)} size(s) have their optimum outside the scanned LRs (widen lr_scan)")
    if not (math.isfinite(e_ci[0]) and e_ci[1] - e_ci[0] < 1):
        reasons.append(f"the exponent's 95% interval [{e_ci[0]:.3g}, {e_ci[1]:.3g}] is wider than 1")
    return LrRule(c=c, exponent=e, exponent_ci=e_ci, sizes=tuple(sizes), identified=not reasons,
                  reasons=tuple(reasons))
