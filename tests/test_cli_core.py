"""The `moue` command line for the model family: bench moe, convert."""

from __future__ import annotations

import math

import pytest
import torch
from typer.testing import CliRunner

from moue import LayerwiseMoEModel, ModelConfig, MoUEModel, layerwise_config
from moue.bench import MoEShape, bench_moe
from moue.studies.cli import app

runner = CliRunner()


def test_bench_moe_reports_ratios_per_shape() -> None:
    shapes = (MoEShape("main", 64, 32, 16, 4, 4, 2), MoEShape("pooled", 64, 32, 16, 16, 4, 2))
    result = bench_moe(repeats=2, shapes=shapes)
    assert set(result) >= {"ratio_main", "ratio_pooled", "torch", "threads", "shapes"}
    assert result["torch"] == torch.__version__
    for name in ("main", "pooled"):
        r = result["shapes"][name]
        assert r["ratio_min"] <= r["ratio"] <= r["ratio_max"]
        assert r["dense_ms"] > 0 and r["moe_ms"] > 0


def test_bench_moe_cuda_without_gpu_says_so_and_exits_0() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = runner.invoke(app, ["bench", "moe", "--device", "cuda"])
    assert out.exit_code == 0
    assert "no CUDA device" in out.output
    # what it can check without a GPU: the kernels compiled for an H100, on tensor cores, no spills
    kernel_lines = [ln for ln in out.output.splitlines() if "_kernel" in ln]
    assert len(kernel_lines) == 4 and all("wgmma" in ln and " 0 B spilled" in ln for ln in kernel_lines)


def test_bench_moe_bad_device_exits_2() -> None:
    out = runner.invoke(app, ["bench", "moe", "--device", "tpu"])
    assert out.exit_code == 2
    assert "--device ('tpu') must be one of cpu, cuda" in out.output


def test_convert_command_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    base = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=16,
                       expert_hidden=16, top_k=2, pool_size=8, window=4, stride=4)
    src_cfg = layerwise_config(base, 4)
    src = LayerwiseMoEModel(src_cfg)
    ckpt = tmp_path / "layerwise.pt"
    torch.save({"config": src_cfg.to_dict(), "model": src.state_dict()}, ckpt)
    out_path = tmp_path / "moue.pt"
    out = runner.invoke(app, ["convert", str(ckpt), "-o", str(out_path), "--window", "6"])
    assert out.exit_code == 0, out.output
    blob = torch.load(out_path, weights_only=True)
    cfg = ModelConfig.from_dict(blob["config"])
    assert (cfg.pool_size, cfg.window, blob["start_window"]) == (8, 6, 4)
    model = MoUEModel(cfg)
    model.load_state_dict(blob["model"])
    model.set_window(blob["start_window"])
    idx = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(model(idx).logits, src(idx), atol=1e-5, rtol=1e-5)

    # bad input: one line, exit 2, nothing written
    again = runner.invoke(app, ["convert", str(ckpt), "-o", str(out_path), "--window", "6"])
    assert again.exit_code == 2 and "already exists" in again.output
    missing = runner.invoke(app, ["convert", str(tmp_path / "nope.pt"), "-o", str(tmp_path / "x.pt"),
                                  "--window", "6"])
    assert missing.exit_code == 2 and "must be an existing file" in missing.output
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    bad = runner.invoke(app, ["convert", str(junk), "-o", str(tmp_path / "y.pt"), "--window", "6"])
    assert bad.exit_code == 2 and "not a readable torch checkpoint" in bad.output
    assert not (tmp_path / "y.pt").exists()


def test_console_entry_turns_config_errors_into_exit_2(tmp_path) -> None:
    import subprocess
    import sys

    ckpt = tmp_path / "layerwise.pt"
    src_cfg = layerwise_config(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2,
                                           expert_hidden=16, pool_size=8, window=4, stride=4), 4)
    torch.save({"config": src_cfg.to_dict(), "model": LayerwiseMoEModel(src_cfg).state_dict()}, ckpt)
    proc = subprocess.run(
        [sys.executable, "-c", "from moue.studies.cli import main; main()", "convert", str(ckpt),
         "-o", str(tmp_path / "out.pt"), "--window", "99"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == ["error: convert.target_window (99) must be in [experts per layer (4), L*E (8)]"]
    assert not (tmp_path / "out.pt").exists()


def test_upcycle_command(tmp_path) -> None:
    torch.manual_seed(0)
    src = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=16, ffn="dense", dense_hidden=16)
    dense = MoUEModel(src)
    ckpt = tmp_path / "dense.pt"
    torch.save({"config": src.to_dict(), "model": dense.state_dict()}, ckpt)
    out_path = tmp_path / "moe.pt"
    args = ["upcycle", str(ckpt), "-o", str(out_path), "--set", "pool_size=8", "--set", "window=4",
            "--set", "stride=4", "--set", "top_k=2"]
    out = runner.invoke(app, args)
    assert out.exit_code == 0, out.output
    blob = torch.load(out_path, weights_only=True)
    cfg = ModelConfig.from_dict(blob["config"])
    assert (cfg.ffn, cfg.pool_size, cfg.expert_hidden) == ("moe", 8, 16)
    model = MoUEModel(cfg)
    model.load_state_dict(blob["model"])
    idx = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(model(idx).logits, dense(idx).logits, atol=1e-5, rtol=1e-5)  # layerwise, no noise
    bad = runner.invoke(app, ["upcycle", str(ckpt), "-o", str(tmp_path / "b.pt"), "--set", "pool_size"])
    assert bad.exit_code == 2 and "--set" in bad.output


def test_every_help_renders_with_its_text_and_flags_as_flags() -> None:
    import typer.main

    from moue.studies.cli import app

    group = typer.main.get_command(app)
    paths = []
    for name, cmd in group.commands.items():
        sub = getattr(cmd, "commands", None)
        paths += [[name, s] for s in sub] if sub else [[name]]
    assert ["bench", "moe"] in paths and ["train"] in paths and ["lr-rule"] in paths
    for path in paths:
        out = runner.invoke(app, [*path, "--help"])
        assert out.exit_code == 0, (path, out.output)
        assert "<bool>" not in out.output, (path, "a boolean option shows as a flag")
        assert "Example" in out.output and " moue " in out.output, (path, "every command's help has an example")
    train = runner.invoke(app, ["train", "--help"]).output
    assert "([model], [train], [data])" in train  # not eaten as markup
    import click

    for path in paths:  # every option says what it does
        cmd = group
        for p in path:
            cmd = cmd.commands[p]
        bare = [o.opts[0] for o in cmd.params if isinstance(o, click.Option) and not (o.help or "").strip()]
        assert not bare, (path, bare)
    assert "vw_multiplicative" in runner.invoke(app, ["fit", "--help"]).output  # moue fit --help lists the laws


def test_bench_train_profile_says_where_a_step_goes() -> None:
    """The profile puts every op's time in one part of the model: the forward by the module that
    ran it, the backward by the forward op it differentiates, the optimizer by its step."""
    import dataclasses

    from moue.bench import CATEGORIES, profile_step
    from moue.studies.cli import QUICKSTART_TRIAL
    from moue.studies.trial import load_trial

    cfg = load_trial(QUICKSTART_TRIAL)
    small = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, d_model=32, n_heads=2, expert_hidden=32,
                                                               router_state_dim=8),
                                train=dataclasses.replace(cfg.train, batch_tokens=1024, seq_len=32))
    prof = profile_step(small, steps=1, warmup=1)
    assert set(prof["ms"]) == set(CATEGORIES) and abs(sum(prof["fraction"].values()) - 1) < 1e-9
    for part in ("attention", "router", "dispatch", "experts", "norms", "optimizer"):
        assert prof["ms"][part] > 0, (part, prof["ms"])
    # the backward lands in the parts: attention's backward is attention's, the experts' matmul
    # backward the experts'
    sdpa = "aten::_scaled_dot_product_flash_attention_for_cpu_backward"
    assert [c for c, ops in prof["ops_ms"].items() if sdpa in ops] == ["attention"], prof["top_ops_ms"]
    assert prof["fraction"]["embedding, head and loss"] < 0.5, prof["fraction"]


@pytest.mark.slow
def test_bench_train_compile_reports_both_modes_side_by_side(tmp_path) -> None:
    """bench train --compile: the eager and the compiled (train.compile) rates of one trial, each
    measured after its warm-up steps, with the warm-up's extra seconds."""
    import dataclasses

    from moue.bench import bench_train
    from moue.studies.cli import QUICKSTART_TRIAL
    from moue.studies.trial import load_trial

    cfg = load_trial(QUICKSTART_TRIAL)
    small = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, d_model=32, n_heads=2, expert_hidden=32,
                                                               router_state_dim=8),
                                train=dataclasses.replace(cfg.train, batch_tokens=1024, seq_len=32),
                                data=dataclasses.replace(cfg.data, val_tokens=4096))
    out = bench_train(small, steps=2, cache_dir=tmp_path, compile_=True)
    assert out["warmup_steps"] == 2 and out["steps"] == 2
    for key in ("ratio", "ratio_compiled", "model_gflops_compiled", "matmul_gflops_compiled"):
        assert 0 < out[key] < math.inf, (key, out)
    assert out["compiled_over_eager"] == pytest.approx(out["model_gflops_compiled"] / out["model_gflops"])
    # the compiled mode's first steps compile (seconds); eager's warm-up costs milliseconds
    assert out["compile_warmup_s"] > out["eager_warmup_s"] + 0.5, out
    assert out["gemm_gflops"] > 0 and out["gemm_step_fraction"] > 0, out  # where the rest of a step goes
    # the step's GEMMs, timed alone, need less than the step; unless they were starved: three test
    # workers on 2 cores once timed them at 0.4 GFLOP/s beside a 159 GFLOP/s matmul probe in the
    # same run (studies/LOG.md, session 17), which says nothing about the code
    if out["gemm_gflops"] > 0.1 * out["matmul_gflops"]:
        assert out["gemm_step_fraction"] < 1, out


def test_bench_train_composite_compares_the_fused_functions_with_the_composite_ops(tmp_path, monkeypatch) -> None:
    """bench train --composite: alternating rounds of the same trial with the fused RoPE / RMSNorm
    and with the composite ops (``moue.fused.composite``), the ratio of the median rates."""
    import dataclasses
    import statistics

    import moue.fused
    from moue.bench import bench_train
    from moue.studies.cli import QUICKSTART_TRIAL
    from moue.studies.trial import load_trial

    cfg = load_trial(QUICKSTART_TRIAL)
    small = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, d_model=32, n_heads=2, expert_hidden=32,
                                                               router_state_dim=8),
                                train=dataclasses.replace(cfg.train, batch_tokens=1024, seq_len=32),
                                data=dataclasses.replace(cfg.data, val_tokens=4096))
    modes = []  # which path each training run's norms took
    rms_norm = moue.fused.RMSNorm.forward
    monkeypatch.setattr(moue.fused.RMSNorm, "forward", lambda self, x: modes.append(moue.fused._eager(x))
                        or rms_norm(self, x))
    out = bench_train(small, steps=2, cache_dir=tmp_path, composite_=True, rounds=2)
    assert len(out["model_gflops_fused"]) == len(out["model_gflops_composite"]) == 2
    assert out["fused_over_composite"] == pytest.approx(
        statistics.median(out["model_gflops_fused"]) / statistics.median(out["model_gflops_composite"]))
    assert True in modes and False in modes, "both paths ran"


@pytest.mark.parametrize("changes", [{"ffn": "dense"}, {"ffn": "dense", "dense_hidden": 96, "n_layers": 3}])
def test_model_gemms_are_the_counted_flops_less_attention_scores_and_norms(changes) -> None:
    """bench train's GEMM list (``model_gemms``): for a dense model, forward and both backward GEMMs
    make up the counted training FLOPs exactly, less the attention scores (``6 L S D``) and the
    norms' weights; an MoE model's add the experts its tokens are routed to."""
    import dataclasses

    from moue.bench import model_gemms
    from moue.counting import count
    from moue.studies.cli import QUICKSTART_TRIAL
    from moue.studies.trial import load_trial

    cfg = load_trial(QUICKSTART_TRIAL)
    m, S, T = cfg.model, cfg.train.seq_len, cfg.train.batch_tokens

    def gemm_flops(model):
        return sum(3 * 2 * rows * inner * cols for rows, inner, cols, _ in model_gemms(model, T))

    dense = m.replace(**changes)
    norms = (2 * dense.n_layers + 1) * dense.d_model
    counted = count(dense, seq_len=S).flops_per_token - 6 * dense.n_layers * S * dense.d_model - 6 * norms
    assert gemm_flops(dense) == counted * T
    # the MoE quickstart: its k experts of F per token (each layer's experts as w groups)
    rows = [g for g in model_gemms(m, T) if g[3] > 1]
    assert rows == [(T * m.top_k, m.d_model, 2 * m.expert_hidden, m.window),
                    (T * m.top_k, m.expert_hidden, m.d_model, m.window)] * m.n_layers
    moe_counted = count(m, seq_len=S).flops_per_token * T
    assert 0.85 * moe_counted < gemm_flops(m) < moe_counted  # less the scores, norms and routers
