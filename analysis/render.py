"""Draw the figure data of ``moue.analysis.figures`` with plotly and assemble one self-contained page.

The page embeds plotly.js once (in ``<head>``) and every figure as a ``div`` plus an inline
script, so it works offline; it references no external resource.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence

from moue.analysis.figures import (
    BootstrapData,
    HoldoutData,
    ModelRow,
    ParallelData,
    ParamRow,
    ResidualData,
    ScatterData,
)

__all__ = ["draw_bootstrap", "draw_holdout", "draw_parallel", "draw_residuals", "draw_scatter",
           "models_table", "page", "params_table", "table"]

_LAYOUT = {"template": "plotly_white", "height": 480, "margin": {"l": 70, "r": 20, "t": 50,
                                                                  "b": 60}}


def _go():
    try:
        import plotly.graph_objects as go
    except ImportError as e:  # pragma: no cover - plotly is a dependency
        raise ImportError("the report needs plotly: pip install plotly") from e
    return go


# one distinct colour per series (plotly's 24-colour qualitative palette; the default cycles 10)
PALETTE = ("#2E91E5", "#E15F99", "#1CA71C", "#FB0D0D", "#DA16FF", "#222A2A", "#B68100", "#750D86", "#EB663B",
           "#511CFB", "#00A08B", "#FB00D1", "#FC0080", "#B2828D", "#6C7C32", "#778AAE", "#862A16", "#A777F1",
           "#620042", "#1616A7", "#DA60CA", "#6C4516", "#0D2A63", "#AF0038")


def draw_scatter(data: ScatterData):
    go = _go()
    fig = go.Figure()
    for i, s in enumerate(data.points):
        fig.add_trace(go.Scatter(x=s.x, y=s.y, mode="markers", name=s.name,
                                 marker={"color": PALETTE[i % len(PALETTE)]}, text=s.text or None,
                                 hovertemplate="%{x:.3g}, %{y:.4f}<br>%{text}"))
    for c in data.curves:
        dashed, grey = c.name.endswith("(extrapolated)"), "(not identified)" in c.name
        line = {"dash": "dash"} if dashed else {}
        if grey:
            line["color"] = "#aaaaaa"
        fig.add_trace(go.Scatter(x=c.x + c.x[::-1], y=c.hi + c.lo[::-1], fill="toself",
                                 line={"width": 0}, opacity=0.1 if dashed or grey else 0.2, hoverinfo="skip",
                                 name=f"{c.name} band", showlegend=False))
        fig.add_trace(go.Scatter(x=c.x, y=c.y, mode="lines", name=c.name, line=line))
    fig.update_layout(title=data.title, xaxis_title=data.x_label, yaxis_title=data.y_label,
                      **_LAYOUT)
    if data.log_x:
        fig.update_xaxes(type="log")
    return fig


def draw_residuals(data: ResidualData):
    go = _go()
    fig = go.Figure()
    for s in data.series:
        fig.add_trace(go.Scatter(x=s.x, y=s.y, mode="markers", name=s.name))
    fig.add_hline(y=0.0, line_dash="dot")
    fig.update_layout(title=data.title, xaxis_title=data.x_label, yaxis_title="log L - pred",
                      **_LAYOUT)
    fig.update_xaxes(type="log")
    return fig


def draw_holdout(data: HoldoutData):
    go = _go()
    fig = go.Figure()
    lo, hi = math.inf, -math.inf
    for s in data.series:  # predicted against observed, the prediction interval as an error bar
        bars = None if not s.lo else {"type": "data", "symmetric": False, "thickness": 1,
                                      "array": [h - y for h, y in zip(s.hi, s.y)],
                                      "arrayminus": [y - l for l, y in zip(s.lo, s.y)]}
        fig.add_trace(go.Scatter(x=s.x, y=s.y, mode="markers", name=s.name, error_y=bars))
        if s.x:
            lo, hi = min(lo, *s.x, *s.y, *s.lo), max(hi, *s.x, *s.y, *s.hi)
    if math.isfinite(lo):
        fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="perfect",
                                 line={"dash": "dot", "color": "gray"}))
    fig.update_layout(title=data.title, xaxis_title="observed loss",
                      yaxis_title="predicted loss (bars: prediction interval)", **_LAYOUT)
    return fig


def draw_bootstrap(data: BootstrapData, *, columns: int = 3):
    """One small panel per exponent: its bootstrap histogram and the estimate as a line."""
    go = _go()
    from plotly.subplots import make_subplots

    n = max(1, len(data.samples))
    cols = min(columns, n)
    rows = -(-n // cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[f"{s.name} = {est:.4g}" for s, est in
                                                               zip(data.samples, data.estimates)])
    for i, (s, est) in enumerate(zip(data.samples, data.estimates)):
        r, c = divmod(i, cols)
        colour = PALETTE[i % len(PALETTE)]
        fig.add_trace(go.Histogram(x=s.y, name=s.name, nbinsx=40, marker_color=colour, showlegend=False),
                      row=r + 1, col=c + 1)
        fig.add_vline(x=est, line_dash="dash", line_color="#222A2A", row=r + 1, col=c + 1)
        fig.update_xaxes(title_text="value", row=r + 1, col=c + 1)
        fig.update_yaxes(title_text="resamples" if c == 0 else None, row=r + 1, col=c + 1)
    fig.update_layout(title=data.title, **{**_LAYOUT, "height": max(_LAYOUT["height"], 260 * rows + 80)})
    return fig


def draw_importance(importance):
    """Horizontal bars: each search axis's importance (``moue.analysis.importance``), largest on top."""
    go = _go()
    names = list(importance.scores)[::-1]
    fig = go.Figure(go.Bar(x=[importance.scores[n] for n in names], y=names, orientation="h",
                           marker_color=PALETTE[0]))
    fig.update_layout(title=f"Parameter importance ({importance.n_trials} trials, PED-ANOVA)",
                      xaxis_title="importance (share, sums to 1)", yaxis_title="search axis",
                      **{**_LAYOUT, "height": max(260, 60 * len(names) + 140)})
    return fig


def draw_parallel(data: ParallelData):
    go = _go()
    fig = go.Figure(go.Parcoords(
        line={"color": data.color, "colorscale": "Viridis", "showscale": True,
              "colorbar": {"title": {"text": data.color_label}}},
        dimensions=[{"label": name, "values": values,
                     **({"tickvals": list(range(len(data.categories[name]))), "ticktext": list(data.categories[name])}
                        if name in data.categories else {})} for name, values in data.dimensions],
        labelangle=-20, labelside="bottom"))
    fig.update_layout(title="The sweep (parallel coordinates, colour = loss)", **_LAYOUT)
    return fig


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.4g}"
    return html.escape(str(v))


def table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """An HTML table: escaped headers, one row per sequence, numbers to 4 significant digits."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def params_table(rows: Sequence[ParamRow], level: float) -> str:
    """The fitted quantities; rows of unidentified laws greyed (class ``unidentified``) and last."""
    heads = ["law", "quantity", "kind", "estimate", f"{level:.0%} low", f"{level:.0%} high"]
    head = "".join(f"<th>{html.escape(h)}</th>" for h in heads)
    body = "".join(
        ("<tr>" if r.identified else '<tr class="unidentified">')
        + "".join(f"<td>{_fmt(c)}</td>" for c in (r.law + ("" if r.identified else " (not identified)"),
                                                  r.parameter, r.kind, r.estimate, r.lo, r.hi)) + "</tr>"
        for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def models_table(rows: Sequence[ModelRow]) -> str:
    return table(["law", "points", "Huber objective", "hold-out RMSE", "hold-out MAPE %",
                   "vs", "LR stat", "p", "AIC", "BIC", "notes"],
                  [(r.law, r.n_points, r.objective, r.holdout_rmse, r.holdout_mape, r.versus,
                    r.lr_stat, r.p_value, r.aic, r.bic, r.notes) for r in rows])


_CSS = """body{font-family:system-ui,sans-serif;margin:24px auto;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:8px 0 24px}td,th{border:1px solid #ccc;padding:3px 8px;
font-size:13px;text-align:right}th{background:#f3f3f3}td:first-child,td:nth-child(2){text-align:left}
.figure{margin:16px 0 32px}.note{color:#555;font-size:13px}code{font-size:12px}
tr.unidentified td{color:#999;background:#fafafa}.summary{font-size:15px;max-width:900px}"""


def page(*, title: str, sections: Sequence[tuple[str, str]], figures: Mapping[str, object],
         ) -> str:
    """The HTML page: ``sections`` are (heading, inner HTML); a section's HTML may contain
    ``{{figure:NAME}}`` placeholders replaced by the figure ``NAME`` of ``figures``."""
    from plotly.offline import get_plotlyjs

    parts = []
    for heading, inner in sections:
        for name, fig in figures.items():
            token = "{{figure:" + name + "}}"
            if token in inner:
                div = fig.to_html(full_html=False, include_plotlyjs=False, include_mathjax=False,
                                  div_id=f"fig-{name}", config={"displaylogo": False,
                                                                "responsive": True})
                block = f'<div class="figure" data-figure="{name}">{div}</div>'
                inner = inner.replace(token, block)
        parts.append(f"<section><h2>{html.escape(heading)}</h2>{inner}</section>")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style>"
        f"<script type=\"text/javascript\">{get_plotlyjs()}</script></head><body>"
        f"<h1>{html.escape(title)}</h1>{''.join(parts)}</body></html>\n"
    )
