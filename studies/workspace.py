"""A workspace: where one machine keeps a study's MLflow store, Tune state, reports and corpus cache.

Layout: ``mlflow.db``, ``artifacts/``, ``ray/`` (Tune storage), ``reports/``, ``cache/``
(tokenised corpora), ``ray_auth_token`` (the local cluster's token), ``.moue.lock``. Also the
one place where a trial's flat settings are resolved from the study and Tune's config.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from studies.spec import Study

__all__ = ["Workspace", "sweep_name", "resolve_trial"]


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def at(cls, path: str | Path) -> Workspace:
        return cls(Path(path).expanduser().resolve())

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def ray(self) -> Path:
        return self.root / "ray"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    def create(self) -> None:
        for d in (self.root, self.ray, self.cache, self.reports, self.root / "artifacts"):
            d.mkdir(parents=True, exist_ok=True)


def sweep_name(study: Study) -> str:
    return f"{study.name}-smoke" if study.smoke else study.name


def resolve_trial(study: Study, config: dict[str, Any]) -> dict[str, Any]:
    """Tune's config of one trial -> the trial's full flat settings (fixed + point + budget)."""
    point = dict(config.get("point", {}))
    # Optuna's own search coordinates (``space.*``) are not settings: the space's define returned
    # the point they map to
    point.update({k: v for k, v in config.items() if k != "point" and not k.startswith("space.")})
    if study.search.algorithm != "grid":
        seed = study.search.seeds[0]
        point.setdefault("train.seed", seed)
        point.setdefault("data.seed", seed)
    flat = study.trial_flat(point)
    flat.setdefault("train.threads", max(1, int(study.resources.cpus)))
    if 0 < study.resources.gpu < 1:  # a fractional GPU share is also a memory cap
        flat.setdefault("train.gpu_memory_fraction", study.resources.gpu)
    return flat
