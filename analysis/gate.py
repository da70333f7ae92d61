"""The regression gate: has a fitted exponent drifted beyond its statistical tolerance?

A baseline (JSON) holds, per law, a full :class:`FitResult`: point estimates, bootstrap samples, the
run filter, the sorted run ids, the resampling seed, corpus fingerprint and counting convention.

- Same runs (same sorted cluster keys, seed and number of resamples): the bootstrap resamples of
  the two fits are the same draws, so the difference ``new_b - baseline_b`` of each exponent is a
  *paired* bootstrap sample; the gate fails when its central ``level`` percentile interval
  excludes zero.
- Different runs: a Wald test per exponent with both bootstrap variances,
  ``z = (new - base) / sqrt(var_base + var_new)``, fails when ``p < 1 - level``. The variances are
  robust (IQR / 1.349 of the bootstrap samples) so that a few runaway resamples cannot hide a
  shift; a joint Wald statistic over all exponents (both bootstrap covariances, not robust) is
  reported alongside for information.

Unusable input (different law, loss column, corpus or counting convention, no bootstrap samples)
raises :class:`AnalysisError` (the command exits 2).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from moue.analysis.errors import AnalysisError
from moue.analysis.result import FitResult, percentile_interval

__all__ = ["Baseline", "GateResult", "GateRow", "compare", "read_baseline", "write_baseline"]

BASELINE_SCHEMA = 1


@dataclass(frozen=True, kw_only=True)
class GateRow:
    """One exponent: estimates, difference, its interval, and the verdict."""

    parameter: str
    baseline: float
    new: float
    difference: float
    interval: tuple[float, float]
    method: str  # "paired" or "wald"
    p_value: float | None
    passed: bool

    @property
    def verdict(self) -> str:
        return "pass" if self.passed else "FAIL"


@dataclass(frozen=True, kw_only=True)
class GateResult:
    """The gate's verdict for one law."""

    law: str
    method: str
    level: float
    rows: tuple[GateRow, ...]
    joint_stat: float | None = None
    joint_df: int | None = None
    joint_p: float | None = None

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows)


@dataclass(frozen=True, kw_only=True)
class Baseline:
    """Stored fits of an experiment, by law."""

    experiment: str
    created: str
    fits: Mapping[str, FitResult]


def _norm_sf(z: float) -> float:
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def _check_compatible(base: FitResult, new: FitResult) -> None:
    if base.law != new.law:
        raise AnalysisError("law", new.law, f"differs from the baseline's ({base.law})")
    if base.loss != new.loss:
        raise AnalysisError("loss", new.loss, f"differs from the baseline's ({base.loss})")
    for name, a, b in (
        ("corpus_fingerprint", base.provenance.corpus_fingerprint,
         new.provenance.corpus_fingerprint),
        ("counting_convention", base.provenance.counting_convention,
         new.provenance.counting_convention),
    ):
        if a != b:
            raise AnalysisError(name, b, f"differs from the baseline's ({a}); the fits are not "
                                "comparable")
    for which, r in (("baseline", base), ("new fit", new)):
        if r.bootstrap.shape[0] < 2:
            raise AnalysisError(f"{which}.n_bootstrap", r.bootstrap.shape[0],
                                "must be >= 2 for the gate (use >= 1000)")


def compare(baseline: FitResult, new: FitResult, *, level: float = 0.95) -> GateResult:
    """Gate ``new`` against ``baseline`` on the law's exponents (see module docstring)."""
    if not 0 < level < 1:
        raise AnalysisError("level", level, "must be in (0, 1)")
    _check_compatible(baseline, new)
    law = baseline.law_spec
    idx = [law.natural.index(p) for p in law.exponents]
    paired = (baseline.provenance.clusters == new.provenance.clusters
              and baseline.seed == new.seed
              and baseline.bootstrap.shape[0] == new.bootstrap.shape[0])
    rows = []
    for j, name in zip(idx, law.exponents):
        b, n = baseline.params[name], new.params[name]
        if paired:
            diff = new.bootstrap[:, j] - baseline.bootstrap[:, j]
            lo, hi = (float(v[0]) for v in percentile_interval(diff[:, None], level))
            rows.append(GateRow(parameter=name, baseline=b, new=n, difference=n - b,
                                interval=(lo, hi), method="paired", p_value=None,
                                passed=bool(lo <= 0.0 <= hi)))
        else:
            se = math.hypot(_robust_sd(baseline.bootstrap[:, j]), _robust_sd(new.bootstrap[:, j]))
            d = n - b
            p = 2.0 * _norm_sf(abs(d) / se) if se > 0 else (1.0 if d == 0 else 0.0)
            zc = _z_crit(level)
            rows.append(GateRow(parameter=name, baseline=b, new=n, difference=d,
                                interval=(d - zc * se, d + zc * se), method="wald",
                                p_value=p, passed=bool(p >= 1 - level)))
    joint = (None, None, None)
    if not paired:
        d = np.array([r.difference for r in rows])
        cov = (np.atleast_2d(np.cov(baseline.bootstrap[:, idx], rowvar=False))
               + np.atleast_2d(np.cov(new.bootstrap[:, idx], rowvar=False)))
        stat = float(d @ np.linalg.pinv(cov) @ d)
        from scipy.stats import chi2

        joint = (stat, len(idx), float(chi2.sf(stat, len(idx))))
    return GateResult(law=law.name, method="paired" if paired else "wald", level=level,
                      rows=tuple(rows), joint_stat=joint[0], joint_df=joint[1],
                      joint_p=joint[2])


def _robust_sd(x: np.ndarray) -> float:
    """Standard deviation from the interquartile range (IQR / 1.349, exact for a normal): a
    handful of wild resamples (a refit that ran off along a flat ridge) must not inflate it."""
    q1, q3 = np.nanquantile(x, [0.25, 0.75])
    return float(q3 - q1) / 1.3489795


def _z_crit(level: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(1 - (1 - level) / 2))


def write_baseline(path: str | Path, *, experiment: str, fits: Mapping[str, FitResult]) -> Path:
    """Write a baseline JSON holding every fit (with its bootstrap samples)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "schema": BASELINE_SCHEMA,
        "kind": "moue-baseline",
        "experiment": experiment,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "fits": {law: r.to_dict() for law, r in fits.items()},
    }
    path.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    return path


def read_baseline(path: str | Path) -> Baseline:
    """Read a baseline written by :func:`write_baseline` (``AnalysisError`` when unusable)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise AnalysisError("baseline", str(path), "does not exist (create one with "
                            "--write-baseline)") from None
    except json.JSONDecodeError as e:
        raise AnalysisError("baseline", str(path), f"is not JSON ({e.msg} at line {e.lineno})") \
            from None
    if not isinstance(doc, dict) or doc.get("kind") != "moue-baseline":
        raise AnalysisError("baseline", str(path), "is not a moue baseline file")
    if doc.get("schema") != BASELINE_SCHEMA:
        raise AnalysisError("baseline schema", doc.get("schema"),
                            f"is not supported (this version reads {BASELINE_SCHEMA})")
    try:
        fits = {law: FitResult.from_dict(d) for law, d in doc["fits"].items()}
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, AnalysisError):
            raise
        raise AnalysisError("baseline", str(path), f"is malformed ({e!r})") from None
    if not fits:
        raise AnalysisError("baseline", str(path), "holds no fits")
    return Baseline(experiment=doc.get("experiment", ""), created=doc.get("created", ""),
                    fits=fits)
