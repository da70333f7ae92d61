"""Variants compared on paired runs: each variant against a reference on the runs that share
everything else (the ``pair`` columns: seed, depth, budget...), with a paired t-test and a sign
count, so a difference is judged against its own seed noise (docs/FITTING.md, "Comparisons").

``variant`` is one column or several (their values joined with ``/``), e.g. the family label
``model.router/model.balance/model.window_layout``; ``label`` maps those joined values to
readable names. A pair is kept when both the variant and the reference have exactly one run in it.

Each comparison carries its ``decision`` (``moue.analysis.decide``): detected, ruled out at the
margin, or undecided, with the minimum detectable effect and the pairs that would decide.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from moue.analysis.decide import DEFAULT_MARGIN_PCT, Decision, paired_decision
from moue.analysis.errors import AnalysisError

__all__ = ["Comparison", "compare_variants", "variant_labels", "with_topology"]


def with_topology(frame):
    """``frame`` with a ``topology`` column: ``layerwise`` (``P = L w``, ``s = w``), ``unipool``
    (``w = P``), ``rotational`` (otherwise), ``dense`` (no pool), from the model columns."""
    import polars as pl

    need = ("model.pool_size", "model.window", "model.stride", "model.n_layers")
    if not all(c in frame.columns for c in need):
        return frame
    P, w, s, L = (pl.col(c) for c in need)
    topo = (pl.when((P == L * w) & (s == w)).then(pl.lit("layerwise"))
            .when(w == P).then(pl.lit("unipool")).otherwise(pl.lit("rotational")))
    if "model.ffn" in frame.columns:
        topo = pl.when(pl.col("model.ffn") == "dense").then(pl.lit("dense")).otherwise(topo)
    return frame.with_columns(topo.alias("topology"))


@dataclass(frozen=True)
class Comparison:
    variant: str
    reference: str
    n_pairs: int
    mean: float  # mean loss of the variant over its pairs
    mean_reference: float
    mean_diff: float  # variant - reference, loss units
    sd_diff: float
    t: float
    p_value: float  # two-sided paired t-test (NaN with fewer than 2 pairs)
    n_better: int  # pairs where the variant's loss is lower
    by_group: Mapping[str, float]  # mean relative difference (percent) per value of the first pair column
    decision: Decision  # on the relative differences (percent), at the comparison's margin

    @property
    def mean_rel_diff(self) -> float:
        """The mean relative difference, in percent of the reference (the decision's estimate)."""
        return self.decision.estimate

    @property
    def rel_ci(self) -> tuple[float, float]:
        """The 95% t-interval of the mean relative difference (percent; the decision's)."""
        return self.decision.ci

    def line(self) -> str:
        p = "n/a" if math.isnan(self.p_value) else f"{self.p_value:.3g}"
        return (f"{self.variant} vs {self.reference}: {self.mean_rel_diff:+.2f}% (diff {self.mean_diff:+.4f} "
                f"+/- {self.sd_diff:.4f} sd, {self.n_pairs} pairs, lower in {self.n_better}), paired t = "
                f"{self.t:.2f}, p = {p}")

    def verdict_line(self, name: str | None = None) -> str:
        """The decision in plain words: ``MoUE-style vs layerwise MoE: undecided (-0.54% [-3.85, +2.77],
        4 pairs); this design detects differences of 4.2% or more; about 36 pairs (32 more) would
        decide at 1%``."""
        return f"{name or f'{self.variant} vs {self.reference}'}: {self.decision.words()}"

    def to_json(self) -> dict:
        """The comparison's fields and its decision's (``moue compare --json``, the report's JSON)."""
        return {"variant": self.variant, "reference": self.reference, "n_pairs": self.n_pairs,
                "mean": self.mean, "mean_reference": self.mean_reference, "mean_diff": self.mean_diff,
                "sd_diff": self.sd_diff, "t": self.t, "p_value": self.p_value, "n_better": self.n_better,
                "by_group": dict(self.by_group), **self.decision.to_json()}


def variant_labels(frame, columns: Sequence[str]) -> list[str]:
    """The joined values of ``columns`` per row (missing as ``-``)."""
    for c in columns:
        if c not in frame.columns:
            raise AnalysisError("--variant", c, "is not a column: " + ", ".join(sorted(frame.columns)))
    rows = zip(*(frame[c].to_list() for c in columns))
    return ["/".join("-" if v is None else str(v) for v in row) for row in rows]


def compare_variants(frame, *, variant: Sequence[str], reference: str, pair: Sequence[str],
                     loss: str = "final/val_loss", label: Mapping[str, str] | None = None,
                     margin: float = DEFAULT_MARGIN_PCT) -> list[Comparison]:
    """Every variant against ``reference`` (a joined value, or its label) on paired runs, each with
    its decision at ``margin`` (percent)."""
    from scipy import stats

    label = dict(label or {})
    reference = label.get(reference, reference)  # a labelled reference is named by its label
    names = [label.get(v, v) for v in variant_labels(frame, variant)]
    for col in pair:
        if col not in frame.columns:
            raise AnalysisError("--pair", col, "is not a column")
    keys = [tuple(row) for row in zip(*(frame[c].to_list() for c in pair))] if pair else [()] * frame.height
    if loss not in frame.columns:
        raise AnalysisError("--loss", loss, "is not a column")
    losses = frame[loss].to_list()
    cells: dict[tuple, dict[str, list[float]]] = {}
    for name, key, value in zip(names, keys, losses):
        cells.setdefault(key, {}).setdefault(name, []).append(value)
    if reference not in set(names):
        raise AnalysisError("--reference", reference, "is not a variant: " + ", ".join(sorted(set(names))))
    out = []
    for name in dict.fromkeys(names):
        if name == reference:
            continue
        pairs = [(key, c[name][0], c[reference][0]) for key, c in cells.items()
                 if len(c.get(name, ())) == 1 and len(c.get(reference, ())) == 1]
        if not pairs:
            continue
        a = np.array([p[1] for p in pairs])
        b = np.array([p[2] for p in pairs])
        d = a - b
        if len(d) > 1 and d.std(ddof=1) > 0:
            t, p = stats.ttest_rel(a, b)
        else:
            t, p = math.nan, math.nan
        rel = 100 * d / b
        decision = paired_decision(rel, margin=margin)
        groups: dict[str, list[float]] = {}
        for (key, x, y) in pairs:
            groups.setdefault(str(key[0]) if key else "all", []).append(100 * (x - y) / y)
        out.append(Comparison(
            variant=name, reference=reference, n_pairs=len(d), mean=float(a.mean()), mean_reference=float(b.mean()),
            mean_diff=float(d.mean()),
            sd_diff=float(d.std(ddof=1)) if len(d) > 1 else math.nan, t=float(t), p_value=float(p),
            n_better=int((d < 0).sum()), by_group={k: float(np.mean(v)) for k, v in groups.items()},
            decision=decision))
    return out
