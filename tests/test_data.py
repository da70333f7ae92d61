"""Corpora: config validation, split, cache, fingerprint, sampling, validation set, races."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from moue import data
from moue.data import (SEPARATOR, BatchSampler, DataConfig, load_corpus,
                            validation_set)
from moue.errors import ConfigError


def _stream_sha(train: bytes | np.ndarray, val: bytes | np.ndarray) -> str:
    """The fingerprint framing, written out independently of the module."""
    t = np.frombuffer(train, np.uint8) if isinstance(train, bytes) else train
    v = np.frombuffer(val, np.uint8) if isinstance(val, bytes) else val
    h = hashlib.sha256(f"moue-corpus-v1 train={len(t)} val={len(v)}\n".encode())
    h.update(t.astype("<u4").tobytes())
    h.update(v.astype("<u4").tobytes())
    return h.hexdigest()


def _write_folder(root: Path, n: int = 40) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        sub = root / f"pkg{i % 3}"
        sub.mkdir(exist_ok=True)
        (sub / f"mod{i:02d}.txt").write_text(f"# module {i}\n" + f"value_{i} = {i * i}\n" * (5 + i))
    return root


@pytest.fixture(scope="session")
def stdlib(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return load_corpus(DataConfig(), cache_dir=cache)


@pytest.fixture
def folder(tmp_path):
    return _write_folder(tmp_path / "corpus")


def _arange_corpus(tmp_path: Path, n: int, dtype: str, suffix: str = ".bin"):
    tokens = (np.arange(n, dtype=np.int64) * 7 % 70001).astype(dtype)
    path = tmp_path / f"tokens_{dtype}{suffix}"
    if suffix == ".npy":
        np.save(path, tokens)
    else:
        tokens.tofile(path)
    cfg = DataConfig(corpus=str(path), token_dtype=dtype, val_fraction=0.1)
    return tokens, load_corpus(cfg, cache_dir=tmp_path / "cache")


# --- config ----------------------------------------------------------------------------------------

def test_missing_path_message_names_field_value_and_allowed():
    with pytest.raises(ConfigError) as e:
        DataConfig(corpus="/nope")
    assert e.value.field == "data.corpus"
    assert str(e.value) == ("data.corpus ('/nope') must be an existing file or folder, 'stdlib', "
                            "or 'hf:<name>'")


@pytest.mark.parametrize("kwargs, field", [
    ({"corpus": ""}, "data.corpus"),
    ({"corpus": "hf:  "}, "data.corpus"),
    ({"token_dtype": "int8"}, "data.token_dtype"),
    ({"token_dtype": "uint8"}, "data.token_dtype"),
    ({"val_fraction": 0.0}, "data.val_fraction"),
    ({"val_fraction": 0.7}, "data.val_fraction"),
    ({"val_fraction": -0.1}, "data.val_fraction"),
    ({"val_fraction": True}, "data.val_fraction"),
    ({"val_tokens": 0}, "data.val_tokens"),
    ({"val_tokens": 1.5}, "data.val_tokens"),
    ({"seed": -1}, "data.seed"),
    ({"vocab_size": 1}, "data.vocab_size"),
])
def test_bad_config_values(kwargs, field):
    with pytest.raises(ConfigError) as e:
        DataConfig(**kwargs)
    assert e.value.field == field
    assert str(e.value).startswith(field + " (")


def test_config_defaults_relative_path_and_from_dict(tmp_path, monkeypatch):
    cfg = DataConfig()
    assert (cfg.corpus, cfg.val_fraction, cfg.val_tokens, cfg.seed) == ("stdlib", 0.05, 65536, 0)
    (tmp_path / "a.txt").write_text("hello")
    monkeypatch.chdir(tmp_path)
    assert DataConfig(corpus="a.txt").corpus == str(tmp_path.resolve() / "a.txt")
    assert DataConfig.from_dict({"seed": 4}).seed == 4
    with pytest.raises(ConfigError) as e:
        DataConfig.from_dict({"sead": 4})
    assert e.value.field == "data.sead" and "allowed: " in str(e.value)


def test_empty_folder_and_binary_only_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError) as e:
        load_corpus(DataConfig(corpus=str(tmp_path / "empty")), cache_dir=tmp_path / "c")
    assert e.value.field == "data.corpus" and "no files" in str(e.value)
    binary = tmp_path / "binary"
    binary.mkdir()
    (binary / "blob.dat").write_bytes(b"ab\0cd")
    (binary / "empty.txt").write_bytes(b"")
    (binary / ".hidden.txt").write_text("hidden text is not read")
    with pytest.raises(ConfigError) as e:
        load_corpus(DataConfig(corpus=str(binary)), cache_dir=tmp_path / "c")
    assert e.value.field == "data.corpus" and "no non-empty text" in str(e.value)


def test_bad_token_files(tmp_path):
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\1\2\3\4\5\6")  # 6 bytes: uint16 fits, uint32 does not
    with pytest.raises(ConfigError) as e:
        load_corpus(DataConfig(corpus=str(odd), token_dtype="uint32"), cache_dir=tmp_path / "c")
    assert e.value.field == "data.token_dtype" and "6 bytes" in str(e.value)
    wide = tmp_path / "wide.npy"
    np.save(wide, np.arange(100, dtype=np.int64))
    with pytest.raises(ConfigError) as e:
        load_corpus(DataConfig(corpus=str(wide)), cache_dir=tmp_path / "c")
    assert e.value.field == "data.corpus" and "int64" in str(e.value)
    tiny = tmp_path / "tiny.bin"
    np.arange(3, dtype=np.uint16).tofile(tiny)
    with pytest.raises(ConfigError) as e:
        load_corpus(DataConfig(corpus=str(tiny)), cache_dir=tmp_path / "c")
    assert e.value.field == "data.corpus" and "too short" in str(e.value)


def test_hf_without_the_extra_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network probe in tests
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(ConfigError) as e:
        load_corpus(DataConfig(corpus="hf:roneneldan/TinyStories"), cache_dir=tmp_path)
    assert e.value.field == "data.corpus"
    assert str(e.value) == ("data.corpus ('hf:roneneldan/TinyStories') needs the optional extra: "
                            "pip install 'moue[hf]'")


class _FakeValue:
    def __init__(self, dtype: str) -> None:
        self.dtype = dtype


class _FakeDataset:
    """Just what the hf path uses of ``datasets.Dataset``."""

    features = {"id": _FakeValue("int64"), "text": _FakeValue("string")}
    _fingerprint = "fake-v1"

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, column: str) -> list[str]:
        assert column == "text"
        return self.texts


def test_hf_corpus_with_a_stand_in_datasets_module(tmp_path, monkeypatch):
    import types
    texts = [f"story {i}: once upon a time" for i in range(50)] + [""]
    fake = types.SimpleNamespace(load_dataset=lambda name, split: _FakeDataset(texts))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setitem(sys.modules, "datasets", fake)
    c = load_corpus(DataConfig(corpus="hf:someone/stories", val_fraction=0.2), cache_dir=tmp_path)
    assert c.kind == "hf" and c.n_files == 50  # the empty row is skipped
    assert not set(c.files_train) & set(c.files_val) and c.files_val
    sep = bytes([SEPARATOR])
    assert c.val.tobytes() == b"".join(texts[int(i)].encode() + sep for i in c.files_val)

    def offline(name, split):
        raise ConnectionError("Couldn't reach 'someone/missing' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(ConfigError) as e:
        load_corpus(DataConfig(corpus="hf:someone/missing"), cache_dir=tmp_path)
    assert e.value.field == "data.corpus"
    assert str(e.value) == ("data.corpus ('hf:someone/missing') offline and not in the local cache: "
                            "Couldn't reach 'someone/missing' on the Hub (LocalEntryNotFoundError)")


def test_vocab_size_override(tmp_path, folder):
    with pytest.raises(ConfigError) as e:
        load_corpus(DataConfig(corpus=str(folder), vocab_size=200), cache_dir=tmp_path / "c")
    assert e.value.field == "data.vocab_size" and "at least 256" in str(e.value)
    c = load_corpus(DataConfig(corpus=str(folder), vocab_size=512), cache_dir=tmp_path / "c")
    assert c.vocab_size == 512


def test_seq_len_and_val_tokens_bounds(stdlib):
    n_val = len(stdlib.val)
    with pytest.raises(ConfigError) as e:
        validation_set(stdlib, seq_len=n_val, n_tokens=n_val)
    assert e.value.field == "train.seq_len" and f"{n_val:,}" in str(e.value)
    with pytest.raises(ConfigError) as e:
        validation_set(stdlib, seq_len=256, n_tokens=n_val + 256)  # more windows than the split holds
    assert e.value.field == "data.val_tokens"
    with pytest.raises(ConfigError) as e:
        validation_set(stdlib, seq_len=256, n_tokens=100)
    assert e.value.field == "data.val_tokens"
    with pytest.raises(ConfigError) as e:
        BatchSampler(stdlib, batch_size=2, seq_len=len(stdlib.train), seed=0)
    assert e.value.field == "train.seq_len"
    with pytest.raises(ConfigError) as e:
        BatchSampler(stdlib, batch_size=0, seq_len=8, seed=0)
    assert e.value.field == "batch_size"


# --- the default corpus ----------------------------------------------------------------------------

def test_stdlib_split_files_and_stream(stdlib):
    root = Path(data.sysconfig.get_paths()["stdlib"])
    ft, fv = stdlib.files_train, stdlib.files_val
    assert stdlib.kind == "stdlib" and stdlib.vocab_size == 256 and stdlib.train.dtype == np.uint8
    assert isinstance(stdlib.train, np.memmap)
    assert not set(ft) & set(fv)
    assert len(ft) > 300 and 5 <= len(fv) <= 0.15 * len(ft)
    assert list(ft) == sorted(ft) and list(fv) == sorted(fv)
    assert all(f.endswith(".py") for f in ft + fv)
    banned = {"test", "tests", "idle_test", "site-packages"}
    assert not any(banned & set(f.split("/")[:-1]) for f in ft + fv)
    assert "os.py" in ft + fv and "json/decoder.py" in ft + fv
    # the split rule: a file is in val exactly when its path hashes below val_fraction
    assert all(data._split_hash(f) < 0.05 for f in fv)
    assert all(data._split_hash(f) >= 0.05 for f in ft)
    # the token stream is the files' bytes, each followed by the separator, train then val
    assert SEPARATOR == 0 and stdlib.val[-1] == 0 and stdlib.train[-1] == 0
    sep = bytes([SEPARATOR])
    train = b"".join((root / f).read_bytes() + sep for f in ft)
    val = b"".join((root / f).read_bytes() + sep for f in fv)
    assert stdlib.train.tobytes() == train and stdlib.val.tobytes() == val
    assert stdlib.fingerprint == _stream_sha(train, val)


def test_split_is_stable_when_files_are_added(tmp_path, folder):
    a = load_corpus(DataConfig(corpus=str(folder), val_fraction=0.3), cache_dir=tmp_path / "c")
    assert a.files_val and a.files_train and a.n_files == 40
    for i in range(40, 60):
        (folder / f"new{i}.txt").write_text(f"new file {i}\n")
    b = load_corpus(DataConfig(corpus=str(folder), val_fraction=0.3), cache_dir=tmp_path / "c")
    assert b.n_files == 60
    assert set(a.files_val) <= set(b.files_val) and set(a.files_train) <= set(b.files_train)


def test_folder_rules_two_files_and_binary_files(tmp_path):
    root = tmp_path / "two"
    root.mkdir()
    (root / "a.txt").write_text("alpha text\n" * 20)
    (root / "b.md").write_text("beta text\n" * 20)
    (root / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    c = load_corpus(DataConfig(corpus=str(root), val_fraction=0.01), cache_dir=tmp_path / "c")
    assert sorted(c.files_train + c.files_val) == ["a.txt", "b.md"]
    assert len(c.files_train) == len(c.files_val) == 1  # at least one document on each side
    assert c.files_val == (min(["a.txt", "b.md"], key=data._split_hash),)


# --- cache and fingerprint -------------------------------------------------------------------------

def test_fingerprint_stable_across_builds_and_changes_with_source(tmp_path, folder):
    cfg = DataConfig(corpus=str(folder), val_fraction=0.2)
    a = load_corpus(cfg, cache_dir=tmp_path / "cache_a")
    b = load_corpus(cfg, cache_dir=tmp_path / "cache_b")
    assert a.fingerprint == b.fingerprint
    assert a.fingerprint == _stream_sha(np.asarray(a.train), np.asarray(a.val))
    assert a.cache_path.name == b.cache_path.name and a.cache_path.parent != b.cache_path.parent
    target = folder / a.files_train[0]
    target.write_text(target.read_text() + "one more line\n")
    c = load_corpus(cfg, cache_dir=tmp_path / "cache_a")
    assert c.fingerprint != a.fingerprint and c.cache_path != a.cache_path
    assert len(c.train) == len(a.train) + len("one more line\n")
    other = load_corpus(DataConfig(corpus=str(folder), val_fraction=0.4), cache_dir=tmp_path / "a")
    assert other.fingerprint != c.fingerprint


def test_cache_is_reused_and_damaged_cache_is_rebuilt(tmp_path, folder, monkeypatch):
    cfg = DataConfig(corpus=str(folder))
    first = load_corpus(cfg, cache_dir=tmp_path / "c")
    bins = sorted((tmp_path / "c").glob("*.bin"))
    assert [p.suffix for p in sorted((tmp_path / "c").iterdir())] == [".bin", ".json"]

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt a cached corpus")

    with monkeypatch.context() as m:
        m.setattr(data, "_join_docs", no_build)
        again = load_corpus(cfg, cache_dir=tmp_path / "c")
    assert again.fingerprint == first.fingerprint and np.array_equal(again.train, first.train)
    with open(bins[0], "r+b") as f:
        f.truncate(10)
    rebuilt = load_corpus(cfg, cache_dir=tmp_path / "c")
    assert rebuilt.fingerprint == first.fingerprint and bins[0].stat().st_size == first.n_tokens


def _race_worker(cache_dir: str, barrier, queue) -> None:
    publish = data._publish

    def gated(tmp: str, path: Path) -> None:
        if path.suffix == ".bin":
            barrier.wait(timeout=60)  # both processes have built before either publishes
        publish(tmp, path)

    data._publish = gated
    c = load_corpus(DataConfig(), cache_dir=cache_dir)
    queue.put((c.fingerprint, c.n_tokens, int(np.asarray(c.val, dtype=np.int64).sum())))


def test_two_processes_building_the_same_cache(tmp_path, stdlib):
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_race_worker, args=(str(tmp_path), barrier, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    expected = (stdlib.fingerprint, stdlib.n_tokens, int(np.asarray(stdlib.val, dtype=np.int64).sum()))
    assert results == [expected, expected]
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".bin", ".json"]  # no temp files left
    assert load_corpus(DataConfig(), cache_dir=tmp_path).fingerprint == stdlib.fingerprint


# --- token files and single files ------------------------------------------------------------------

@pytest.mark.parametrize("dtype, suffix", [("uint16", ".bin"), ("uint32", ".bin"),
                                           ("uint16", ".npy"), ("uint32", ".npy")])
def test_token_file_corpus(tmp_path, dtype, suffix):
    tokens, c = _arange_corpus(tmp_path, 10_000, dtype, suffix)
    assert c.kind == "tokens" and c.train.dtype == np.dtype(dtype)
    assert isinstance(c.train, np.memmap)
    assert (len(c.train), len(c.val)) == (9_000, 1_000)
    assert np.array_equal(c.train, tokens[:9_000]) and np.array_equal(c.val, tokens[9_000:])
    assert c.vocab_size == int(tokens.max()) + 1
    assert c.fingerprint == _stream_sha(tokens[:9_000], tokens[9_000:])
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".json"]


def test_token_fingerprint_ignores_storage_dtype(tmp_path):
    _, a = _arange_corpus(tmp_path, 5_000, "uint16")
    _, b = _arange_corpus(tmp_path, 5_000, "uint32")
    assert a.fingerprint == b.fingerprint


def test_single_text_file_is_split_by_position(tmp_path):
    path = tmp_path / "book.txt"
    text = "".join(f"line {i}\n" for i in range(1000)).encode()
    path.write_bytes(text)
    c = load_corpus(DataConfig(corpus=str(path), val_fraction=0.1), cache_dir=tmp_path / "c")
    stream = text + bytes([SEPARATOR])
    n_val = -(-len(stream) // 10)
    assert c.val.tobytes() == stream[-n_val:] and c.train.tobytes() == stream[:-n_val]
    assert c.files_train == c.files_val == ("book.txt",)


# --- sampling --------------------------------------------------------------------------------------

def test_batches_are_windows_of_the_train_split(tmp_path):
    tokens, c = _arange_corpus(tmp_path, 20_000, "uint32")
    x, y = next(BatchSampler(c, batch_size=8, seq_len=32, seed=0))
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == torch.int64
    train = torch.from_numpy(tokens[:18_000].astype(np.int64))
    for row_x, row_y in zip(x, y):
        start = int(np.flatnonzero(tokens[:18_000] == row_x[0].item())[0])
        assert torch.equal(row_x, train[start:start + 32])
        assert torch.equal(row_y, train[start + 1:start + 33])


def test_same_seed_same_batches_different_seed_different(stdlib):
    a = BatchSampler(stdlib, batch_size=4, seq_len=64, seed=7)
    b = BatchSampler(stdlib, batch_size=4, seq_len=64, seed=7)
    c = BatchSampler(stdlib, batch_size=4, seq_len=64, seed=8)
    for _ in range(5):
        (xa, ya), (xb, yb), (xc, _) = next(a), next(b), next(c)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert not torch.equal(xa, xc)
    assert a.step == 5
    assert not torch.equal(a.batch(0)[0], a.batch(1)[0])


def test_resume_from_state_dict_continues_identically(stdlib, tmp_path):
    a = BatchSampler(stdlib, batch_size=3, seq_len=16, seed=11)
    for _ in range(4):
        next(a)
    torch.save(a.state_dict(), tmp_path / "state.pt")
    expected = [next(a) for _ in range(5)]
    b = BatchSampler(stdlib, batch_size=3, seq_len=16, seed=11)
    b.load_state_dict(torch.load(tmp_path / "state.pt"))
    assert b.step == 4
    for (xe, ye), (xb, yb) in zip(expected, [next(b) for _ in range(5)]):
        assert torch.equal(xe, xb) and torch.equal(ye, yb)
    fresh = BatchSampler(stdlib, batch_size=3, seq_len=16, seed=11)
    assert not torch.equal(next(fresh)[0], expected[0][0])
    with pytest.raises(ValueError, match="batch_size"):
        BatchSampler(stdlib, batch_size=5, seq_len=16, seed=11).load_state_dict(a.state_dict())


def test_validation_set_is_fixed(stdlib, tmp_path):
    v = validation_set(stdlib, seq_len=128, n_tokens=4096)
    assert v.x.shape == v.y.shape == (32, 128) and v.n_tokens == 4096
    val = torch.from_numpy(np.asarray(stdlib.val, dtype=np.int64))
    assert torch.equal(v.x[0], val[:128]) and torch.equal(v.y[-1], val[-128:])
    assert torch.equal(v.x[:, 1:], v.y[:, :-1])
    step = (len(val) - 129) / 31  # 32 evenly spaced windows, spaced at least seq_len apart
    assert step >= 128
    for i in range(32):
        start = i * (len(val) - 129) // 31
        assert torch.equal(v.x[i], val[start:start + 128])
    # samplers with other seeds and batch sizes neither change nor affect it
    for seed, bs in ((0, 4), (99, 16)):
        s = BatchSampler(stdlib, batch_size=bs, seq_len=128, seed=seed)
        next(s)
        w = validation_set(stdlib, seq_len=128, n_tokens=4096)
        assert w.sha256 == v.sha256 and torch.equal(w.x, v.x)
        got = [x for x, _ in w.batches(bs)]
        assert torch.equal(torch.cat(got), v.x) and len(got) == -(-32 // bs)
    # an independent build in another cache gives the same tokens and hash
    other = load_corpus(DataConfig(), cache_dir=tmp_path)
    assert validation_set(other, seq_len=128, n_tokens=4096).sha256 == v.sha256
    assert validation_set(stdlib, seq_len=64, n_tokens=4096).sha256 != v.sha256
    h = hashlib.sha256(b"moue-val-v1 rows=32 seq_len=128\n")
    h.update(v.x.numpy().astype("<u4").tobytes())
    h.update(v.y[:, -1].numpy().astype("<u4").tobytes())
    assert v.sha256 == h.hexdigest()
