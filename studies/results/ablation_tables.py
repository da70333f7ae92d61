"""The ablation's tables in studies/LOG.md, from ``ablation_runs.csv`` (one row per finished run).

    python studies/results/ablation_tables.py                      # the tables
    python studies/results/ablation_tables.py --add ablation_l6 WS # append that experiment's runs first

Per variant and depth: the mean final validation loss (sd over seeds, n, expert width f); then
each variant against the layerwise MoE and against the rotational windows alone, paired over
(depth, seed) with a paired t-test (``moue.analysis.paired.compare_variants``), and its verdict at a
1% margin with the minimum detectable effect (``moue.analysis.decide``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import polars as pl

from moue.analysis.figures import family_labels
from moue.analysis.paired import compare_variants, with_topology

CSV = Path(__file__).with_name("ablation_runs.csv")
LOSS = "final/val_loss"
ORDER = ("layerwise MoE", "UniPool-style", "rotational windows", "rotational + clamped", "rotational + trajectory",
         "rotational + exposure", "MoUE-style")


def add(experiment: str, workspace: str) -> None:
    from moue.analysis.loading import load_runs

    old = pl.read_csv(CSV)
    frame = load_runs(experiment, tracking_uri=f"sqlite:///{Path(workspace).resolve() / 'mlflow.db'}").frame
    frame = with_topology(frame).with_columns(pl.Series("family", family_labels(frame)))
    new = frame.select([pl.col(c).cast(old.schema[c]) for c in old.columns])
    merged = pl.concat([old, new.filter(~pl.col("run_id").is_in(old["run_id"].to_list()))])
    merged.write_csv(CSV)
    print(f"{CSV}: {old.height} + {merged.height - old.height} runs")


def variant(row: dict) -> str:
    fam, router, balance, layout = row["family"], row["model.router"], row["model.balance"], row["model.window_layout"]
    if row["topology"] == "layerwise":
        return "layerwise MoE"
    if row["topology"] == "unipool":
        return "UniPool-style"
    if router == "trajectory" and balance == "exposure":
        return "MoUE-style"
    if router == "trajectory":
        return "rotational + trajectory"
    if balance == "exposure":
        return "rotational + exposure"
    if layout == "clamped":
        return "rotational + clamped"
    return "rotational windows" if fam else fam


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--add":
        add(sys.argv[2], sys.argv[3])
    frame = pl.read_csv(CSV)
    frame = frame.with_columns(pl.Series("variant", [variant(r) for r in frame.iter_rows(named=True)]))
    depths = sorted(frame["model.n_layers"].unique().to_list())
    print("| variant | " + " | ".join(f"L = {d}" for d in depths) + " |")
    print("|---|" + "---|" * len(depths))
    for v in ORDER:
        cells = []
        for d in depths:
            g = frame.filter((pl.col("variant") == v) & (pl.col("model.n_layers") == d))
            if g.height == 0:
                cells.append("-")
                continue
            f = ",".join(str(x) for x in sorted(g["model.expert_hidden"].unique().to_list()))
            cells.append(f"{g[LOSS].mean():.4f} ({g[LOSS].std():.4f}, n={g.height}, f={f})")
        print(f"| {v} | " + " | ".join(cells) + " |")
    print()
    for ref in ("layerwise MoE", "rotational windows"):
        print(f"against {ref}, paired over (depth, seed):")
        for c in compare_variants(frame, variant=["variant"], reference=ref, pair=["model.n_layers", "train.seed"],
                                  loss=LOSS):
            per = ", ".join(f"L{k.strip('()').split(',')[0]} {v:+.2f}%" if k != "all" else f"{v:+.2f}%"
                            for k, v in sorted(c.by_group.items()))
            print(f"  {c.line()}  [by depth: {per}]")
            print(f"    {c.decision.words()}")


if __name__ == "__main__":
    main()
