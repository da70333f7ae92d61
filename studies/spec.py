"""Study specs: the TOML a researcher writes, loaded and validated before anything starts.

Format (every table but ``[search]`` and ``[budget]`` optional; see ``studies/*.toml``)::

    name = "quickstart"                  # also the MLflow experiment unless [tracking] says otherwise
    description = "one line"

    [search]
    space = "virtual_width"              # a search_spaces name
    algorithm = "grid"                   # grid | tpe | random
    num_samples = 0                      # tpe/random: trials to run (grid: must be 0, the grid decides)
    seeds = [0, 1]                       # grid: every point runs once per seed (model init + batch order)
    seed = 0                             # sampler seed (tpe/random)
    max_concurrent = 0                   # 0: as many as the resources allow

    [scheduler]
    kind = "asha"                        # none | asha (time attribute: tokens seen)
    grace_tokens = 131072
    reduction_factor = 3

    [budget]
    tokens = 524288                      # per trial; a list (grid only, no ASHA) makes the token
                                         # budget a grid axis: every point runs at every budget
    marks = 4                            # report marks per trial (validation, checkpoint)

    [resources]
    cpus = 1                             # per trial
    gpu = 0.0                            # per trial, a fraction shares a GPU

    [tracking]
    experiment = ""                      # default: name
    tracking_uri = ""                    # default: the workspace's SQLite store

    [analysis]
    laws = ["compute", "vw_additive"]    # analysis.LAWS names
    margin_pct = 1.0                     # the smallest effect of interest of every comparison's verdict
    [[analysis.comparisons]]             # comparisons the report decides (moue compare's options), each:
    name = "16 vs 2 experts"             #   its name in the report
    variant = ["model.pool_size"]        #   column(s) naming a variant (values joined with "/")
    reference = "4"                      #   the reference variant's (joined) value
    pair = ["train.seed"]                #   columns a pair of runs shares
    label = { "4" = "2 experts" }        #   optional names of joined values

    [design]                             # an adaptive study (moue.analysis.design, moue.studies.adaptive):
    target = "family:MoUE-style"         #   family:NAME, comparison:NAME, exponent:LAW.PARAM, term:LAW.PARAM
    precision = 0.01                     #   the margin (paired: a fraction) or the half-width (a parameter)
    budget_flops = 5e15                  #   stop here at the latest (undecided if so)
    batch = 2                            #   trials per round; the grid is the candidate set
    [space]                              # options of the search space (search_spaces.<space>.defaults)
    [lr_stage]                           # ladder only: tune the LR per size first (moue.studies.stages)
    multipliers = [0.25, 0.5, 1, 2, 4]   # each size at these multiples of its rule's LR
    tokens_per_param = 5.0               # the stage's (short) trials
    families = ["layerwise"]             # the stage's families (default: the study's first)
    on_unidentified = "stop"             # stop | use: a rule that is not identified stops the study
    extend = 2                           # rounds of 2 more LRs past the edge for sizes whose optimum is there
    [fixed.model] / [fixed.train] / [fixed.data]   # settings every trial shares
    [smoke.model] / [smoke.train] / [smoke.data] / [smoke.budget] / [smoke.space] / [smoke.scheduler] /
    [smoke.lr_stage] / [smoke.search] (num_samples, seeds) / [smoke.design]
                                         # --smoke overrides

Every error is a ``ConfigError`` naming the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moue.errors import ConfigError
from moue.fields import is_int
from moue.topology import family

__all__ = ["Study", "LrStageSpec", "STAGES", "SearchSpec", "SchedulerSpec", "ResourcesSpec", "load_study", "STUDIES_DIR", "shipped_studies",
           "flatten_toml"]

STUDIES_DIR = Path(__file__).parent
ALGORITHMS = ("grid", "tpe", "random")
SCHEDULERS = ("none", "asha")


@dataclass(frozen=True, kw_only=True)
class SearchSpec:
    space: str
    algorithm: str = "grid"
    num_samples: int = 0
    seeds: tuple[int, ...] = (0,)
    seed: int = 0
    max_concurrent: int = 0


@dataclass(frozen=True, kw_only=True)
class SchedulerSpec:
    kind: str = "none"
    grace_tokens: int = 0
    reduction_factor: float = 3.0


@dataclass(frozen=True, kw_only=True)
class ResourcesSpec:
    cpus: float = 1.0
    gpu: float = 0.0


@dataclass(frozen=True, kw_only=True)
class LrStageSpec:
    """``[lr_stage]``: each ladder size at ``multipliers`` of its rule's LR for ``tokens_per_param``
    tokens per parameter; ``moue run`` fits ``lr = c N^-exponent`` to it (``moue.analysis.lr_rule``) and
    runs the main trials at that rule."""

    multipliers: tuple[float, ...]
    tokens_per_param: float = 5.0
    families: tuple[str, ...] = ()  # () : the study's first family
    on_unidentified: str = "stop"
    extend: int = 2  # rounds of bracket extension for sizes whose optimum is at an edge of the scan


@dataclass(frozen=True, kw_only=True)
class Study:
    name: str
    description: str
    search: SearchSpec
    scheduler: SchedulerSpec
    budget_tokens: int  # the largest budget (ASHA's max_t; fixed["train.tokens"] for non-grid searches)
    marks: int
    resources: ResourcesSpec
    experiment: str
    tracking_uri: str
    laws: tuple[str, ...]
    margin_pct: float  # [analysis] margin_pct: the smallest effect of interest (moue.analysis.decide)
    comparisons: tuple  # [[analysis.comparisons]]: moue.analysis.decide.ComparisonSpec
    space_options: dict[str, Any]
    fixed: dict[str, Any]  # flat dotted model.* / train.* / data.* settings
    source: str  # the spec text as run
    sha256: str
    path: str
    smoke: bool = False
    points: list[dict[str, Any]] = field(default_factory=list)  # grid: resolved points (seed included)
    pruned: list[tuple[dict[str, Any], str]] = field(default_factory=list)
    budgets: tuple[int, ...] = ()  # every token budget, ascending (one entry unless [budget] lists several)
    plans: tuple = ()  # grid: one moue.studies.plan.TrialPlan per point, in the order of ``points``
    lr_stage: LrStageSpec | None = None  # [lr_stage] (main stage; None in the LR stage itself)
    stage: str = "main"
    lr_rule_file: str = ""  # main stage of a study with [lr_stage]: the fitted rule it runs at
    given_name: str = ""  # ``--name``: this sweep's name (and experiment) instead of the spec's
    design: Any = None  # [design]: moue.analysis.design.DesignSpec (an adaptive study); None: the grid runs whole

    def plan(self, config: dict[str, Any]):
        """The ``TrialPlan`` of the trial Tune configured with ``config`` (``{"point": {...}}`` for
        grids, the sampler's suggestion otherwise): the one place a trial's config is decided."""
        from moue.studies.plan import plan_trial

        return plan_trial(self, config)

    def trial_tokens(self, point: dict[str, Any]) -> int:
        """A trial's token budget: the point's own (several budgets) or the study's."""
        return int(point.get("train.tokens", self.budget_tokens))

    def trial_flat(self, point: dict[str, Any]) -> dict[str, Any]:
        """The flat config of one trial: fixed settings, then the point, then the budget."""
        tokens = self.trial_tokens(point)
        return {**self.fixed, **point, "train.tokens": tokens,
                "train.eval_every_tokens": self.eval_every(tokens)}

    def eval_every(self, tokens: int) -> int:
        """Tokens between report marks for a trial of ``tokens`` (``marks`` per trial)."""
        batch = int(self.fixed.get("train.batch_tokens", _train_default("batch_tokens")))
        steps = max(1, tokens // batch // self.marks)
        return steps * batch

    def lost_families(self) -> list[tuple[str, str]]:
        """Families (layerwise, one shared pool, rotational pool) the grid had but its constraints
        pruned entirely, each with one reason: a launch says so, not only ``--dry-run``."""
        kept = {_family(self.fixed, p) for p in self.points}
        lost: dict[str, str] = {}
        for point, why in self.pruned:
            fam = _family(self.fixed, point)
            if fam not in kept:
                lost.setdefault(fam, why)
        return sorted(lost.items())


def _train_default(name: str) -> Any:
    from moue.trial_config import TrainConfig

    return {f.name: f.default for f in dataclasses.fields(TrainConfig)}[name]


MAX_NAME = 100  # a study name becomes folder names (Tune's trial dirs add ~100 more), runs and an experiment
MAX_TOKENS = 10**12  # per trial

_TOP_KEYS = {"name", "description", "search", "scheduler", "budget", "resources", "tracking", "analysis",
             "space", "lr_stage", "design", "fixed", "smoke"}
STAGES = ("main", "lr")  # a study with [lr_stage] runs "lr" (its LR scan) and then "main"
LR_STAGE_SUFFIX = "_lr"


def _table(doc: dict, key: str, allowed: dict[str, type | tuple], *, required: tuple[str, ...] = ()) -> dict:
    value = doc.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(key, value, "must be a table")
    for k, v in value.items():
        if k not in allowed:
            raise ConfigError(f"{key}.{k}", v, f"is not a setting of [{key}]; allowed: {', '.join(sorted(allowed))}")
        types = allowed[k]
        if types is object:  # checked by its owner (a search space's options)
            continue
        ok = isinstance(v, types) and not (isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)))
        if not ok:
            names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
            raise ConfigError(f"{key}.{k}", v, f"must be of type {names}")
    for k in required:
        if k not in value:
            raise ConfigError(f"{key}.{k}", None, "is required")
    return value


def flatten_toml(doc: dict, prefix: str = "") -> dict[str, Any]:
    """A parsed TOML document as ``{"a.b.c": value}`` (lists kept whole): for naming what differs."""
    flat: dict[str, Any] = {}
    for k, v in doc.items():
        if isinstance(v, dict):
            flat.update(flatten_toml(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def _flatten_fixed(doc: dict, key: str) -> dict[str, Any]:
    fixed = doc.get(key, {})
    if not isinstance(fixed, dict):
        raise ConfigError(key, fixed, "must be a table with [model], [train] and/or [data] sub-tables")
    flat: dict[str, Any] = {}
    for section, table in fixed.items():
        allowed = ("model", "train", "data") if key == "fixed" else ("model", "train", "data", "budget", "space", "scheduler",
                                                                   "search", "lr_stage", "design")
        if section not in allowed or not isinstance(table, dict):
            raise ConfigError(f"{key}.{section}", table, f"must be one of the tables {', '.join(allowed)}")
        for k, v in table.items():
            flat[f"{section}.{k}"] = v
    return flat


def load_study(path: str | Path, *, smoke: bool = False, stage: str = "main", lr_rule: str | Path | None = None,
               lr_extension: tuple[str, list[float], list[int]] | None = None, as_name: str | None = None) -> Study:
    """Load, validate and resolve a study (grid points included); raise ``ConfigError`` on any problem.

    A study with ``[lr_stage]`` has two stages: ``stage="lr"`` is its LR scan (experiment and name
    with the suffix ``_lr``; ``space.lr_scan`` and ``lr_scan_tokens_per_param`` from the table, the
    stage's families, no cooldown branches); ``stage="main"`` with ``lr_rule`` (a rule file of the
    scan) is the study at the fitted rule. The main stage without ``lr_rule`` is the study at the
    spec's own ``space.lr_rule`` (what ``--dry-run`` shows before the scan has run).
    ``lr_extension = (suffix, multipliers, active counts)`` is a bracket extension of the LR stage:
    the sweep ``<name>_lr<suffix>`` (same experiment) of those sizes at those multipliers.
    ``as_name`` (``--name``) runs the study as another sweep: that name, and an experiment of that
    name (its fits apart from the first sweep's), whatever the spec's ``name`` and ``experiment``."""
    if stage not in STAGES:
        raise ConfigError("stage", stage, f"must be one of {', '.join(STAGES)}")
    p = Path(path)
    text, doc = _read_spec(p, path)
    name, description = _name_and_description(doc)
    if as_name:
        name, _ = _name_and_description({"name": as_name}, field="--name")

    s = _table(doc, "search", {"space": str, "algorithm": str, "num_samples": int, "seeds": list, "seed": int,
                               "max_concurrent": int}, required=("space",))
    b = _table(doc, "budget", {"tokens": (int, list), "marks": int}, required=("tokens",))
    c = _table(doc, "scheduler", {"kind": str, "grace_tokens": int, "reduction_factor": (int, float)})
    r = _table(doc, "resources", {"cpus": (int, float), "gpu": (int, float)})
    t = _table(doc, "tracking", {"experiment": str, "tracking_uri": str})
    a = _table(doc, "analysis", {"laws": list, "margin_pct": (int, float), "comparisons": list})
    space_options = dict(_table(doc, "space", {k: object for k in doc.get("space", {})}))
    _rule_next_to_spec(space_options, p)
    for key in ("lr_stage", "design"):
        if smoke and isinstance(doc.get("smoke", {}).get(key), dict) and key in doc:
            doc = {**doc, key: {**doc[key], **doc["smoke"][key]}}
    lr_stage = _lr_stage_spec(doc, s)
    if stage == "lr" and lr_stage is None:
        raise ConfigError("lr_stage", None, "is required for the LR stage (the spec has no [lr_stage] table)")
    fixed = _flatten_fixed(doc, "fixed")
    smoke_space: dict[str, Any] = {}
    if smoke:
        s, b, c, smoke_space = _apply_smoke(_flatten_fixed(doc, "smoke"), s, b, c, fixed)
    else:
        _flatten_fixed(doc, "smoke")  # validated even when unused

    search = _search_spec(s)
    budgets, marks = _budget_spec(b, fixed, search)
    budget = budgets[-1]
    scheduler = _scheduler_spec(c, budgets)
    resources = _resources_spec(r)
    _check_placement(t.get("tracking_uri", ""), fixed, resources)
    experiment = ((as_name or t.get("experiment") or name)  # another sweep (--name): its own experiment
                  + ("-smoke" if smoke else ""))  # smoke runs never mix in
    laws = _laws(a)
    margin_pct, comparisons = _decisions(a)

    from moue.search_spaces import get_space

    space = get_space(search.space)
    options = space.options(space_options)  # defaults < [space]
    if smoke:  # < the space's own smoke options < the spec's [smoke.space]
        options = space.options({**options, **space.smoke, **smoke_space})
    options, name, experiment = _staged(space, options, name, experiment, stage=stage, lr_stage=lr_stage,
                                        lr_rule=lr_rule, lr_extension=lr_extension)
    fixed["train.tokens"] = budget  # the spaces see the budget (e.g. widening as a fraction of it)
    study = Study(
        name=name, description=description, search=search, scheduler=scheduler, budget_tokens=budget,
        marks=marks, resources=resources, experiment=experiment, tracking_uri=t.get("tracking_uri", ""),
        laws=tuple(laws), margin_pct=margin_pct, comparisons=comparisons, space_options=options, fixed=fixed, source=text,
        sha256=hashlib.sha256(text.encode()).hexdigest(), path=str(p.resolve()), smoke=smoke, budgets=budgets,
        lr_stage=lr_stage if stage == "main" else None, stage=stage,
        lr_rule_file=str(Path(lr_rule).resolve()) if lr_rule is not None and stage == "main" else "",
        given_name=as_name or "",
    )
    _probe_fixed(fixed)
    study = _resolve_points(study, space)
    if "design" in doc and stage == "main":  # an LR stage scans its grid whole
        study = _with_design(study, doc)
    if not smoke and "smoke" in doc:  # the [smoke.*] overrides are checked now, not at the first --smoke
        _check_smoke(p, _flatten_fixed(doc, "smoke"))
    return study


def _with_design(study: Study, doc: dict) -> Study:
    """``[design]`` checked against the study: a grid (its candidates) without ASHA, and a target
    its trials can answer (``moue.studies.adaptive.build_design``)."""
    from moue.analysis.design import DesignSpec

    d = _table(doc, "design", {"target": str, "precision": (int, float), "budget_flops": (int, float),
                               "batch": int}, required=("target", "precision", "budget_flops"))
    if study.search.algorithm != "grid":
        raise ConfigError("search.algorithm", study.search.algorithm, "must be 'grid' in a study with [design] "
                          "(the grid is the set of trials the design chooses from)")
    if study.scheduler.kind != "none":
        raise ConfigError("scheduler.kind", study.scheduler.kind, "must be 'none' in a study with [design] "
                          "(the design reads every trial's final loss)")
    spec = DesignSpec(target=d["target"], precision=float(d["precision"]), budget_flops=float(d["budget_flops"]),
                      batch=d.get("batch", 2))
    study = dataclasses.replace(study, design=spec)
    from moue.studies.adaptive import build_design

    if not build_design(study).initial():
        raise ConfigError("design.budget_flops", spec.budget_flops, "is less than the cheapest trial of the study "
                          "(a paired target: its cheapest pair)")
    return study


def _name_and_description(doc: dict[str, Any], field: str = "name") -> tuple[str, str]:
    name = doc.get("name")
    if not isinstance(name, str) or not name.strip() or not all(c.isalnum() or c in "-_" for c in name):
        raise ConfigError(field, name, "must be a non-empty name of letters, digits, '-' and '_'")
    if len(name) > MAX_NAME:
        raise ConfigError(field, f"{name[:20]}... ({len(name)} characters)",
                          f"must be at most {MAX_NAME} characters (it names folders, runs and the experiment)")
    description = doc.get("description", "")
    if not isinstance(description, str):
        raise ConfigError("description", description, "must be a string")
    return name, description


def _budget_spec(b: dict[str, Any], fixed: dict[str, Any], search: SearchSpec) -> tuple[tuple[int, ...], int]:
    """The ``[budget]`` table: the token budgets (ascending) and the marks per trial."""
    budgets = _budgets(b["tokens"])
    marks = b.get("marks", 4)
    for key in ("train.tokens", "train.eval_every_tokens"):
        if key in fixed:
            raise ConfigError(f"fixed.{key}", fixed[key], "is set by [budget] (tokens, marks); remove it")
    if len(budgets) > 1 and search.algorithm != "grid":
        raise ConfigError("budget.tokens", list(budgets),
                          f"must be one number with algorithm {search.algorithm!r} (a list of budgets is a grid axis)")
    if marks < 1:
        raise ConfigError("budget.marks", marks, "must be >= 1")
    return budgets, marks


def _resources_spec(r: dict[str, Any]) -> ResourcesSpec:
    resources = ResourcesSpec(cpus=float(r.get("cpus", 1.0)), gpu=float(r.get("gpu", 0.0)))
    if resources.cpus <= 0:
        raise ConfigError("resources.cpus", resources.cpus, "must be > 0")
    if not 0 <= resources.gpu <= 8:
        raise ConfigError("resources.gpu", resources.gpu, "must be in [0, 8] (a fraction shares one GPU)")
    return resources


def _laws(a: dict[str, Any]) -> list[str]:
    from moue.analysis.laws import LAWS  # pure Python registry (no scipy at import)

    laws = a.get("laws", ["compute"])
    for law in laws:
        if law not in LAWS:
            raise ConfigError("analysis.laws", law, f"must be one of {', '.join(LAWS)}")
    return laws


def _decisions(a: dict[str, Any]) -> tuple[float, tuple]:
    """``[analysis] margin_pct`` and ``[[analysis.comparisons]]`` (their checks are the analysis's own)."""
    from moue.analysis.decide import DEFAULT_MARGIN_PCT, comparison_specs, margin_value  # no scipy at import

    return margin_value(a.get("margin_pct", DEFAULT_MARGIN_PCT)), comparison_specs(a.get("comparisons", []))


def _rule_next_to_spec(space_options: dict[str, Any], p: Path) -> None:
    """A relative ``space.lr_rule`` file next to the spec is used wherever moue runs (in place)."""
    rule = space_options.get("lr_rule")
    if isinstance(rule, str) and rule not in ("fixed", "power") and not Path(rule).is_absolute() \
            and (p.parent / rule).is_file():
        space_options["lr_rule"] = str((p.parent / rule).resolve())


def _staged(space, options: dict[str, Any], name: str, experiment: str, *, stage: str, lr_stage, lr_rule,
            lr_extension) -> tuple[dict[str, Any], str, str]:
    """The space options, name and experiment of one stage (``load_study``'s docstring)."""
    if stage == "lr":
        options = space.options({**options, **_lr_stage_options(lr_stage, options)})
        name, experiment = name + LR_STAGE_SUFFIX, _with_suffix(experiment, LR_STAGE_SUFFIX)
        if lr_extension is not None:
            suffix, mults, only = lr_extension
            options = space.options({**options, "lr_scan": list(mults), "lr_scan_only": list(only)})
            name += suffix
    elif lr_rule is not None:
        options = space.options({**options, "lr_rule": str(Path(lr_rule).resolve())})
    return options, name, experiment


def _with_suffix(experiment: str, suffix: str) -> str:
    """``name-smoke`` -> ``name_lr-smoke``: the smoke tag stays last."""
    base, smoke = (experiment[:-6], "-smoke") if experiment.endswith("-smoke") else (experiment, "")
    return base + suffix + smoke


def _lr_stage_spec(doc: dict, s: dict) -> LrStageSpec | None:
    """``[lr_stage]`` checked: a ladder study's LR scan (multipliers of each size's rule LR)."""
    if "lr_stage" not in doc:
        return None
    t = _table(doc, "lr_stage", {"multipliers": list, "tokens_per_param": (int, float), "families": list,
                                 "on_unidentified": str, "extend": int}, required=("multipliers",))
    if s.get("space") != "ladder":
        raise ConfigError("lr_stage", "[lr_stage]", f"needs search.space = \"ladder\" (the study's space is "
                          f"{s.get('space')!r}): the stage scans the LR of each ladder size")
    m = t["multipliers"]
    if len(m) < 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in m) \
            or len(set(m)) != len(m):
        raise ConfigError("lr_stage.multipliers", m, "must be at least 3 distinct positive numbers (a parabola "
                          "in ln lr needs 3 LRs per size)")
    tpp = t.get("tokens_per_param", 5.0)
    if not tpp > 0:
        raise ConfigError("lr_stage.tokens_per_param", tpp, "must be > 0")
    fams = t.get("families", [])
    if not all(isinstance(f, str) for f in fams):
        raise ConfigError("lr_stage.families", fams, "must be a list of family names (space.families)")
    on = t.get("on_unidentified", "stop")
    if on not in ("stop", "use"):
        raise ConfigError("lr_stage.on_unidentified", on, "must be 'stop' or 'use'")
    extend = t.get("extend", 2)
    if not 0 <= extend <= 8:
        raise ConfigError("lr_stage.extend", extend, "must be in [0, 8] (rounds of bracket extension)")
    return LrStageSpec(multipliers=tuple(float(v) for v in sorted(m)), tokens_per_param=float(tpp),
                       families=tuple(fams), on_unidentified=on, extend=extend)


def _lr_stage_options(lr_stage: LrStageSpec, options: dict[str, Any]) -> dict[str, Any]:
    """The ladder options of the LR stage: the scan, its families, no cooldown branches."""
    families = list(lr_stage.families) or list(options["families"][:1])
    for f in families:
        if f not in options["families"]:
            raise ConfigError("lr_stage.families", f, f"must be among the study's space.families "
                              f"({', '.join(options['families'])})")
    return {"lr_scan": list(lr_stage.multipliers), "lr_scan_tokens_per_param": lr_stage.tokens_per_param,
            "families": families, "cooldowns": []}


def _read_spec(p: Path, path: str | Path) -> tuple[str, dict]:
    """The spec's text and parsed TOML; not a file, not UTF-8, not TOML or unknown top-level keys
    are errors naming the spec."""
    if not p.is_file():
        raise ConfigError("spec", str(path), "must be an existing study TOML file (see `moue studies`)")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError("spec", str(path), f"is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                          "a study is a TOML file saved as UTF-8") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("spec", str(path), f"is not valid TOML: {exc}") from None
    for k, v in doc.items():
        if k not in _TOP_KEYS:
            raise ConfigError(k, v, f"is not a study setting; allowed: {', '.join(sorted(_TOP_KEYS))}")
    return text, doc


def _apply_smoke(overrides: dict[str, Any], s: dict, b: dict, c: dict, fixed: dict[str, Any]
                 ) -> tuple[dict, dict, dict, dict[str, Any]]:
    """``[smoke.*]`` on top of the spec: new [search], [budget], [scheduler] tables, the
    [smoke.space] options, and ``fixed`` updated in place."""
    smoke_space: dict[str, Any] = {}
    for k, v in overrides.items():
        section, _, rest = k.partition(".")
        if section == "budget":
            if rest not in ("tokens", "marks"):
                raise ConfigError(f"smoke.{k}", v, "must be budget.tokens or budget.marks")
            b = {**b, rest: v}
        elif section == "space":
            smoke_space[rest] = v
        elif section == "scheduler":
            if rest not in ("kind", "grace_tokens", "reduction_factor"):
                raise ConfigError(f"smoke.{k}", v, "must be scheduler.kind, grace_tokens or reduction_factor")
            c = {**c, rest: v}
        elif section in ("lr_stage", "design"):
            continue  # merged into their tables by load_study
        elif section == "search":
            if rest not in ("num_samples", "seeds"):
                raise ConfigError(f"smoke.{k}", v, "must be search.num_samples or search.seeds")
            s = {**s, rest: v}
        else:
            fixed[k] = v
    return s, b, c, smoke_space


def _search_spec(s: dict) -> SearchSpec:
    search = SearchSpec(space=s["space"], algorithm=s.get("algorithm", "grid"), num_samples=s.get("num_samples", 0),
                        seeds=tuple(s.get("seeds", [0])), seed=s.get("seed", 0),
                        max_concurrent=s.get("max_concurrent", 0))
    if search.algorithm not in ALGORITHMS:
        raise ConfigError("search.algorithm", search.algorithm, f"must be one of {', '.join(ALGORITHMS)}")
    if search.algorithm == "grid" and search.num_samples:
        raise ConfigError("search.num_samples", search.num_samples, "must be 0 (or absent) with algorithm 'grid'")
    if search.algorithm != "grid" and search.num_samples < 1:
        raise ConfigError("search.num_samples", search.num_samples,
                          f"must be >= 1 with algorithm {search.algorithm!r}")
    if not search.seeds or not all(is_int(x) and x >= 0 for x in search.seeds):
        raise ConfigError("search.seeds", list(search.seeds), "must be a non-empty list of integers >= 0")
    if len(set(search.seeds)) != len(search.seeds):
        raise ConfigError("search.seeds", list(search.seeds), "must not repeat a seed")
    if isinstance(search.seed, bool) or not 0 <= search.seed < 2**32:
        raise ConfigError("search.seed", search.seed, "must be an integer in [0, 2**32) (the sampler's seed)")
    if search.max_concurrent < 0:
        raise ConfigError("search.max_concurrent", search.max_concurrent, "must be >= 0 (0: no limit)")
    return search


def _scheduler_spec(c: dict, budgets: tuple[int, ...]) -> SchedulerSpec:
    scheduler = SchedulerSpec(kind=c.get("kind", "none"), grace_tokens=c.get("grace_tokens", 0),
                              reduction_factor=float(c.get("reduction_factor", 3.0)))
    if scheduler.kind not in SCHEDULERS:
        raise ConfigError("scheduler.kind", scheduler.kind, f"must be one of {', '.join(SCHEDULERS)}")
    if scheduler.kind == "asha":
        if len(budgets) > 1:
            raise ConfigError("scheduler.kind", scheduler.kind,
                              "must be 'none' when budget.tokens lists several budgets (ASHA would stop the "
                              "short-budget trials that a scaling fit needs)")
        if not 0 < scheduler.grace_tokens < budgets[-1]:
            raise ConfigError("scheduler.grace_tokens", scheduler.grace_tokens,
                              f"must be in (0, budget.tokens ({budgets[-1]})) with ASHA")
        if scheduler.reduction_factor <= 1:
            raise ConfigError("scheduler.reduction_factor", scheduler.reduction_factor, "must be > 1")
    return scheduler


def _resolve_points(study: Study, space) -> Study:
    """Grid: every point at every budget, pruned by the space and the constraints, times the seeds,
    each resolved into its plan. Samplers: the first points they would suggest are checked."""
    from moue.search_spaces import prune

    if study.search.algorithm != "grid":
        for point in preview_points(study, 3):
            _validate_trial(study, point)
        return study
    kept, pruned = [], []
    for tokens in study.budgets:  # the spaces see each budget (e.g. widening as a fraction of it)
        fixed_b = {**study.fixed, "train.tokens": tokens}
        points, pruned_by_space = space.grid_pruned(fixed_b, study.space_options)
        kept_b, pruned_b = prune(points, fixed_b)
        tag = {"train.tokens": tokens} if len(study.budgets) > 1 else {}
        kept += [{**pt, **tag} for pt in kept_b]
        pruned += [({**pt, **tag}, why) for pt, why in [*pruned_by_space, *pruned_b]]
    if not kept:
        reasons = "; ".join(sorted({why for _, why in pruned})) or "the grid is empty"
        raise ConfigError("search.space", study.search.space, f"yields no valid point with these settings: {reasons}")
    seeded = [{**pt, "train.seed": seed, "data.seed": seed} for pt in kept for seed in study.search.seeds]
    plans = tuple(_validate_trial(study, pt) for pt in seeded)
    return dataclasses.replace(study, points=seeded, pruned=pruned, plans=plans)


def _check_placement(tracking_uri: str, fixed: dict[str, Any], resources: ResourcesSpec) -> None:
    """Where the study's records go and its trials run: a usable tracking URI, a GPU share for CUDA."""
    if tracking_uri:
        from moue.studies.tracking import check_tracking_uri

        check_tracking_uri("tracking.tracking_uri", tracking_uri)
    device = fixed.get("train.device", "auto")
    if isinstance(device, str) and device.startswith("cuda") and resources.gpu <= 0:
        raise ConfigError("fixed.train.device", device, "needs resources.gpu > 0 (trials get a GPU only when they "
                          "ask Ray for one); or use \"auto\" (CUDA where a trial has a GPU)")


def _check_smoke(path: Path, overrides: dict[str, Any]) -> None:
    """The study under its ``[smoke.*]`` overrides; an error is named after the override it comes from."""
    try:
        load_study(path, smoke=True)
    except ConfigError as exc:
        raise _smoke_error(exc, overrides) from None


def _smoke_error(exc: ConfigError, overrides: dict[str, Any]) -> ConfigError:
    """An error of the study under its ``[smoke.*]`` overrides, named after the override it comes from."""
    if exc.field.startswith("smoke."):
        return exc
    for key in overrides:
        if exc.field in (key, f"fixed.{key}"):
            return ConfigError(f"smoke.{key}", exc.value, exc.allowed)
    return ConfigError(f"with --smoke, {exc.field}", exc.value, exc.allowed)


def _budgets(value: Any) -> tuple[int, ...]:
    """``budget.tokens``: one positive integer or a non-empty list of distinct ones (sorted)."""
    values = value if isinstance(value, list) else [value]
    if not values or not all(is_int(v) and v >= 1 for v in values):
        raise ConfigError("budget.tokens", value, "must be an integer >= 1 or a non-empty list of them")
    if len(set(values)) != len(values):
        raise ConfigError("budget.tokens", value, "must not repeat a budget")
    if max(values) > MAX_TOKENS:
        raise ConfigError("budget.tokens", max(values), f"must be at most {MAX_TOKENS:.0e} tokens per trial "
                          "(moue runs many short trials; this is years of CPU time)")
    return tuple(sorted(values))


def _probe_fixed(fixed: dict[str, Any]) -> None:
    """Each ``[fixed]`` section on its own (the rest at defaults): an error in a setting the spec
    fixed is named ``fixed.<section>.<key>`` before any point is generated. Combinations with the
    searched settings are checked per point afterwards."""
    import warnings

    from moue.config import ModelConfig
    from moue.trial_config import DataConfig, TrialConfig

    sections = {name: {k.partition(".")[2]: v for k, v in fixed.items() if k.startswith(name + ".")}
                for name in ("model", "train", "data")}
    for name, build in (("model", ModelConfig.from_dict), ("data", DataConfig.from_dict),
                        ("train", lambda values: TrialConfig.from_dict({"train": values}).train)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a probe at default topology, not a model that runs
                build(sections[name])
        except ConfigError as exc:
            if exc.field in _BUDGET_FIELDS:
                raise ConfigError(_BUDGET_FIELDS[exc.field], exc.value, exc.allowed) from None
            if exc.field.startswith(f"{name}.") and exc.field[len(name) + 1:] in sections[name]:
                allowed = exc.allowed
                if name == "train" and allowed.startswith("is not a train setting"):
                    keys = [k for k in allowed.partition("allowed: ")[2].split(", ")
                            if f"train.{k}" not in _BUDGET_FIELDS]  # [budget] sets those
                    allowed = f"is not a train setting; allowed: {', '.join(keys)} (tokens and marks: [budget])"
                raise ConfigError(f"fixed.{exc.field}", exc.value, allowed) from None
    try:  # the sections together (e.g. train.seq_len against model.max_seq_len)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            TrialConfig.from_dict(dict(sections))
    except ConfigError as exc:
        if exc.field in _BUDGET_FIELDS:
            raise ConfigError(_BUDGET_FIELDS[exc.field], exc.value, exc.allowed) from None
        if exc.field in fixed:
            raise ConfigError(f"fixed.{exc.field}", exc.value, exc.allowed) from None


def preview_points(study: Study, n: int) -> list[dict[str, Any]]:
    """The first ``n`` points the define-by-run space yields for this study's sampler seed."""
    import optuna

    from moue.search_spaces import get_space

    space = get_space(study.search.space)
    sampler = (optuna.samplers.RandomSampler(seed=study.search.seed) if study.search.algorithm == "random"
               else optuna.samplers.TPESampler(seed=study.search.seed))
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        preview = optuna.create_study(sampler=sampler)
        points = []
        for _ in range(n):
            trial = preview.ask()
            derived = space.define(trial, study.fixed, study.space_options)
            suggested = {k: v for k, v in trial.params.items() if not k.startswith("space.")}
            points.append({**suggested, **(derived or {})})
    finally:
        optuna.logging.set_verbosity(verbosity)
    return points


_BUDGET_FIELDS = {"train.tokens": "budget.tokens", "train.eval_every_tokens": "budget.marks"}


def _validate_trial(study: Study, point: dict[str, Any]):
    """The plan of a point (a valid ``TrialConfig``); an error in a setting that came from
    ``[fixed]`` is reported as ``fixed.<section>.<key>``."""
    try:
        return study.plan({"point": point})
    except ConfigError as exc:
        if exc.field in _BUDGET_FIELDS and exc.field not in point:  # set from [budget], not [fixed]
            raise ConfigError(_BUDGET_FIELDS[exc.field], exc.value, exc.allowed) from None
        if exc.field in study.fixed and exc.field not in point:
            raise ConfigError(f"fixed.{exc.field}", exc.value, exc.allowed) from None
        raise


def _family(fixed: dict[str, Any], point: dict[str, Any]) -> str:
    """The architecture family a point's topology is: private windows per layer, one shared pool, or a rotation."""
    return {"layerwise": "layerwise", "unipool": "one shared pool (UniPool-style)",
            "rotational": "rotational pool (MoUE-style)"}[family_of(fixed, point)]


def family_of(fixed: dict[str, Any], point: dict[str, Any]) -> str:
    """``layerwise``, ``unipool`` (one shared pool) or ``rotational``: the topology of a point."""
    from moue.search_spaces.constraints import model_value

    flat = {**fixed, **point}
    return family(*(model_value(flat, k) for k in ("n_layers", "pool_size", "window", "stride")))


def shipped_studies() -> list[Path]:
    return sorted(STUDIES_DIR.glob("*.toml"))
