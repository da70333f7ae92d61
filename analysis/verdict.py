"""Is a fitted law identified? The verdict every fit carries (docs/FITTING.md, "Verdicts").

A law is **identified** when none of these holds (each is a reason, in words, in the verdict):

- a parameter sits on a bound of the search box (its estimate is the box, not the data);
- an exponent's 95% interval is wider than its estimate (``hi - lo > |estimate|``): its sign or
  size is not pinned down;
- a law variable has fewer than ``MIN_LEVELS`` distinct values (a power law needs at least 3
  levels to be more than a line through two points);
- there is no bootstrap (no intervals), or more than ``MAX_BAD_RESAMPLES`` of the resamples hit
  the iteration limit or ended with a parameter on a bound;
- the hold-out is missing, held out fewer than ``MIN_HOLDOUT`` points, or its MAPE is above
  ``MAX_HOLDOUT_MAPE`` percent.

``exponent_reasons`` are the reasons that concern the exponents themselves (on a bound, too wide,
too few levels, failed resamples): ``moue check`` refuses to gate an exponent that has any, while
a law whose only problem is its hold-out may still be gated (its exponents are estimated; its
predictions are not trusted).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Verdict", "verdict", "MIN_LEVELS", "MIN_HOLDOUT", "MAX_HOLDOUT_MAPE", "MAX_BAD_RESAMPLES"]

MIN_LEVELS = 3
MIN_HOLDOUT = 3
MAX_HOLDOUT_MAPE = 5.0  # percent
MAX_BAD_RESAMPLES = 0.05  # fraction of bootstrap resamples


@dataclass(frozen=True)
class Verdict:
    identified: bool
    reasons: tuple[str, ...]
    exponent_reasons: tuple[str, ...]

    def line(self) -> str:
        return "identified" if self.identified else "NOT identified: " + "; ".join(self.reasons)


def verdict(result, *, width_exempt: tuple[str, ...] = ()) -> Verdict:
    """The verdict of a ``FitResult`` (module docstring). ``width_exempt`` names exponents whose
    interval may be wider than their estimate: a term under test whose true value may be 0 (the V
    term, when deciding whether virtual width matters: ``moue.analysis.decide.v_effect``)."""
    law = result.law_spec
    d, h, prov = result.diagnostics, result.holdout, result.provenance
    exp = []
    for name in d.on_bound:
        exp.append(f"{name} = {result.params[name]:.4g} is on a bound of the search box")
    for name in law.exponents:
        if name not in result.ci or name in width_exempt:
            continue
        lo, hi = result.ci[name]
        est = result.params[name]
        if not hi - lo <= abs(est):
            exp.append(f"{name}'s 95% interval [{lo:.3g}, {hi:.3g}] is wider than its estimate {est:.3g}")
    for var, n in prov.levels.items():
        if n < MIN_LEVELS:
            exp.append(f"{var} has {n} distinct value{'s' if n != 1 else ''} (at least {MIN_LEVELS} are needed)")
    B = result.n_bootstrap
    if B == 0:
        exp.append("no bootstrap: no intervals")
    else:
        bad = d.n_bootstrap_unconverged + d.n_bootstrap_on_bound
        if bad > MAX_BAD_RESAMPLES * B:
            exp.append(f"{d.n_bootstrap_on_bound} of {B} bootstrap resamples ended with a parameter on a bound "
                       f"and {d.n_bootstrap_unconverged} did not converge (more than {MAX_BAD_RESAMPLES:.0%})")
    reasons = list(exp)
    if h is None:
        reasons.append("no hold-out evaluation")
    else:
        if h.n_test < MIN_HOLDOUT:
            reasons.append(f"the hold-out has {h.n_test} point{'s' if h.n_test != 1 else ''} "
                           f"(at least {MIN_HOLDOUT} are needed)")
        if h.mape > MAX_HOLDOUT_MAPE:
            reasons.append(f"hold-out MAPE {h.mape:.1f}% is above {MAX_HOLDOUT_MAPE:g}%")
    return Verdict(identified=not reasons, reasons=tuple(reasons), exponent_reasons=tuple(exp))
