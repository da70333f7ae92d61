"""Trial checkpoints on Tune's storage: written atomically with a checksum, verified on load with a
fall-back to the trial's earlier checkpoints, pruned once a sweep has ended."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ray import tune

__all__ = ["CHECKPOINT_FILE", "CHECKSUM_FILE", "write_checkpoint", "read_checkpoint", "load_checkpoint",
           "prune_checkpoints"]


CHECKPOINT_FILE, CHECKSUM_FILE = "state.pt", "state.sha256"


def write_checkpoint(directory: Path, state: dict) -> None:
    """``state.pt`` written atomically (``moue.studies.trial.save_checkpoint``), with its SHA-256 beside
    it (checked on every load)."""
    import hashlib

    from moue.studies.trial import save_checkpoint

    save_checkpoint(directory / CHECKPOINT_FILE, state)
    (directory / CHECKSUM_FILE).write_text(hashlib.sha256((directory / CHECKPOINT_FILE).read_bytes()).hexdigest())


def read_checkpoint(directory: Path) -> dict:
    """The state of a checkpoint folder; ``ValueError`` when missing, truncated or altered."""
    import hashlib
    import io

    import torch

    try:
        blob = (directory / CHECKPOINT_FILE).read_bytes()
    except OSError as exc:
        raise ValueError(f"incomplete checkpoint: {exc}") from None
    checksum = directory / CHECKSUM_FILE
    # a checkpoint of a sweep started before checksums has none: then torch.load is the only check
    if checksum.is_file() and hashlib.sha256(blob).hexdigest() != checksum.read_text().strip():
        raise ValueError("checksum mismatch")
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)


def load_checkpoint(checkpoint) -> tuple[dict | None, int]:
    """The newest readable checkpoint of a trial: Tune's, else the trial's earlier ones (newest
    first), else none (start over). Returns (state or None, how many were skipped as corrupt)."""
    if checkpoint is None:
        return None, 0
    from pyarrow.fs import FileSelector, FileType

    fs = checkpoint.filesystem
    parent = os.path.dirname(checkpoint.path.rstrip("/"))
    try:
        found = [i.path for i in fs.get_file_info(FileSelector(parent, allow_not_found=True))
                 if i.type == FileType.Directory and i.base_name.startswith("checkpoint_")]
    except OSError:
        found = []
    current = checkpoint.path.rstrip("/")
    older = sorted((p for p in found if p.rstrip("/") < current), reverse=True)
    corrupt = 0
    for path in [current, *older]:
        try:
            with tune.Checkpoint(path=path, filesystem=fs).as_directory() as d:
                return read_checkpoint(Path(d)), corrupt
        except Exception as exc:  # unreadable: fall back to the one before
            print(f"[moue] checkpoint {path} is unusable ({exc}); trying an earlier one", file=sys.stderr)
            corrupt += 1
    return None, corrupt


def prune_checkpoints(results) -> int:
    """After a sweep: each trial keeps only the checkpoint Tune would restore it from.

    Why not ``CheckpointConfig(num_to_keep=1)``: Tune deletes the older checkpoint as soon as a
    newer one is registered, while the experiment state that ``--resume`` reads reaches storage
    later (an asynchronous sync). A driver killed in between leaves a state pointing at a deleted
    checkpoint, and that trial can never resume ("Could not recover from checkpoint as it does
    not exist on storage anymore"; seen in CI). Pruning when a trial ends has the same window
    (the stored state may still list it as running on its previous checkpoint). So Tune keeps
    every checkpoint during the sweep (``marks`` per trial on disk) and this runs once
    ``Tuner.fit`` has returned, after Tune's final, waited-for save of the experiment state. The
    kept checkpoint is ``result.checkpoint`` (the one Tune registered), not the newest folder: a
    worker that died while writing one leaves a folder Tune never recorded. Returns the number of
    folders removed; failures are reported, never raised (housekeeping only)."""
    removed = 0
    for result in results:
        keep = result.checkpoint.path if result.checkpoint is not None else None
        if keep is None:
            continue  # nothing registered: leave the trial's folders alone
        try:
            from pyarrow.fs import FileSelector, FileType

            fs = result.filesystem
            for info in fs.get_file_info(FileSelector(result.path, allow_not_found=True)):
                if (info.type == FileType.Directory and info.base_name.startswith("checkpoint_")
                        and info.path.rstrip("/") != keep.rstrip("/")):
                    fs.delete_dir(info.path)
                    removed += 1
        except Exception as exc:
            print(f"[moue] could not prune old checkpoints in {result.path}: {exc}", file=sys.stderr)
    return removed
