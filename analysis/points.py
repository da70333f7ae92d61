"""What a fit needs from a table: the law's variables, the loss, weights, clusters and the compute
axis, validated (:func:`prepare_points`). A table is a polars DataFrame or a mapping of columns."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from moue.analysis.errors import AnalysisError
from moue.analysis.laws import Law

__all__ = ["Points", "column_values", "prepare_points"]


@dataclass(frozen=True, kw_only=True)
class Points:
    """What a fit of a law needs from a table, validated."""

    data: Mapping[str, np.ndarray]  # law variable -> values
    loss: np.ndarray
    weights: np.ndarray
    cluster_index: np.ndarray  # row -> index into clusters
    clusters: tuple[str, ...]  # sorted cluster keys (every row its own cluster: row numbers)
    compute: np.ndarray  # the hold-out / extrapolation axis
    compute_column: str
    cluster_column: str | None = None  # the column the clusters come from (None: rows)
    corpus_fingerprint: str | None = None
    counting_convention: str | None = None

    def subset(self, rows: np.ndarray) -> Points:
        """The points of the rows selected by the boolean mask ``rows``."""
        return dataclasses.replace(
            self, data={k: v[rows] for k, v in self.data.items()}, loss=self.loss[rows],
            weights=self.weights[rows], cluster_index=self.cluster_index[rows],
            compute=self.compute[rows])


def column_values(frame, name: str) -> np.ndarray | None:
    """The values of column ``name`` of ``frame`` (polars or a mapping), ``None`` if absent."""
    if hasattr(frame, "get_column"):  # polars
        if name not in frame.columns:
            return None
        return frame.get_column(name).to_numpy()
    if name not in frame:
        return None
    return np.asarray(frame[name])


def _columns(frame) -> list[str]:
    return list(frame.columns) if hasattr(frame, "columns") else list(frame)


def _unique_nonnull(values: np.ndarray | None) -> list:
    if values is None:
        return []
    return sorted({str(v) for v in values.tolist() if v is not None})


def _single(frame, col: str) -> str | None:
    found = _unique_nonnull(column_values(frame, col))
    return found[0] if found else None


def _positive(values, field_name: str, col: str) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise AnalysisError(field_name, col, "must be a numeric column") from None
    bad = ~np.isfinite(arr) | (arr <= 0)
    if bad.any():
        raise AnalysisError(field_name, col, f"has {int(bad.sum())} missing, non-finite or "
                            f"non-positive values (first at row {int(np.flatnonzero(bad)[0])}); "
                            f"filter them out first, e.g. --where '{_quoted(col)} > 0' (NaN counts as missing)")
    return arr


def _quoted(col: str) -> str:
    """``col`` as a SQL operand: a column name in double quotes, an expression in parentheses."""
    return f"({col})" if '"' in col else f'"{col}"'


def _too_few(law: Law, n: int) -> AnalysisError:
    return AnalysisError("points", n, f"are too few: law {law.name} has {law.n_params} "
                         f"parameters and needs at least {law.n_params + 2} points")


def _law_data(frame, law: Law, variables: Mapping[str, str]) -> dict[str, np.ndarray]:
    cols = _columns(frame)
    data = {}
    for var in law.variables:
        col = variables.get(var)
        if col is None:
            raise AnalysisError(f"variables.{var}", None,
                                f"is required by law {law.name} ({', '.join(law.variables)})")
        values = column_values(frame, col)
        if values is None:
            raise AnalysisError(f"variables.{var}", col,
                                f"is not a column; columns: {', '.join(cols)}")
        data[var] = _positive(values, f"variables.{var}", col)
    return data


def _row_weights(frame, weights: str | None, n: int) -> np.ndarray:
    if weights is None:
        return np.ones(n)
    wv = column_values(frame, weights)
    if wv is None:
        raise AnalysisError("weights", weights,
                            f"is not a column; columns: {', '.join(_columns(frame))}")
    w = np.asarray(wv, dtype=np.float64)
    if not (np.all(np.isfinite(w)) and np.all(w >= 0) and w.sum() > 0):
        raise AnalysisError("weights", weights, "must be finite, >= 0 and not all zero")
    return w


def _row_clusters(frame, cluster: str | None, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted cluster keys and each row's index into them (no column: every row its own)."""
    if cluster is None:  # every row its own cluster, in row order
        return np.array([str(i) for i in range(n)]), np.arange(n)
    kv = column_values(frame, cluster)
    if kv is None:
        raise AnalysisError("cluster", cluster,
                            f"is not a column; columns: {', '.join(_columns(frame))}")
    keys = np.array([str(v) for v in kv.tolist()])
    return np.unique(keys, return_inverse=True)


def _compute_axis(frame, law: Law, data, variables) -> tuple[np.ndarray, str]:
    """The hold-out / extrapolation axis: ``C``, else ``final/flops``, else ``6 N D``."""
    if "C" in data:
        return data["C"], variables["C"]
    fl = column_values(frame, "final/flops")
    if fl is not None and np.all(np.isfinite(np.asarray(fl, dtype=float))):
        return np.asarray(fl, dtype=np.float64), "final/flops"
    if "N" in data and "D" in data:
        return 6.0 * data["N"] * data["D"], "6ND"
    var = law.variables[0]
    return data[var], variables[var]


def prepare_points(frame, *, law: Law, loss: str, variables: Mapping[str, str],
                   weights: str | None = None, cluster: str | None = None) -> Points:
    """Validate and extract what a fit of ``law`` needs from ``frame`` (polars or a mapping).

    Refuses (``AnalysisError``): missing columns, non-finite or non-positive values, fewer points
    than parameters + 2, an axis with a single value, mixed corpora or counting conventions.
    """
    cols = _columns(frame)
    n_rows = frame.height if hasattr(frame, "height") else (
        len(frame[cols[0]]) if cols else 0)
    if n_rows < law.n_params + 2:
        raise _too_few(law, n_rows)
    data = _law_data(frame, law, variables)
    lvalues = column_values(frame, loss)
    if lvalues is None:
        raise AnalysisError("loss", loss, f"is not a column; columns: {', '.join(cols)}")
    lvalues = _positive(lvalues, "loss", loss)
    n = lvalues.shape[0]
    if n < law.n_params + 2:
        raise _too_few(law, n)
    for var, values in data.items():
        if np.unique(values).size < 2:
            raise AnalysisError(f"variables.{var}", variables[var],
                                f"has a single value ({values[0]:g}); the law needs it to vary")
    for col, what in (("corpus_fingerprint", "corpora"), ("data.corpus", "corpora"),
                      ("count.convention", "counting conventions")):
        found = _unique_nonnull(column_values(frame, col))
        if len(found) > 1:
            raise AnalysisError(col, found, f"mixes {what}; fit one at a time (filter the runs)")
    w = _row_weights(frame, weights, n)
    if cluster is None and "run_id" in cols:
        cluster = "run_id"
    clusters, cluster_index = _row_clusters(frame, cluster, n)
    compute, compute_column = _compute_axis(frame, law, data, variables)
    return Points(data=data, loss=lvalues, weights=w, cluster_index=cluster_index,
                  clusters=tuple(str(c) for c in clusters), compute=compute,
                  compute_column=compute_column, cluster_column=cluster,
                  corpus_fingerprint=_single(frame, "corpus_fingerprint"),
                  counting_convention=_single(frame, "count.convention"))
