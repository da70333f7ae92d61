"""``moue report``: load a study, fit its laws, write one self-contained HTML report.

Layered as load -> fit -> figure data (``analysis.figures``) -> drawing (``analysis.render``). Laws
that cannot be fitted to the data (an axis missing or single-valued, too few points) are listed in
the report with the reason instead of failing the whole report. The report is logged as an artifact
(``reports/<file>``) of the sweep's parent run(s).
"""

from __future__ import annotations

import html
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from analysis.errors import AnalysisError
from analysis.fitting import DEFAULT_COLUMNS, DEFAULT_LOSS, FitResult, fit
from analysis.laws import get_law
from analysis.nested import NestedTest, likelihood_ratio_test

__all__ = ["DEFAULT_REPORT_LAWS", "ReportResult", "fit_laws", "write_report"]

DEFAULT_REPORT_LAWS = ("compute", "chinchilla", "vw_additive", "vw_multiplicative",
                       "vw_interaction")


@dataclass(frozen=True, kw_only=True)
class ReportResult:
    """What ``write_report`` produced."""

    path: Path
    fits: dict[str, FitResult] = field(repr=False)
    tests: dict[str, NestedTest] = field(repr=False)
    skipped: dict[str, str]
    figures: tuple[str, ...]
    notes: tuple[str, ...]
    logged_to: tuple[str, ...]
    n_runs: int = 0  # trial runs the fits used
    excluded: dict[str, int] = field(default_factory=dict)  # runs left out, by reason (diverged, failed, ...)

    def runs_line(self) -> str:
        """The runs the report used and those it left out, as its HTML says."""
        parts = ", ".join(f"{v} {k}" for k, v in sorted(self.excluded.items()))
        return f"runs: {self.n_runs} used" + (f"; excluded: {parts}" if parts else "")


MAX_BUDGET_FILTER = ", largest token budget"  # appended to a fit's filter when law_frame kept only those


def law_frame(frame, law_name: str):
    """The rows a law is fitted on, and a note when that is not all of them: a law without a D term
    (``compute`` has C instead; ``vw_interaction`` is Clark-style, at fixed tokens) fitted to a study
    of several token budgets would read the budget's effect as noise, so it gets the runs at the
    largest budget only (within 1%: ``final/tokens`` rounds to whole batches)."""
    law = get_law(law_name)
    # the budget each run was given (train.tokens, exact); final/tokens rounds down to whole
    # batches, so without the param budgets count as equal within 1%
    d_col, tol = ("train.tokens", 0.0) if "train.tokens" in frame.columns else (DEFAULT_COLUMNS["D"], 0.01)
    if "D" in law.variables or "C" in law.variables or d_col not in frame.columns:
        return frame, None
    import polars as pl

    d = frame.get_column(d_col).cast(pl.Float64)
    top = d.max()
    if top is None or d.min() >= (1 - tol) * top:
        return frame, None
    kept = frame.filter(pl.col(d_col).cast(pl.Float64) >= (1 - tol) * top)
    return kept, (f"fit {law_name}: the law has no D term, so it is fitted on the {kept.height} runs at the "
                  f"largest token budget ({d_col} = {top:.4g}) of the {frame.height}")


def fit_laws(frame, *, laws: Sequence[str], loss: str = DEFAULT_LOSS, n_bootstrap: int = 1000,
             seed: int = 0, delta: float = 1e-3, filter_desc: str = "", source: str = "",
             ) -> tuple[dict[str, FitResult], dict[str, str]]:
    """Fit each law with the default moue columns; unusable laws are returned with the reason."""
    fits, skipped = {}, {}
    for name in laws:
        law = get_law(name)
        variables = {v: DEFAULT_COLUMNS[v] for v in law.variables}
        rows, note = law_frame(frame, name)
        if note:
            warnings.warn(note, stacklevel=2)
        flt = filter_desc + (MAX_BUDGET_FILTER if note else "")
        try:
            fits[name] = fit(rows, law=name, loss=loss, variables=variables, delta=delta,
                             n_bootstrap=n_bootstrap, seed=seed, filter_desc=flt,
                             source=source)
        except AnalysisError as e:
            skipped[name] = str(e)
    return fits, skipped


def _nested_tests(frame, fits: dict[str, FitResult], loss: str, delta: float):
    tests = {}
    full = frame
    for name, r in fits.items():
        nested = r.law_spec.nested
        if nested is None:
            continue
        frame, _ = law_frame(full, name)  # the nested law shares the rows of the law it tests
        small = fits.get(nested)
        if small is None or small.delta != r.delta:
            nspec = get_law(nested)
            small = fit(frame, law=nested, loss=loss, delta=delta, n_bootstrap=0, holdout=None,
                        variables={v: r.variables[v] for v in nspec.variables})
        tests[name] = likelihood_ratio_test(frame, law=name, fits=(r, small))
    return tests


def write_report(
    experiment: str,
    *,
    tracking_uri: str,
    output: str | Path,
    laws: Sequence[str] = DEFAULT_REPORT_LAWS,
    parent_run_id: str | None = None,
    loss: str = DEFAULT_LOSS,
    n_bootstrap: int = 1000,
    seed: int = 0,
    delta: float = 1e-3,
    log_artifact: bool = True,
    png_dir: str | Path | None = None,
) -> ReportResult:
    """Write the report of ``experiment`` to ``output`` and return what it contains."""
    from analysis import figures as F
    from analysis import render as R
    from analysis.loading import load_runs

    for name in laws:
        get_law(name)
    runs = load_runs(experiment, tracking_uri=tracking_uri, parent_run_id=parent_run_id)
    frame = runs.frame
    if frame.height == 0:
        why = ", ".join(f"{v} {k}" for k, v in sorted(runs.excluded.items()))
        raise AnalysisError("experiment", experiment, "has no finished trials to report on"
                            + (f" (excluded: {why})" if why else " (no trial runs)"))
    flt = "moue.status = finished" + (f", parent {parent_run_id}" if parent_run_id else "")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fits, skipped = fit_laws(frame, laws=laws, loss=loss, n_bootstrap=n_bootstrap, seed=seed,
                                 delta=delta, filter_desc=flt, source=tracking_uri)
        tests = _nested_tests(frame, fits, loss, delta)
    notes = tuple(dict.fromkeys(str(w.message) for w in caught))
    for note in notes:  # surfaced again to the caller, and listed in the report
        warnings.warn(note, stacklevel=2)

    compute = DEFAULT_COLUMNS["C"] if DEFAULT_COLUMNS["C"] in frame.columns else loss
    labels = F.architecture_labels(frame)
    v_law = next((fits[n] for n in ("vw_multiplicative", "vw_additive", "vw_interaction")
                  if n in fits), None)
    figs = {
        "loss_vs_compute": R.draw_scatter(F.loss_vs_compute_data(
            frame, loss=loss, compute=compute, fits=fits, labels=labels)),
    }
    have_v = all(DEFAULT_COLUMNS[v] in frame.columns for v in ("N", "V"))
    if have_v:
        figs["loss_vs_virtual_width"] = R.draw_scatter(F.loss_vs_virtual_width_data(
            frame, loss=loss, n_col=DEFAULT_COLUMNS["N"], v_col=DEFAULT_COLUMNS["V"],
            d_col=DEFAULT_COLUMNS["D"] if DEFAULT_COLUMNS["D"] in frame.columns else None,
            fit=v_law))
    if fits:
        figs["residuals"] = R.draw_residuals(F.residual_data(
            frame, fits=fits, compute=compute, frames={n: law_frame(frame, n)[0] for n in fits}))
        figs["holdout"] = R.draw_holdout(F.holdout_data(fits))
        figs["bootstrap"] = R.draw_bootstrap(F.bootstrap_data(fits))
    figs["parallel"] = R.draw_parallel(F.parallel_data(frame, loss=loss))

    level = next(iter(fits.values())).level if fits else 0.95
    ho = F.holdout_data(fits)
    prov_rows = [
        ("experiment", experiment), ("tracking store", tracking_uri),
        ("runs fitted", frame.height),
        ("runs excluded", ", ".join(f"{v} {k}" for k, v in sorted(runs.excluded.items()))
         or "none"),
        ("filter", flt), ("loss column", loss), ("Huber delta", delta),
        ("bootstrap", f"{n_bootstrap} resamples by run, seed {seed}"),
        ("generated", datetime.now(UTC).isoformat(timespec="seconds")),
    ]
    for p in runs.parents:
        prov_rows.append((f"parent {p.run_id}", ", ".join(f"{k}={v}" for k, v in p.tags.items())))
    for col in ("corpus_fingerprint", "count.convention"):
        if col in frame.columns:
            prov_rows.append((col, ", ".join(sorted({str(v) for v in frame.get_column(col)}))))
    sections = [
        ("Loss vs compute", "{{figure:loss_vs_compute}}"),
    ]
    if have_v:
        sections.append(("Virtual width", "{{figure:loss_vs_virtual_width}}"))
    sections.append(("Fitted laws", R.params_table(F.param_rows(fits), level)
                     + "<p class=note>Intervals: bootstrap percentiles. Derived quantities: "
                     "compute-optimal exponents (a_opt, b_opt), loss at 10x the largest compute "
                     "(C = 6ND), best virtual width in the observed range (v_best sits on an end "
                     "when the law is monotone in V).</p>"))
    sections.append(("Does virtual width help? (hold-out, likelihood ratio, AIC/BIC)",
                     R.models_table(F.model_rows(fits, tests))))
    if fits:
        sections.append(("Residuals", "{{figure:residuals}}"))
        sections.append(("Hold-out", "{{figure:holdout}}" + "".join(
            f"<p class=note>{html.escape(s)}</p>" for s in ho.summary)))
        sections.append(("Bootstrap", "{{figure:bootstrap}}"))
    sections.append(("The sweep", "{{figure:parallel}}"))
    if skipped or notes:
        sections.append(("Warnings and skipped laws", "<ul>" + "".join(
            f"<li>{html.escape(k)}: {html.escape(v)}</li>" for k, v in skipped.items())
            + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>"))
    sections.append(("Provenance", R._table(["field", "value"], prov_rows)))

    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(R.page(title=f"moue report: {experiment}", sections=sections, figures=figs),
                   encoding="utf-8")

    extra_notes = []
    if png_dir is not None:
        extra_notes.extend(_export_png(figs, Path(png_dir)))
    logged = []
    if log_artifact:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri)
        for p in runs.parents:
            client.log_artifact(p.run_id, str(out), artifact_path="reports")
            logged.append(p.run_id)
    return ReportResult(path=out, fits=fits, tests=tests, skipped=skipped,
                        figures=tuple(figs), notes=notes + tuple(extra_notes),
                        logged_to=tuple(logged), n_runs=frame.height, excluded=dict(runs.excluded))


def _export_png(figs, png_dir: Path) -> list[str]:
    """PNG copies via kaleido (optional extra ``png``); skipped with a reason when unavailable."""
    try:
        import kaleido  # noqa: F401
    except ImportError:
        return ["PNG export skipped: kaleido is not installed (pip install 'moue[png]')"]
    png_dir.mkdir(parents=True, exist_ok=True)
    try:
        for name, fig in figs.items():
            fig.write_image(str(png_dir / f"{name}.png"))
    except Exception as e:  # kaleido raises its own types when no Chrome/Chromium is usable
        return [f"PNG export skipped: {type(e).__name__}: {e}"]
    return []
