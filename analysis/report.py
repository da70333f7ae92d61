"""``moue report``: load a study, fit its laws, write one self-contained HTML report.

Layered as load -> fit -> figure data (``moue.analysis.figures``) -> drawing (``moue.analysis.render``). Laws
that cannot be fitted to the data (an axis missing or single-valued, too few points) are listed in
the report with the reason instead of failing the whole report. The report is logged as an artifact
(``reports/<file>``) of the sweep's parent run(s).
"""

from __future__ import annotations

import dataclasses
import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from moue.analysis.decide import DEFAULT_MARGIN_PCT, ComparisonSpec, Decision
from moue.analysis.design_report import design_figure, design_html, design_json, load_design
from moue.analysis.errors import AnalysisError
from moue.analysis.fitting import DEFAULT_COLUMNS, DEFAULT_LOSS, fit
from moue.analysis.laws import get_law
from moue.analysis.nested import NestedTest, likelihood_ratio_test
from moue.analysis.predict import next_prediction
from moue.analysis.result import FitResult

__all__ = ["DEFAULT_REPORT_LAWS", "MAX_BUDGET_FILTER", "LawFits", "ReportResult", "fit_laws",
           "law_frame", "law_rows", "write_report", "headline", "summary_json", "approach_rows", "json_safe",
           "NamedComparison", "ReportDecisions", "decide_report", "study_comparisons", "v_term_decisions"]

DEFAULT_REPORT_LAWS = ("compute", "chinchilla", "vw_additive", "vw_multiplicative",
                       "vw_interaction")


@dataclass(frozen=True, kw_only=True)
class ReportDecisions:
    """What a report decides (``moue.analysis.decide``): the families against the layerwise MoE
    (``moue.analysis.paired.Comparison``, paired by size and seed), the study's own comparisons
    (``NamedComparison``) and each law's virtual-width term, at the study's margin."""

    margin: float = DEFAULT_MARGIN_PCT  # the smallest effect of interest, percent ([analysis] margin_pct)
    families: tuple = ()
    comparisons: tuple = ()
    v_terms: dict[str, Decision] = field(default_factory=dict)  # law -> the decision on its V term

    def entries(self) -> list[tuple[str, str, Decision]]:
        """(name, what is compared, decision) of every comparison, in the report's order."""
        return ([(f"{c.variant} vs {c.reference}", "family, paired by size and seed", c.decision)
                 for c in self.families]
                + [(n.name, f"{n.comparison.variant} vs {n.comparison.reference}", n.comparison.decision)
                   for n in self.comparisons]
                + [(f"virtual width in {law}", "law term: predicted loss from the smallest to the largest V", d)
                   for law, d in self.v_terms.items()])

    def lines(self) -> list[str]:
        """Every decision in plain words, one line each."""
        return [f"{name}: {d.words()}" for name, _, d in self.entries()]


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
    headline: str | None = None  # the law the report leads with (``headline``), None when none is identified
    approaches: tuple = ()  # moue.analysis.approaches.ApproachRow, one per approach
    importance: object = None  # moue.analysis.importance.Importance of the search axes (None: too few trials)
    decided: ReportDecisions = field(default_factory=ReportDecisions)
    next_prediction: object = None  # moue.analysis.predict.NextPrediction of the headline law (None: none)
    design: dict | None = None  # an adaptive study's design record (moue.analysis.design_report; None: none)

    def decisions(self) -> dict[str, Decision]:
        """Every comparison's decision by name (``ReportDecisions.entries``)."""
        return {name: d for name, _, d in self.decided.entries()}

    def decision_lines(self) -> list[str]:
        """Every decision in plain words, one line each."""
        return self.decided.lines()

    def runs_line(self) -> str:
        """The runs the report used and those it left out, as its HTML says."""
        parts = ", ".join(f"{v} {k}" for k, v in sorted(self.excluded.items()))
        return f"runs: {self.n_runs} used" + (f"; excluded: {parts}" if parts else "")


@dataclass(frozen=True)
class NamedComparison:
    """One comparison a study asked for (``[[analysis.comparisons]]``): its name and result."""

    name: str
    comparison: object  # moue.analysis.paired.Comparison


def headline(fits: dict[str, FitResult], preferred: Sequence[str] = ()) -> str | None:
    """The law to lead with: the first of ``preferred`` (the study's own) that is identified, else
    the identified law with the smallest hold-out MAPE, else ``None`` (no law is a result)."""
    for name in preferred:
        if name in fits and fits[name].verdict.identified:
            return name
    good = [(r.holdout.mape, n) for n, r in fits.items() if r.verdict.identified and r.holdout is not None]
    return min(good)[1] if good else None


def law_lines(fits: dict[str, FitResult]) -> list[str]:
    """The printed summary of the fits (``moue run``, ``moue report``): identified laws first, as
    results, each with its estimates, 95% intervals and hold-out; the others apart, with their
    reasons, never as a result."""
    out = []

    def show(name, r, prefix=""):
        params = ", ".join(f"{k} = {v:.4g} [{r.ci[k][0]:.3g}, {r.ci[k][1]:.3g}]" if k in r.ci else
                           f"{k} = {v:.4g}" for k, v in r.params.items())
        out.append(f"{prefix}{name}: {params}  (95% bootstrap intervals)")
        if r.holdout is not None:
            h = r.holdout
            out.append(f"{prefix}  hold-out ({h.n_test} largest-compute points, fit on {h.n_train}): RMSE "
                       f"{h.rmse:.4f}, max |err| {h.max_abs_error:.4f}, MAPE {h.mape:.2f}%")

    good = {n: r for n, r in fits.items() if r.verdict.identified}
    for name, r in good.items():
        show(name, r)
    if not fits:
        out.append("no law was fitted (none asked for, or none could be: see below)")
    elif not good:
        out.append("no law is identified by these runs: none is a result (reasons below)")
    for name, r in fits.items():
        if name not in good:
            out.append(f"not identified, not a result: {name}: " + "; ".join(r.verdict.reasons))
            show(name, r, prefix="    ")
    return out


def summary_json(res: ReportResult) -> dict:
    """``moue report --json``: the headline and, per law, its verdict, estimates, 95% intervals,
    exponents and hold-out (``params`` are fitted on all rows; the hold-out's own fit is on the
    training rows only)."""
    laws = {}
    for name, r in res.fits.items():
        v, h = r.verdict, r.holdout
        laws[name] = {
            "identified": v.identified, "reasons": list(v.reasons), "params": dict(r.params),
            "ci": {k: list(b) for k, b in r.ci.items()}, "exponents": list(r.law_spec.exponents),
            "derived": dict(r.derived), "derived_ci": {k: list(b) for k, b in r.derived_ci.items()},
            "holdout": None if h is None else {"rmse": h.rmse, "mape": h.mape, "n": h.n_test,
                                               "n_train": h.n_train, "params_train_only": dict(h.params),
                                               "test_loss": list(h.test_loss), "test_pred": list(h.test_pred),
                                               "test_lo": list(h.test_lo), "test_hi": list(h.test_hi),
                                               "coverage": h.coverage},
        }
        if name in res.decided.v_terms:
            laws[name]["v_term"] = {"name": f"virtual width in {name}", **res.decided.v_terms[name].to_json()}
    approaches = [{"approach": r.approach, "a": r.a, "a_ci": None if r.a_ci is None else list(r.a_ci), "b": r.b,
                   "b_ci": None if r.b_ci is None else list(r.b_ci), "identified": r.identified,
                   "reasons": list(r.reasons)} for r in res.approaches]
    families = [{"family": c.variant, "reference": c.reference, "n_pairs": c.n_pairs,
                 "mean_rel_diff_pct": c.mean_rel_diff, "ci_pct": list(c.rel_ci), "p_value": c.p_value,
                 "n_better": c.n_better, **c.decision.to_json()} for c in res.decided.families]
    comparisons = [{"name": n.name, "variant": n.comparison.variant, "reference": n.comparison.reference,
                    "p_value": n.comparison.p_value, "n_better": n.comparison.n_better,
                    **n.comparison.decision.to_json()} for n in res.decided.comparisons]
    imp = res.importance
    importance = None if imp is None else {"method": imp.method, "n_trials": imp.n_trials,
                                           "target_quantile": imp.target_quantile, "scores": dict(imp.scores)}
    return json_safe({"headline": res.headline, "laws": laws, "approaches": approaches, "families": families,
                    "comparisons": comparisons, "margin_pct": res.decided.margin, "decisions": res.decision_lines(),
                    "importance": importance, "skipped": dict(res.skipped), "runs": res.n_runs,
                    "next_prediction": None if res.next_prediction is None else res.next_prediction.to_dict(),
                    "design": None if res.design is None else design_json(res.design),
                    "report": str(res.path)})


# what a family comparison holds fixed: the size, the physical pool (a grid over experts per layer
# pairs each family with the layerwise MoE of the same pool L * E) and the seed; a study with several
# token budgets per size pairs by budget too (BUDGET_PAIR). A ladder's budgets are not a pair column
# first: its families train for the same tokens per parameter, so their budgets differ by up to the
# active-count tolerance.
FAMILY_PAIR = ("model.d_model", "model.n_layers", "model.pool_size", "train.seed")
BUDGET_PAIR = "train.tokens"
REFERENCE_FAMILY = "layerwise MoE"


def family_comparisons(frame, *, margin: float = DEFAULT_MARGIN_PCT) -> tuple:
    """Each architecture family against the layerwise MoE on runs of the same size and pool
    (``FAMILY_PAIR``; and token budget, ``BUDGET_PAIR``, when that alone leaves runs unpaired),
    paired (``moue.analysis.paired``); empty when the runs have no such pairs."""
    import polars as pl

    from moue.analysis.figures import family_labels
    from moue.analysis.paired import compare_variants

    labels = family_labels(frame)
    if labels is None or REFERENCE_FAMILY not in labels or DEFAULT_LOSS not in frame.columns:
        return ()
    pair = [c for c in FAMILY_PAIR if c in frame.columns]
    framed = frame.with_columns(pl.Series("family", labels))
    out = ()
    for cols in (pair, pair + [BUDGET_PAIR] if BUDGET_PAIR in frame.columns else None):
        if cols is None or out:
            continue
        try:
            out = tuple(c for c in compare_variants(framed, variant=["family"], reference=REFERENCE_FAMILY, pair=cols,
                                                    loss=DEFAULT_LOSS, margin=margin) if c.n_pairs >= 2)
        except AnalysisError:
            return ()
    return out


def study_comparisons(frame, specs: Sequence[ComparisonSpec], *, margin: float = DEFAULT_MARGIN_PCT,
                      loss: str = DEFAULT_LOSS) -> tuple[tuple[NamedComparison, ...], tuple[str, ...]]:
    """The study's own comparisons (``[[analysis.comparisons]]``) on its runs, and a note for each
    that could not be made (a column the runs lack, no pairs). A comparison of several variants
    gives one entry per variant, named ``name (variant)``."""
    from moue.analysis.paired import compare_variants, with_topology

    framed, out, notes = with_topology(frame), [], []
    for spec in specs:
        try:
            rows = compare_variants(framed, variant=spec.variant, reference=spec.reference, pair=spec.pair,
                                    loss=loss, label=spec.label, margin=margin)
        except AnalysisError as e:
            notes.append(f"comparison {spec.name!r} not made: {e}")
            continue
        if not rows:
            notes.append(f"comparison {spec.name!r} not made: no variant has a run paired with the reference")
        for c in rows:
            out.append(NamedComparison(name=spec.name if len(rows) == 1 else f"{spec.name} ({c.variant})",
                                       comparison=c))
    return tuple(out), tuple(notes)


def decide_report(run_frame, frame, fits: dict[str, FitResult], comparisons: Sequence[ComparisonSpec], *,
                  margin: float = DEFAULT_MARGIN_PCT, loss: str = DEFAULT_LOSS) -> tuple[ReportDecisions, tuple[str, ...]]:
    """Everything a report decides: the families and the study's comparisons on its runs
    (``run_frame``), the V terms on the fitted points (``frame``); and the notes of comparisons that
    could not be made."""
    named, notes = study_comparisons(run_frame, comparisons, margin=margin, loss=loss)
    return ReportDecisions(margin=margin, families=family_comparisons(run_frame, margin=margin), comparisons=named,
                           v_terms=v_term_decisions(frame, fits, margin=margin)), notes


def v_term_decisions(frame, fits: dict[str, FitResult], *, margin: float = DEFAULT_MARGIN_PCT
                     ) -> dict[str, Decision]:
    """The decision on the V term of every fitted law with a V variable, on the law's own rows
    (``moue.analysis.decide.v_effect``)."""
    from moue.analysis.decide import v_effect
    from moue.analysis.points import column_values

    out = {}
    for name, r in fits.items():
        if "V" not in r.law_spec.variables:
            continue
        rows, _ = law_frame(frame, name)
        columns = {v: column_values(rows, col) for v, col in r.variables.items()}
        if any(c is None for c in columns.values()):
            continue
        d = v_effect(r, columns, margin=margin)
        if d is not None:
            out[name] = d
    return out


def json_safe(x):
    """JSON-safe: NaN as None, infinities as "inf" / "-inf" (as ``FitResult.to_dict`` writes them)."""
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


MAX_BUDGET_FILTER = ", largest token budget"  # appended to a fit's filter when law_rows kept only those
FINAL_POINTS_FILTER = ", final points"  # appended when law_rows left out cooldown branches and marks


def law_frame(frame, law_name: str):
    """The rows a law is fitted on, and a note when that is not all of them (:func:`law_rows`)."""
    rows, note, _ = law_rows(frame, law_name)
    return rows, note


def law_rows(frame, law_name: str):
    """The rows a law is fitted on, a note when that is not all of them, and the suffix that says
    so in the fit's filter (``""`` for all rows).

    - A law of compute alone (``compute``, ``compute_power``: C but no D) describes runs on one
      allocation line, such as a ladder's fixed tokens per parameter. Cooldown branches and
      intermediate marks (``point`` other than ``final``) are the same runs at fewer tokens: at a
      given C they sit beside larger models' final points with another N/D split, so a law in C
      alone would read the allocation's effect as noise (and its E drifts to 0). Such a law gets
      the final points only; the laws in (N, D) use every point.
    - A law without D and without C (``vw_interaction`` is Clark-style, at fixed tokens) fitted to
      a study of several token budgets would read the budget's effect as noise, so it gets the runs
      at the largest budget only (within 1%: ``final/tokens`` rounds to whole batches)."""
    import polars as pl

    law = get_law(law_name)
    if "D" in law.variables:
        return frame, None, ""
    if "C" in law.variables:
        if "point" not in frame.columns:
            return frame, None, ""
        kept = frame.filter(pl.col("point") == "final")
        if kept.height == frame.height:
            return frame, None, ""
        return kept, (f"fit {law_name}: a law of compute alone describes one allocation line, so it is "
                      f"fitted on the {kept.height} final points, not on the {frame.height - kept.height} "
                      "cooldown branches or marks (the same runs at fewer tokens)"), FINAL_POINTS_FILTER
    # the budget each run was given (train.tokens, exact); final/tokens rounds down to whole
    # batches, so without the param budgets count as equal within 1%
    d_col, tol = ("train.tokens", 0.0) if "train.tokens" in frame.columns else (DEFAULT_COLUMNS["D"], 0.01)
    if d_col not in frame.columns:
        return frame, None, ""
    d = frame.get_column(d_col).cast(pl.Float64)
    top = d.max()
    if top is None or d.min() >= (1 - tol) * top:
        return frame, None, ""
    kept = frame.filter(pl.col(d_col).cast(pl.Float64) >= (1 - tol) * top)
    return kept, (f"fit {law_name}: the law has no D term, so it is fitted on the {kept.height} runs at the "
                  f"largest token budget ({d_col} = {top:.4g}) of the {frame.height}"), MAX_BUDGET_FILTER


@dataclass(frozen=True, kw_only=True)
class LawFits:
    """The fits of several laws, the laws that could not be fitted (with the reason) and the
    notes of it all: which rows a law was fitted on, then each fit's own notes, in order."""

    fits: dict[str, FitResult]
    skipped: dict[str, str]
    notes: tuple[str, ...]


def fit_laws(frame, *, laws: Sequence[str], loss: str = DEFAULT_LOSS, n_bootstrap: int = 1000,
             seed: int = 0, delta: float | None = None, filter_desc: str = "", source: str = "",
             ) -> LawFits:
    """Fit each law with the default moue columns; unusable laws are returned with the reason."""
    fits, skipped, notes = {}, {}, []
    for name in laws:
        law = get_law(name)
        variables = {v: DEFAULT_COLUMNS[v] for v in law.variables}
        rows, note, suffix = law_rows(frame, name)
        if note:
            notes.append(note)
        flt = filter_desc + suffix
        try:
            fits[name] = fit(rows, law=name, loss=loss, variables=variables, delta=delta,
                             n_bootstrap=n_bootstrap, seed=seed, filter_desc=flt,
                             source=source)
        except AnalysisError as e:
            skipped[name] = str(e)
            continue
        notes.extend(fits[name].notes)
    return LawFits(fits=fits, skipped=skipped, notes=tuple(notes))


def _nested_tests(frame, fits: dict[str, FitResult], loss: str, delta: float,
                  ) -> tuple[dict[str, NestedTest], tuple[str, ...]]:
    """Each law with a nested law against it, on the law's rows, and the notes of the nested
    fits made here (a nested law fitted already with the same delta is reused)."""
    tests, notes = {}, []
    full = frame
    for name, r in fits.items():
        nspec = r.law_spec.nested_law
        if nspec is None:
            continue
        frame, _ = law_frame(full, name)  # the nested law shares the rows of the law it tests
        small = fits.get(nspec.name)
        if small is None or small.delta != r.delta:
            small = fit(frame, law=nspec.name, loss=loss, delta=r.delta, n_bootstrap=0,
                        holdout=None, variables=nspec.select(r.variables))
            notes.extend(small.notes)
        tests[name] = likelihood_ratio_test(frame, law=name, fits=(r, small))
    return tests, tuple(notes)


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
    delta: float | None = None,
    log_artifact: bool = True,
    png_dir: str | Path | None = None,
    lr_rule=None,
    points: str = "final",
    margin_pct: float = DEFAULT_MARGIN_PCT,
    comparisons: Sequence[ComparisonSpec] = (),
) -> ReportResult:
    """Write the report of ``experiment`` to ``output`` and return what it contains. The notes
    of the fits (and which rows a law was fitted on) are listed in the report and returned in
    ``ReportResult.notes``, each once. ``lr_rule`` (an ``moue.analysis.lr_rule.LrRule``: the study's LR
    stage) adds its LR curves and rule. ``points``: ``"final"`` fits each run's final loss and its
    cooldown branches (decayed losses); ``"marks"`` adds every intermediate mark of the training
    curves (``moue.analysis.loading.with_mark_points``; resampled by run). ``margin_pct`` and
    ``comparisons`` (``[[analysis.comparisons]]``): what the report decides (:func:`decide_report`)."""
    from moue.analysis import render as R
    from moue.analysis.loading import load_runs

    for name in laws:
        get_law(name)
    if points not in ("final", "marks"):
        raise AnalysisError("--points", points, "must be 'final' (final losses and cooldown branches) or 'marks'")
    runs = load_runs(experiment, tracking_uri=tracking_uri, parent_run_id=parent_run_id, curves=True)
    frame = _report_points(runs, experiment, points)
    flt = "moue.status = finished" + (f", parent {parent_run_id}" if parent_run_id else "")
    fitted = fit_laws(frame, laws=laws, loss=loss, n_bootstrap=n_bootstrap, seed=seed,
                      delta=delta, filter_desc=flt, source=tracking_uri)
    tests, test_notes = _nested_tests(frame, fitted.fits, loss, delta)
    notes = tuple(dict.fromkeys(fitted.notes + test_notes))

    figs = _figures(frame, fitted.fits, loss)
    prov = _provenance_rows(runs, experiment=experiment, tracking_uri=tracking_uri, flt=flt,
                            loss=loss, delta=delta, n_bootstrap=n_bootstrap, seed=seed)
    lead = headline(fitted.fits, laws)
    nxt = None if lead is None else next_prediction(fitted.fits[lead], law_frame(frame, lead)[0], columns=DEFAULT_COLUMNS)
    approaches, iso = approach_rows(runs, fitted.fits, seed=seed)
    if iso is not None:
        from moue.analysis import figures as F

        figs["isoflop"] = R.draw_scatter(F.isoflop_data(iso))
    sections = _sections(fitted, tests, notes, prov, have_v="loss_vs_virtual_width" in figs)
    importance, imp_html = _importance_section(runs.frame, loss, figs)
    sections.append(("Which settings matter (parameter importance)", imp_html))
    decided, cmp_notes = decide_report(runs.frame, frame, fitted.fits, comparisons, margin=margin_pct, loss=loss)
    notes = tuple(dict.fromkeys(notes + cmp_notes))
    sections.insert(0, ("Summary", _summary_html(fitted, tests, lead, n_runs=runs.frame.height,
                                                 n_points=frame.height, decisions=decided, next_pred=nxt)))
    sections.insert(3, ("Compute-optimal exponents, three approaches", _approaches_html(approaches)
                        + ("{{figure:isoflop}}" if iso is not None else "")))
    if decided.entries() or cmp_notes:
        sections.insert(1, ("Decisions", _decisions_table(decided, notes=cmp_notes)))
    design = _design_section(runs.parents, tracking_uri, sections, figs)
    if lr_rule is not None:
        from moue.analysis import figures as F

        figs["lr_stage"] = R.draw_scatter(F.lr_rule_data(lr_rule))
        sections.insert(1, ("Learning rate per size (the LR stage)", _lr_rule_html(lr_rule)))
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(R.page(title=f"moue report: {experiment}", sections=sections, figures=figs),
                   encoding="utf-8")

    extra_notes = [] if png_dir is None else _export_png(figs, Path(png_dir))
    res = ReportResult(path=out, fits=fitted.fits, tests=tests, skipped=fitted.skipped,
                       figures=tuple(figs), notes=notes + tuple(extra_notes),
                       logged_to=(), n_runs=runs.frame.height, excluded=dict(runs.excluded), headline=lead,
                       approaches=tuple(approaches), importance=importance, next_prediction=nxt, decided=decided,
                       design=design)
    if log_artifact:
        res = dataclasses.replace(res, logged_to=_log_report(out, runs.parents, tracking_uri, res))
    return res


def _design_section(parents, tracking_uri: str, sections: list, figs: dict) -> dict | None:
    """An adaptive study's design record, its section (second) and figure; ``None``: no design."""
    from moue.analysis import render as R

    design = load_design(parents, tracking_uri)
    if design is not None:
        figs["design"] = R.draw_scatter(design_figure(design))
        sections.insert(1, ("Adaptive design: what it trained and why it stopped", design_html(design)))
    return design


def _report_points(runs, experiment: str, points: str):
    """The points a report fits: each run's final loss and its cooldown branches (``train.cooldown_at``:
    (N, D) points of their own, resampled with their run), and with ``points="marks"`` every mark of
    the training curves; refused when there is none."""
    from moue.analysis.loading import with_cooldown_points, with_mark_points

    frame = with_cooldown_points(runs.frame)
    if points == "marks":
        frame = with_mark_points(frame, runs.curves)
    if frame.height == 0:
        why = ", ".join(f"{v} {k}" for k, v in sorted(runs.excluded.items()))
        raise AnalysisError("experiment", experiment, "has no finished trials to report on"
                            + (f" (excluded: {why})" if why else " (no trial runs)"))
    return frame


def approach_rows(runs, fits: dict[str, FitResult], *, seed: int = 0) -> tuple[list, object]:
    """Approaches 1-3 (``moue.analysis.approaches``) on a study's runs: the envelope of the ``val/loss``
    curves against ``derived.flops_per_token * tokens``, IsoFLOP profiles of the final losses and
    cooldown branches (``final/flops`` budgets; ``space.isoflop_budgets`` designs them), and the
    laws' ``a_opt``; an approach the runs cannot support is a row with its reason. Also returns
    the IsoFLOP result (``None`` when it could not be computed)."""
    import numpy as np

    from moue.analysis.approaches import ApproachRow, envelope, three_approaches
    from moue.analysis.isoflop import isoflop
    from moue.analysis.loading import with_cooldown_points

    frame, env, iso, missing = runs.frame, None, None, []
    n_col, f_col = DEFAULT_COLUMNS["N"], "derived.flops_per_token"
    try:
        if runs.curves is None or n_col not in frame.columns or f_col not in frame.columns:
            raise AnalysisError("curves", None, "are needed (val/loss at every mark)")
        val = runs.curves.filter(runs.curves["key"] == "val/loss")
        by_run = {r: (n, f) for r, n, f in zip(frame["run_id"], frame[n_col], frame[f_col])}
        curves = {}
        for (rid,), g in val.group_by(["run_id"]):
            if rid in by_run:
                curves[rid] = (*by_run[rid], g["step"].to_numpy(), g["value"].to_numpy())
        env = envelope(curves, bootstrap=200, seed=seed)
    except AnalysisError as e:
        missing.append(ApproachRow("1: envelope of training curves", None, None, None, None, False, (str(e),)))
    try:  # on final points and cooldown branches (decayed losses; an IsoFLOP design's budgets)
        points = with_cooldown_points(frame)
        iso = isoflop(points[DEFAULT_LOSS].to_numpy(), np.asarray(points[n_col], float),
                      np.asarray(points[DEFAULT_COLUMNS["C"]], float), bootstrap=200, seed=seed)
    except (AnalysisError, KeyError) as e:
        missing.append(ApproachRow("2: IsoFLOP profiles", None, None, None, None, False, (str(e),)))
    return three_approaches(env=env, iso=iso, fits=fits) + missing, iso


def _importance_section(frame, loss: str, figs: dict) -> tuple[object, str]:
    """PED-ANOVA importances of the study's search axes on the finished trials' final losses
    (``moue.analysis.importance``; ``None`` with too few trials or no axis) and the section's HTML;
    adds the figure to ``figs``."""
    from moue.analysis import render as R
    from moue.analysis.importance import MIN_TRIALS, parameter_importance

    imp = parameter_importance(frame, loss=loss) if loss in frame.columns else None
    if imp is None:
        return None, (f"<p class=note>Not computed: fewer than {MIN_TRIALS} finished trials or no setting "
                      "that varies on its own.</p>")
    figs["importance"] = R.draw_importance(imp)
    return imp, (f"<p>How much each search axis explains which trials did best ({html.escape(imp.method)}, "
                 f"top {imp.target_quantile:.0%} of {imp.n_trials} finished trials against all, on "
                 f"{html.escape(loss)}). Settings derived from an axis (a ladder's heads, tokens and learning "
                 "rate) count with it. Importance has no direction and is rough with few trials.</p>"
                 "{{figure:importance}}")


def _lr_rule_html(rule) -> str:
    """The LR stage: its curves, the rule the main trials ran at, each size's optimum, the verdict."""
    from moue.analysis import render as R

    lo, hi = rule.exponent_ci
    verdict = ("identified" if rule.identified else
               "<b>not identified</b>: " + html.escape("; ".join(rule.reasons)))
    head = (f"<p>The main trials ran at <b>lr = {rule.c:.4g} N<sup>-{rule.exponent:.3f}</sup></b> (exponent 95% "
            f"bootstrap interval [{lo:.3f}, {hi:.3f}]), fitted to the optimum of a parabola in ln lr at each size "
            f"of the LR stage; the rule is {verdict}.</p>")
    rows = [(f"{sz['n']:.4g}", f"{sz['lr_opt']:.4g}", f"{sz['loss_opt']:.4g}", ", ".join(sz["flags"]) or "-",
             "yes" if sz["used"] else "no") for sz in rule.sizes]
    return head + R.table(["N (active)", "optimal lr", "loss at the optimum", "flags", "used"], rows) + "{{figure:lr_stage}}"


def _approaches_html(rows) -> str:
    from moue.analysis import render as R

    def ci(b):
        return "" if b is None else f"[{b[0]:.3g}, {b[1]:.3g}]"

    table = R.table(["approach", "a (N_opt ~ C^a)", "95% interval", "b (D_opt ~ C^b)", "95% interval", "verdict"],
                    [(r.approach, r.a, ci(r.a_ci), r.b, ci(r.b_ci),
                      "identified" if r.identified else "not identified: " + "; ".join(r.reasons)) for r in rows])
    return table + ("<p class=note>Approach 1 uses intermediate marks, which are not decayed losses (the "
                    "learning rate has not annealed there); cooldown branches remove that bias. Approach 2 "
                    "groups runs within 0.1 decades of compute into budgets.</p>")


def _summary_html(fitted: LawFits, tests: dict[str, NestedTest], lead: str | None, *, n_runs: int,
                  n_points: int, decisions: ReportDecisions | None = None, next_pred=None) -> str:
    """The plain-language paragraph at the top, and every law's verdict."""
    fits = fitted.fits
    runs_text = f"{n_runs} runs" + (f" ({n_points} points with their cooldown branches)" if n_points > n_runs else "")
    if lead is None:
        text = (f"{runs_text}. <b>No law is identified</b> by these runs, so none of the fitted values "
                "below is a result (each law's reasons are listed).")
    else:
        r = fits[lead]
        exps = ", ".join(f"{k} = {r.params[k]:.3g} [{r.ci[k][0]:.3g}, {r.ci[k][1]:.3g}]"
                         for k in r.law_spec.exponents if k in r.ci)
        h = r.holdout
        text = (f"{runs_text}. Headline law: <b>{html.escape(lead)}</b> ({html.escape(r.law_spec.formula)}): "
                f"{html.escape(exps)} (95% bootstrap intervals); hold-out MAPE {h.mape:.2f}% on {h.n_test} "
                "largest-compute runs.")
        if next_pred is not None:  # moue.analysis.predict.next_prediction
            text += " " + html.escape(next_pred.sentence(lead))
    v_tests = [t for t in tests.values() if t.law in fits and fits[t.law].verdict.identified]
    for t in v_tests:
        text += (f" Virtual width ({html.escape(t.law)} vs {html.escape(t.nested)}): likelihood-ratio "
                 f"{t.lr_stat:.2f} (df {t.df}), p = {t.p_value:.3g}.")
    if decisions is not None:
        text += _decisions_html(decisions)
    rows = "".join(
        f"<li{'' if r.verdict.identified else ' class=note'}><b>{html.escape(n)}</b>: "
        f"{html.escape(r.verdict.line())}</li>" for n, r in fits.items())
    return f"<p class=summary>{text}</p><ul>{rows}</ul>"


def _decisions_html(d: ReportDecisions) -> str:
    """The verdicts in plain words (final loss, 95% intervals, at the study's margin)."""
    lines = [f"{name} ({what}): {dec.words()}" for name, what, dec in d.entries()]
    if not lines:
        return ""
    items = "".join(f"<li>{html.escape(line)}.</li>" for line in lines)
    return (f"</p><p class=summary><b>Decisions</b> (95% intervals; margin {d.margin:g}%: detected when the "
            "interval excludes 0, ruled out when it lies inside the margin, else undecided):</p>"
            f"<ul class=decisions>{items}</ul><p class=summary>")


def _decisions_table(d: ReportDecisions, notes: Sequence[str] = ()) -> str:
    """Every comparison's decision as a table (percent of the reference loss, 95% intervals), and
    the comparisons that could not be made (``notes``)."""
    from moue.analysis import render as R

    rows = []
    for name, what, dec in d.entries():
        needed = "" if dec.needed is None else f"{dec.needed:,} {dec.unit}"
        rows.append((name, what, f"{dec.estimate:+.2f}%", f"[{dec.ci[0]:+.2f}, {dec.ci[1]:+.2f}]",
                     f"{dec.n} {dec.unit}", dec.verdict + (f" ({dec.why.split(' (')[0]})" if dec.why else ""),
                     f"{dec.mde:.2g}%" if math.isfinite(dec.mde) else "unknown", needed))
    return (R.table(["comparison", "what", "estimate", "95% interval", "n", "verdict", "detectable (80% power)",
                     f"would decide at {d.margin:g}%"], rows)
            + f"<p class=note>Verdicts at a margin of {d.margin:g}% ([analysis] margin_pct): detected when the 95% "
            "interval excludes 0, ruled out when it lies inside the margin (equivalence), else undecided, with "
            "the pairs or runs the measured noise says would decide (docs/FITTING.md, \"Decisions\").</p>"
            + "".join(f"<p class=note>{html.escape(n)}</p>" for n in notes))


def _figures(frame, fits: dict[str, FitResult], loss: str) -> dict[str, object]:
    """The report's plotly figures, by name (virtual width only when the frame has N and V)."""
    from moue.analysis import figures as F
    from moue.analysis import render as R

    compute = DEFAULT_COLUMNS["C"] if DEFAULT_COLUMNS["C"] in frame.columns else loss
    labels = F.family_labels(frame) or F.architecture_labels(frame)
    v_law = next((fits[n] for n in ("vw_multiplicative", "vw_additive", "vw_interaction")
                  if n in fits), None)
    figs = {
        "loss_vs_compute": R.draw_scatter(F.loss_vs_compute_data(
            frame, loss=loss, compute=compute, fits=fits, labels=labels)),
    }
    if all(DEFAULT_COLUMNS[v] in frame.columns for v in ("N", "V")):
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
    return figs


def _provenance_rows(runs, *, experiment: str, tracking_uri: str, flt: str, loss: str,
                     delta: float, n_bootstrap: int, seed: int) -> list[tuple[str, object]]:
    frame = runs.frame
    rows = [
        ("experiment", experiment), ("tracking store", tracking_uri),
        ("runs fitted", frame.height),
        ("runs excluded", ", ".join(f"{v} {k}" for k, v in sorted(runs.excluded.items()))
         or "none"),
        ("filter", flt), ("loss column", loss), ("Huber delta", "each law's own (see the fitted laws)" if delta is None else delta),
        ("bootstrap", f"{n_bootstrap} resamples by run, seed {seed}"),
        ("generated", datetime.now(UTC).isoformat(timespec="seconds")),
    ]
    for p in runs.parents:
        rows.append((f"parent {p.run_id}", ", ".join(f"{k}={v}" for k, v in p.tags.items())))
    for col in ("corpus_fingerprint", "count.convention"):
        if col in frame.columns:
            rows.append((col, ", ".join(sorted({str(v) for v in frame.get_column(col)}))))
    return rows


def _sections(fitted: LawFits, tests: dict[str, NestedTest], notes: tuple[str, ...],
              prov_rows, *, have_v: bool) -> list[tuple[str, str]]:
    """The page's sections (heading, inner HTML with figure placeholders), in order."""
    from moue.analysis import figures as F
    from moue.analysis import render as R

    fits, skipped = fitted.fits, fitted.skipped
    level = next(iter(fits.values())).level if fits else 0.95
    sections = [("Loss vs compute", "{{figure:loss_vs_compute}}")]
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
            f"<p class=note>{html.escape(s)}</p>" for s in F.holdout_data(fits).summary)))
        sections.append(("Bootstrap", "{{figure:bootstrap}}"))
    sections.append(("The sweep", "{{figure:parallel}}"))
    if skipped or notes:
        sections.append(("Warnings and skipped laws", "<ul>" + "".join(
            f"<li>{html.escape(k)}: {html.escape(v)}</li>" for k, v in skipped.items())
            + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>"))
    sections.append(("Provenance", R.table(["field", "value"], prov_rows)))
    return sections


def _log_report(out: Path, parents, tracking_uri: str, res: ReportResult) -> tuple[str, ...]:
    """Log the report as an artifact (``reports/<file>``) of every parent run, and its decisions:
    the summary JSON (``reports/<stem>.json``) and one tag per decision in plain words
    (``DECISION_TAG_PREFIX`` + the comparison's name); the parents' ids."""
    import json
    import re
    import tempfile

    from mlflow import MlflowClient

    from moue.tracking_contract import DECISION_TAG_PREFIX

    client = MlflowClient(tracking_uri=tracking_uri)
    summary = json.dumps(summary_json(res), allow_nan=False, default=float, indent=1)
    tags = {DECISION_TAG_PREFIX + re.sub(r"[^A-Za-z0-9_.\- /]+", "_", name)[:200]: f"{name}: {d.words()}"[:5000]
            for name, d in res.decisions().items()}  # MLflow's tag keys take letters, digits and _-. /
    with tempfile.TemporaryDirectory() as tmp:
        js = Path(tmp) / f"{out.stem}.json"
        js.write_text(summary, encoding="utf-8")
        for p in parents:
            client.log_artifact(p.run_id, str(out), artifact_path="reports")
            client.log_artifact(p.run_id, str(js), artifact_path="reports")
            for key, value in tags.items():
                client.set_tag(p.run_id, key, value)
    return tuple(p.run_id for p in parents)


def _export_png(figs, png_dir: Path) -> list[str]:
    """PNG copies via kaleido (optional extra ``png``); skipped with a reason when unavailable."""
    import importlib

    try:
        importlib.import_module("kaleido")
    except ImportError:
        return ["PNG export skipped: kaleido is not installed (pip install 'moue[png]')"]
    png_dir.mkdir(parents=True, exist_ok=True)
    try:
        for name, fig in figs.items():
            fig.write_image(str(png_dir / f"{name}.png"))
    except Exception as e:  # kaleido raises its own types when no Chrome/Chromium is usable
        return [f"PNG export skipped: {type(e).__name__}: {e}"]
    return []
