"""One trial for real: training on the default corpus, resume, divergence, schedules, `moue train`."""

from __future__ import annotations

import math

import pytest
import torch
from typer.testing import CliRunner

from moue import LayerwiseMoEModel, ModelConfig, layerwise_config
from moue.errors import ConfigError
from moue.train import NullSink, TrainConfig, TrialConfig, lr_at, train
from moue.studies.cli import app
from moue.studies.trial import load_checkpoint, load_trial, parse_override, save_checkpoint

TINY_MODEL = dict(vocab_size=256, d_model=64, n_layers=2, n_heads=2, max_seq_len=64, expert_hidden=64)
TINY_TRAIN = dict(tokens=98_304, batch_tokens=2048, seq_len=64, lr=4e-3, eval_every_tokens=24_576, eval_batch=64)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def tiny(model: dict | None = None, train_: dict | None = None, data: dict | None = None) -> TrialConfig:
    return TrialConfig.from_dict({
        "model": {**TINY_MODEL, **(model or {})},
        "train": {**TINY_TRAIN, **(train_ or {})},
        "data": {"val_tokens": 8192, **(data or {})},
    })


ARCHITECTURES = {
    "dense": dict(ffn="dense", dense_hidden=128),
    "layerwise": dict(pool_size=8, window=4, stride=4),
    "unipool": dict(pool_size=6, window=6, stride=0, router="norm", balance="pool"),
    "moue-rotational": dict(pool_size=6, window=4, stride=2, router="trajectory", router_state_dim=16,
                            balance="exposure"),
}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_validation_loss_falls_on_the_default_corpus(arch: str, cache_dir) -> None:
    sink = NullSink()
    result = train(tiny(ARCHITECTURES[arch]), sink, cache_dir=cache_dir)
    assert result.status == "finished"
    vals = [m["val/loss"] for _, m in sink.reports if "val/loss" in m]
    steps = [s for s, m in sink.reports if "val/loss" in m]
    assert steps == [0, 24_576, 49_152, 73_728, 98_304] and len(sink.reports) == 5
    assert vals[0] == pytest.approx(math.log(256), abs=0.1)  # untrained: uniform over bytes
    assert vals[-1] < vals[0] - 1.5, vals  # a real drop, not noise
    assert result.final_val_loss == vals[-1]
    final = sink.reports[-1][1]
    assert final["status"] == "finished" and final["final/tokens"] == 98_304
    assert final["final/flops"] == result.counts.flops_per_token * 98_304
    assert final["final/train_s"] <= final["final/wall_s"]
    mid = sink.reports[2][1]
    assert {"train/loss", "grad_norm", "lr", "tokens_per_s"} <= set(mid)
    if arch != "dense":
        assert {"balance/loss", "balance/load_cv", "balance/dead_frac", "router/entropy", "router/z"} <= set(mid)
        assert 0 <= mid["balance/dead_frac"] <= 1


class _Killed(Exception):
    pass


class KillAfter(NullSink):
    """Records like NullSink, then 'crashes' right after persisting the checkpoint at ``tokens``."""

    def __init__(self, tokens: int) -> None:
        super().__init__()
        self.tokens = tokens

    def report(self, mark) -> None:
        super().report(mark)
        if mark.tokens == self.tokens and mark.checkpoint is not None:
            raise _Killed


@pytest.mark.parametrize("arch", ["moue-rotational", "unipool"])
def test_stopped_and_resumed_run_reproduces_the_loss_curve(arch: str, cache_dir, tmp_path) -> None:
    model = dict(ARCHITECTURES[arch], expert_bias=True) if arch == "unipool" else ARCHITECTURES[arch]
    cfg = tiny(model, dict(tokens=49_152, eval_every_tokens=8192))
    straight = NullSink()
    train(cfg, straight, cache_dir=cache_dir)

    first = KillAfter(24_576)
    with pytest.raises(_Killed):
        train(cfg, first, cache_dir=cache_dir)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, first.checkpoints[-1][1])  # through disk, loaded with weights_only=True
    second = NullSink()
    train(cfg, second, cache_dir=cache_dir, resume=load_checkpoint(path))

    combined = first.reports + second.reports
    assert [s for s, _ in combined] == [s for s, _ in straight.reports]
    for (_, a), (_, b) in zip(straight.reports, combined):
        for key in ("val/loss", "train/loss", "grad_norm", "balance/loss", "router/z"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-6, rel=0), key
    assert second.reports[-1][1]["final/val_loss"] == pytest.approx(straight.reports[-1][1]["final/val_loss"], abs=1e-6)


def test_absurd_learning_rate_is_detected_as_divergence(cache_dir) -> None:
    sink = NullSink()
    result = train(tiny(ARCHITECTURES["layerwise"], dict(lr=1e4, warmup_frac=0.0, grad_clip=0.0)), sink,
                   cache_dir=cache_dir)
    assert result.status == "diverged"
    assert result.final_val_loss is None
    assert result.tokens <= 5 * 2048, "detected within a few steps"
    assert ("loss" in result.stop_reason or "gradient" in result.stop_reason) and "step" in result.stop_reason
    last = sink.reports[-1][1]
    assert last["status"] == "diverged" and last["stop_reason"] == result.stop_reason
    assert not any(k.startswith("final/") for _, m in sink.reports for k in m)


def test_validation_set_is_the_same_across_trials(cache_dir) -> None:
    a = train(tiny(ARCHITECTURES["dense"], dict(tokens=2048, seed=1)), None, cache_dir=cache_dir)
    b = train(tiny(ARCHITECTURES["layerwise"], dict(tokens=4096, seed=2), dict(seed=7)), None, cache_dir=cache_dir)
    assert a.val_sha256 == b.val_sha256
    assert a.corpus_fingerprint == b.corpus_fingerprint


def test_expert_bias_moves_during_training(cache_dir) -> None:
    cfg = tiny(dict(ARCHITECTURES["layerwise"], expert_bias=True), dict(tokens=8192))
    sink = NullSink()
    train(cfg, sink, cache_dir=cache_dir)
    bias = sink.checkpoints[-1][1]["model"]["moe.router.bias_LW"]
    assert bias.abs().max() > 0
    # 4 steps of sign updates: every entry is a whole multiple of the rate, at most 4 of them
    units = bias / 1e-3
    assert torch.allclose(units, units.round(), atol=1e-4) and units.abs().max() <= 4 + 1e-4


def test_converted_model_widens_its_window_during_training(cache_dir, tmp_path) -> None:
    from moue import convert_layerwise

    base = ModelConfig(**TINY_MODEL, pool_size=8, window=4, stride=4)
    src_cfg = layerwise_config(base, 4)
    cfg, state = convert_layerwise(LayerwiseMoEModel(src_cfg).state_dict(), src_cfg, target_window=8)
    path = tmp_path / "converted.pt"
    torch.save({"config": cfg.to_dict(), "model": state, "start_window": 4}, path)
    trial = TrialConfig.from_dict({"model": cfg.to_dict(), "train": {**TINY_TRAIN, "tokens": 8192,
                                   "init_from": str(path), "widen_tokens": 4096}, "data": {"val_tokens": 8192}})
    windows = []
    import moue.moe as moe_mod

    original = moe_mod.MoE.set_window

    def spy(self, w):
        windows.append(w)
        original(self, w)

    moe_mod.MoE.set_window = spy
    try:
        result = train(trial, None, cache_dir=cache_dir)
    finally:
        moe_mod.MoE.set_window = original
    assert result.status == "finished"
    assert windows == [4, 4, 6, 8, 8]  # the start (first mark's evaluation), then 4 steps widening over 2


def test_lr_schedules() -> None:
    cos = TrainConfig(tokens=100 * 1024, batch_tokens=1024, seq_len=64, lr=1.0, warmup_frac=0.1, min_lr_ratio=0.1)
    lrs = [lr_at(s, cos) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert max(lrs) == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    wsd = TrainConfig(tokens=100 * 1024, batch_tokens=1024, seq_len=64, lr=1.0, schedule="wsd",
                      warmup_frac=0.1, decay_frac=0.2, min_lr_ratio=0.0)
    lrs = [lr_at(s, wsd) for s in range(100)]
    assert lrs[10:80] == [1.0] * 70
    assert lrs[-1] == pytest.approx(0.0) and lrs[90] == pytest.approx(0.45)


def test_param_groups_exclude_norms_and_embedding_from_decay() -> None:
    from moue import MoUEModel
    from moue.train import _param_groups

    model = MoUEModel(ModelConfig(**TINY_MODEL, pool_size=4, window=4, stride=0, router="norm"))
    decay, no_decay = _param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    assert "embed.weight" in nd and "norm.weight" in nd and "moe.router.sigma" in nd
    assert "blocks.0.attn_norm.weight" in nd
    d = {names[id(p)] for p in decay["params"]}
    assert {"moe.pool.w_in_PDF2", "lm_head.weight", "blocks.0.attn.qkv.weight"} <= d
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


# ------------------------------------------------------------------------------ bad input

BAD = [
    (["--set", "data.corpus=/definitely/not/here"], "data.corpus ('/definitely/not/here') must be an existing"),
    (["--set", "train.batch_tokens=1000"], "train.batch_tokens (1000) must be a multiple of train.seq_len (128)"),
    (["--set", "model.top_k=9"], "model.top_k (9) must be <= model.window (8)"),
    (["--set", "train.lr=-1"], "train.lr (-1.0) must be a finite number > 0.0"),
    (["--set", "train.seq_len=512"], "train.seq_len (512) must be <= model.max_seq_len (128)"),
    (["--set", "train.epochs=3"], "train.epochs (3) is not a train setting"),
    (["--set", "nonsense"], "--set ('nonsense') must look like section.key=value"),
    (["--set", "model.router=gru"], "model.router ('gru') must be one of softmax, norm, trajectory"),
]


@pytest.mark.parametrize("extra,message", BAD, ids=[m.split(" ")[0] for _, m in BAD])
def test_bad_trial_input_fails_before_training(extra, message, tmp_path) -> None:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "from moue.studies.cli import main; main()", "train",
                           "studies/trials/quickstart.toml", "--workspace", str(tmp_path), *extra],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: " + message), lines
    assert not (tmp_path / "train").exists() and not (tmp_path / "cache").exists()


def test_parse_override_values(tmp_path) -> None:
    assert parse_override("train.lr=3e-3") == ("train.lr", 3e-3)
    assert parse_override("model.router=norm") == ("model.router", "norm")
    assert parse_override("model.router_shared=true") == ("model.router_shared", True)
    assert parse_override("model.balance_depth_weights=[1, 2]") == ("model.balance_depth_weights", [1, 2])
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim]\nlr = 1\n")
    with pytest.raises(ConfigError, match="optim .* is not a trial section"):
        load_trial(bad)


def test_moue_train_command_runs_and_resumes(tmp_path) -> None:
    runner = CliRunner()
    args = ["train", "studies/trials/quickstart.toml", "--workspace", str(tmp_path), "--name", "t",
            "--set", "train.tokens=16384", "--set", "train.eval_every_tokens=8192", "--set", "data.val_tokens=4096",
            "--set", "model.n_layers=2", "--set", "model.pool_size=12"]
    out = runner.invoke(app, args)
    assert out.exit_code == 0, out.output
    assert "final val loss" in out.output and "virtual width     16 (physical 12" in out.output
    ckpt = load_checkpoint(tmp_path / "train" / "t" / "checkpoint.pt")
    assert ckpt["step"] == 2
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "already has a run" in again.output
    resumed = runner.invoke(app, [*args, "--resume"])
    assert resumed.exit_code == 0, resumed.output


def test_torch_compile_option_trains_like_eager(cache_dir) -> None:
    """train.compile = true (MoUEModel.compile_regions) trains to eager's loss."""
    eager = train(tiny(ARCHITECTURES["layerwise"], dict(tokens=4096)), None, cache_dir=cache_dir)
    compiled = train(tiny(ARCHITECTURES["layerwise"], dict(tokens=4096, compile=True)), None, cache_dir=cache_dir)
    assert compiled.status == "finished"
    assert compiled.final_val_loss == pytest.approx(eager.final_val_loss, abs=1e-4)


def test_compile_regions_compiles_the_routing_free_parts_with_the_same_values_and_gradients() -> None:
    """MoUEModel.compile_regions: norms, attention, shared FFN, router and head compiled in place
    (state-dict keys unchanged); the MoE dispatch stays eager; outputs and gradients as eager."""
    from moue.model import MoUEModel

    cfg = tiny({**ARCHITECTURES["moue-rotational"], "n_shared": 1}).model
    torch.manual_seed(0)
    eager = MoUEModel(cfg)
    compiled = MoUEModel(cfg)
    compiled.load_state_dict(eager.state_dict())
    keys = list(compiled.state_dict())
    compiled.compile_regions()
    assert list(compiled.state_dict()) == keys
    block = compiled.blocks[0]
    for module in (block.attn_norm, block.attn, block.ffn_norm, block.shared, compiled.moe.router,
                   compiled.norm, compiled.lm_head):
        assert module._compiled_call_impl is not None, module
    assert compiled.moe._compiled_call_impl is None  # data-dependent group sizes: eager
    idx = torch.randint(0, cfg.vocab_size, (2, 32))
    outs = []
    for model in (eager, compiled):
        out = model(idx)
        (out.logits.square().mean() + out.aux_loss).backward()
        outs.append((out.logits, {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-4, atol=1e-5)
    for name, grad in outs[0][1].items():
        torch.testing.assert_close(outs[1][1][name], grad, rtol=1e-3, atol=1e-5, msg=name)


def test_trial_optimizer_is_fused_adamw_with_the_loops_update() -> None:
    """``moue.train.adamw`` is one fused kernel on CPU, with the same groups and update as the loop;
    a loop's saved state (checkpoints before the change) keeps the loop after ``load_state_dict``."""
    from moue.model import MoUEModel
    from moue.train import adamw

    cfg = tiny(ARCHITECTURES["moue-rotational"], {"weight_decay": 0.1})
    torch.manual_seed(0)
    model = MoUEModel(cfg.model)
    loop_model = MoUEModel(cfg.model)
    loop_model.load_state_dict(model.state_dict())
    fused = adamw(model, cfg.train, torch.device("cpu"))
    assert [g["fused"] for g in fused.param_groups] == [True, True]
    assert [g["weight_decay"] for g in fused.param_groups] == [0.1, 0.0]
    loop = adamw(loop_model, cfg.train, torch.device("cpu"))
    for group in loop.param_groups:  # torch's per-parameter loop, on the same groups (read at each step)
        group["fused"] = False
    x = torch.randint(0, 256, (4, 64))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(3):
        for m, opt in ((model, fused), (loop_model, loop)):
            out = m(x)
            (torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), x.flatten()) + out.aux_loss).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    loop_params = dict(loop_model.named_parameters())
    for n, p in model.named_parameters():
        assert not torch.equal(p, before[n]), n  # it stepped
        torch.testing.assert_close(p, loop_params[n], rtol=1e-5, atol=1e-6, msg=n)
    resumed = adamw(loop_model, cfg.train, torch.device("cpu"))
    resumed.load_state_dict(loop.state_dict())
    assert [g["fused"] for g in resumed.param_groups] == [False, False]
