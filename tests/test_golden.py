"""Golden loss curves: a tiny seeded model of each family trains 50 steps on the default corpus and
its per-step training loss and validation loss match the checked-in curves
(``tests/data/golden_<family>.json``) to 1e-5 relative.

CPU training here is deterministic for a fixed thread count, so any change to the model, its
losses, the optimizer step or the data order moves these curves. When a change is meant to move
them, regenerate deliberately and say so in ``studies/LOG.md``:

    cd <repo> && PYTHONPATH=. python tests/test_golden.py --regenerate

(one thread, ``train.device = "cpu"``; about 10 s per family; the files record the torch version).
A curve recorded with another torch version or CPU may differ in the last digits: the test then
says which file and step moved. The default corpus is this Python's standard library, so another
Python release gives another corpus: the files record its fingerprint, and on a machine whose
corpus differs the test is skipped, saying both fingerprints (regenerate there to compare).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from moue.train import NullSink, TrialConfig, train

DATA = Path(__file__).resolve().parent / "data"
STEPS = 50
RTOL = 1e-5

TRUNK = dict(vocab_size=256, d_model=32, n_layers=4, n_heads=2, max_seq_len=32, expert_hidden=16, top_k=2)
FAMILIES = {
    # layerwise MoE: E = 2 private experts per layer, softmax router, switch loss
    "layerwise": dict(pool_size=8, window=2, stride=2, router="softmax", balance="switch"),
    # UniPool-style: one global pool, NormRouter, pool loss on the previous batch's load
    "unipool": dict(pool_size=6, window=6, stride=0, router="norm", balance="pool"),
    # MoUE-style: rotational windows, trajectory router, exposure loss
    "moue": dict(pool_size=8, window=3, stride=2, router="trajectory", router_state_dim=8, balance="exposure"),
}


def config(family: str) -> TrialConfig:
    return TrialConfig.from_dict({
        "model": {**TRUNK, **FAMILIES[family]},
        "train": {"tokens": STEPS * 256, "batch_tokens": 256, "seq_len": 32, "lr": 3e-3, "warmup_frac": 0.1,
                  "eval_every_tokens": 256, "eval_batch": 16, "seed": 0, "device": "cpu"},
        "data": {"corpus": "stdlib", "val_tokens": 512, "seed": 0},
    })


def curve(family: str, cache_dir) -> dict[str, list[float]]:
    """Per-step training loss (each mark covers one step) and the validation loss at every mark."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sink = NullSink()
        result = train(config(family), sink, cache_dir=cache_dir)
    finally:
        torch.set_num_threads(threads)
    assert result.status == "finished", result.stop_reason
    return {"train_loss": [m.metrics["train/loss"] for m in sink.marks[1:]],
            "val_loss": [m.metrics["val/loss"] for m in sink.marks]}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("golden-cache")


def skip_on_another_corpus(recorded: str, cache_dir, what: str) -> None:
    """Skip (with both fingerprints) where the default corpus, this Python's standard library, is
    not the one ``what`` was recorded on."""
    from moue.data import DataConfig, load_corpus

    here = load_corpus(DataConfig(), cache_dir=cache_dir).fingerprint
    if here != recorded:
        pytest.skip(f"{what} was recorded on the default corpus {recorded[:12]} (Python 3.11.7's standard "
                    f"library); this Python's is {here[:12]} ({sys.version.split()[0]}): regenerate here to compare")


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_curve_matches_the_golden_curve(family: str, cache_dir) -> None:
    golden = json.loads((DATA / f"golden_{family}.json").read_text())
    skip_on_another_corpus(golden["corpus_fingerprint"], cache_dir, f"golden_{family}.json")
    got = curve(family, cache_dir)
    for key in ("train_loss", "val_loss"):
        want = golden[key]
        assert len(got[key]) == len(want), key
        for step, (a, b) in enumerate(zip(got[key], want)):
            assert a == pytest.approx(b, rel=RTOL), f"golden_{family}.json {key}[{step}]: {a!r} != {b!r}"
    assert got["val_loss"][-1] < got["val_loss"][0] - 0.5  # it learns


def regenerate(cache_dir: str) -> None:
    for family in FAMILIES:
        got = curve(family, cache_dir)
        from moue.data import DataConfig, load_corpus

        fingerprint = load_corpus(DataConfig(), cache_dir=cache_dir).fingerprint
        record = {"family": family, "config": config(family).to_flat(), "torch": torch.__version__,
                  "threads": 1, "corpus_fingerprint": fingerprint, "python": sys.version.split()[0],
                  "regenerate": "PYTHONPATH=. python tests/test_golden.py --regenerate", **got}
        path = DATA / f"golden_{family}.json"
        path.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {path}: val loss {got['val_loss'][0]:.4f} -> {got['val_loss'][-1]:.4f}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--regenerate"]:
        sys.exit("usage: PYTHONPATH=. python tests/test_golden.py --regenerate")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        regenerate(tmp)
