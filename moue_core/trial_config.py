"""A trial's typed configuration: ``TrialConfig`` = model + training + data (+ conversion source).

Pure Python (no torch): search spaces, spec loading and ``--dry-run`` import and validate trial
configs without it. Every config is frozen and validated in ``__post_init__``; a dict (TOML,
``--set``, Tune's config) becomes one at the edge, ``TrialConfig.from_dict``, with the one-line
``ConfigError`` of ``moue.fields`` for unknown keys, wrong types and out-of-range values.
Rules that involve two sections (context length against the RoPE table, widening against the
window) live in ``TrialConfig`` itself; nothing restates them elsewhere.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from moue.config import ModelConfig
from moue.counting import CONVENTION
from moue.errors import ConfigError
from moue.fields import build, choice, integer, is_int, number

__all__ = ["TrainConfig", "DataConfig", "ConvertConfig", "TrialConfig", "lr_at", "cooldown_lr", "SECTIONS", "SCHEDULES",
           "DEVICES", "ROUTER_INITS", "TOKEN_DTYPES", "CONVERTED_IN_TRIAL", "CORPUS_ALLOWED"]

SECTIONS = ("model", "train", "data", "convert")
SCHEDULES = ("cosine", "wsd")
DEVICES = ("auto", "cpu", "cuda")
COOLDOWN_SHAPES = ("linear", "1-sqrt")
ROUTER_INITS = ("zero", "copy")  # moue.convert.widen_layerwise
TOKEN_DTYPES = ("uint16", "uint32")
CONVERTED_IN_TRIAL = "layerwise base (converted in the trial)"  # train.init_from as logged before the worker converts
CORPUS_ALLOWED = "must be an existing file or folder, 'stdlib', or 'hf:<name>'"


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Optimisation and budget of one trial. Token counts are rounded to whole optimizer steps."""

    tokens: int = 1_000_000  # training budget
    batch_tokens: int = 8192  # tokens per optimizer step (batch size = batch_tokens / seq_len)
    seq_len: int = 128
    lr: float = 3e-3
    schedule: Literal["cosine", "wsd"] = "cosine"
    warmup_frac: float = 0.05
    decay_frac: float = 0.2  # wsd: final fraction of steps spent decaying
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every_tokens: int = 262_144  # report marks; a study sets it from each trial's budget and [budget] marks
    eval_batch: int = 32  # sequences per validation forward
    max_loss: float = 100.0  # a loss above this counts as divergence
    seed: int = 0  # model initialisation
    threads: int = 0  # intra-op threads (0: leave torch's default)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = False
    gpu_memory_fraction: float = 0.0  # CUDA: cap this process's share of the GPU (fractional trials); 0 = none
    init_from: str = ""  # a converted checkpoint (``moue convert``) to start from
    widen_tokens: int = 0  # converted models: tokens over which the window widens to model.window
    # wsd: cooldown branches (Hägele et al. 2024): at each of these token counts of the stable phase
    # a copy of the run decays to min_lr_ratio * lr over cooldown_frac of the tokens seen, and its
    # final validation loss is reported as the point (N, D = t * (1 + cooldown_frac)); the main
    # run continues unchanged (moue.train)
    cooldown_at: tuple[int, ...] = ()
    cooldown_frac: float = 0.2
    cooldown_shape: Literal["linear", "1-sqrt"] = "linear"

    def __post_init__(self) -> None:
        for name, low in (("tokens", 1), ("batch_tokens", 1), ("seq_len", 1), ("eval_every_tokens", 1),
                          ("eval_batch", 1), ("seed", 0), ("threads", 0), ("widen_tokens", 0)):
            integer(f"train.{name}", getattr(self, name), low)
        number("train.lr", self.lr, 0.0, open_low=True)
        for name in ("warmup_frac", "decay_frac", "min_lr_ratio", "beta1", "beta2", "gpu_memory_fraction"):
            number(f"train.{name}", getattr(self, name), 0.0, 1.0)
        for name in ("weight_decay", "grad_clip"):
            number(f"train.{name}", getattr(self, name), 0.0)
        number("train.max_loss", self.max_loss, 0.0, open_low=True)
        choice("train.schedule", self.schedule, SCHEDULES)
        choice("train.device", self.device, DEVICES)
        if self.batch_tokens % self.seq_len:
            raise ConfigError("train.batch_tokens", self.batch_tokens,
                              f"must be a multiple of train.seq_len ({self.seq_len})")
        if self.tokens < self.batch_tokens:
            raise ConfigError("train.tokens", self.tokens,
                              f"must be at least one step (train.batch_tokens = {self.batch_tokens})")
        if self.widen_tokens > self.tokens:
            raise ConfigError("train.widen_tokens", self.widen_tokens, f"must be <= train.tokens ({self.tokens})")
        self._check_cooldowns()
        if self.init_from and not Path(self.init_from).is_file():
            raise ConfigError("train.init_from", self.init_from, "must be an existing checkpoint file")

    def _check_cooldowns(self) -> None:
        number("train.cooldown_frac", self.cooldown_frac, 0.0, 1.0, open_low=True)
        choice("train.cooldown_shape", self.cooldown_shape, COOLDOWN_SHAPES)
        at = self.cooldown_at
        if not isinstance(at, tuple) or not all(is_int(t) for t in at):
            raise ConfigError("train.cooldown_at", at, "must be a list of token counts")
        if not at:
            return
        if self.schedule != "wsd":
            raise ConfigError("train.cooldown_at", list(at), "needs train.schedule = 'wsd' (a constant-LR phase to branch from)")
        steps = self.tokens // self.batch_tokens
        lo = max(1, int(self.warmup_frac * steps)) * self.batch_tokens
        hi = (steps - int(self.decay_frac * steps)) * self.batch_tokens
        for t in at:
            if not lo <= t <= hi:
                raise ConfigError("train.cooldown_at", t, f"must be in the stable phase, [{lo}, {hi}] tokens "
                                  "(after warm-up, before the final decay)")
        if list(at) != sorted(set(at)):
            raise ConfigError("train.cooldown_at", list(at), "must be increasing without repeats")

    @property
    def steps(self) -> int:
        return self.tokens // self.batch_tokens

    @property
    def batch_size(self) -> int:
        return self.batch_tokens // self.seq_len

    @property
    def eval_every_steps(self) -> int:
        return max(1, self.eval_every_tokens // self.batch_tokens)


def cooldown_lr(i: int, steps: int, peak: float, floor: float, shape: str) -> float:
    """Learning rate at step ``i`` (0-based) of a cooldown of ``steps`` steps from ``peak`` to
    ``floor``: linear, or ``1-sqrt`` (Hägele et al. 2024: ``peak - (peak - floor) sqrt(p)``)."""
    p = (i + 1) / steps
    return peak - (peak - floor) * (math.sqrt(p) if shape == "1-sqrt" else p)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate at optimizer step ``step`` (0-based): linear warm-up, then cosine to
    ``min_lr_ratio * lr``, or warm-up-stable-decay (constant, then linear decay over the last
    ``decay_frac`` of the steps)."""
    total = cfg.steps
    warmup = int(cfg.warmup_frac * total)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    floor = cfg.min_lr_ratio * cfg.lr
    if cfg.schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    decay = int(cfg.decay_frac * total)
    start = total - decay
    if step < start:
        return cfg.lr
    return cfg.lr - (cfg.lr - floor) * (step - start + 1) / max(1, decay)


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Which corpus, how it is split, and the batch-order seed (the sources: ``moue.data``).

    ``corpus`` paths are made absolute here (trials may run in another working directory).
    ``seed`` only orders training batches; the split and the validation set never depend on it.
    ``vocab_size``: ``None`` derives it (256 for bytes, largest token + 1 for token files); a number
    must be at least that.
    """

    corpus: str = "stdlib"
    token_dtype: str = "uint16"  # for *.bin token files; *.npy files carry their own dtype
    val_fraction: float = 0.05
    val_tokens: int = 65536  # tokens in the fixed validation set
    seed: int = 0
    vocab_size: int | None = None

    def __post_init__(self) -> None:
        c = self.corpus
        if not isinstance(c, str) or not c.strip():
            raise ConfigError("data.corpus", c, CORPUS_ALLOWED)
        if c.startswith("hf:"):
            if not c[3:].strip():
                raise ConfigError("data.corpus", c, "needs a dataset name after 'hf:'")
        elif c != "stdlib":
            path = Path(c).expanduser()
            if not path.exists():
                raise ConfigError("data.corpus", c, CORPUS_ALLOWED)
            object.__setattr__(self, "corpus", str(path.resolve()))
        if self.token_dtype not in TOKEN_DTYPES:
            raise ConfigError("data.token_dtype", self.token_dtype, f"must be one of {TOKEN_DTYPES}")
        v = self.val_fraction
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 0.5:
            raise ConfigError("data.val_fraction", v, "must be a number in (0, 0.5]")
        integer("data.val_tokens", self.val_tokens, 1)
        integer("data.seed", self.seed, 0)
        if self.vocab_size is not None:
            v = self.vocab_size
            if not is_int(v) or v < 2:
                raise ConfigError("data.vocab_size", v, "must be an integer >= 2, or unset to derive it")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DataConfig:
        """Build from a plain dict (TOML, Ray); unknown keys are an error naming the key."""
        return build(cls, "data", values)


@dataclass(frozen=True, kw_only=True)
class ConvertConfig:
    """The trial starts from its study's layerwise base, converted to this model's ring and widened
    to ``model.window`` (``moue.convert.widen_layerwise``); the worker writes that checkpoint
    and sets ``train.init_from`` to it. ``router_init``: the new window rows of each layer's router
    start at zero or copied from the expert's owner layer."""

    router_init: str = "zero"

    def __post_init__(self) -> None:
        choice("convert.router_init", self.router_init, ROUTER_INITS)


@dataclass(frozen=True, kw_only=True)
class TrialConfig:
    """Everything one trial needs: the model, its training, its data, and (conversion trials) where
    its weights come from."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    convert: ConvertConfig | None = None

    def __post_init__(self) -> None:
        if self.train.seq_len > self.model.max_seq_len:
            raise ConfigError("train.seq_len", self.train.seq_len,
                              f"must be <= model.max_seq_len ({self.model.max_seq_len})")
        if self.train.widen_tokens:
            if self.model.ffn != "moe" or self.model.window <= self.model.top_k:
                raise ConfigError("train.widen_tokens", self.train.widen_tokens,
                                  "needs a window to widen (model.window > model.top_k)")
            if not self.train.init_from and self.convert is None:
                raise ConfigError("train.widen_tokens", self.train.widen_tokens,
                                  "needs train.init_from (a converted model)")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrialConfig:
        """From nested sections (``{"model": {...}, ...}``) and/or flat dotted keys
        (``{"model.pool_size": 32}``): TOML files, ``--set`` overrides and Ray's configs."""
        sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        for key, value in values.items():
            if key in sections and isinstance(value, dict):
                sections[key].update(value)
                continue
            head, _, rest = key.partition(".")
            if head not in sections or not rest:
                raise ConfigError(key, value, f"is not a setting; use {', '.join(s + '.*' for s in SECTIONS)}")
            sections[head][rest] = value
        return cls(model=ModelConfig.from_dict(sections["model"]), train=build(TrainConfig, "train", sections["train"]),
                   data=DataConfig.from_dict(sections["data"]),
                   convert=build(ConvertConfig, "convert", sections["convert"]) if sections["convert"] else None)

    def resolved(self, init_from: str) -> TrialConfig:
        """This conversion trial with its converted checkpoint written (``init_from``)."""
        return dataclasses.replace(self, train=dataclasses.replace(self.train, init_from=init_from))

    def to_flat(self) -> dict[str, Any]:
        """Flat dotted keys with JSON-able values, as logged to MLflow (``tracking_contract``)."""
        out: dict[str, Any] = {}
        for name in SECTIONS:
            section = getattr(self, name)
            if section is None:
                continue
            for key, value in dataclasses.asdict(section).items():
                out[f"{name}.{key}"] = list(value) if isinstance(value, tuple) else value
        if self.convert is not None and not self.train.init_from:
            out["train.init_from"] = CONVERTED_IN_TRIAL
        out["count.convention"] = CONVENTION
        return out
