"""The adaptive study (studies/adaptive.toml) against the fixed ladder of the same budget
(studies/LOG.md, issue 34): what the design trained and decided, and the interval the fixed ladder's
allocation (the grid in seed-major order, every size at every seed, up to the same FLOPs) would
have had at the same measured pair-to-pair sd. The fixed ladder was not trained: its interval is a
projection from the design's own runs (the pooled sd does not depend on the allocation), said so.

    python studies/results/adaptive_vs_grid.py [RECORD]   # default: adaptive_design.json beside this file
                                                          # (a copy of <workspace>/designs/adaptive.json)
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from scipy import stats

from moue.analysis.design import stratified
from moue.studies.adaptive import build_design
from moue.studies.spec import load_study

SPEC = Path(__file__).resolve().parents[1] / "adaptive.toml"
RECORD = Path(__file__).resolve().parent / "adaptive_design.json"


def main(record_file: str = str(RECORD)) -> None:
    record = json.loads(Path(record_file).read_text())
    study = load_study(SPEC)
    design = build_design(study)
    design.restore(record["state"])
    pairs = design._pairs()
    est, se, df = stratified(pairs)
    sd = se * len(pairs) / math.sqrt(sum(1 / len(v) for v in pairs.values()))  # the pooled pair sd
    t = stats.t.isf(0.025, df)
    print(f"design: {record['verdict']}; stopped: {record['stop']}")
    print(f"  {record['finished_trials']} trials, {record['spent_flops']:.3g} FLOPs of {record['budget_flops']:.3g}; "
          "pairs per size: " + ", ".join(f"d{k[0]} {len(v)}" for k, v in sorted(pairs.items())))
    last = record["looks"][-1]
    print(f"  stratified estimate {est:+.3f}% (pooled pair sd {sd:.3f}%, {df} df); plain 95% [{est - t * se:+.3f}, "
          f"{est + t * se:+.3f}]; the interval it stops on [{last['lo']:+.3f}, {last['hi']:+.3f}] at information "
          f"fraction {last.get('fraction', float('nan')):.3f}")
    # the fixed ladder of the same budget: whole seeds of every size, in the grid's order
    per_seed = {}
    for c in design.candidates:
        if c.arm:
            per_seed.setdefault(c.seed, 0.0)
            per_seed[c.seed] += c.cost
    seeds, spent = 0, 0.0
    for seed in sorted(per_seed):
        if spent + per_seed[seed] > record["spent_flops"]:
            break
        seeds, spent = seeds + 1, spent + per_seed[seed]
    strata = len(pairs)
    se_grid = sd / strata * math.sqrt(strata / seeds)
    t_grid = stats.t.isf(0.025, strata * (seeds - 1))
    print(f"fixed ladder of the same FLOPs: {seeds} seeds of each size ({spent:.3g} FLOPs); at the same pair sd its "
          f"plain 95% half-width would be {t_grid * se_grid:.3f}% against the design's {t * se:.3f}% "
          f"(variance ratio {(se / se_grid) ** 2:.3f})")


if __name__ == "__main__":
    main(*sys.argv[1:])
