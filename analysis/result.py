"""What a fit returns: :class:`FitResult` (named parameters, intervals, derived quantities,
bootstrap samples, diagnostics, hold-out, provenance, the noise of its prediction intervals) and its
JSON form.

The JSON form (schema ``RESULT_SCHEMA``) is the dataclasses' own fields, written and read back
generically from their type annotations: nested dataclasses become objects, tuples and arrays
lists, and the non-finite floats JSON lacks are written as ``null`` (NaN) and ``"inf"``/``"-inf"``.
Five things are added for readers of the file and ignored when it is read back: ``schema``, the
law's ``formula``, the bootstrap ``sd`` of every parameter and the verdict (``identified``,
``reasons``; ``moue.analysis.verdict``); the bootstrap samples sit under
``bootstrap`` (``params``, ``derived``, ``derived_names``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moue.analysis.derived import DerivedContext
from moue.analysis.errors import AnalysisError
from moue.analysis.laws import Law, get_law
from moue.analysis.predict import Noise, Prediction, prediction_interval

__all__ = ["RESULT_SCHEMA", "Diagnostics", "FitResult", "HoldoutResult", "Provenance",
           "percentile_interval"]

RESULT_SCHEMA = 1


@dataclass(frozen=True, kw_only=True)
class HoldoutResult:
    """Hold-out evaluation; errors are in loss units, ``mape`` in percent."""

    column: str
    min_value: float
    n_train: int
    n_test: int
    rmse: float
    max_abs_error: float
    mape: float
    extrapolation_ratio: float  # largest held-out compute / largest training compute
    params: Mapping[str, float]  # natural parameters of the training fit
    test_loss: tuple[float, ...]
    test_pred: tuple[float, ...]
    test_axis: tuple[float, ...]
    # prediction intervals of the training fit at the held-out points (moue.analysis.predict) and
    # the fraction of held-out losses inside them; empty and NaN without a bootstrap
    test_lo: tuple[float, ...] = ()
    test_hi: tuple[float, ...] = ()
    coverage: float = math.nan


@dataclass(frozen=True, kw_only=True)
class Diagnostics:
    """Convergence record of the multi-start fit (and its bootstrap). ``warnings`` are the fit's
    notes (rough intervals, an optimum on a bound, unconverged resamples, a skipped hold-out):
    they live here only, and the command line prints them once."""

    objective: float
    grad_norm: float  # max |projected gradient| at the optimum
    status: str  # optimiser status of the best start
    n_starts: int
    n_converged: int  # starts that ended converged or stalled (not max_iter)
    n_best_basin: int  # starts that ended at the best optimum (f within 1e-7, params within 1e-4)
    on_bound: tuple[str, ...]  # natural names of parameters sitting on a bound
    n_bootstrap_unconverged: int = 0
    warnings: tuple[str, ...] = ()
    n_bootstrap_on_bound: int = 0  # resamples whose refit ended with a parameter on a bound


@dataclass(frozen=True, kw_only=True)
class Provenance:
    """What was fitted: rows, the filter, corpus, counting convention, source."""

    n_points: int
    n_clusters: int
    cluster_column: str | None
    clusters: tuple[str, ...]  # sorted cluster keys (run ids): pairing key of the gate
    filter: str = ""
    corpus_fingerprint: str | None = None
    counting_convention: str | None = None
    source: str = ""
    levels: Mapping[str, int] = field(default_factory=dict)  # distinct values of each law variable


def _ro(mapping: Mapping) -> Mapping:
    return types.MappingProxyType(dict(mapping))


@dataclass(frozen=True, kw_only=True)
class FitResult:
    """A fitted law: named (natural) parameters, percentile intervals, derived quantities,
    bootstrap samples, diagnostics, hold-out evaluation and provenance.

    ``theta`` is the optimum in the law's fitted parametrisation (logs of coefficients);
    ``bootstrap`` the natural parameters of every resample, shape (B, P), in ``law.natural``
    order; ``bootstrap_derived`` likewise for ``derived`` (columns in ``derived`` order).
    """

    law: str
    loss: str
    variables: Mapping[str, str]
    delta: float
    theta: tuple[float, ...]
    params: Mapping[str, float]
    ci: Mapping[str, tuple[float, float]]
    derived: Mapping[str, float]
    derived_ci: Mapping[str, tuple[float, float]]
    context: DerivedContext
    level: float
    n_bootstrap: int
    seed: int
    diagnostics: Diagnostics
    holdout: HoldoutResult | None
    provenance: Provenance
    # (B, P) and (B, Q): their widths are the numbers of params and derived (B may be 0)
    bootstrap: np.ndarray = field(repr=False, metadata={"columns": "params"})
    bootstrap_derived: np.ndarray = field(repr=False, metadata={"columns": "derived"})
    noise: Noise | None = None  # run-to-run noise for prediction intervals (None: read from an older file)

    def __post_init__(self) -> None:
        for name in ("variables", "params", "ci", "derived", "derived_ci"):
            object.__setattr__(self, name, _ro(getattr(self, name)))
        for name in ("bootstrap", "bootstrap_derived"):
            arr = np.array(getattr(self, name), dtype=np.float64)
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)

    @property
    def law_spec(self) -> Law:
        return get_law(self.law)

    @property
    def verdict(self):
        """Identified, or not with reasons (``moue.analysis.verdict``)."""
        from moue.analysis.verdict import verdict

        return verdict(self)

    @property
    def notes(self) -> tuple[str, ...]:
        """The fit's notes (``diagnostics.warnings``) as the command line prints them."""
        return tuple(f"fit {self.law}: {note}" for note in self.diagnostics.warnings)

    def sd(self, name: str) -> float:
        """Bootstrap standard deviation of a natural parameter."""
        j = self.law_spec.natural.index(name)
        return float(np.std(self.bootstrap[:, j], ddof=1))

    def predict(self, data: Mapping[str, np.ndarray], *, samples: bool = False,
                interval: bool = False) -> np.ndarray | Prediction:
        """Predicted loss at ``data`` (law variable -> values); with ``samples=True`` one row per
        bootstrap resample (B, n) instead of the point estimate (n,); with ``interval=True`` a
        :class:`~moue.analysis.predict.Prediction` (``pred``, and ``lo``, ``hi``: the interval at the
        fit's ``level`` a new run falls in, parameter uncertainty and run-to-run noise included)."""
        law = self.law_spec
        if interval:
            if samples:
                raise AnalysisError("predict", "samples and interval", "are exclusive: ask for one")
            if self.noise is None:
                raise AnalysisError("prediction interval", f"fit of {self.law}",
                                    "has no noise estimate (a result written by an older moue): refit it")
            return prediction_interval(law, np.asarray(self.theta), self.bootstrap, self.noise, data,
                                       level=self.level)
        if samples:
            return law.predict_loss(law.from_natural(self.bootstrap), data)
        return law.predict_loss(np.asarray(self.theta)[None, :], data)[0]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: ``params``, ``ci``, ``derived``, ``diagnostics``, ``holdout``..."""
        body = _to_json(self)
        samples = {"params": body.pop("bootstrap"), "derived": body.pop("bootstrap_derived"),
                   "derived_names": list(self.derived)}
        sd = {k: self.sd(k) for k in self.params} if self.n_bootstrap > 1 else {}
        out: dict[str, Any] = {"schema": RESULT_SCHEMA}
        for key, value in body.items():  # the layout of schema 1: formula after law, sd after ci
            out[key] = value
            if key == "law":
                out["formula"] = self.law_spec.formula
            elif key == "ci":
                out["sd"] = _to_json(sd)
        v = self.verdict
        out["identified"], out["reasons"] = v.identified, list(v.reasons)
        out["bootstrap"] = samples
        return out

    def to_json(self, *, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FitResult:
        """Read back :meth:`to_dict` (``KeyError``, ``TypeError`` or ``ValueError`` when it is
        malformed)."""
        if d.get("schema") != RESULT_SCHEMA:
            raise AnalysisError("fit result schema", d.get("schema"),
                                f"is not supported (this version reads {RESULT_SCHEMA})")
        samples = d["bootstrap"]
        return _from_json(cls, {**d, "bootstrap": samples["params"],
                                "bootstrap_derived": samples["derived"]})

    @classmethod
    def from_json(cls, text: str) -> FitResult:
        return cls.from_dict(json.loads(text))


def percentile_interval(samples: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Central ``level`` percentile interval of each column of ``samples`` (B, Q), ignoring NaN.

    Columns with infinite samples (e.g. ``n_cutoff`` when V never stops helping) use the
    inverted-CDF definition, since interpolating between infinities is undefined.
    """
    q = [(1 - level) / 2, 1 - (1 - level) / 2]
    samples = np.atleast_2d(samples)
    lo, hi = np.empty(samples.shape[1]), np.empty(samples.shape[1])
    for j in range(samples.shape[1]):
        col = samples[:, j]
        col = col[~np.isnan(col)]
        if col.size == 0:
            lo[j] = hi[j] = np.nan
            continue
        method = "linear" if np.all(np.isfinite(col)) else "inverted_cdf"
        lo[j], hi[j] = np.quantile(col, q, method=method)
    return lo, hi


# ----------------------------------------------------------------------------- JSON round trip


def _to_json(x):
    """Dataclasses (field by field), mappings, sequences and arrays as JSON values."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: _to_json(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, Mapping):
        return {k: _to_json(v) for k, v in x.items()}
    if isinstance(x, np.ndarray):
        return _to_json(x.tolist())
    if isinstance(x, (list, tuple)):
        return [_to_json(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


def _from_json(cls, d: Mapping[str, Any]):
    """The dataclass ``cls`` from its JSON object, each field decoded by its annotation; keys
    that are not fields are ignored, absent fields with a default take it."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in d and (f.default is not dataclasses.MISSING
                                or f.default_factory is not dataclasses.MISSING):
            continue
        if "columns" in f.metadata:
            kwargs[f.name] = _array(d[f.name], len(d[f.metadata["columns"]]))
        else:
            kwargs[f.name] = _decode(hints[f.name], d[f.name])
    return cls(**kwargs)


def _decode(tp, x):
    if dataclasses.is_dataclass(tp):
        return _from_json(tp, x)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        if x is None and type(None) in args:
            return None
        (inner,) = (a for a in args if a is not type(None))
        return _decode(inner, x)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_decode(args[0], v) for v in x)
        if len(x) != len(args):
            raise ValueError(f"expected {len(args)} values, got {x!r}")
        return tuple(_decode(a, v) for a, v in zip(args, x))
    if origin is Mapping or origin is dict:
        return {str(k): _decode(args[1], v) for k, v in x.items()}
    if tp is float:
        return _number(x)
    if tp is int:
        return int(x)
    if tp is str:
        if not isinstance(x, str):
            raise TypeError(f"expected a string, got {x!r}")
        return x
    raise TypeError(f"no JSON decoding for {tp}")


def _number(x) -> float:
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    special = {None: math.nan, "inf": math.inf, "-inf": -math.inf}
    if x in special:
        return special[x]
    raise ValueError(f"expected a number, got {x!r}")


def _array(rows, n_columns: int) -> np.ndarray:
    # explicit row counts: a law with no derived quantities has (B, 0) samples, which
    # reshape(-1, 0) cannot infer
    return np.array([[_number(v) for v in row] for row in rows],
                    dtype=np.float64).reshape(len(rows), n_columns)
