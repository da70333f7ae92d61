"""A check of issue 33 (studies/LOG.md, 2026-12-07 session 17): split-conformal prediction intervals
on Epoch's Chinchilla points, from the absolute out-of-sample errors (ln L) of extrapolation folds
(the law refitted below the 50-90% quantiles of compute, predicting the points above), measured on
splits inside the training rows and on the hold-out C >= 1e21. Not the method moue uses
(``moue.analysis.predict``); it covered 0.83 of the hold-out.

    python studies/results/epoch_conformal_check.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from moue.analysis import fit

DATA = Path(__file__).resolve().parents[2] / "tests" / "data" / "chinchilla_epoch2024.csv"
VARIABLES = {"N": "Model Size", "D": "D", "C": "Training FLOP"}
QUANTILES = (0.5, 0.6, 0.7, 0.8, 0.9)


def epoch() -> pl.DataFrame:
    df = pl.read_csv(DATA)
    fifth_highest = df.get_column("loss").sort(descending=True)[4]  # Epoch's filter
    return df.filter(pl.col("loss") < fifth_highest).with_columns(
        D=pl.col("Training FLOP") / (6 * pl.col("Model Size")))


def log_prediction(rows: pl.DataFrame, at: pl.DataFrame) -> np.ndarray:
    r = fit(rows, law="chinchilla", loss="loss", variables=VARIABLES, n_bootstrap=0, holdout=None)
    return np.log(r.predict({"N": at["Model Size"].to_numpy(), "D": at["D"].to_numpy()}))


def conformal(train: pl.DataFrame, test: pl.DataFrame, level: float = 0.95) -> dict[str, float]:
    compute = train["Training FLOP"].to_numpy()
    errors = []
    for q in QUANTILES:
        cut = np.quantile(compute, q, method="inverted_cdf")
        below, above = train.filter(pl.col("Training FLOP") < cut), train.filter(pl.col("Training FLOP") >= cut)
        errors.append(np.log(above["loss"].to_numpy()) - log_prediction(below, above))
    e = np.sort(np.abs(np.concatenate(errors)))
    k = min(int(np.ceil((e.size + 1) * level)), e.size)  # the split-conformal quantile
    half = e[k - 1]
    p = log_prediction(train, test)
    loss = test["loss"].to_numpy()
    lo, hi = np.exp(p - half), np.exp(p + half)
    rmse = float(np.sqrt(np.mean((np.exp(p) - loss) ** 2)))
    return {"fold_errors": e.size, "coverage": float(np.mean((loss >= lo) & (loss <= hi))),
            "median_half_width": float(np.median((hi - lo) / 2)), "rmse": rmse}


def main() -> None:
    df = epoch()
    train = df.filter(pl.col("Training FLOP") < 1e21)
    for cut in (1e20, 3e20, 7e20):  # splits inside the training rows
        inner = conformal(train.filter(pl.col("Training FLOP") < cut), train.filter(pl.col("Training FLOP") >= cut))
        print(f"training rows held out at C >= {cut:.0e}: {inner}")
    print(f"hold-out C >= 1e21: {conformal(train, df.filter(pl.col('Training FLOP') >= 1e21))}")


if __name__ == "__main__":
    main()
