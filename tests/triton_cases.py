"""The Triton expert kernels, run on CPU by Triton's interpreter, against the grouped-matmul path.

Run by tests/test_triton.py in a fresh interpreter process (``python -m pytest tests/triton_cases.py``
with ``TRITON_INTERPRET=1``): torch.compile elsewhere in the suite imports Triton through
inductor, after which interpreted kernels in the same process fail to call their helpers.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are defined

import pytest  # noqa: E402
import torch  # noqa: E402


from moue import ModelConfig, MoUEModel  # noqa: E402
from moue.moe import ExpertPool, dispatch, select_backend  # noqa: E402


def _case(T: int, D: int, F: int, P: int, K: int, choices: list[int], seed: int):
    g = torch.Generator().manual_seed(seed)
    pool = ExpertPool(P, D, F, init_std=0.3)
    x = torch.randn(T, D, generator=g)
    ids = torch.stack([torch.tensor(choices)[torch.randperm(len(choices), generator=g)[:K]] for _ in range(T)])
    gates = torch.rand(T, K, generator=g)
    return pool, x, ids, gates


CASES = [
    # (T, D, F, P, K, experts the tokens may choose): uneven and empty groups, k = 1, 2, 4,
    # windows of a larger pool, F and D not multiples of the block sizes, > BLOCK_M rows per expert
    (40, 32, 48, 1, 1, [0]),
    (70, 32, 48, 5, 2, [0, 1, 2, 3, 4]),
    (50, 40, 24, 8, 2, [1, 2, 6]),  # experts 0, 3, 4, 5, 7 get nothing
    (36, 32, 32, 16, 4, [5, 6, 7, 8, 9, 10]),  # a window of 6 in a pool of 16
    (150, 16, 16, 3, 1, [0, 1, 2]),  # more than one row tile per expert
]


@pytest.mark.parametrize("T,D,F,P,K,choices", CASES)
def test_triton_matches_grouped_mm_outputs_and_gradients(T, D, F, P, K, choices, monkeypatch) -> None:
    import moue.triton_moe as tm

    launches = []
    real = tm._launch
    monkeypatch.setattr(tm, "_launch", lambda *a: launches.append(1) or real(*a))
    pool, x, ids, gates = _case(T, D, F, P, K, choices, seed=T + P)
    grad = torch.randn(T, D)
    results = []
    for backend in ("grouped_mm", "triton"):
        xx = x.clone().requires_grad_()
        gg = gates.clone().requires_grad_()
        pool.zero_grad(set_to_none=True)
        y = dispatch(xx, ids, gg, pool, backend=backend)
        y.backward(grad)
        results.append((y.detach(), xx.grad, gg.grad, pool.w_in_PDF2.grad.clone(), pool.w_out_PFD.grad.clone()))
    assert launches == [1], "the triton backend ran the kernels once"
    for name, a, b in zip(("y", "dx", "dgates", "dw_in", "dw_out"), *results):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4, msg=name)
    unused = [e for e in range(P) if e not in choices]
    assert (results[1][3][unused] == 0).all() and (results[1][4][unused] == 0).all()


@pytest.mark.parametrize("T,P,choices", [(300, 3, [0, 1, 2]), (200, 6, [0, 2, 5])])
def test_large_tiles_match_grouped_mm(T, P, choices) -> None:
    """The LARGE tile configuration (128-row tiles, 8 warps) forced on a small problem: groups
    shorter and longer than one tile, empty experts, F and D not multiples of the tiles."""
    from moue.moe import ExpertPool
    from moue.triton_moe import LARGE, triton_experts

    pool, x, ids, gates = _case(T, 72, 40, P, 2, choices, seed=T)
    ids_S = ids.reshape(-1)
    order = ids_S.argsort(stable=True)
    token_S, gates_S = order // 2, gates.reshape(-1)[order]
    offs = ids_S.bincount(minlength=P).cumsum(0).to(torch.int32)
    got = triton_experts(x, token_S, gates_S, pool.w_in_PDF2.detach(), pool.w_out_PFD.detach(), offs, blocks=LARGE)
    got = torch.zeros_like(x).index_add(0, token_S, got)
    ref = dispatch(x, ids, gates, pool, backend="grouped_mm").detach()
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert isinstance(pool, ExpertPool)


@pytest.mark.parametrize("blocks", ["SMALL", "LARGE"])
def test_half_precision_kernels_accumulate_in_fp32(blocks) -> None:
    """fp16 inputs (the interpreter's tl.dot is wrong for bf16 in Triton 3.9, so bf16 itself is only
    compiled here, see test_triton.py): the result equals an fp32 computation on the same
    rounded inputs to half-precision output rounding, i.e. the dots accumulate in fp32."""
    import moue.triton_moe as tm

    pool, x, ids, gates = _case(160, 64, 48, 4, 2, [0, 1, 2, 3], seed=3)
    h = torch.float16
    ids_S = ids.reshape(-1)
    order = ids_S.argsort(stable=True)
    token_S, gates_S = order // 2, gates.reshape(-1)[order]
    offs = ids_S.bincount(minlength=4).cumsum(0).to(torch.int32)
    w_in, w_out = pool.w_in_PDF2.detach().to(h), pool.w_out_PFD.detach().to(h)
    got = tm.triton_experts(x.to(h), token_S, gates_S.to(h), w_in, w_out, offs, blocks=getattr(tm, blocks))
    assert got.dtype == h
    from moue.grouped import grouped_mm

    a, b = grouped_mm(x.to(h).float().index_select(0, token_S), w_in.float(), offs).split(48, dim=-1)
    hidden = (torch.nn.functional.silu(a) * b).to(h).float()  # h is stored in fp16 between the kernels
    ref = grouped_mm(hidden, w_out.float(), offs) * gates_S.to(h).float().unsqueeze(1)
    torch.testing.assert_close(got.float(), ref, atol=2e-2, rtol=2e-3)


def test_dispatch_under_autocast_runs_the_experts_in_the_autocast_dtype(monkeypatch) -> None:
    import moue.triton_moe as tm

    seen = []
    real = tm._launch
    monkeypatch.setattr(tm, "_launch", lambda x, *a, **k: seen.append((x.dtype, a[2].dtype)) or real(x, *a, **k))
    pool, x, ids, gates = _case(64, 32, 32, 4, 2, [0, 1, 2, 3], seed=5)
    ref = dispatch(x, ids, gates, pool, backend="grouped_mm").detach()
    xx = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.float16):
        y = dispatch(xx, ids, gates, pool, backend="triton")
    assert seen == [(torch.float16, torch.float16)]  # activations and expert weights
    assert y.dtype == torch.float32  # the k contributions summed in the residual dtype
    torch.testing.assert_close(y.detach(), ref, atol=3e-2, rtol=1e-2)
    y.pow(2).sum().backward()
    assert pool.w_in_PDF2.grad.dtype == torch.float32 and xx.grad.dtype == torch.float32
    assert torch.isfinite(pool.w_out_PFD.grad).all() and pool.w_out_PFD.grad.abs().sum() > 0


def test_dispatcher_selection_and_forced_switch() -> None:
    cpu = torch.device("cpu")
    assert select_backend("auto", cpu) == "grouped_mm"
    assert select_backend("auto", torch.device("cuda")) == "triton"
    assert select_backend("grouped_mm", torch.device("cuda")) == "grouped_mm"
    assert select_backend("triton", cpu) == "triton"  # allowed here: the interpreter is on
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        with pytest.raises(RuntimeError, match="needs a CUDA device or TRITON_INTERPRET=1"):
            select_backend("triton", cpu)
    finally:
        os.environ["TRITON_INTERPRET"] = "1"


def test_model_forced_to_triton_trains_like_grouped_mm() -> None:
    torch.manual_seed(0)
    base = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=16, expert_hidden=16,
                       pool_size=6, window=4, stride=2, top_k=2, router="trajectory", router_state_dim=8)
    a = MoUEModel(base.replace(dispatch="grouped_mm"))
    b = MoUEModel(base.replace(dispatch="triton"))
    b.load_state_dict(a.state_dict())
    idx = torch.randint(0, 64, (2, 16))
    out_a, out_b = a(idx), b(idx)
    torch.testing.assert_close(out_b.logits, out_a.logits, atol=1e-4, rtol=1e-4)
    out_a.logits.pow(2).mean().backward()
    out_b.logits.pow(2).mean().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, atol=1e-5, rtol=1e-3, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_bf16_on_cuda_matches_fp32_reference() -> None:
    pool, x, ids, gates = _case(4096, 256, 512, 16, 2, list(range(16)), seed=0)
    pool = pool.cuda()
    ref = dispatch(x.cuda(), ids.cuda(), gates.cuda(), pool, backend="grouped_mm")
    pool_bf16 = pool.to(torch.bfloat16)
    got = dispatch(x.cuda().bfloat16(), ids.cuda(), gates.cuda().bfloat16(), pool_bf16, backend="triton")
    torch.testing.assert_close(got.float(), ref, atol=5e-2, rtol=5e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_autocast_bf16_triton_matches_grouped_mm_on_cuda() -> None:
    pool, x, ids, gates = _case(32768 // 4, 256, 256, 16, 2, list(range(16)), seed=1)  # LARGE tiles
    pool, x, ids, gates = pool.cuda(), x.cuda(), ids.cuda(), gates.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a = dispatch(x, ids, gates, pool, backend="grouped_mm")
        b = dispatch(x, ids, gates, pool, backend="triton")
    torch.testing.assert_close(b, a, atol=5e-2, rtol=5e-2)


def test_fractional_gpu_share_becomes_a_memory_cap() -> None:
    from pathlib import Path

    from moue.studies.runner import resolve_trial
    from moue.studies.spec import load_study

    root = Path(__file__).resolve().parent.parent
    study = load_study(root / "studies" / "smoke.toml")
    import dataclasses

    shared = dataclasses.replace(study, resources=dataclasses.replace(study.resources, gpu=0.25))
    flat = resolve_trial(shared, {"point": study.points[0]})
    assert flat["train.gpu_memory_fraction"] == 0.25
    assert "train.gpu_memory_fraction" not in resolve_trial(study, {"point": study.points[0]})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_training_step_on_cuda(tmp_path) -> None:
    from moue.train import TrialConfig, train

    cfg = TrialConfig.from_dict({"model": {"d_model": 64, "n_layers": 2, "n_heads": 2, "max_seq_len": 64,
                                           "expert_hidden": 64, "pool_size": 8, "window": 4, "stride": 2},
                                 "train": {"tokens": 8192, "batch_tokens": 2048, "seq_len": 64, "device": "cuda",
                                           "gpu_memory_fraction": 0.25},
                                 "data": {"val_tokens": 4096}})
    assert train(cfg, None, cache_dir=tmp_path).status == "finished"
