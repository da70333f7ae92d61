"""The analysis commands of ``moue``: ``report``, ``fit``, ``isoflop``, ``check`` and ``bench-fit``.

``studies/cli.py`` owns the ``moue`` app and calls :func:`register`. Importing this module is cheap
(typer only); numpy, polars, scipy, plotly and mlflow load inside the commands. Unusable input
prints one line naming the field, the value and what is allowed, and exits with code 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from moue.tracking_contract import DEFAULT_WORKSPACE

__all__ = ["register"]

_TRACKING = typer.Option("--tracking-uri", help="MLflow tracking URI (default: sqlite:///"
                         "<workspace>/mlflow.db, absolute).")
_WORKSPACE = typer.Option("--workspace", help="moue workspace directory.")
_PARENT = typer.Option("--parent", help="Only this sweep (parent run id) of the experiment.")


def _fail(e: Exception) -> typer.Exit:
    typer.echo(f"error: {e}", err=True)
    return typer.Exit(code=2)


def _uri(tracking_uri: str | None, workspace: Path) -> str:
    from moue.analysis.loading import default_tracking_uri

    return tracking_uri or default_tracking_uri(workspace)


def _check_laws(laws: list[str]) -> None:
    from moue.analysis.laws import get_law

    for name in laws:
        get_law(name)


def report_cmd(
    experiment: Annotated[str, typer.Argument(help="Study (MLflow experiment) name.")],
    law: Annotated[list[str] | None, typer.Option("--law", help="Law to fit (repeatable); default: the "
                                                  "study's own [analysis] laws (its logged spec), else "
                                                  "compute, chinchilla and the three virtual-width forms.")] = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="HTML file (default: "
                                                "<workspace>/reports/<experiment>.html).")] = None,
    tracking_uri: Annotated[str | None, _TRACKING] = None,
    workspace: Annotated[Path, _WORKSPACE] = Path(DEFAULT_WORKSPACE),
    parent: Annotated[str | None, _PARENT] = None,
    bootstrap: Annotated[int, typer.Option("--bootstrap", help="Bootstrap resamples.")] = 1000,
    seed: Annotated[int, typer.Option("--seed", help="Bootstrap seed.")] = 0,
    log_artifact: Annotated[bool, typer.Option("--log-artifact/--no-log-artifact",
                                               help="Log the report to the parent run(s).")
                            ] = True,
    png: Annotated[Path | None, typer.Option("--png", help="Also write PNGs here (needs the "
                                             "'png' extra: kaleido + Chromium).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (headline, and per law: "
                                          "identified, reasons, params, ci, exponents, holdout); "
                                          "the other lines go to stderr.")] = False,
    lr_rule: Annotated[Path | None, typer.Option("--lr-rule", help="The study's LR rule (its LR stage's "
                                                 "<workspace>/reports/<name>_lr_rule.json, the default when it "
                                                 "exists): adds the LR curves.")] = None,
    points: Annotated[str, typer.Option("--points", help="What each run contributes: 'final' (its final "
                                        "loss and cooldown branches) or 'marks' (also every intermediate "
                                        "mark: training curves, not decayed losses).")] = "final",
    margin: Annotated[float | None, typer.Option("--margin", help="The smallest effect of interest, in percent "
                                                 "of the reference loss, for every comparison's verdict "
                                                 "(default: the study's [analysis] margin_pct, else 1.0).")] = None,
) -> None:
    """Fit the study's scaling laws and write one self-contained HTML report.

    Example: moue report virtual_width --law chinchilla --law vw_multiplicative -o vw.html
    """
    from moue.analysis.decide import DEFAULT_MARGIN_PCT, comparison_specs, margin_value
    from moue.analysis.errors import AnalysisError
    from moue.analysis.loading import study_analysis
    from moue.analysis.report import write_report

    out = output or (workspace / "reports" / f"{experiment}-report.html")
    err = as_json  # with --json, stdout holds the JSON object only
    try:
        if margin is not None:
            margin_value(margin, "--margin")
        table = study_analysis(experiment, tracking_uri=_uri(tracking_uri, workspace), parent_run_id=parent)
        laws = list(law) if law else _study_laws(table, err)
        own = table or {}
        _check_laws(laws)
        if bootstrap < 0:
            raise AnalysisError("--bootstrap", bootstrap, "must be >= 0")
        rule = _report_rule(lr_rule, workspace / "reports" / f"{experiment}_lr_rule.json")
        res = write_report(experiment, tracking_uri=_uri(tracking_uri, workspace), output=out,
                           laws=laws, parent_run_id=parent, n_bootstrap=bootstrap, seed=seed,
                           log_artifact=log_artifact, png_dir=png, lr_rule=rule, points=points,
                           margin_pct=margin if margin is not None else margin_value(
                               own.get("margin_pct", DEFAULT_MARGIN_PCT)),
                           comparisons=comparison_specs(own.get("comparisons", [])))
    except AnalysisError as e:
        raise _fail(e) from None
    typer.echo(f"wrote {res.path} ({len(res.fits)} laws fitted, {len(res.figures)} figures); {res.runs_line()}",
               err=err)
    for name, why in res.skipped.items():
        typer.echo(f"skipped {name}: {why}", err=err)
    for note in res.notes:
        typer.echo(f"note: {note}", err=err)
    if res.logged_to:
        typer.echo(f"logged as an artifact of {', '.join(res.logged_to)}", err=err)
    if as_json:
        from moue.analysis.report import summary_json

        typer.echo(json.dumps(summary_json(res), allow_nan=False, default=_json_float))
        return
    from moue.analysis.report import law_lines

    for line in law_lines(res.fits):
        typer.echo(line)
    for line in res.decision_lines():
        typer.echo(line)


def _study_laws(table: dict | None, err: bool) -> list[str]:
    """The study's own ``[analysis] laws`` (``table``: its logged spec's, None when none is logged;
    ``[]`` is a study that fits no law), else the report's defaults; says which."""
    from moue.analysis.report import DEFAULT_REPORT_LAWS

    laws = list(DEFAULT_REPORT_LAWS if table is None else table.get("laws", ["compute"]))
    typer.echo(f"laws: {', '.join(laws) or 'none'} (" + ("the study's [analysis] laws" if table is not None else
               "the defaults: no spec is logged") + "; --law chooses others)", err=err)
    return laws


def _report_rule(path: Path | None, default: Path):
    """The LR rule a report shows: ``--lr-rule``, else the workspace's rule file of the study, else none."""
    from moue.analysis.lr_rule import load_rule

    path = path if path is not None else (default if default.is_file() else None)
    return None if path is None else load_rule(path)


def _json_float(x):
    return float(x)


def _parse_float(name: str, raw: str | None) -> float | None:
    from moue.analysis.errors import AnalysisError

    if raw is None:
        return None
    try:
        return float(raw)
    except ValueError:
        raise AnalysisError(name, raw, "must be a number (e.g. 1e21)") from None


def _read_table(path: Path):
    import polars as pl

    from moue.analysis.errors import AnalysisError

    if not path.exists():
        raise AnalysisError("FILE", str(path), "does not exist")
    suffixes = "".join(path.suffixes[-2:]).lower()
    if path.suffix.lower() != ".parquet" and not (path.suffix.lower() == ".csv" or suffixes == ".csv.gz"):
        raise AnalysisError("FILE", str(path), "must be .csv, .csv.gz or .parquet")
    try:
        frame = pl.read_parquet(path) if path.suffix.lower() == ".parquet" else pl.read_csv(path)
    except (pl.exceptions.NoDataError, pl.exceptions.ComputeError, OSError) as e:
        raise AnalysisError("FILE", str(path), f"is not a readable table ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else 'empty'})") from None
    if frame.height == 0:
        raise AnalysisError("FILE", str(path), f"has no rows (columns: {', '.join(frame.columns) or 'none'})")
    return _numeric_strings(frame)


def _numeric_strings(frame):
    """Text columns whose every value is a number (``nan``, ``inf`` included: polars's CSV reader
    reads a column with a ``nan`` in it as text) as Float64; other columns as they are."""
    import polars as pl

    casts = []
    for name, dtype in frame.schema.items():
        if dtype == pl.String:
            col = frame.get_column(name)
            as_float = col.str.strip_chars().cast(pl.Float64, strict=False)
            if as_float.null_count() == col.null_count():
                casts.append(as_float.alias(name))
    return frame.with_columns(casts) if casts else frame


def _apply_sets(frame, sets: list[str], law) -> tuple[object, dict[str, str]]:
    """``VAR=COLUMN`` or ``VAR=SQL expression`` (polars SQL over the columns)."""
    import polars as pl

    from moue.analysis.errors import AnalysisError

    variables: dict[str, str] = {}
    for item in sets:
        var, sep, expr = item.partition("=")
        var, expr = var.strip(), expr.strip()
        if not sep or not var or not expr:
            raise AnalysisError("--set", item, "must be VAR=COLUMN or VAR=EXPRESSION")
        if var not in law.variables:
            raise AnalysisError("--set", var, f"is not a variable of law {law.name} "
                                f"({', '.join(law.variables)})")
        if expr in frame.columns:
            variables[var] = expr
            continue
        try:
            frame = frame.with_columns(pl.sql_expr(expr).alias(f"{var} = {expr}"))
        except Exception as e:  # polars raises several error types for a bad SQL expression
            raise AnalysisError("--set", item, "is neither a column nor a valid SQL expression "
                                f"over the columns ({type(e).__name__}); columns: "
                                + ", ".join(frame.columns)) from None
        variables[var] = f"{var} = {expr}"
    missing = [v for v in law.variables if v not in variables]
    if missing:
        raise AnalysisError("--set", ", ".join(missing), f"must be given for law {law.name} "
                            f"(e.g. --set {missing[0]}=COLUMN)")
    return frame, variables


def _law_help() -> str:
    from moue.analysis.laws import LAWS  # a pure-Python registry (no scipy at import)

    return "Law to fit, one of: " + "; ".join(f"{name}: {law.formula}" for name, law in LAWS.items()) + "."


def fit_cmd(
    file: Annotated[Path, typer.Argument(help="Table to fit: .csv, .csv.gz or .parquet.")],
    law: Annotated[str, typer.Option("--law", help=_law_help())],
    loss: Annotated[str, typer.Option("--loss", help="Loss column.")],
    set_: Annotated[list[str], typer.Option("--set", help="VAR=COLUMN or VAR=SQL expression, "
                                            "one per law variable (repeatable).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as one JSON object."
                                          )] = False,
    where: Annotated[str | None, typer.Option("--where", help="Keep rows matching this SQL "
                                              "predicate, e.g. \"loss < 3\".")] = None,
    delta: Annotated[float | None, typer.Option("--delta", help="Huber delta in the law's residual units "
                                                "(default: the law's own; docs/FITTING.md).")] = None,
    bootstrap: Annotated[int, typer.Option("--bootstrap", help="Resamples (0: none).")] = 1000,
    seed: Annotated[int, typer.Option("--seed", help="Bootstrap seed.")] = 0,
    cluster: Annotated[str | None, typer.Option("--cluster", help="Column whose rows resample "
                                                "together (e.g. a run id).")] = None,
    weight: Annotated[str | None, typer.Option("--weight", help="Per-row weight column.")] = None,
    holdout_min: Annotated[str | None, typer.Option("--holdout-min", help="Hold out rows whose "
                                                    "compute is >= this (default: the "
                                                    "largest-compute group).")] = None,
    holdout_column: Annotated[str | None, typer.Option("--holdout-column", help="Column of "
                                                       "the hold-out axis.")] = None,
    no_holdout: Annotated[bool, typer.Option("--no-holdout", help="Fit on every row; no hold-out error (the "
                                             "verdict then says the law is not identified).")] = False,
    samples: Annotated[bool, typer.Option("--samples", help="Include bootstrap samples in "
                                          "--json.")] = False,
    at: Annotated[list[str] | None, typer.Option("--at", help="Predict the loss here, with its 95% prediction "
                                                 "interval: every law variable as VAR=VALUE, comma-separated, "
                                                 "e.g. N=7e10,D=1.4e12 (repeatable).")] = None,
) -> None:
    """Fit a scaling law to any table.

    Example (Epoch's Chinchilla data): moue fit data.csv --law chinchilla --loss loss
    --set N="Model Size" --set D='"Training FLOP" / (6 * "Model Size")' --holdout-min 1e21
    --at N=7e10,D=1.4e12
    """
    from moue.analysis.errors import AnalysisError
    from moue.analysis.fitting import Holdout, fit
    from moue.analysis.laws import get_law

    try:
        spec = get_law(law)
        targets = _parse_at(at or [], spec, bootstrap)
        frame = _filtered(_read_table(file), where)
        frame, variables = _apply_sets(frame, set_, spec)
        holdout = None if no_holdout else Holdout(
            column=holdout_column, min_value=_parse_float("--holdout-min", holdout_min))
        result = fit(frame, law=law, loss=loss, variables=variables, delta=delta,
                     n_bootstrap=bootstrap, seed=seed, cluster=cluster, weights=weight,
                     holdout=holdout, filter_desc=where or "", source=str(file))
    except AnalysisError as e:
        raise _fail(e) from None
    _print_notes(result.notes)
    predictions = _predictions(result, targets)
    if as_json:
        d = result.to_dict()
        if not samples:
            d.pop("bootstrap")
        if targets:
            d["predictions"] = predictions
        typer.echo(json.dumps(d, allow_nan=False))
        return
    _print_fit(result)
    for p in predictions:
        at_text = ", ".join(f"{k} = {v:.4g}" for k, v in p["inputs"].items())
        typer.echo(f"prediction at {at_text}: loss {p['pred']:.4f}, {result.level:.0%} prediction interval "
                   f"[{p['lo']:.4f}, {p['hi']:.4f}]")


def _parse_at(items: list[str], law, n_bootstrap: int) -> list[dict[str, float]]:
    """``--at VAR=VALUE,...`` (every variable of ``law``, positive numbers) as one dict per point."""
    import math

    from moue.analysis.errors import AnalysisError

    example = ",".join(f"{v}=1e9" for v in law.variables)
    points = []
    for item in items:
        values: dict[str, float] = {}
        for part in item.split(","):
            var, sep, raw = (x.strip() for x in part.partition("="))
            if not sep or not var or not raw:
                raise AnalysisError("--at", item, f"must be VAR=VALUE for each variable of law {law.name}, "
                                    f"comma-separated (e.g. --at {example})")
            if var not in law.variables:
                raise AnalysisError("--at", item, f"names {var!r}, which is not a variable of law {law.name} "
                                    f"({', '.join(law.variables)})")
            try:
                x = float(raw)
            except ValueError:
                raise AnalysisError("--at", item, f"gives {var}={raw!r}, which is not a number (e.g. {var}=1e9)") from None
            if not (math.isfinite(x) and x > 0):
                raise AnalysisError("--at", item, f"gives {var}={raw}: values must be positive and finite")
            values[var] = x
        missing = [v for v in law.variables if v not in values]
        if missing:
            raise AnalysisError("--at", item, f"lacks {', '.join(missing)}: law {law.name} needs "
                                f"{', '.join(law.variables)} (e.g. --at {example})")
        if n_bootstrap < 2:
            raise AnalysisError("--at", item, f"needs a bootstrap for its interval (--bootstrap >= 2, not {n_bootstrap})")
        points.append(values)
    return points


def _predictions(result, targets: list[dict[str, float]]) -> list[dict]:
    """The fit's prediction and interval at each ``--at`` point, as ``--json`` lists them."""
    import numpy as np

    out = []
    for inputs in targets:
        p = result.predict({k: np.array([v]) for k, v in inputs.items()}, interval=True)
        out.append({"inputs": inputs, "pred": float(p.pred[0]), "lo": float(p.lo[0]), "hi": float(p.hi[0])})
    return out


def isoflop_cmd(
    file: Annotated[Path, typer.Argument(help="Table: .csv, .csv.gz or .parquet.")],
    loss: Annotated[str, typer.Option("--loss", help="Loss column.")],
    set_: Annotated[list[str], typer.Option("--set", help="N=COLUMN and C=COLUMN (parameters, FLOPs), "
                                            "optionally D=COLUMN (tokens; default C / 6N); SQL "
                                            "expressions allowed.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as one JSON object.")] = False,
    where: Annotated[str | None, typer.Option("--where", help="Keep rows matching this SQL "
                                              "predicate, e.g. \"loss < 3\".")] = None,
    tol_dex: Annotated[float, typer.Option("--tol-dex", help="Runs within this many decades of C "
                                           "form one budget.")] = 0.1,
    min_points: Annotated[int, typer.Option("--min-points", help="Runs a budget needs.")] = 5,
    bootstrap: Annotated[int, typer.Option("--bootstrap", help="Resamples (within budgets).")] = 1000,
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """IsoFLOP profiles (Hoffmann et al.'s Approach 2): a parabola in ln N per compute budget, its
    minima, and N_opt ~ C^a, D_opt ~ C^b with 95% bootstrap intervals and a verdict.

    Example (Epoch's Chinchilla data): moue isoflop tests/data/chinchilla_epoch2024.csv --loss loss
    --set N="Model Size" --set C="Training FLOP" --json
    """
    from types import SimpleNamespace

    from moue.analysis.errors import AnalysisError
    from moue.analysis.isoflop import isoflop

    try:
        frame = _filtered(_read_table(file), where)
        names = ("N", "C", "D") if any(s.strip().startswith("D=") for s in set_) else ("N", "C")
        frame, cols = _apply_sets(frame, set_, SimpleNamespace(name="isoflop", variables=names))
        if loss not in frame.columns:
            raise AnalysisError("--loss", loss, "must be a column: " + ", ".join(frame.columns))
        get = {k: frame[v].cast(float).to_numpy() for k, v in cols.items()}
        result = isoflop(frame[loss].cast(float).to_numpy(), get["N"], get["C"], get.get("D"), tol_dex=tol_dex,
                         min_points=min_points, bootstrap=bootstrap, seed=seed)
    except AnalysisError as e:
        raise _fail(e) from None
    if as_json:
        typer.echo(json.dumps(result.as_dict(), allow_nan=False, default=float))
        return
    _print_isoflop(result)


def lr_rule_cmd(
    experiment: Annotated[str, typer.Argument(help="The LR stage's study (MLflow experiment) name.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Rule JSON to write (a ladder's space.lr_rule).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the rule as one JSON object.")] = False,
    tracking_uri: Annotated[str | None, _TRACKING] = None,
    workspace: Annotated[Path, _WORKSPACE] = Path(DEFAULT_WORKSPACE),
    parent: Annotated[str | None, _PARENT] = None,
    bootstrap: Annotated[int, typer.Option("--bootstrap", help="Resamples (within sizes).")] = 1000,
    html: Annotated[Path | None, typer.Option("--html", help="Also write a page with the LR curves and the rule.")] = None,
) -> None:
    """Fit lr = c * N^-exponent to an LR stage (a ladder with space.lr_scan): the optimum per size
    from a parabola in ln lr, then the power law, with a bootstrap interval and a verdict.

    Example: moue lr-rule ladder_lr -o studies/results/ladder_lr_rule.json
    """
    from moue.analysis.errors import AnalysisError
    from moue.analysis.lr_rule import rule_of_experiment

    try:
        rule = rule_of_experiment(experiment, tracking_uri=_uri(tracking_uri, workspace), parent_run_id=parent,
                                  bootstrap=bootstrap)
    except AnalysisError as e:
        raise _fail(e) from None
    text = json.dumps(rule.as_dict(), allow_nan=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text + "\n")
    if html is not None:
        from moue.analysis import figures as F
        from moue.analysis import render as R

        fig = R.draw_scatter(F.lr_rule_data(rule))
        html.parent.mkdir(parents=True, exist_ok=True)
        html.write_text(R.page(title=f"moue lr-rule: {experiment}", sections=[("LR curves and the rule", "{{figure:lr}}")],
                               figures={"lr": fig}), encoding="utf-8")
    if as_json:
        typer.echo(text)
        return
    lines = rule.lines()
    typer.echo(f"{lines[0]}; wrote {output}")
    for line in lines[1:]:
        typer.echo(line)


def compare_cmd(
    experiment: Annotated[str, typer.Argument(help="Study (MLflow experiment) name.")],
    variant: Annotated[list[str], typer.Option("--variant", help="Column(s) naming a variant (repeatable; "
                                               "values joined with '/'); 'topology' is layerwise, unipool "
                                               "or rotational.")],
    reference: Annotated[str, typer.Option("--reference", help="The variant the others are compared with "
                                           "(a joined value, or a --label name).")],
    pair: Annotated[list[str], typer.Option("--pair", help="Columns a pair shares (repeatable), e.g. "
                                            "train.seed and model.n_layers.")] = [],  # noqa: B006 - typer default
    label: Annotated[list[str], typer.Option("--label", help="NAME=JOINED_VALUE (repeatable).")] = [],  # noqa: B006
    loss: Annotated[str, typer.Option("--loss", help="Loss column.")] = "final/val_loss",
    margin: Annotated[float, typer.Option("--margin", help="The smallest effect of interest, in percent of the "
                                          "reference's loss: 'ruled_out' when the 95% interval lies inside "
                                          "+/- this.")] = 1.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list, one object per variant.")] = False,
    tracking_uri: Annotated[str | None, _TRACKING] = None,
    workspace: Annotated[Path, _WORKSPACE] = Path(DEFAULT_WORKSPACE),
    parent: Annotated[str | None, _PARENT] = None,
) -> None:
    """Compare variants on paired runs (same seed, depth, budget...): mean difference, paired t-test
    and how many pairs each variant wins, per variant against the reference, and its verdict:
    detected, ruled out at the margin, or undecided with the pairs that would decide
    (docs/FITTING.md, "Decisions").

    Example: moue compare ablation --variant model.router --variant model.balance --reference softmax/switch
    --pair train.seed --pair model.n_layers
    """
    from moue.analysis.decide import margin_value
    from moue.analysis.errors import AnalysisError
    from moue.analysis.loading import load_runs
    from moue.analysis.paired import compare_variants, with_topology

    try:
        margin_value(margin, "--margin")
        names = {}
        for item in label:
            name, sep, value = item.partition("=")
            if not sep:
                raise AnalysisError("--label", item, "must be NAME=JOINED_VALUE")
            names[value] = name
        frame = with_topology(load_runs(experiment, tracking_uri=_uri(tracking_uri, workspace),
                                        parent_run_id=parent).frame)
        rows = compare_variants(frame, variant=variant, reference=reference, pair=pair, loss=loss, label=names,
                                margin=margin)
    except AnalysisError as e:
        raise _fail(e) from None
    if as_json:
        from moue.analysis.report import json_safe

        typer.echo(json.dumps([json_safe(r.to_json()) for r in rows], allow_nan=False))
        return
    for r in rows:
        typer.echo(r.line())
        typer.echo("    " + r.verdict_line("verdict"))
        typer.echo("    by " + (pair[0] if pair else "all") + ": " + ", ".join(
            f"{k}: {v:+.2f}%" for k, v in r.by_group.items()))


def _print_isoflop(r) -> None:
    typer.echo(f"IsoFLOP (Approach 2): {sum(b.used for b in r.budgets)} of {len(r.budgets)} budgets used; "
               f"{r.n_bootstrap} bootstrap resamples within budgets, 95% intervals")
    typer.echo(f"  N_opt ~ C^a: a = {r.a:.3f} [{r.a_ci[0]:.3f}, {r.a_ci[1]:.3f}]")
    typer.echo(f"  D_opt ~ C^b: b = {r.b:.3f} [{r.b_ci[0]:.3f}, {r.b_ci[1]:.3f}]")
    for b in r.budgets:
        flags = f"  ({', '.join(b.flags)})" if b.flags else ""
        typer.echo(f"  C = {b.compute:.3g}: {b.n_points} runs, N {b.n_range[0]:.3g}..{b.n_range[1]:.3g}, "
                   f"N_opt {b.n_opt:.3g}, D_opt {b.d_opt:.3g}, loss {b.loss_opt:.4g}{flags}")
    if r.identified:
        typer.echo("verdict: identified")
    else:
        typer.echo("verdict: NOT identified: " + "; ".join(r.reasons))


def _filtered(frame, where: str | None):
    """``frame`` with ``--where`` applied (a polars SQL predicate). NaN counts as missing, as in
    SQL: polars orders NaN above every number, so ``"loss" > 0`` would keep a NaN loss; the
    predicate is evaluated with NaN read as null, and a row it does not hold for is dropped."""
    if not where:
        return frame
    import polars as pl

    from moue.analysis.errors import AnalysisError

    try:
        import polars.selectors as cs

        keep = frame.with_columns(cs.float().fill_nan(None)).select(
            pl.sql_expr(where).fill_null(False).alias("keep"))["keep"]
        return frame.filter(keep)
    except Exception as e:  # polars raises several error types for a bad predicate
        raise AnalysisError("--where", where, f"is not a valid SQL predicate ({type(e).__name__})") from None


def _print_fit(r) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    t = Table(title=f"{r.law}: {r.law_spec.formula}  ({r.provenance.n_points} points, "
              f"Huber delta {r.delta:g})")
    for col in ("quantity", "estimate", f"{r.level:.0%} low", f"{r.level:.0%} high"):
        t.add_column(col, justify="right")
    for k, v in list(r.params.items()) + list(r.derived.items()):
        lo, hi = r.ci.get(k) or r.derived_ci.get(k) or (None, None)
        t.add_row(k, f"{v:.5g}", "" if lo is None else f"{lo:.5g}", "" if hi is None else
                  f"{hi:.5g}")
    console.print(t)
    d = r.diagnostics
    console.print(f"objective {d.objective:.6g}, |grad| {d.grad_norm:.2g}, best start "
                  f"{d.status}; {d.n_best_basin}/{d.n_starts} starts reached the best basin; "
                  f"on a bound: {', '.join(d.on_bound) or 'none'}")
    if r.holdout is not None:
        h = r.holdout
        console.print(f"hold-out ({h.n_test} points with {h.column} >= {h.min_value:.3g}, fit on "
                      f"{h.n_train}): RMSE {h.rmse:.4f}, max |err| {h.max_abs_error:.4f}, "
                      f"MAPE {h.mape:.2f}%, extrapolation x{h.extrapolation_ratio:.2f}"
                      + (f"; {r.level:.0%} prediction intervals cover {round(h.coverage * h.n_test)} of {h.n_test}"
                         if h.test_lo else ""))
    console.print(f"verdict: {r.verdict.line()}", style=None if r.verdict.identified else "dim")


def check_cmd(
    experiment: Annotated[str, typer.Argument(help="Study (MLflow experiment) name.")],
    baseline: Annotated[Path, typer.Option("--baseline", help="Baseline JSON.")],
    write_baseline: Annotated[bool, typer.Option("--write-baseline", help="Fit and write the "
                                                 "baseline instead of checking.")] = False,
    law: Annotated[list[str] | None, typer.Option("--law", help="Laws to gate (default: the "
                                                  "baseline's; when writing: chinchilla and the "
                                                  "virtual-width laws that fit).")] = None,
    level: Annotated[float, typer.Option("--level", help="Confidence level.")] = 0.95,
    tracking_uri: Annotated[str | None, _TRACKING] = None,
    workspace: Annotated[Path, _WORKSPACE] = Path(DEFAULT_WORKSPACE),
    parent: Annotated[str | None, _PARENT] = None,
    bootstrap: Annotated[int, typer.Option("--bootstrap", help="Resamples when writing a "
                                           "baseline (checks reuse the baseline's).")] = 1000,
    seed: Annotated[int, typer.Option("--seed", help="Seed when writing a baseline.")] = 0,
    force_unidentified: Annotated[bool, typer.Option("--force-unidentified", help="Gate exponents the "
                                                     "runs do not identify (refused by default).")] = False,
    force_experiment: Annotated[bool, typer.Option("--force-experiment", help="Gate against a baseline "
                                                   "written for another experiment (refused by default).")
                                ] = False,
) -> None:
    """Gate fitted exponents against a baseline: exit 0 pass, 1 regression, 2 unusable input
    (including an exponent the runs do not identify: see --force-unidentified).

    Example: moue check virtual_width --baseline baselines/virtual_width.json
    """
    from moue.analysis.errors import AnalysisError
    from moue.analysis.gate import compare, read_baseline
    from moue.analysis.gate import write_baseline as write
    from moue.analysis.loading import load_runs

    try:
        if law:
            _check_laws(list(law))
        if not 0 < level < 1:
            raise AnalysisError("--level", level, "must be in (0, 1)")
        base = None if write_baseline else read_baseline(baseline)
        if base is not None and base.experiment and base.experiment != experiment and not force_experiment:
            raise AnalysisError("--baseline", str(baseline), f"is the baseline of experiment {base.experiment!r}, "
                                f"not {experiment!r}; pass --force-experiment to gate against it anyway")
        runs = load_runs(experiment, tracking_uri=_uri(tracking_uri, workspace),
                         parent_run_id=parent)
        flt = "moue.status = finished" + (f", parent {parent}" if parent else "")
        if write_baseline:
            fitted = _baseline_fits(runs.frame, experiment, law, bootstrap, seed, flt)
        else:
            laws = list(law) if law else list(base.fits)
            fits, notes = _refit_for_check(runs.frame, base, laws, flt)
            for name in laws:  # an exponent the data do not identify is not gated (moue.analysis.verdict)
                why = fits[name].verdict.exponent_reasons
                if why and not force_unidentified:
                    raise AnalysisError(f"law {name}", experiment, "is not identified by these runs, so its "
                                        "exponents cannot be gated: " + "; ".join(why))
            results = [compare(base.fits[name], fits[name], level=level) for name in laws]
    except AnalysisError as e:
        raise _fail(e) from None
    if write_baseline:
        _print_notes(fitted.notes)
        for name, r in fitted.fits.items():
            for reason in r.verdict.exponent_reasons:  # one reason a message
                typer.echo(f"warning: {name} is not identified ({reason}); `moue check` will refuse to gate it",
                           err=True)
        path = write(baseline, experiment=experiment, fits=fitted.fits)
        typer.echo(f"wrote baseline {path} ({', '.join(fitted.fits)}; {runs.frame.height} runs)")
        for name, why in fitted.skipped.items():
            typer.echo(f"skipped {name}: {why}")
        return
    _print_notes(notes)
    _print_gate(results)
    if not all(r.passed for r in results):
        raise typer.Exit(code=1)


def _print_notes(notes) -> None:
    """Each note of the fits once, on stderr."""
    for note in notes:
        typer.echo(f"warning: {note}", err=True)


def _baseline_fits(frame, experiment: str, law: list[str] | None, bootstrap: int, seed: int,
                   flt: str):
    """The fits a new baseline holds: the laws asked for (each must fit), else chinchilla and
    the virtual-width laws that can be fitted."""
    from moue.analysis.errors import AnalysisError
    from moue.analysis.report import fit_laws

    if bootstrap < 2:
        raise AnalysisError("--bootstrap", bootstrap, "must be >= 2 for a baseline")
    laws = list(law) if law else ["chinchilla", "vw_additive", "vw_multiplicative"]
    fitted = fit_laws(frame, laws=laws, n_bootstrap=bootstrap, seed=seed, filter_desc=flt)
    if law and fitted.skipped:  # laws asked for by name must fit
        name, why = next(iter(fitted.skipped.items()))
        raise AnalysisError(f"law {name}", experiment, f"cannot be fitted: {why}")
    if not fitted.fits:
        raise AnalysisError("experiment", experiment, "has no law that can be fitted: "
                            + "; ".join(fitted.skipped.values()))
    return fitted


def _refit_for_check(frame, base, laws: list[str], flt: str) -> tuple[dict, list[str]]:
    """Refit each law as its baseline was fitted (same loss, variables, delta, resamples, seed
    and level, on the same kind of rows); the fits and their notes."""
    from moue.analysis.errors import AnalysisError
    from moue.analysis.fitting import fit
    from moue.analysis.report import law_rows

    fits, notes = {}, []
    for name in laws:
        if name not in base.fits:
            raise AnalysisError("--law", name, "is not in the baseline (it has "
                                + ", ".join(base.fits) + ")")
        b = base.fits[name]
        # the rows the baseline was fitted on: the largest budget or the final points only if its
        # filter says so (law_rows), else every row
        rows, note, suffix = law_rows(frame, name)
        if note and suffix not in b.provenance.filter:
            notes.append(f"fit {name}: the baseline was fitted on every row, so the check is too "
                         f"(this moue fits it on fewer: {note.split(': ', 1)[1]})")
            rows, suffix = frame, ""
        fits[name] = fit(rows, law=name, loss=b.loss, variables=b.variables, delta=b.delta,
                         n_bootstrap=b.n_bootstrap, seed=b.seed, level=b.level, holdout=None,
                         filter_desc=flt + suffix)
        notes.extend(fits[name].notes)
    return fits, notes


def _print_gate(results) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(120, Console().width))
    for r in results:
        t = Table(title=f"{r.law}: {r.method} test at {r.level:.0%}"
                  + (f" (joint Wald chi2={r.joint_stat:.3g}, df={r.joint_df}, "
                     f"p={r.joint_p:.3g})" if r.joint_stat is not None else ""))
        for col in ("parameter", "baseline", "new", "difference", "interval", "verdict"):
            t.add_column(col, justify="right")
        for row in r.rows:
            t.add_row(row.parameter, f"{row.baseline:.5g}", f"{row.new:.5g}",
                      f"{row.difference:+.3g}",
                      f"[{row.interval[0]:+.3g}, {row.interval[1]:+.3g}]"
                      + ("" if row.p_value is None else f" p={row.p_value:.3g}"), row.verdict)
        console.print(t)
    console.print(gate_summary(results))


def gate_summary(results) -> str:
    """The gate's last line, counted from its rows: ``pass: ...`` or ``regression in LAW: ...``."""
    rows = [row for r in results for row in r.rows]
    failed = [row for row in rows if not row.passed]
    counted = f"{len(rows) - len(failed)} of {len(rows)} exponent(s) within their interval"
    laws = [r.law for r in results if not r.passed]
    return f"regression in {', '.join(laws)}: {counted}" if failed else f"pass: {counted}"


def bench_fit_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    reference_starts: Annotated[int, typer.Option(
        "--reference-starts", help="Starts the scipy reference loop runs (a seeded random subset "
        "of the 4,500; its time is scaled to the full grid). 0 or >= 4500: all of them.")] = 900,
) -> None:
    """Benchmark the vectorised full-grid Chinchilla fit against a scipy L-BFGS-B loop.

    Example: moue bench fit --json
    """
    from moue.analysis.bench import run_fit_bench
    from moue.analysis.errors import AnalysisError

    try:
        run_fit_bench(json=as_json, reference_starts=reference_starts, stream=sys.stdout)
    except AnalysisError as e:
        raise _fail(e) from None


def bench_design_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    reps: Annotated[int | None, typer.Option("--reps", help="Repetitions of each simulated scenario (both "
                                             "policies on the same draws; default: DEFAULT_REPS of "
                                             "moue.analysis.design_bench).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the simulated outcomes.")] = 0,
) -> None:
    """Benchmark the adaptive design against the fixed grid on simulated trials (a known law plus
    seed noise): compute ratio, truth coverage, false detection rate.

    Example: moue bench design --json
    """
    from moue.analysis.design_bench import run_design_bench
    from moue.analysis.errors import AnalysisError

    try:
        run_design_bench(json=as_json, seed=seed, stream=sys.stdout, **({} if reps is None else {"reps": reps}))
    except AnalysisError as e:
        raise _fail(e) from None


def export_cmd(
    experiment: Annotated[str, typer.Argument(help="Study (MLflow experiment) name.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="File to write: .parquet or .csv.")],
    tracking_uri: Annotated[str | None, _TRACKING] = None,
    workspace: Annotated[Path, _WORKSPACE] = Path(DEFAULT_WORKSPACE),
    parent: Annotated[str | None, _PARENT] = None,
    include: Annotated[list[str] | None, typer.Option("--include", help="Also export trials of this status "
                                                      "(repeatable): early_stopped, diverged, failed.")] = None,
) -> None:
    """One row per finished trial: typed params (model.*, train.*, data.*), counts (derived.*) and
    final metrics (final/*), as analysis loads them.

    Example: moue export quickstart -o quickstart.parquet
    """
    from moue.analysis.errors import AnalysisError
    from moue.analysis.loading import load_runs

    try:
        if output.suffix not in (".parquet", ".csv"):
            raise AnalysisError("--output", str(output), "must end in .parquet or .csv")
        kw = {"include_statuses": ("finished", *include)} if include else {}
        runs = load_runs(experiment, tracking_uri=_uri(tracking_uri, workspace), parent_run_id=parent, **kw)
    except AnalysisError as e:
        raise _fail(e) from None
    frame = runs.frame
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.suffix == ".parquet":
        frame.write_parquet(output)
    else:  # CSV holds scalars only: list columns (e.g. train.cooldown_at) as JSON text
        import polars as pl

        lists = [c for c, t in frame.schema.items() if isinstance(t, pl.List)]
        frame.with_columns([pl.col(c).map_elements(lambda v: json.dumps(list(v)), return_dtype=pl.String)
                            for c in lists]).write_csv(output)
    left = ", ".join(f"{n} {k}" for k, n in sorted(runs.excluded.items()))
    typer.echo(f"wrote {output}: {frame.height} trials, {frame.width} columns" + (f"; left out: {left}" if left else ""))


def register(app: typer.Typer, bench: typer.Typer | None = None) -> None:
    """Add ``report``, ``fit``, ``check`` to the ``moue`` app, and the fit benchmark as ``fit`` of
    its ``bench`` group (or as ``bench-fit`` when no group is given) with the design benchmark as
    ``design`` beside it."""
    app.command("report")(report_cmd)
    app.command("fit")(fit_cmd)
    app.command("check")(check_cmd)
    app.command("isoflop")(isoflop_cmd)
    app.command("export")(export_cmd)
    app.command("lr-rule")(lr_rule_cmd)
    app.command("compare")(compare_cmd)
    if bench is not None:
        bench.command("fit")(bench_fit_cmd)
        bench.command("design")(bench_design_cmd)
    else:
        app.command("bench-fit")(bench_fit_cmd)
