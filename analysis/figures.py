"""The data behind every report figure, computed without plotly (testable without a browser).

Each ``*_data`` function returns a frozen dataclass of plain arrays and labels; ``moue.analysis.render``
draws them. Bands are central ``level`` percentile intervals of the bootstrap predictions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from moue.analysis.nested import NestedTest
from moue.analysis.result import FitResult, percentile_interval

__all__ = [
    "Band",
    "BootstrapData",
    "HoldoutData",
    "HoldoutSeries",
    "ModelRow",
    "ParallelData",
    "ParamRow",
    "ResidualData",
    "ScatterData",
    "Series",
    "architecture_labels",
    "family_labels",
    "bootstrap_data",
    "holdout_data",
    "loss_vs_compute_data",
    "isoflop_data",
    "lr_rule_data",
    "loss_vs_virtual_width_data",
    "model_rows",
    "parallel_data",
    "param_rows",
    "residual_data",
]

ARCH_COLUMNS = ("model.pool_size", "model.window", "model.stride", "model.top_k", "model.router")
_SHORT = {"model.pool_size": "P", "model.window": "w", "model.stride": "s", "model.top_k": "k",
          "model.router": "router"}


@dataclass(frozen=True, kw_only=True)
class Series:
    name: str
    x: tuple[float, ...]
    y: tuple[float, ...]
    text: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Band:
    """A fitted curve with its bootstrap band."""

    name: str
    x: tuple[float, ...]
    y: tuple[float, ...]
    lo: tuple[float, ...]
    hi: tuple[float, ...]


@dataclass(frozen=True, kw_only=True)
class ScatterData:
    title: str
    x_label: str
    y_label: str
    points: tuple[Series, ...]
    curves: tuple[Band, ...] = ()
    log_x: bool = True


@dataclass(frozen=True, kw_only=True)
class ResidualData:
    title: str
    x_label: str
    series: tuple[Series, ...]  # one per law: x = compute, y = log-residual


@dataclass(frozen=True, kw_only=True)
class HoldoutSeries:
    """One law's held-out points: ``x`` observed, ``y`` predicted by the fit without them, and each
    prediction's interval ``[lo, hi]`` (empty when that fit had no bootstrap)."""

    name: str
    x: tuple[float, ...]
    y: tuple[float, ...]
    lo: tuple[float, ...] = ()
    hi: tuple[float, ...] = ()


@dataclass(frozen=True, kw_only=True)
class HoldoutData:
    title: str
    series: tuple[HoldoutSeries, ...]  # one per law with a hold-out
    summary: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class BootstrapData:
    title: str
    samples: tuple[Series, ...]  # name = "law: parameter"; y = the bootstrap samples
    estimates: tuple[float, ...]


@dataclass(frozen=True, kw_only=True)
class ParallelData:
    dimensions: tuple[tuple[str, tuple[float, ...]], ...]
    color: tuple[float, ...]
    color_label: str
    categories: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # label -> names of codes 0, 1, ...


@dataclass(frozen=True, kw_only=True)
class ParamRow:
    law: str
    parameter: str
    estimate: float
    lo: float | None
    hi: float | None
    kind: str  # "parameter" or "derived"
    identified: bool = True  # the law's verdict (unidentified rows are shown greyed, apart)


@dataclass(frozen=True, kw_only=True)
class ModelRow:
    law: str
    n_points: int
    objective: float
    holdout_rmse: float | None
    holdout_mape: float | None
    lr_stat: float | None
    p_value: float | None
    aic: float | None
    bic: float | None
    versus: str | None
    notes: str


def _col(frame, name: str) -> np.ndarray:
    return frame.get_column(name).to_numpy()


def architecture_labels(frame, columns: Sequence[str] = ARCH_COLUMNS) -> list[str]:
    """A short architecture label per row from the columns that vary (``P=16 w=4``)."""
    present = [c for c in columns if c in frame.columns and frame.get_column(c).n_unique() > 1]
    if not present:
        return ["all"] * frame.height
    cols = {c: frame.get_column(c).to_list() for c in present}
    return [" ".join(f"{_SHORT.get(c, c)}={cols[c][i]}" for c in present)
            for i in range(frame.height)]


# readable family names: (topology, router, balance, window layout) -> name (moue.analysis.paired.with_topology)
FAMILY_NAMES = {
    ("layerwise", "softmax", "switch", "ring"): "layerwise MoE",
    ("unipool", "norm", "pool", "ring"): "UniPool-style",
    ("rotational", "trajectory", "exposure", "ring"): "MoUE-style (ring)",
    ("rotational", "trajectory", "exposure", "clamped"): "MoUE-style",
    ("rotational", "softmax", "switch", "ring"): "rotational windows",
    ("rotational", "softmax", "switch", "clamped"): "rotational + clamped",
    ("rotational", "trajectory", "switch", "ring"): "rotational + trajectory",
    ("rotational", "softmax", "exposure", "ring"): "rotational + exposure",
}


def family_labels(frame) -> list[str] | None:
    """The architecture family of each row (``FAMILY_NAMES``, else ``topology router/balance``), or
    ``None`` when the frame lacks the model columns (then ``architecture_labels`` is used)."""
    from moue.analysis.paired import with_topology

    cols = ("model.router", "model.balance")
    framed = with_topology(frame)
    if "topology" not in framed.columns or not all(c in frame.columns for c in cols):
        return None
    layout = (framed.get_column("model.window_layout").to_list() if "model.window_layout" in framed.columns
              else ["ring"] * framed.height)
    out = []
    for key in zip(framed.get_column("topology").to_list(), *(framed.get_column(c).to_list() for c in cols), layout):
        key = tuple("ring" if v is None else str(v) for v in key)
        out.append(FAMILY_NAMES.get(key, f"{key[0]} {key[1]}/{key[2]}" + ("" if key[3] == "ring" else f" {key[3]}")))
    return out


def _band(name, x, samples, point, level):
    lo, hi = percentile_interval(samples, level) if samples.shape[0] > 1 else (point, point)
    return Band(name=name, x=tuple(map(float, x)), y=tuple(map(float, point)),
                lo=tuple(map(float, lo)), hi=tuple(map(float, hi)))


def loss_vs_compute_data(frame, *, loss: str, compute: str, fits: Mapping[str, FitResult],
                         labels: Sequence[str]) -> ScatterData:
    """Final loss against training compute, one series per architecture; the ``compute`` law's
    curve and the compute-optimal frontier of laws that have one (``Law.optimum``: ``chinchilla``),
    with bootstrap bands."""
    x, y = _col(frame, compute), _col(frame, loss)
    runs = frame.get_column("run_id").to_list() if "run_id" in frame.columns else [""] * len(x)
    points = []
    for lab in sorted(set(labels)):
        m = [i for i, v in enumerate(labels) if v == lab]
        points.append(Series(name=lab, x=tuple(float(x[i]) for i in m),
                             y=tuple(float(y[i]) for i in m), text=tuple(runs[i] for i in m)))
    # the fitted range solid, a decade beyond it as a marked extrapolation (name ends "extrapolated")
    ranges = (("", np.geomspace(x.min(), x.max(), 40)), (" (extrapolated)", np.geomspace(x.max(), x.max() * 10, 20)))
    curves = []
    for name, r in fits.items():
        tag = "" if r.verdict.identified else " (not identified)"  # drawn grey: not a result
        for suffix, grid in ranges:
            suffix = tag + suffix
            if name == "compute":
                pt = r.predict({"C": grid})
                bs = r.predict({"C": grid}, samples=True) if r.n_bootstrap > 1 else pt[None]
                curves.append(_band("compute law" + suffix, grid, bs, pt, r.level))
            elif r.law_spec.optimum is not None:
                # compute-optimal frontier: N_opt(C), D_opt(C) from the fitted law at each C
                band = _frontier(r, grid)
                curves.append(Band(name=band.name + suffix, x=band.x, y=band.y, lo=band.lo, hi=band.hi))
    return ScatterData(title="Loss vs compute by architecture family", x_label=f"training compute (FLOPs, {compute})",
                       y_label=f"validation loss (nats per token, {loss})", points=tuple(points), curves=tuple(curves))


def isoflop_data(iso) -> ScatterData:
    """IsoFLOP profiles (``moue.analysis.isoflop``): each budget's runs, its parabola in ln N over the
    sampled range, and its minimum (a point series of the minima)."""
    points, curves = [], []
    for b in iso.budgets:
        name = f"C = {b.compute:.2g} FLOPs" + ("" if b.used else " (no minimum)")
        points.append(Series(name=name, x=b.n, y=b.loss))
        p2, p1, p0, m = b.parabola
        if math.isfinite(p2):
            grid = np.geomspace(b.n_range[0], b.n_range[1], 30)
            u = np.log(grid) - m
            y = p0 + p1 * u + p2 * u * u
            curves.append(Band(name=f"parabola, {name}", x=tuple(map(float, grid)), y=tuple(map(float, y)),
                               lo=tuple(map(float, y)), hi=tuple(map(float, y))))
    used = [b for b in iso.budgets if b.used]
    points.append(Series(name="minima (N_opt, loss)", x=tuple(b.n_opt for b in used),
                         y=tuple(b.loss_opt for b in used)))
    return ScatterData(title=f"IsoFLOP profiles: N_opt ~ C^{iso.a:.3f} [{iso.a_ci[0]:.3f}, {iso.a_ci[1]:.3f}]"
                             + ("" if iso.identified else " (not identified)"),
                       x_label="active parameters N", y_label="final validation loss (nats per token)",
                       points=tuple(points), curves=tuple(curves))


def lr_rule_data(rule) -> ScatterData:
    """An LR stage (``moue.analysis.lr_rule``): each size's loss against its learning rates with the
    optimum marked, in the title the fitted rule."""
    points = [Series(name=f"N = {s['n']:.3g}" + (f" ({', '.join(s['flags'])})" if s["flags"] else ""),
                     x=tuple(s["lrs"]), y=tuple(s["losses"])) for s in rule.sizes]
    used = [s for s in rule.sizes if s["used"]]
    points.append(Series(name="optimum per size", x=tuple(s["lr_opt"] for s in used),
                         y=tuple(s["loss_opt"] for s in used)))
    lo, hi = rule.exponent_ci
    return ScatterData(title=f"LR stage: lr = {rule.c:.3g} N^-{rule.exponent:.3f} (exponent 95% [{lo:.3f}, {hi:.3f}])"
                             + ("" if rule.identified else " (not identified)"),
                       x_label="learning rate", y_label="final validation loss (nats per token)", points=tuple(points))


def _frontier(r: FitResult, grid: np.ndarray) -> Band:
    """The compute-optimal loss of a law of N and D alone along ``grid`` (C = 6ND)."""
    law = r.law_spec

    def frontier(nat):  # natural parameters (S, P) -> loss (S, G)
        p = {k: v[:, None] for k, v in law.by_name(nat).items()}
        return law.optimum(p, grid[None, :] * 1.0).loss

    nat = np.array([[r.params[k] for k in law.natural]])
    pt = frontier(nat)[0]
    bs = frontier(r.bootstrap) if r.n_bootstrap > 1 else pt[None]
    return _band(f"{r.law} compute-optimal (C = 6ND)", grid, bs, pt, r.level)


def loss_vs_virtual_width_data(frame, *, loss: str, n_col: str, v_col: str,
                               d_col: str | None, fit: FitResult | None) -> ScatterData:
    """Loss against virtual width at fixed active parameters (the largest token budget of each
    size), with the fitted virtual-width law's curve and band per size."""
    N, V, L = _col(frame, n_col), _col(frame, v_col), _col(frame, loss)
    D = _col(frame, d_col) if d_col else None
    points, curves = [], []
    for members in _size_groups(N):
        m = np.isin(N, members)
        n_val = float(np.exp(np.mean(np.log(members))))  # the group's geometric mean
        if D is not None:
            m &= D >= 0.99 * D[m].max()
        order = np.argsort(V[m])
        points.append(Series(name=f"N≈{n_val:.3g}" if len(members) > 1 else f"N={n_val:.3g}", x=tuple(map(float, V[m][order])),
                             y=tuple(map(float, L[m][order]))))
        if fit is not None:
            vg = np.geomspace(V.min(), V.max(), 40)
            data = {"N": np.full_like(vg, n_val), "V": vg}
            if "D" in fit.law_spec.variables and D is not None:
                data["D"] = np.full_like(vg, D[m].max())
            pt = fit.predict(data)
            bs = fit.predict(data, samples=True) if fit.n_bootstrap > 1 else pt[None]
            curves.append(_band(f"{fit.law} N={n_val:.3g}", vg, bs, pt, fit.level))
    return ScatterData(title="Loss vs virtual width at fixed active parameters",
                       x_label=f"virtual width ({v_col})", y_label=f"loss ({loss})",
                       points=tuple(points), curves=tuple(curves))


def _size_groups(N: np.ndarray, tol: float = 0.05) -> list[np.ndarray]:
    """Distinct active-parameter counts, sorted, grouped while each is within ``tol`` of the one
    before: an iso-active design matches sizes to a few percent of a target (router and state
    parameters differ, +/- the space's ``active_tol``), and those points belong on one curve;
    the sizes of a scaling ladder are tens of percent apart."""
    groups: list[list[float]] = []
    for n in np.unique(N):
        if groups and n <= groups[-1][-1] * (1 + tol):
            groups[-1].append(n)
        else:
            groups.append([n])
    return [np.array(g) for g in groups]


def residual_data(frame, *, fits: Mapping[str, FitResult], compute: str,
                  frames: Mapping[str, object] | None = None) -> ResidualData:
    """Residuals ``log L - prediction`` (log10 for log10 laws) against compute, per law, on the
    rows each law was fitted on (``frames``; default: all of ``frame``)."""
    series = []
    full = frame
    for name, r in fits.items():
        frame = (frames or {}).get(name, full)
        x = _col(frame, compute)
        law = r.law_spec
        data = {v: _col(frame, r.variables[v]) for v in law.variables}
        obs = law.target(_col(frame, r.loss))
        pred = law.predict(np.asarray(r.theta)[None, :], data)[0]
        series.append(Series(name=name, x=tuple(map(float, x)), y=tuple(map(float, obs - pred))))
    return ResidualData(title="Residuals (log loss)", x_label=f"compute ({compute})",
                        series=tuple(series))


def holdout_data(fits: Mapping[str, FitResult]) -> HoldoutData:
    """Held-out (largest-compute) points: observed against predicted by the fit without them, with
    its prediction intervals (``moue.analysis.predict``) and how many held-out losses they cover."""
    series, summary = [], []
    for name, r in fits.items():
        h = r.holdout
        if h is None:
            summary.append(f"{name}: no hold-out ({'; '.join(r.diagnostics.warnings) or 'off'})")
            continue
        series.append(HoldoutSeries(name=name, x=h.test_loss, y=h.test_pred, lo=h.test_lo, hi=h.test_hi))
        covered = (f"; {r.level:.0%} prediction intervals cover {round(h.coverage * h.n_test)} of {h.n_test}"
                   if h.test_lo else "")
        summary.append(f"{name}: {h.n_test} points with {h.column} >= {h.min_value:.3g} held out "
                       f"(fit on {h.n_train}); RMSE {h.rmse:.4f}, max |err| "
                       f"{h.max_abs_error:.4f}, MAPE {h.mape:.2f}%, extrapolation x"
                       f"{h.extrapolation_ratio:.2f}{covered}")
    return HoldoutData(title="Hold-out: largest-compute group predicted by a fit without it",
                       series=tuple(series), summary=tuple(summary))


def bootstrap_data(fits: Mapping[str, FitResult]) -> BootstrapData:
    """Bootstrap samples of every exponent of every law."""
    samples, estimates = [], []
    for name, r in fits.items():
        if r.n_bootstrap < 2:
            continue
        law = r.law_spec
        for p in law.exponents:
            j = law.natural.index(p)
            samples.append(Series(name=f"{name}: {p}", x=(),
                                  y=tuple(map(float, r.bootstrap[:, j]))))
            estimates.append(r.params[p])
    return BootstrapData(title="Bootstrap distributions of the exponents",
                         samples=tuple(samples), estimates=tuple(estimates))


_AXIS = {"derived.n_params_active": "active params", "derived.virtual_width": "virtual width",
          "derived.reuse": "reuse", "final/val_loss": "val loss", "model.n_layers": "depth", "model.d_model": "width",
          "model.pool_size": "pool", "model.window": "window", "model.stride": "stride", "model.top_k": "top-k",
          "model.expert_hidden": "expert width", "train.lr": "lr", "train.tokens": "tokens", "train.seed": "seed"}


def _short(column: str) -> str:
    """A parallel-coordinates axis label: short words, not the MLflow key."""
    return _AXIS.get(column, column.split(".", 1)[-1].split("/")[-1].replace("_", " "))


def parallel_data(frame, *, loss: str, max_dims: int = 10) -> ParallelData:
    """Parallel coordinates over the family and router (categorical axes) and the numeric config
    columns that vary (``model.*``, ``train.*``, then active parameters, virtual width and reuse),
    coloured by loss; axes labelled in short words."""
    dims, categories = [], {}
    labels = family_labels(frame)
    cats = ([("family", labels)] if labels else []) + [
        (_short(c), frame.get_column(c).cast(str).to_list()) for c in ("model.router",) if c in frame.columns]
    for name, values in cats:
        names = tuple(sorted(set(values)))
        if len(names) > 1:
            dims.append((name, tuple(float(names.index(v)) for v in values)))
            categories[name] = names
    preferred = ("derived.n_params_active", "derived.virtual_width", "derived.reuse")
    candidates = ([c for c in frame.columns if c.startswith(("model.", "train."))]
                  + [c for c in preferred if c in frame.columns])
    for c in candidates:  # the sweep's axes first, then the derived quantities the laws use
        if not frame.schema[c].is_numeric():
            continue
        v = frame.get_column(c)
        if v.null_count() == 0 and v.n_unique() > 1:
            dims.append((_short(c), tuple(map(float, v.to_numpy()))))
    dims = dims[:max_dims]
    lossv = tuple(map(float, _col(frame, loss)))
    return ParallelData(dimensions=tuple(dims) + ((_short(loss), lossv),), color=lossv, color_label=_short(loss),
                        categories=categories)


def param_rows(fits: Mapping[str, FitResult]) -> list[ParamRow]:
    rows = []
    for name, r in sorted(fits.items(), key=lambda item: not item[1].verdict.identified):
        ok = r.verdict.identified
        for k, v in r.params.items():
            lo, hi = r.ci.get(k, (None, None))
            rows.append(ParamRow(law=name, parameter=k, estimate=v, lo=lo, hi=hi,
                                 kind="parameter", identified=ok))
        for k, v in r.derived.items():
            lo, hi = r.derived_ci.get(k, (None, None))
            rows.append(ParamRow(law=name, parameter=k, estimate=v, lo=lo, hi=hi, kind="derived",
                                 identified=ok))
    return rows


def model_rows(fits: Mapping[str, FitResult], tests: Mapping[str, NestedTest]) -> list[ModelRow]:
    rows = []
    for name, r in fits.items():
        t = tests.get(name)
        h = r.holdout
        rows.append(ModelRow(
            law=name, n_points=r.provenance.n_points, objective=r.diagnostics.objective,
            holdout_rmse=None if h is None else h.rmse, holdout_mape=None if h is None else h.mape,
            lr_stat=None if t is None else t.lr_stat, p_value=None if t is None else t.p_value,
            aic=None if t is None else t.aic, bic=None if t is None else t.bic,
            versus=None if t is None else t.nested,
            notes="; ".join(r.diagnostics.warnings)))
    return rows
