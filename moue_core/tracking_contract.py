"""The tracking contract: every name a sweep writes to MLflow and the analysis reads back.

One pure-Python module (no MLflow, Ray or torch import) that the writer (``moue.studies.tracking``,
``moue.studies.runner``) and the reader (``moue.analysis.loading``) both import, so a name is spelled once.

Layout of a sweep in MLflow (schema ``SCHEMA_VERSION``):

- one **parent run** per sweep, tagged ``moue.kind = study``, ``moue.sweep_id``, ``moue.study``,
  ``moue.spec_sha256`` and the provenance tags ``PARENT_TAGS``; artifacts ``spec.toml`` and
  ``environment.json``;
- one **child run** per trial (``mlflow.parentRunId``), tagged ``moue.kind = trial``,
  ``moue.trial_id``, ``moue.seed`` and, when it ends, ``moue.status`` (one of ``STATUSES``) and
  ``moue.stop_reason``; params: the trial's resolved config (``model.*``, ``train.*``,
  ``data.*``), ``count.convention`` and ``derived.*``, and the same resolved config once more as
  one typed JSON object in the param ``CONFIG_PARAM`` (``{"model.pool_size": 32, ...}``: the
  reader takes types from it instead of guessing them back from strings);
- metrics: the learning curves ``TRACKED`` at step = tokens seen, and ``final/*`` once a trial
  finished (or was stopped early).
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "SCHEMA_VERSION", "KIND", "KIND_STUDY", "KIND_TRIAL", "SCHEMA", "STATUS", "STOP_REASON", "TRIAL_ID", "SEED",
    "SWEEP_ID", "PARENT_RUN", "STATUSES", "DONE", "VAL_LOSS", "TRAIN_LOSS", "FINAL_VAL_LOSS", "FINAL_TOKENS",
    "TRACKED", "LAYER_METRICS", "COOLDOWN", "is_tracked", "CURVE_METRICS", "PARENT_TAGS", "CONFIG_PARAM", "DECISION_TAG_PREFIX", "DESIGN_TAG", "DESIGN_VERDICT_TAG", "DESIGN_ARTIFACT", "DESIGN_METRICS", "VIEW_TAG", "VIEW_PARAMS", "view_state", "view_url", "DEFAULT_WORKSPACE", "default_tracking_uri", "search_runs",
]

SCHEMA_VERSION = 1

# tags
KIND = "moue.kind"
KIND_STUDY, KIND_TRIAL = "study", "trial"
SCHEMA = "moue.schema"
STATUS = "moue.status"
STOP_REASON = "moue.stop_reason"
TRIAL_ID = "moue.trial_id"
SEED = "moue.seed"
SWEEP_ID = "moue.sweep_id"
PARENT_RUN = "mlflow.parentRunId"
PARENT_TAGS = ("moue.study", "moue.spec_sha256", "moue.git_sha", "moue.git_dirty", "moue.corpus_fingerprint",
               "moue.search", "moue.scheduler")

# the experiment's saved view in MLflow's UI (an experiment tag MLflow's "shared view" reads): the
# runs table with the study's key axes as columns, trials ranked by final val loss; opened by
# ``view_url`` (``moue ui`` prints it per study)
VIEW_KEY = "moue"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
VIEW_PARAMS = ("family", "derived.n_params_active", "model.pool_size", "model.window", "model.stride", "model.top_k",
               "model.n_layers", "derived.virtual_width", "train.tokens")


def view_state() -> dict:
    return {"selectedColumns": ["attributes.`Run Name`", *(f"params.`{p}`" for p in VIEW_PARAMS),
                                "metrics.`final/val_loss`"],
            "orderByKey": "metrics.`final/val_loss`", "orderByAsc": True, "searchFilter": "",
            "runsHiddenMode": "SHOW_ALL"}


def view_url(base: str, experiment_id: str) -> str:
    """The experiment's runs in MLflow's model-training view (not the GenAI overview MLflow 3
    opens by default), with the saved view's columns."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW_KEY}&workflowType=machine_learning"


# params
DECISION_TAG_PREFIX = "moue.decision."  # parent-run tags: one per comparison's verdict, in plain words (moue report)
# an adaptive study's design (moue.studies.adaptive) on the parent run: why it stopped, its verdict,
# its whole record, and one step per look of each DESIGN_METRICS curve (the target's interval by round)
DESIGN_TAG = "moue.design.stop"
DESIGN_VERDICT_TAG = "moue.design.verdict"
DESIGN_ARTIFACT = "design.json"
DESIGN_METRICS = {key: f"design/{key}" for key in ("estimate", "lo", "hi", "half_width", "compute_flops", "n_trials")}
CONFIG_PARAM = "config.json"  # the trial's resolved config, typed, as one JSON object

# a trial's end states; a trial in one of DONE is never trained again (a failed one is retried, an
# interrupted one, stopped with its sweep by Ctrl-C, resumes from its last checkpoint)
STATUSES = ("finished", "early_stopped", "diverged", "failed", "interrupted")
DONE = ("finished", "early_stopped", "diverged")

# metrics
VAL_LOSS = "val/loss"
TRAIN_LOSS = "train/loss"
FINAL_VAL_LOSS = "final/val_loss"
FINAL_TOKENS = "final/tokens"
TRACKED = (TRAIN_LOSS, VAL_LOSS, "lr", "grad_norm", "tokens_per_s", "balance/loss", "balance/load_cv",
           "balance/dead_frac", "balance/maxvio", "balance/dropped_frac", "router/entropy", "router/z",
           "trial/restored_from", "trial/corrupt_checkpoints")
# per-MoE-layer curves: <prefix>layer_<l> (moue.train, the load metrics of a mark interval)
LAYER_METRICS = ("balance/maxvio/", "balance/load_entropy/")
# cooldown branches (train.cooldown_at): cooldown/<t>/{val_loss,tokens,flops,branch_tokens} at the mark
# after the branch ran, and every branch again as final/cooldown/<t>/* with the final metrics
COOLDOWN = "cooldown/"


def is_tracked(name: str) -> bool:
    """Whether metric ``name`` is logged at a mark (``TRACKED``, per layer, or a cooldown branch)."""
    return name in TRACKED or name.startswith(LAYER_METRICS) or name.startswith(COOLDOWN)
CURVE_METRICS = (TRAIN_LOSS, VAL_LOSS)

# where things are by default
DEFAULT_WORKSPACE = "moue_runs"


def default_tracking_uri(workspace: str | Path = DEFAULT_WORKSPACE) -> str:
    """``sqlite:///<absolute workspace>/mlflow.db`` (absolute: trials run in other directories)."""
    return f"sqlite:///{Path(workspace).expanduser().resolve() / 'mlflow.db'}"


def search_runs(client, experiment_id: str, filter_string: str) -> list:
    """Every run of ``experiment_id`` matching ``filter_string``, oldest first, across all pages
    (``client`` is an ``mlflow.MlflowClient``)."""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, max_results=1000,
                                  order_by=["attributes.start_time ASC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs
