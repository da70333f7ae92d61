"""moue analysis: MLflow -> polars, scaling-law fits with virtual width, reports, regression gate.

Layers (each testable alone): :func:`load_runs` (docs/TRACKING.md schema -> typed polars frame),
:data:`LAWS` (each law one unit: variables, parametrisation, derived quantities, exponents, nested
law) and :func:`fit` (multi-start Huber fits, bootstrap, hold-out -> :class:`FitResult`; its
stages :func:`prepare`, :func:`fit_point`, :func:`fit_bootstrap`, :func:`fit_noise`,
:func:`fit_holdout`, :func:`assemble` are public too; :class:`Prediction` intervals from
``FitResult.predict(data, interval=True)``),
:func:`likelihood_ratio_test` (does virtual width help?), :func:`compare` (the regression gate),
:func:`write_report` (self-contained HTML). Heavy dependencies (polars, scipy, mlflow, plotly) are
imported inside the functions that need them.
"""

from moue.analysis.derived import DerivedContext
from moue.analysis.errors import AnalysisError
from moue.analysis.fitting import (
    DEFAULT_COLUMNS,
    BootstrapSamples,
    FitOptions,
    Holdout,
    HoldoutFit,
    PointFit,
    Problem,
    assemble,
    fit,
    fit_bootstrap,
    fit_holdout,
    fit_noise,
    fit_point,
    prepare,
)
from moue.analysis.gate import Baseline, GateResult, GateRow, compare, read_baseline, write_baseline
from moue.analysis.laws import LAWS, Law, get_law
from moue.analysis.loading import LoadedRuns, ParentRun, default_tracking_uri, load_runs
from moue.analysis.nested import NestedTest, likelihood_ratio_test
from moue.analysis.points import Points
from moue.analysis.predict import Noise, Prediction
from moue.analysis.report import write_report
from moue.analysis.result import Diagnostics, FitResult, HoldoutResult, Provenance

__all__ = [
    "DEFAULT_COLUMNS",
    "LAWS",
    "AnalysisError",
    "Baseline",
    "BootstrapSamples",
    "DerivedContext",
    "Diagnostics",
    "FitOptions",
    "FitResult",
    "GateResult",
    "GateRow",
    "Holdout",
    "HoldoutFit",
    "HoldoutResult",
    "Law",
    "LoadedRuns",
    "NestedTest",
    "Noise",
    "ParentRun",
    "PointFit",
    "Points",
    "Prediction",
    "Problem",
    "Provenance",
    "assemble",
    "compare",
    "default_tracking_uri",
    "fit",
    "fit_bootstrap",
    "fit_holdout",
    "fit_noise",
    "fit_point",
    "get_law",
    "likelihood_ratio_test",
    "load_runs",
    "prepare",
    "read_baseline",
    "write_baseline",
    "write_report",
]
