"""Adaptive studies: a Ray Tune searcher that chooses each next trial from the study's grid and stops
the sweep when the study's question is answered (``[design]``; ``moue.analysis.design`` decides,
this module adapts it to Tune and to a study).

The study's grid (every point at every seed) is the candidate set. :func:`candidates` turns each
point into a :class:`~moue.analysis.design.Candidate`: its cost (the plan's FLOPs), the (N, D, C, V,
E) rows it adds to a law's fit (its final point, and its cooldown branches, from the plan), and for
a paired target its arm (``variant``, ``reference``) and stratum (the settings a pair shares but its
seed). :class:`AdaptiveSearcher` is a ``ray.tune.search.Searcher`` (the API Tune's own searchers
use, so concurrency limits, ``--address`` and ``Tuner.restore`` work as for them): ``suggest`` hands
out the round's proposals one trial at a time, waits (``None``) while a round runs, takes a look
when it has finished and returns ``Searcher.FINISHED`` when the design stops. Its state (a JSON
document: proposals, results, looks) is saved with Tune's experiment state and in the workspace's
``designs/<sweep>.json``, which the driver logs to the sweep's parent run when the sweep ends.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ray.tune.search import Searcher

from moue.errors import ConfigError
from moue.tracking_contract import COOLDOWN, FINAL_VAL_LOSS

__all__ = ["AdaptiveSearcher", "build_design", "candidates", "design_record", "round_lines"]

SEED_KEYS = ("train.seed", "data.seed")


def _flat(study, point: Mapping[str, Any]) -> dict[str, Any]:
    return {**study.fixed, **point}


def _rows(plan) -> tuple[dict[str, float], ...]:
    """The law rows a trial yields: its final point, then each cooldown branch in the order of
    ``train.cooldown_at`` (a branch decays over ``cooldown_frac`` of the steps so far; moue.train)."""
    counts, tc = plan.counts, plan.config.train
    flat = plan.config.model
    base = {"N": float(counts.n_params_active), "V": float(counts.virtual_width), "E": float(flat.pool_size)}
    bt = tc.batch_tokens
    final = (plan.tokens // bt) * bt  # whole optimizer steps, as moue.train runs them
    out = [{**base, "D": float(final), "C": float(counts.compute(final))}]
    for t in sorted(tc.cooldown_at):
        tokens = (t // bt + max(1, round(tc.cooldown_frac * (t // bt)))) * bt
        out.append({**base, "D": float(tokens), "C": float(counts.compute(tokens))})
    return tuple(out)


def _arms(study, kind: str, name: str) -> tuple[list[str], list[tuple]]:
    """Each point's arm (``variant``, ``reference`` or ``""``) and stratum for a paired target."""
    import polars as pl

    flats = [_flat(study, p) for p in study.points]
    keys = sorted({k for f in flats for k in f if not isinstance(f[k], (list, tuple, dict))})
    frame = pl.DataFrame({k: [f.get(k) for f in flats] for k in keys}, strict=False)
    if kind == "family":
        from moue.analysis.figures import family_labels
        from moue.analysis.report import FAMILY_PAIR, REFERENCE_FAMILY

        labels = family_labels(frame) or []
        variant = _match_family(name, sorted(set(labels) - {REFERENCE_FAMILY}))
        arms = ["variant" if lab == variant else "reference" if lab == REFERENCE_FAMILY else "" for lab in labels]
        pair = [c for c in FAMILY_PAIR if c not in SEED_KEYS]
        if len(study.budgets) > 1:  # several token budgets: a pair shares its budget (the report's BUDGET_PAIR)
            pair.append("train.tokens")
    else:
        spec = next((c for c in study.comparisons if c.name == name), None)
        if spec is None:
            raise ConfigError("design.target", f"comparison:{name}", "names no [[analysis.comparisons]] entry; "
                              "the study has " + (", ".join(repr(c.name) for c in study.comparisons) or "none"))
        for col in (*spec.variant, *spec.pair):
            if col not in frame.columns:
                raise ConfigError("design.target", f"comparison:{name}", f"pairs or varies {col!r}, which no trial "
                                  "of the study sets")
        from moue.analysis.paired import variant_labels

        values = variant_labels(frame, spec.variant)
        labels = dict(spec.label)
        reference = {spec.reference, labels.get(spec.reference, spec.reference)}  # by value or by its label
        reference |= {v for v, lab in labels.items() if lab in reference}
        arms = ["reference" if v in reference else "variant" for v in values]
        pair = [c for c in spec.pair if c not in SEED_KEYS]
    strata = [tuple(f.get(c) for c in pair) for f in flats]
    return arms, strata


def _match_family(name: str, labels: list[str]) -> str:
    """The family label ``name`` means: an exact label, or the one label it begins (case and
    punctuation ignored: ``moue`` and ``MoUE-style`` name ``MoUE-style (ring)``)."""
    def norm(s: str) -> str:
        return "".join(ch for ch in s.lower() if ch.isalnum())

    exact = [lab for lab in labels if norm(lab) == norm(name)]
    found = exact or [lab for lab in labels if norm(lab).startswith(norm(name))]
    if len(found) != 1:
        raise ConfigError("design.target", f"family:{name}", "must name one family of the study other than the "
                          "layerwise MoE (the reference): " + (", ".join(labels) or "it has none"))
    return found[0]


def candidates(study) -> tuple:
    """The study's grid as the design's candidates (``moue.analysis.design.Candidate``), in the
    order of ``study.points``."""
    from moue.analysis.design import PAIRED_KINDS, Candidate, parse_target

    kind, name, _ = parse_target(study.design.target)
    arms, strata = _arms(study, kind, name) if kind in PAIRED_KINDS else ([""] * len(study.points), [()] * len(study.points))
    out = []
    for i, (point, plan) in enumerate(zip(study.points, study.plans, strict=True)):
        setting = tuple(sorted((k, str(v)) for k, v in point.items() if k not in SEED_KEYS))
        out.append(Candidate(index=i, cost=float(plan.compute), seed=int(point.get("train.seed", 0)), rows=_rows(plan),
                             arm=arms[i], stratum=strata[i], setting=setting, label=plan.run_name))
    return tuple(out)


def build_design(study):
    """A fresh :class:`~moue.analysis.design.Design` of the study (``ConfigError`` when the target
    does not fit the study's trials)."""
    from moue.analysis.design import Design

    return Design(spec=study.design, candidates=candidates(study), seed=study.search.seed)


class AdaptiveSearcher(Searcher):
    """Tune's side of an adaptive study (the module docstring). ``record`` is the workspace file the
    design's state is written to after every look."""

    def __init__(self, study, *, metric: str, record: str | os.PathLike[str]) -> None:
        super().__init__(metric=metric, mode="min")
        self.study = study
        self.record = str(record)
        self.design = build_design(study)
        self.trial_index: dict[str, int] = {}
        self.queue: list[int] = []
        self.finished = False
        self.max_concurrent = 0  # 0: no limit (Tune's max_concurrent_trials, kept here)

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        """Keep Tune's concurrency limit here instead of under its ``ConcurrencyLimiter``, which
        forgets a trial that errored before a resume: Tune retrains it (``resume_errored``) but the
        limiter would not pass its result on, and the design would hold it as failed."""
        self.max_concurrent = int(max_concurrent or 0)
        return True

    # ---- Tune's hooks

    def suggest(self, trial_id: str) -> dict | str | None:
        if trial_id in self.trial_index:  # asked again for a trial it already has (a restored driver)
            return {"point": self.study.points[self.trial_index[trial_id]]}
        if self.max_concurrent and len(self.design.pending) - len(self.queue) >= self.max_concurrent:
            return None  # as many running as allowed
        if not self.queue and not self.finished:
            self._next_round()
        if self.queue:
            i = self.queue.pop(0)
            self.trial_index[trial_id] = i
            return {"point": self.study.points[i]}
        return Searcher.FINISHED if self.finished else None

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        i = self.trial_index.get(trial_id)
        if i is None:
            return
        self.design.observe(i, None if error or not result else _losses(result, self.design.by_index[i]))
        self._write()

    def _next_round(self) -> None:
        """The first round, or a look once the running round has finished (then its proposals, or
        the end of the design)."""
        if not self.design.proposed:
            self.queue = self.design.initial()
            if not self.queue:
                self.finished = True
            self._write()
            return
        if self.design.pending:
            return
        look = self.design.step()
        self.queue = [p.index for p in look.proposals]
        self.finished = bool(look.stop)
        self._write()

    # ---- state

    def state(self) -> dict:
        return {"design": self.design.state(), "trial_index": dict(self.trial_index), "queue": list(self.queue),
                "finished": self.finished}

    def save(self, checkpoint_path: str) -> None:
        Path(checkpoint_path).write_text(json.dumps(self.state()))

    def restore(self, checkpoint_path: str) -> None:
        state = json.loads(Path(checkpoint_path).read_text())
        self.design.restore(state["design"])
        self.trial_index = {k: int(v) for k, v in state["trial_index"].items()}
        self.queue = [int(i) for i in state["queue"]]
        self.finished = bool(state["finished"])

    def _write(self) -> None:
        """The design record (:func:`design_record`) in the workspace, replaced whole."""
        path = Path(self.record)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(design_record(self.design, finished=self.finished), indent=1))
        tmp.replace(path)


def _losses(result: Mapping[str, Any], candidate) -> tuple[float, ...] | None:
    """The loss of each of a trial's rows from its last result: the final validation loss, then
    each cooldown branch's (NaN where one is missing: the trial is then not used)."""
    if result.get("status") not in (None, "finished"):
        return None
    final = result.get(FINAL_VAL_LOSS)
    if final is None:
        return None
    out = [float(final)]
    final, _, loss = FINAL_VAL_LOSS.rpartition("/")
    prefix = f"{final}/{COOLDOWN}"  # final/cooldown/<t>/val_loss
    branches = sorted(int(k[len(prefix):].split("/")[0]) for k in result
                      if k.startswith(prefix) and k.endswith("/" + loss))
    for t in branches[: len(candidate.rows) - 1]:
        out.append(float(result[f"{prefix}{t}/{loss}"]))
    out += [math.nan] * (len(candidate.rows) - len(out))
    return tuple(out)


def design_record(design, *, finished: bool = False) -> dict:
    """What a study's design did (``moue report --json``'s ``design``, the parent run's
    ``design.json``): the spec, the candidates, the looks with their proposals and reasons, and
    where it stands."""
    spec = design.spec
    last = design.looks[-1] if design.looks else None
    return {
        "target": spec.target, "precision": spec.precision, "budget_flops": spec.budget_flops, "batch": spec.batch,
        "n_candidates": len(design.candidates), "candidate_flops": sum(c.cost for c in design.candidates),
        "proposed": len(design.proposed), "finished_trials": len(design.results),
        "spent_flops": design.spent(), "finished": finished,
        "stop": last.stop if last else "", "verdict": last.verdict if last else "undecided",
        "initial": [design.by_index[i].label for i in design.proposed[: _initial_count(design)]],
        "looks": [lk.to_json() for lk in design.looks], "state": design.state(),
    }


def _initial_count(design) -> int:
    if not design.looks:
        return len(design.proposed)
    return design.looks[0].n_trials


def round_lines(design, first: list[int]) -> list[str]:
    """``--dry-run``'s account of a design: the candidates, their compute and the first round."""
    spec = design.spec
    total = sum(c.cost for c in design.candidates)
    lines = [f"adaptive design: target {spec.target}, precision {spec.precision:g}, budget {spec.budget_flops:.3g} "
             f"FLOPs ({spec.budget_flops / total:.0%} of the {len(design.candidates)} candidates' {total:.3g}), "
             f"{spec.batch} trials per round",
             f"first round ({len(first)} trials, {sum(design.by_index[i].cost for i in first):.3g} FLOPs):"]
    lines += [f"  {design.by_index[i].label}" for i in first]
    return lines
