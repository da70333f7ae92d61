"""Decisions: did a comparison answer its question, and what could it have detected?
(docs/FITTING.md, "Decisions").

Every comparison (a variant against a reference on paired runs, or a law term that tests an
effect) ends in one of three verdicts, judged on its 95% interval of the effect in percent of the
reference loss and a **margin**, the smallest effect of interest (``margin_pct``, default 1%):

- ``detected``: the interval excludes 0 (a two-sided test at 5%);
- ``ruled_out``: the interval lies inside ``(-margin, +margin)``: the two one-sided tests of
  equivalence (TOST, Schuirmann 1987) each at 2.5%, since the 95% interval is used (the usual TOST
  at 5% per side uses the 90% interval; ours is the stricter of the two);
- ``undecided``: neither. Then ``needed``: how many pairs (runs, for a law term) the measured noise
  says would decide at the margin.

Alongside, the **minimum detectable effect** (MDE): the smallest true effect this design detects
with 80% power at 5% two-sided, from the measured noise. For paired runs it is exact for the paired
t-test (the non-central t: power = P(|T'| > t_{0.975, n-1}), T' ~ t'(n - 1, sqrt(n) * effect / sd);
Cohen 1988, ch. 2; G*Power's "difference from constant, matched pairs"), and ``needed`` is the
smallest number of pairs whose MDE is at most the margin. For a law term it is the normal
approximation on the bootstrap's standard deviation, ``(z_0.975 + z_0.80) * sd``, and ``needed``
scales the runs as ``sd ~ 1 / sqrt(runs)``: more runs of the same design (seeds of each point),
``runs * (MDE / margin)^2``.

The noise behind both is estimated from the same data (the sd over pairs, the bootstrap sd), so an
MDE from 3 pairs is itself rough; the verdicts do not depend on it, only the advice does.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from moue.analysis.errors import AnalysisError

__all__ = ["ALPHA", "POWER", "DEFAULT_MARGIN_PCT", "VERDICTS", "Decision", "ComparisonSpec", "comparison_specs",
           "margin_value", "decide", "paired_decision", "bootstrap_decision", "paired_power", "paired_mde",
           "pairs_needed", "v_effect"]

ALPHA = 0.05  # two-sided
POWER = 0.80
DEFAULT_MARGIN_PCT = 1.0
VERDICTS = ("detected", "ruled_out", "undecided")
MAX_NEEDED = 1_000_000  # a search bound: beyond it "needed" says "more than"


@dataclass(frozen=True, kw_only=True)
class Decision:
    """The verdict of one comparison; effects in percent of the reference loss."""

    estimate: float
    ci: tuple[float, float]  # 95%
    n: int  # pairs, or runs (clusters) for a law term
    sd: float  # of one pair's difference (paired), or of the estimate (bootstrap)
    mde: float  # minimum detectable effect at 80% power, 5% two-sided (NaN without a noise estimate)
    margin: float
    verdict: str
    needed: int | None = None  # undecided only: pairs (runs) in all that would decide at the margin
    unit: str = "pairs"
    why: str = ""  # set when the verdict is forced to undecided (e.g. its law is not identified)

    def words(self) -> str:
        """The verdict in plain words, e.g. ``undecided (-0.5% [-3.8, +2.8]); this design detects
        differences of 4.2% or more; about 36 pairs would decide at 1%``."""
        lo, hi = self.ci
        interval = f"{self.estimate:+.2f}% [{lo:+.2f}, {hi:+.2f}]"
        head = {"detected": "detected", "ruled_out": f"ruled out at {self.margin:g}%",
                "undecided": "undecided"}[self.verdict]
        out = f"{head} ({interval}, {self.n} {self.unit})"
        if self.why:
            out += f" because {self.why}"
        if self.verdict == "detected" and max(abs(lo), abs(hi)) < self.margin:
            out += f", smaller than the {self.margin:g}% margin"
        if math.isfinite(self.mde):
            out += f"; this design detects differences of {self.mde:.2g}% or more"
        elif self.unit == "runs":
            out += "; the bootstrap does not measure this term's noise, so what this design can detect is unknown"
        else:
            out += "; too few to estimate the noise, so what this design can detect is unknown"
        if self.verdict == "undecided" and self.needed is not None:
            more = self.needed - self.n
            amount = (f"more than {MAX_NEEDED:,}" if self.needed > MAX_NEEDED else f"about {self.needed:,}")
            out += f"; {amount} {self.unit} ({more:,} more) would decide at {self.margin:g}%"
        return out

    def to_json(self) -> dict:
        """The fields ``moue report --json`` and ``moue compare --json`` carry."""
        out = {"estimate_pct": self.estimate, "ci_pct": list(self.ci), "verdict": self.verdict,
               "mde_pct": self.mde, "margin_pct": self.margin, f"n_{self.unit}": self.n}
        if self.verdict == "undecided":
            out[f"needed_{self.unit}"] = self.needed
        if self.why:
            out["why"] = self.why
        return out


def decide(estimate: float, ci: tuple[float, float], margin: float) -> str:
    """``detected`` (the interval excludes 0), ``ruled_out`` (inside (-margin, margin)) or
    ``undecided``; an interval with a NaN end is undecided."""
    lo, hi = ci
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "undecided"
    if lo > 0 or hi < 0:
        return "detected"
    if -margin < lo and hi < margin:
        return "ruled_out"
    return "undecided"


def paired_power(n: int, effect_over_sd: float, *, alpha: float = ALPHA) -> float:
    """Power of the two-sided paired t-test with ``n`` pairs against a true mean difference of
    ``effect_over_sd`` standard deviations of one pair's difference (non-central t)."""
    from scipy import stats

    if n < 2:
        return math.nan
    df = n - 1
    crit = stats.t.ppf(1 - alpha / 2, df)
    nc = math.sqrt(n) * abs(effect_over_sd)
    upper = float(stats.nct.sf(crit, df, nc))
    lower = float(stats.nct.cdf(-crit, df, nc))  # the wrong-sign rejections: tiny, NaN at df = 1 in scipy
    if not math.isfinite(lower):
        lower = float(stats.nct.sf(crit, df, -nc))  # the same tail by symmetry
    return upper + (lower if math.isfinite(lower) else 0.0)


def paired_mde(n: int, sd: float, *, alpha: float = ALPHA, power: float = POWER) -> float:
    """The smallest true mean difference (units of ``sd``'s data) the paired t-test with ``n`` pairs
    detects with probability ``power``: the root of ``paired_power(n, d / sd) = power``."""
    if n < 2 or not math.isfinite(sd):
        return math.nan
    return float(sd * _unit_mde(n, alpha, power))


@functools.lru_cache(maxsize=4096)
def _unit_mde(n: int, alpha: float, power: float) -> float:
    """:func:`paired_mde` in units of the sd (it scales with the sd)."""
    from scipy.optimize import brentq

    hi = 1.0
    while paired_power(n, hi, alpha=alpha) < power:
        hi *= 2
    return float(brentq(lambda d: paired_power(n, d, alpha=alpha) - power, 0.0, hi, xtol=1e-12))


def pairs_needed(sd: float, margin: float, *, alpha: float = ALPHA, power: float = POWER) -> int | None:
    """The fewest pairs whose paired t-test detects a true difference of ``margin`` with
    ``power`` (``MAX_NEEDED + 1`` past the search bound; None without a noise estimate)."""
    if not (math.isfinite(sd) and margin > 0):
        return None
    if sd == 0:
        return 2

    def ok(n):
        return paired_power(n, margin / sd, alpha=alpha) >= power

    hi = 2
    while not ok(hi):
        if hi > MAX_NEEDED:
            return MAX_NEEDED + 1
        hi *= 2
    lo = max(2, hi // 2)
    while lo < hi:  # power rises with n: the first n that reaches it
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid + 1, hi)
    return lo


def paired_decision(diffs_pct: Sequence[float], *, margin: float = DEFAULT_MARGIN_PCT) -> Decision:
    """The decision of paired differences (percent of the reference): mean, 95% t-interval, MDE
    and, when undecided, the pairs that would decide at ``margin``."""
    from scipy import stats

    d = np.asarray(diffs_pct, dtype=np.float64)
    n = d.size
    if n == 0:
        raise AnalysisError("pairs", 0, "a decision needs at least one pair")
    mean = float(d.mean())
    if n < 2:
        return Decision(estimate=mean, ci=(math.nan, math.nan), n=n, sd=math.nan, mde=math.nan,
                        margin=margin, verdict="undecided", needed=None)
    sd = float(d.std(ddof=1))
    half = float(stats.t.ppf(1 - ALPHA / 2, n - 1) * sd / math.sqrt(n))
    ci = (mean - half, mean + half)
    verdict = decide(mean, ci, margin)
    return Decision(estimate=mean, ci=ci, n=n, sd=sd, mde=paired_mde(n, sd), margin=margin, verdict=verdict,
                    needed=pairs_needed(sd, margin) if verdict == "undecided" else None)


def bootstrap_decision(estimate: float, samples: np.ndarray, *, n_runs: int, margin: float = DEFAULT_MARGIN_PCT,
                       why: str = "") -> Decision:
    """The decision of a quantity estimated by a fit, from its bootstrap ``samples`` (percent):
    percentile 95% interval, MDE ``(z_0.975 + z_0.80) * sd``, and when undecided the runs that
    would decide at ``margin`` (``n_runs * (MDE / margin)^2``). ``why`` forces ``undecided`` and
    says why (e.g. the law the term belongs to is not identified)."""
    from scipy import stats

    s = np.asarray(samples, dtype=np.float64)
    s = s[np.isfinite(s)]
    if s.size < 2:
        return Decision(estimate=estimate, ci=(math.nan, math.nan), n=n_runs, sd=math.nan, mde=math.nan,
                        margin=margin, verdict="undecided", unit="runs", why=why or "there is no bootstrap")
    lo, hi = np.quantile(s, [ALPHA / 2, 1 - ALPHA / 2])
    sd = float(s.std(ddof=1))
    mde = float((stats.norm.ppf(1 - ALPHA / 2) + stats.norm.ppf(POWER)) * sd)
    verdict = "undecided" if why else decide(estimate, (float(lo), float(hi)), margin)
    needed = None
    if verdict == "undecided" and margin > 0:
        needed = max(n_runs, math.ceil(n_runs * (mde / margin) ** 2)) if mde > 0 else n_runs
    return Decision(estimate=estimate, ci=(float(lo), float(hi)), n=n_runs, sd=sd, mde=mde, margin=margin,
                    verdict=verdict, needed=needed, unit="runs", why=why)


# ----------------------------------------------------------------------------- a study's comparisons


@dataclass(frozen=True, kw_only=True)
class ComparisonSpec:
    """One ``[[analysis.comparisons]]`` table of a study: ``variant`` columns (values joined with
    ``/``) against the ``reference`` value on runs paired by the ``pair`` columns (``moue
    compare``'s options), ``label`` naming joined values."""

    name: str
    variant: tuple[str, ...]
    reference: str
    pair: tuple[str, ...] = ()
    label: Mapping[str, str] | None = None


def margin_value(value, field: str = "analysis.margin_pct") -> float:
    """A margin in percent: a number in (0, 100)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 100:
        raise AnalysisError(field, value, "must be a number of percent in (0, 100), e.g. 1.0")
    return float(value)


def comparison_specs(tables) -> tuple[ComparisonSpec, ...]:
    """``[[analysis.comparisons]]`` (a list of tables) as specs; every error names the field."""
    if not isinstance(tables, list):
        raise AnalysisError("analysis.comparisons", tables, "must be an array of tables ([[analysis.comparisons]])")
    out, names = [], set()
    allowed = {"name", "variant", "reference", "pair", "label"}
    for i, t in enumerate(tables):
        where = f"analysis.comparisons[{i}]"
        if not isinstance(t, dict):
            raise AnalysisError(where, t, "must be a table with name, variant, reference and pair")
        for key in t:
            if key not in allowed:
                raise AnalysisError(f"{where}.{key}", t[key], "is not a setting: " + ", ".join(sorted(allowed)))
        for key in ("name", "variant", "reference"):
            if key not in t:
                raise AnalysisError(f"{where}.{key}", None, "is required")
        name, ref = t["name"], t["reference"]
        if not isinstance(name, str) or not name.strip() or name in names:
            raise AnalysisError(f"{where}.name", name, "must be a non-empty string, unique among the comparisons")
        names.add(name)
        cols = {}
        for key in ("variant", "pair"):
            v = t.get(key, [])
            if isinstance(v, str):
                v = [v]
            if not isinstance(v, list) or not all(isinstance(c, str) and c for c in v) or (key == "variant" and not v):
                raise AnalysisError(f"{where}.{key}", t.get(key), "must be a list of column names, e.g. "
                                    + ('["model.pool_size"]' if key == "variant" else '["train.seed"]'))
            cols[key] = tuple(v)
        if isinstance(ref, bool) or not isinstance(ref, (str, int, float)):
            raise AnalysisError(f"{where}.reference", ref, "must be the reference's value (joined with '/')")
        label = t.get("label")
        if label is not None and (not isinstance(label, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in label.items())):
            raise AnalysisError(f"{where}.label", label, "must be a table of JOINED_VALUE = \"name\"")
        out.append(ComparisonSpec(name=name, variant=cols["variant"], reference=str(ref), pair=cols["pair"],
                                  label=dict(label) if label else None))
    return tuple(out)


# ----------------------------------------------------------------------------- law terms


def v_effect(fit, columns: Mapping[str, np.ndarray], *, margin: float = DEFAULT_MARGIN_PCT) -> Decision | None:
    """The decision on a law's virtual-width term: the change of the predicted loss (percent) from
    the smallest to the largest virtual width among the law's rows ``columns`` (law variable ->
    values), the other variables at their medians there; its interval from the fit's bootstrap.
    Negative: wider reach lowers the loss. A law that is not identified gives ``undecided`` (its
    estimates are not a result), with the noise figures still shown; the V term's own interval
    being wider than its estimate does not count (a term that may be 0 is what is tested), and a V
    term on a bound of the search box gives no MDE (its resamples' spread is the box's). None for
    a law without V."""
    law = fit.law_spec
    if "V" not in law.variables or "V" not in columns:
        return None
    V = np.asarray(columns["V"], dtype=np.float64)
    at = {k: np.full(2, float(np.median(np.asarray(columns[k], dtype=np.float64))))
          for k in law.variables if k != "V"}
    data = {**at, "V": np.array([V.min(), V.max()])}
    pred = fit.predict(data)
    estimate = float(100 * (pred[1] - pred[0]) / pred[0])
    samples = np.empty(0)
    if fit.n_bootstrap > 1:
        s = fit.predict(data, samples=True)
        samples = 100 * (s[:, 1] - s[:, 0]) / s[:, 0]
    nested = law.nested_law
    v_params = [k for k in law.natural if nested is None or k not in nested.natural]
    stuck = [k for k in v_params if k in fit.diagnostics.on_bound]
    if stuck:  # the resamples pile up on the bound: their spread is the box's, not the data's noise
        lo, hi = (np.quantile(samples, [ALPHA / 2, 1 - ALPHA / 2]) if samples.size > 1 else (math.nan, math.nan))
        return Decision(estimate=estimate, ci=(float(lo), float(hi)), n=fit.provenance.n_clusters, sd=math.nan,
                        mde=math.nan, margin=margin, verdict="undecided", unit="runs",
                        why=f"its V term's {', '.join(stuck)} sits on a bound of the search box")
    from moue.analysis.verdict import verdict

    # a V term whose true value is 0 has an interval wider than its estimate, which alone makes
    # the law "not identified": that is the null this decision tests, so it does not count here
    rest = verdict(fit, width_exempt=tuple(v_params))
    why = "" if rest.identified else "its law is not identified (" + "; ".join(rest.reasons) + ")"
    return bootstrap_decision(estimate, samples, n_runs=fit.provenance.n_clusters, margin=margin, why=why)
