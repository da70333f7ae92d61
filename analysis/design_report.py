"""An adaptive study's design in its report: the record the sweep logged to its parent run
(``design.json``, ``moue.studies.adaptive.design_record``), read back, summarised in one line, drawn
(the target's interval against the compute spent) and tabulated look by look with each proposal's
reason."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence

from moue.analysis.figures import Band, ScatterData, Series

__all__ = ["design_figure", "design_html", "design_json", "design_line", "load_design"]


def load_design(parents: Sequence, tracking_uri: str) -> dict | None:
    """The design record of the newest parent run that has one (``None``: not an adaptive study)."""
    from mlflow import MlflowClient

    from moue.tracking_contract import DESIGN_ARTIFACT, DESIGN_TAG

    with_design = [p for p in parents if DESIGN_TAG in p.tags]
    if not with_design:
        return None
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        path = client.download_artifacts(with_design[-1].run_id, DESIGN_ARTIFACT)
    except Exception:  # noqa: BLE001 - MLflow raises its own and OS errors for a missing artifact
        return None  # the tags without the record (an upload that failed): no design section
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def design_json(record: Mapping) -> dict:
    """What ``moue report --json`` carries of a design: the record without the searcher's state."""
    return {k: v for k, v in record.items() if k != "state"}


def _interval(look: Mapping, lo: str = "lo", hi: str = "hi") -> str:
    a, b = look.get(lo), look.get(hi)
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
        return "none yet"
    return f"[{a:+.4g}, {b:+.4g}]"


def design_line(record: Mapping) -> str:
    """An adaptive sweep's outcome in one line: what it decided, why it stopped, what it spent."""
    looks = record.get("looks") or [{}]
    last = looks[-1]
    est = last.get("estimate")
    interval = f"{est:+.4g} {_interval(last)}" if est is not None and math.isfinite(est) else "no estimate"
    return (f"design {record['target']}: {record['verdict']} ({interval} after {len(record.get('looks') or [])} "
            f"look(s)); stopped: {record['stop'] or 'not yet'}; {record['finished_trials']} of "
            f"{record['n_candidates']} candidate trials, {record['spent_flops']:.3g} of "
            f"{record['budget_flops']:.3g} FLOPs")


def design_figure(record: Mapping) -> ScatterData:
    """The target's estimate and interval against the compute spent, look by look: the interval the
    design stops on (the repeated confidence interval of a paired target) where it is finite, and
    the plain 95% interval where the record has it."""
    looks = [lk for lk in record.get("looks", ()) if lk.get("estimate") is not None
             and math.isfinite(lk["estimate"])]
    x = tuple(float(lk["compute_flops"]) for lk in looks)
    bands = []
    for name, lo, hi in (("interval the design stops on", "lo", "hi"), ("plain 95% interval", "lo95", "hi95")):
        rows = [(c, lk) for c, lk in zip(x, looks) if lk.get(lo) is not None and math.isfinite(lk[lo])
                and math.isfinite(lk[hi])]
        if rows:
            bands.append(Band(name=name, x=tuple(c for c, _ in rows), y=tuple(lk["estimate"] for _, lk in rows),
                              lo=tuple(lk[lo] for _, lk in rows), hi=tuple(lk[hi] for _, lk in rows)))
    return ScatterData(title=f"{record['target']}: estimate and interval against compute spent",
                       x_label="compute spent (FLOPs)", y_label="estimate (percent of the reference loss for a "
                       "paired target; the parameter for a law target)",
                       points=(Series(name="estimate at each look", x=x, y=tuple(lk["estimate"] for lk in looks)),),
                       curves=tuple(bands), log_x=False)


def design_html(record: Mapping) -> str:
    """The report's section: the outcome, then one row per look (its proposals and their reasons)."""
    from html import escape

    from moue.analysis.render import table

    rows = []
    for lk in record.get("looks", ()):
        props = "; ".join(f"{p['label']} ({p['reason']})" for p in lk.get("proposals", ())) or lk.get("stop", "")
        rows.append([lk["round"], lk["n_trials"], f"{lk['compute_flops']:.3g}",
                     "n/a" if lk.get("estimate") is None else f"{lk['estimate']:+.4g}", _interval(lk),
                     _interval(lk, "lo95", "hi95"), lk["verdict"], props])
    head = (f"<p>{escape(design_line(record))}. The study's grid ({record['n_candidates']} trials, "
            f"{record['candidate_flops']:.3g} FLOPs) is the candidate set; the design chose "
            f"{record['proposed']} of them (docs/FITTING.md, \"Adaptive designs\"). The paired verdicts "
            "elsewhere in this report are fixed-sample 95% intervals; after a design that looked at its data "
            "round by round, the interval the design stops on (the repeated confidence interval) is the one "
            "that keeps its 95% coverage.</p>")
    return head + table(["look", "trials done", "FLOPs done", "estimate", "interval it stops on",
                         "plain 95% interval", "verdict", "next trials (why) or stop"], rows) + "{{figure:design}}"
