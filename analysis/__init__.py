"""moue analysis: MLflow -> polars, scaling-law fits with virtual width, reports, regression gate.

Layers (each testable alone): :func:`load_runs` (TRACKING.md schema -> typed polars frame),
:data:`LAWS` and :func:`fit` (multi-start Huber fits, bootstrap, hold-out -> :class:`FitResult`),
:func:`likelihood_ratio_test` (does virtual width help?), :func:`compare` (the regression gate),
:func:`write_report` (self-contained HTML). Heavy dependencies (polars, scipy, mlflow, plotly) are
imported inside the functions that need them.
"""

from analysis.derived import DerivedContext
from analysis.errors import AnalysisError
from analysis.fitting import (
    DEFAULT_COLUMNS,
    Diagnostics,
    FitOptions,
    FitResult,
    Holdout,
    HoldoutResult,
    Provenance,
    fit,
)
from analysis.gate import Baseline, GateResult, GateRow, compare, read_baseline, write_baseline
from analysis.laws import LAWS, Law, get_law
from analysis.loading import LoadedRuns, ParentRun, default_tracking_uri, load_runs
from analysis.nested import NestedTest, likelihood_ratio_test
from analysis.report import write_report

__all__ = [
    "DEFAULT_COLUMNS",
    "LAWS",
    "AnalysisError",
    "Baseline",
    "DerivedContext",
    "Diagnostics",
    "FitOptions",
    "FitResult",
    "GateResult",
    "GateRow",
    "Holdout",
    "HoldoutResult",
    "Law",
    "LoadedRuns",
    "NestedTest",
    "ParentRun",
    "Provenance",
    "compare",
    "default_tracking_uri",
    "fit",
    "get_law",
    "likelihood_ratio_test",
    "load_runs",
    "read_baseline",
    "write_baseline",
    "write_report",
]
