"""A workspace: where one machine keeps a study's MLflow store, Tune state, reports and corpus cache.

Layout: ``mlflow.db``, ``artifacts/``, ``ray/`` (Tune storage), ``reports/``, ``cache/``
(tokenised corpora), ``ray_auth_token`` (the local cluster's token), ``.moue.lock``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moue.studies.spec import Study

__all__ = ["SweepInterrupted", "Workspace", "sweep_name"]


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

    def design_record(self, sweep: str) -> Path:
        """Where an adaptive sweep's searcher writes its design record (``moue.studies.adaptive``)."""
        return self.root / "designs" / f"{sweep}.json"

    def create(self) -> None:
        for d in (self.root, self.ray, self.cache, self.reports, self.root / "artifacts"):
            d.mkdir(parents=True, exist_ok=True)


def sweep_name(study: Study) -> str:
    return f"{study.name}-smoke" if study.smoke else study.name


class SweepInterrupted(Exception):
    """The sweep stopped before every trial ended (Ctrl-C): nothing may be fitted on it. Its
    trials are ``interrupted`` and its parent run KILLED; the next run resumes it. ``outcome`` is
    the ``moue.studies.runner.SweepOutcome`` (here, not there: every command's error handler catches it
    without importing Ray)."""

    def __init__(self, outcome, *, not_started: int = 0) -> None:
        self.outcome = outcome
        n = outcome.statuses.get("interrupted", 0)
        super().__init__(f"the sweep {outcome.name} was interrupted: {n} trial(s) stopped before they ended, "
                         f"{not_started} not started; nothing was fitted. Run the same command again to "
                         "resume it")
