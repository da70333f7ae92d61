"""Corpora: where tokens come from, how they are split, cached, fingerprinted and sampled.

Four sources, chosen by ``DataConfig.corpus``:

- ``"stdlib"`` (default, no download): the running interpreter's standard-library ``.py`` files
  (``sysconfig.get_paths()["stdlib"]``), sorted by relative path, with every folder named ``test``,
  ``tests``, ``idle_test``, ``site-packages`` or ``__pycache__`` left out.
- a text file or a folder. A folder means every non-hidden regular file below it, at any depth,
  sorted by relative POSIX path; files that contain a NUL byte are taken as binary and skipped
  (the rule ``git`` uses), so the separator below never occurs inside a document. Empty files are
  skipped everywhere; a single named file is read as it is.
- a pre-tokenised token file: ``*.bin`` (raw little-endian tokens of ``DataConfig.token_dtype``) or
  ``*.npy`` (a 1-D ``uint16``/``uint32`` array; its own dtype is used). Memory-mapped, never copied.
- ``"hf:<name>"``: the ``train`` split of a Hugging Face dataset (optional extra ``moue[hf]``),
  one document per row of its ``text`` column (else its first string column).

Text is tokenised as bytes (vocabulary 256); every document is followed by one separator byte
``SEPARATOR`` (0). Split: a document goes to validation when
``sha256("moue-split-v1:" + relative path)``, read as a fraction in [0, 1), is below
``val_fraction``, so adding or removing a file never moves another file across the split; at least
one document lands on each side. A single text file or a token file is split by position instead:
the last ``val_fraction`` of its tokens is the validation split.

Cache (``cache_dir``, the workspace's ``cache/``): ``<kind>-<key>.bin`` holds the train tokens
then the validation tokens; ``<kind>-<key>.json`` next to it holds the split point, the file lists
and the fingerprint. ``key`` hashes the source description (paths, sizes, mtimes), the tokenizer,
the split rule and ``val_fraction``. Both files are written to a temporary name in the same folder
and moved into place with ``os.replace``, the ``.json`` last: a reader either sees a complete cache
or none, and two processes building the same cache at once both succeed with identical files.
Token files need no ``.bin``; only their ``.json`` (fingerprint, largest token) is cached.

Fingerprint: ``sha256(f"moue-corpus-v1 train={n_train} val={n_val}\\n" + train + val)`` with every
token written as a little-endian ``uint32``, so it names the token stream and the split, not the
storage dtype.

Batches: ``BatchSampler`` is counter-based. Batch ``i`` takes its window starts from
``numpy.random.default_rng([seed, i])`` (PCG64 seeded from a SeedSequence of the seed and the
counter), so batch ``i`` is a pure function of ``(corpus, seed, i, batch_size, seq_len)`` and resuming
needs only the counter (``state_dict``). The validation set (``validation_set``) is a fixed set of
evenly spaced windows over the validation split: it depends on the corpus, ``seq_len`` and the token
count only, never on a seed, a batch size or the model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import socket
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moue.errors import ConfigError
from moue.fields import is_int
from moue.trial_config import CORPUS_ALLOWED, TOKEN_DTYPES, DataConfig

__all__ = ["DataConfig", "Corpus", "load_corpus", "BatchSampler", "ValidationSet",
           "validation_set", "SEPARATOR"]

SEPARATOR = 0  # byte that follows every document of a text corpus
TOKENIZER = "bytes-v1"
SPLIT_RULE = "moue-split-v1"
TOKEN_SUFFIXES = (".bin", ".npy")
STDLIB_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})
_CHUNK = 1 << 24  # tokens per hashing chunk


@dataclass(frozen=True, eq=False)
class Corpus:
    """A tokenised, split corpus. ``train``/``val`` are 1-D (usually memory-mapped) arrays."""

    kind: str  # "stdlib", "text", "tokens" or "hf"
    train: np.ndarray
    val: np.ndarray
    fingerprint: str  # sha256 of the token stream (module docstring)
    vocab_size: int
    files_train: tuple[str, ...]  # relative paths (documents, for text corpora)
    files_val: tuple[str, ...]
    description: str
    cache_path: Path | None  # the .json metadata file

    @property
    def n_files(self) -> int:
        return len(self.files_train) + len(self.files_val)

    @property
    def n_tokens(self) -> int:
        return len(self.train) + len(self.val)


def load_corpus(cfg: DataConfig, *, cache_dir: str | os.PathLike[str]) -> Corpus:
    """The corpus ``cfg`` names, tokenised once into ``cache_dir`` and memory-mapped from there."""
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    if cfg.corpus == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        files = _list_files(root, suffix=".py", excluded_dirs=STDLIB_EXCLUDED_DIRS)
        name = f"Python {sys.version.split()[0]} standard library ({root})"
        corpus = _text_corpus(cfg, cache, "stdlib", name, root, files)
    elif cfg.corpus.startswith("hf:"):
        corpus = _hf_corpus(cfg, cache)
    else:
        path = Path(cfg.corpus)
        if not path.exists():
            raise ConfigError("data.corpus", cfg.corpus, CORPUS_ALLOWED)
        if path.is_file() and path.suffix in TOKEN_SUFFIXES:
            corpus = _token_file_corpus(cfg, cache, path)
        elif path.is_file():
            corpus = _text_corpus(cfg, cache, "text", str(path), path.parent, [path.name],
                                  skip_binary=False)
        else:
            files = _list_files(path, suffix="", excluded_dirs=frozenset())
            corpus = _text_corpus(cfg, cache, "text", str(path), path, files)
    if cfg.vocab_size is not None:
        if cfg.vocab_size < corpus.vocab_size:
            raise ConfigError("data.vocab_size", cfg.vocab_size,
                              f"must be at least {corpus.vocab_size} for this corpus")
        corpus = dataclasses.replace(corpus, vocab_size=cfg.vocab_size)
    return corpus


# --- text corpora --------------------------------------------------------------------------------

def _list_files(root: Path, *, suffix: str, excluded_dirs: frozenset[str]) -> list[str]:
    """Sorted relative POSIX paths of the non-hidden regular files below ``root``."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in excluded_dirs]
        for f in filenames:
            p = Path(dirpath, f)
            if not f.startswith(".") and f.endswith(suffix) and p.is_file():
                found.append(p.relative_to(root).as_posix())
    return sorted(found)


def _split_hash(doc: str) -> float:
    """Where ``doc`` falls in [0, 1) under the split rule; below ``val_fraction`` means validation."""
    digest = hashlib.sha256(f"{SPLIT_RULE}:{doc}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _split_docs(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Hash split of two or more documents, keeping at least one on each side: when no document
    falls below ``val_fraction`` the lowest goes to validation; when all do, the highest to train."""
    val = [d for d in docs if _split_hash(d) < val_fraction]
    if not val:
        val = [min(docs, key=_split_hash)]
    elif len(val) == len(docs):
        val.remove(max(docs, key=_split_hash))
    chosen = set(val)
    return [d for d in docs if d not in chosen], val


def _join_docs(cfg: DataConfig, docs: dict[str, bytes]) -> tuple[np.ndarray, int, dict[str, Any]]:
    """The byte stream (train documents, then validation documents, each followed by
    ``SEPARATOR``), the split point and the document lists. One document is split by position."""
    if not docs:
        raise ConfigError("data.corpus", cfg.corpus, "contains no non-empty text documents")
    sep = bytes([SEPARATOR])
    if len(docs) == 1:
        (doc, data), = docs.items()
        stream = np.frombuffer(data + sep, dtype=np.uint8)
        n_train = len(stream) - max(2, math.ceil(len(stream) * cfg.val_fraction))
        if n_train < 2:
            raise ConfigError("data.corpus", cfg.corpus, "is too short to split (under 4 bytes)")
        return stream, n_train, {"files_train": [doc], "files_val": [doc]}
    train, val = _split_docs(list(docs), cfg.val_fraction)
    blob_train = b"".join(docs[d] + sep for d in train)
    blob_val = b"".join(docs[d] + sep for d in val)
    stream = np.frombuffer(blob_train + blob_val, dtype=np.uint8)
    return stream, len(blob_train), {"files_train": train, "files_val": val}


def _text_corpus(cfg: DataConfig, cache: Path, kind: str, name: str, root: Path,
                 files: list[str], *, skip_binary: bool = True) -> Corpus:
    if not files:
        raise ConfigError("data.corpus", cfg.corpus, "contains no files to read")
    stats = [(f, st.st_size, st.st_mtime_ns) for f in files for st in [(root / f).stat()]]
    source = {"kind": kind, "root": str(root), "files": stats}
    stem = f"{kind}-{_key(source, cfg.val_fraction)}"

    def build() -> tuple[np.ndarray, int, dict[str, Any]]:
        docs = {f: data for f in files for data in [(root / f).read_bytes()]
                if data and not (skip_binary and b"\0" in data)}
        return _join_docs(cfg, docs)

    meta, tokens = _cached(cache, stem, build)
    n_train = meta["n_train"]
    ft, fv = tuple(meta["files_train"]), tuple(meta["files_val"])
    shown = f"{len(ft)} train / {len(fv)} val files" if ft != fv else "1 file split by position"
    return Corpus(kind=kind, train=tokens[:n_train], val=tokens[n_train:],
                  fingerprint=meta["fingerprint"], vocab_size=256, files_train=ft, files_val=fv,
                  description=f"{kind}: {name}, {shown}, {n_train:,} train / "
                              f"{len(tokens) - n_train:,} val byte tokens",
                  cache_path=cache / f"{stem}.json")


def _hf_corpus(cfg: DataConfig, cache: Path) -> Corpus:
    """The train split of a Hugging Face dataset, one document per row (optional extra)."""
    name = cfg.corpus[3:].strip()
    offline = any(os.environ.get(v) for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if not offline and not any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy")):
        try:  # without this probe an unreachable hub can stall for minutes in retries
            socket.create_connection(("huggingface.co", 443), timeout=3).close()
        except OSError:
            os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
            offline = True
    try:
        import datasets
    except ImportError:
        raise ConfigError("data.corpus", cfg.corpus,
                          "needs the optional extra: pip install 'moue[hf]'") from None
    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as e:  # the hub raises many types; all mean "cannot load this name here"
        where = "offline and not in the local cache" if offline else "could not be loaded"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError("data.corpus", cfg.corpus, f"{where}: {first}") from None
    columns = [c for c, f in ds.features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
    if not columns:
        raise ConfigError("data.corpus", cfg.corpus, "has no string column to read text from")
    column = "text" if "text" in columns else columns[0]
    source = {"kind": "hf", "name": name, "column": column, "rows": len(ds),
              "fingerprint": getattr(ds, "_fingerprint", None)}
    stem = f"hf-{_key(source, cfg.val_fraction)}"

    def build() -> tuple[np.ndarray, int, dict[str, Any]]:
        return _join_docs(cfg, {str(i): t.encode() for i, t in enumerate(ds[column]) if t})

    meta, tokens = _cached(cache, stem, build)
    n_train = meta["n_train"]
    return Corpus(kind="hf", train=tokens[:n_train], val=tokens[n_train:],
                  fingerprint=meta["fingerprint"], vocab_size=256,
                  files_train=tuple(meta["files_train"]), files_val=tuple(meta["files_val"]),
                  description=f"hf: {name} (column {column!r}), {len(ds):,} rows, {n_train:,} "
                              f"train / {len(tokens) - n_train:,} val byte tokens",
                  cache_path=cache / f"{stem}.json")


# --- token files ---------------------------------------------------------------------------------

def _token_file_corpus(cfg: DataConfig, cache: Path, path: Path) -> Corpus:
    if path.suffix == ".npy":
        tokens = np.load(path, mmap_mode="r")
        if tokens.ndim != 1 or tokens.dtype not in (np.uint16, np.uint32):
            raise ConfigError("data.corpus", str(path),
                              f"must hold a 1-D uint16 or uint32 array, not {tokens.dtype} {tokens.shape}")
    else:
        dtype = np.dtype(cfg.token_dtype).newbyteorder("<")
        size = path.stat().st_size
        if size == 0 or size % dtype.itemsize:
            raise ConfigError("data.token_dtype", cfg.token_dtype,
                              f"does not fit {path} ({size} bytes, not a positive multiple of "
                              f"{dtype.itemsize}); allowed: {TOKEN_DTYPES}")
        tokens = np.memmap(path, dtype=dtype, mode="r")
    n_val = max(2, math.ceil(len(tokens) * cfg.val_fraction))
    n_train = len(tokens) - n_val
    if n_train < 2:
        raise ConfigError("data.corpus", str(path), "is too short to split (under 4 tokens)")
    st = path.stat()
    source = {"kind": "tokens", "path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
              "dtype": str(tokens.dtype)}
    stem = f"tokens-{_key(source, cfg.val_fraction)}"
    meta_path = cache / f"{stem}.json"
    meta = _read_json(meta_path)
    if meta is None or meta.get("n_train") != n_train:
        fingerprint, largest = _fingerprint(tokens, n_train)
        meta = {"source": source, "n_train": n_train, "fingerprint": fingerprint, "max_token": largest}
        _write_atomic(meta_path, json.dumps(meta, indent=1).encode())
    return Corpus(kind="tokens", train=tokens[:n_train], val=tokens[n_train:],
                  fingerprint=meta["fingerprint"], vocab_size=meta["max_token"] + 1,
                  files_train=(path.name,), files_val=(path.name,),
                  description=f"tokens: {path} ({tokens.dtype}), {n_train:,} train / "
                              f"{n_val:,} val tokens",
                  cache_path=meta_path)


# --- cache and fingerprint -----------------------------------------------------------------------

def _key(source: dict[str, Any], val_fraction: float) -> str:
    described = {"source": source, "tokenizer": TOKENIZER, "separator": SEPARATOR,
                 "split": SPLIT_RULE, "val_fraction": val_fraction}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:20]


def _fingerprint(tokens: np.ndarray, n_train: int) -> tuple[str, int]:
    """sha256 of the stream as little-endian uint32 (framing in the module docstring); max token."""
    h = hashlib.sha256(f"moue-corpus-v1 train={n_train} val={len(tokens) - n_train}\n".encode())
    largest = 0
    for part in (tokens[:n_train], tokens[n_train:]):
        for i in range(0, len(part), _CHUNK):
            chunk = np.asarray(part[i:i + _CHUNK])
            h.update(chunk.astype("<u4").tobytes())
            largest = max(largest, int(chunk.max()))
    return h.hexdigest(), largest


def _write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then ``os.replace`` it onto ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _publish(tmp: str, path: Path) -> None:
    os.replace(tmp, path)  # atomic on POSIX and Windows within one filesystem


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _cached(cache: Path, stem: str, build) -> tuple[dict[str, Any], np.ndarray]:
    """Metadata and memory-mapped tokens of ``stem``, building them first when absent or damaged."""
    bin_path, meta_path = cache / f"{stem}.bin", cache / f"{stem}.json"
    meta = _read_json(meta_path)
    if meta is not None and bin_path.exists():
        dtype = np.dtype(meta["dtype"])
        if bin_path.stat().st_size == meta["n_tokens"] * dtype.itemsize:
            return meta, np.memmap(bin_path, dtype=dtype, mode="r")
    stream, n_train, extra = build()
    fingerprint, _ = _fingerprint(stream, n_train)
    meta = {"n_train": n_train, "n_tokens": len(stream), "dtype": stream.dtype.str,
            "fingerprint": fingerprint, "tokenizer": TOKENIZER, **extra}
    _write_atomic(bin_path, stream.tobytes())
    _write_atomic(meta_path, json.dumps(meta, indent=1).encode())  # last: marks the cache complete
    return meta, np.memmap(bin_path, dtype=stream.dtype, mode="r")


# --- sampling ------------------------------------------------------------------------------------

def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64)
    return torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy())


class BatchSampler:
    """Seeded random training windows: ``next(sampler)`` is ``(x, y)``, int64 ``[batch, seq_len]``.

    Counter-based: batch ``i`` depends only on ``(corpus, seed, i, batch_size, seq_len)``, so
    ``state_dict()`` is the counter and a resumed sampler continues with identical batches.
    """

    def __init__(self, corpus: Corpus, *, batch_size: int, seq_len: int, seed: int) -> None:
        for name, v in (("batch_size", batch_size), ("train.seq_len", seq_len)):
            if not is_int(v) or v < 1:
                raise ConfigError(name, v, "must be an integer >= 1")
        if not is_int(seed) or seed < 0:
            raise ConfigError("data.seed", seed, "must be an integer >= 0")
        if seq_len + 1 > len(corpus.train):
            raise ConfigError("train.seq_len", seq_len,
                              f"must be below the train split's {len(corpus.train):,} tokens")
        self.corpus, self.batch_size, self.seq_len, self.seed = corpus, batch_size, seq_len, seed
        self.step = 0  # batches drawn so far; the next batch is batch(self.step)

    def batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch number ``i`` of this sampler's stream (pure: does not move the counter)."""
        rng = np.random.default_rng([self.seed, i])
        starts = rng.integers(0, len(self.corpus.train) - self.seq_len, size=self.batch_size)
        return _windows(self.corpus.train, starts, self.seq_len)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.batch(self.step)
        self.step += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, "step": self.step, "seed": self.seed, "batch_size": self.batch_size,
                "seq_len": self.seq_len, "corpus": self.corpus.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state["step"]``; the rest of ``state`` must match this sampler."""
        mine = self.state_dict()
        for k in ("version", "seed", "batch_size", "seq_len", "corpus"):
            if state.get(k) != mine[k]:
                raise ValueError(f"sampler state has {k}={state.get(k)!r}, this sampler {mine[k]!r}")
        self.step = int(state["step"])


@dataclass(frozen=True, eq=False)
class ValidationSet:
    """The fixed validation windows: ``x``, ``y`` int64 ``[n, seq_len]`` and their sha256."""

    x: torch.Tensor
    y: torch.Tensor
    sha256: str

    @property
    def n_tokens(self) -> int:
        return self.x.numel()

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not is_int(batch_size) or batch_size < 1:
            raise ConfigError("batch_size", batch_size, "must be an integer >= 1")
        for i in range(0, len(self.x), batch_size):
            yield self.x[i:i + batch_size], self.y[i:i + batch_size]


def validation_set(corpus: Corpus, *, seq_len: int, n_tokens: int) -> ValidationSet:
    """``n_tokens // seq_len`` windows at evenly spaced, non-overlapping starts over the validation
    split (first window at its start, last at its end). No seed: every trial of a study with the
    same corpus and ``seq_len`` is evaluated on exactly these tokens."""
    if not is_int(seq_len) or seq_len < 1:
        raise ConfigError("train.seq_len", seq_len, "must be an integer >= 1")
    n_val = len(corpus.val)
    if seq_len + 1 > n_val:
        raise ConfigError("train.seq_len", seq_len,
                          f"must be below the validation split's {n_val:,} tokens "
                          f"(raise data.val_fraction)")
    if not is_int(n_tokens) or n_tokens < seq_len:
        raise ConfigError("data.val_tokens", n_tokens, f"must be an integer >= train.seq_len ({seq_len})")
    rows = n_tokens // seq_len
    if rows * seq_len + 1 > n_val:
        raise ConfigError("data.val_tokens", n_tokens,
                          f"must be at most {n_val - 1:,}, the validation split's size "
                          f"(raise data.val_fraction or lower data.val_tokens)")
    starts = (np.arange(rows, dtype=np.int64) * (n_val - seq_len - 1)) // max(rows - 1, 1)
    x, y = _windows(corpus.val, starts, seq_len)
    h = hashlib.sha256(f"moue-val-v1 rows={rows} seq_len={seq_len}\n".encode())
    h.update(x.numpy().astype("<u4").tobytes())
    h.update(y[:, -1].numpy().astype("<u4").tobytes())
    return ValidationSet(x=x, y=y, sha256=h.hexdigest())
