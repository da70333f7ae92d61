"""The recorded studies re-read with verdicts (issue 33): each family against the layerwise MoE and
each virtual-width term, with the minimum detectable effect and what would decide, from the runs
tables next to this file (``<study>_runs.csv``, one row per finished run, as exported from MLflow).

    python studies/results/decisions.py                  # every table here, margin 1%
    python studies/results/decisions.py quickstart --margin 1.3

The same code as ``moue report`` (``moue.analysis.report.family_comparisons``, ``fit_laws``,
``v_term_decisions``; 1,000 bootstrap resamples, seed 0).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import polars as pl

from moue.analysis.loading import with_cooldown_points
from moue.analysis.report import family_comparisons, fit_laws, v_term_decisions

HERE = Path(__file__).parent
STUDIES = ("quickstart", "ladder", "isoflop", "virtual_width", "vw_scaling", "vw_width")
V_LAWS = ("vw_multiplicative", "vw_additive", "vw_interaction")


def reread(study: str, margin: float, bootstrap: int) -> list[str]:
    frame = pl.read_csv(HERE / f"{study}_runs.csv", infer_schema_length=None)
    lines = [f"{c.variant} vs {c.reference}: {c.decision.words()}"
             for c in family_comparisons(frame, margin=margin)]
    points = with_cooldown_points(frame)
    fitted = fit_laws(points, laws=V_LAWS, n_bootstrap=bootstrap, seed=0)
    for law, d in v_term_decisions(points, fitted.fits, margin=margin).items():
        r = fitted.fits[law]
        v_params = {k: v for k, v in r.params.items() if k not in r.law_spec.nested_law.natural}
        terms = ", ".join(f"{k} = {v:.3g} [{r.ci[k][0]:.3g}, {r.ci[k][1]:.3g}]" for k, v in v_params.items())
        lines.append(f"virtual width in {law} ({terms}): {d.words()}")
    for law, why in fitted.skipped.items():
        lines.append(f"{law}: not fitted: {why}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("studies", nargs="*", default=list(STUDIES))
    ap.add_argument("--margin", type=float, default=1.0)
    ap.add_argument("--bootstrap", type=int, default=1000)
    args = ap.parse_args()
    for study in args.studies:
        print(f"## {study} (margin {args.margin:g}%)")
        for line in reread(study, args.margin, args.bootstrap):
            print(f"- {line}")


if __name__ == "__main__":
    main()
