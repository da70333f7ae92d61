"""A study's stages: the LR scan of a ladder (``[lr_stage]``), its fitted rule, then the main trials.

A ladder with ``[lr_stage]`` tunes the learning rate per size before it spends its budget
(Porian et al. 2024: one LR for every size biases the fitted exponents). ``run_stages`` runs

1. the LR stage (``load_study(..., stage="lr")``: every size of the stage's families at each
   multiplier of its rule's LR, short trials; experiment ``<name>_lr``),
2. ``moue.analysis.lr_rule`` on its finished runs: the optimum per size and ``lr = c N^-exponent``;
   a size whose best LR is the largest (smallest) scanned gets 2 more LRs past it (x2, x4 the
   edge multiplier), up to ``lr_stage.extend`` rounds, each round a sweep ``<name>_lr_up<k>_<hash>``
   / ``_down<k>_<hash>`` (the hash of its LRs and sizes) in the same experiment, then the rule is refitted on them all;
   written to ``<workspace>/reports/<name>_lr_rule.json`` (``moue report`` adds it to the report),
3. the main stage at that rule (``space.lr_rule`` = the file), unless the rule is not identified
   and ``on_unidentified = "stop"``: then the study stops with the reasons, the stage kept.

Each stage is an ordinary sweep: a stage whose Tune state exists is resumed, so re-running the
command after an interruption continues where it stopped (a finished LR stage is not rerun; its
rule is refitted from the same runs, deterministically).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from moue.studies.runner import SweepOutcome, Workspace, sweep_name
from moue.studies.spec import Study, load_study

__all__ = ["StagedOutcome", "run_stages", "rule_path"]


@dataclass(frozen=True)
class StagedOutcome:
    main: SweepOutcome | None  # None when the LR stage stopped the study
    lr: SweepOutcome | None = None
    rule: object | None = None  # moue.analysis.lr_rule.LrRule
    rule_file: Path | None = None
    stopped: str = ""  # why the main stage did not run


def rule_path(workspace: Workspace, study: Study) -> Path:
    """``<workspace>/reports/<study>_lr_rule.json`` (``moue report <study>`` finds it there)."""
    return workspace.reports / f"{sweep_name(study)}_lr_rule.json"


def run_stages(study: Study, *, workspace: Workspace, sweep: Callable[[Study, bool], SweepOutcome],
               echo: Callable[[str], None] = print, bootstrap: int = 1000) -> StagedOutcome:
    """Run ``study`` (its LR stage first when it has one). ``sweep(study, resume)`` runs one stage;
    each stage resumes when its Tune state exists."""

    def run(s: Study) -> SweepOutcome:
        resume = (workspace.ray / sweep_name(s) / "tuner.pkl").is_file()
        if resume:
            echo(f"resuming the sweep in {workspace.ray / sweep_name(s)}")
        return sweep(s, resume)

    if study.lr_stage is None:
        return StagedOutcome(main=run(study))
    lr_study = load_study(study.path, smoke=study.smoke, stage="lr", as_name=study.given_name or None)
    echo(f"LR stage: {len(lr_study.points)} trials ({', '.join(f'{m:g}' for m in study.lr_stage.multipliers)} x "
         f"each size's LR, {study.lr_stage.tokens_per_param:g} tokens per parameter)")
    lr_out = run(lr_study)
    from moue.analysis.errors import AnalysisError

    try:
        rule = fit_stage_rule(lr_out, bootstrap=bootstrap)
        up, down = max(study.lr_stage.multipliers), min(study.lr_stage.multipliers)
        for k in range(1, study.lr_stage.extend + 1):  # bracket extension: 2 more LRs past each edge
            edges = _edges(rule)
            if not edges:
                break
            for direction, ns in edges.items():
                ms = [up * 2, up * 4] if direction == "up" else [down / 2, down / 4]
                tag = hashlib.sha256(json.dumps([ms, sorted(ns)]).encode()).hexdigest()[:6]  # its content
                ext = load_study(study.path, smoke=study.smoke, stage="lr", as_name=study.given_name or None,
                                 lr_extension=(f"_{direction}{k}_{tag}", ms, ns))
                echo(f"LR stage, extension {k}: {len(ns)} size(s) with their optimum at the "
                     f"{'top' if direction == 'up' else 'bottom'} of the scan, at {', '.join(f'{m:g}' for m in ms)} x")
                run(ext)
            up, down = (up * 4 if "up" in edges else up), (down / 4 if "down" in edges else down)
            rule = fit_stage_rule(lr_out, bootstrap=bootstrap)
    except AnalysisError as e:
        return StagedOutcome(main=None, lr=lr_out, stopped=f"the LR stage gives no rule ({e}); the main stage did "
                             "not run. Widen lr_stage.multipliers (each size needs a minimum in ln lr)")
    path = rule_path(workspace, study)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rule.as_dict(), allow_nan=True) + "\n")
    for line in rule.lines():
        echo(line)
    echo(f"the rule: {path}")
    if not rule.identified and study.lr_stage.on_unidentified == "stop":
        why = ("the LR rule is not identified (" + "; ".join(rule.reasons) + "); the main stage did not run. "
               "Widen lr_stage.multipliers, or set lr_stage.on_unidentified = \"use\" to run at it anyway")
        return StagedOutcome(main=None, lr=lr_out, rule=rule, rule_file=path, stopped=why)
    main = load_study(study.path, smoke=study.smoke, lr_rule=path, as_name=study.given_name or None)
    echo(f"main stage: {len(main.points)} trials at lr = {rule.c:.4g} * N^-{rule.exponent:.3f}")
    return StagedOutcome(main=run(main), lr=lr_out, rule=rule, rule_file=path)


def fit_stage_rule(lr_out: SweepOutcome, *, bootstrap: int = 1000):
    """The LR rule of a finished LR stage: the finished trials of its experiment (the scan and its
    extensions, each a sweep with its own parent run)."""
    from moue.analysis.lr_rule import rule_of_experiment

    return rule_of_experiment(lr_out.experiment, tracking_uri=lr_out.tracking_uri, bootstrap=bootstrap)


def _edges(rule) -> dict[str, list[int]]:
    """Active counts of the sizes whose best scanned LR is the largest (``up``) or the smallest
    (``down``) of their scan: where the scan must go on."""
    out: dict[str, list[int]] = {}
    for sz in rule.sizes:
        if "edge" not in sz["flags"] or not sz["lrs"]:
            continue
        if sz["lr_opt"] >= max(sz["lrs"]):
            out.setdefault("up", []).append(int(sz["n"]))
        elif sz["lr_opt"] <= min(sz["lrs"]):
            out.setdefault("down", []).append(int(sz["n"]))
    return out
