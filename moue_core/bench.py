"""``moue bench moe``: one MoE layer against a dense SwiGLU FFN of the same active FLOPs.

The MoE layer (router over its window, top-k, dropless grouped-matmul dispatch, balance and z-loss)
and a dense SwiGLU of hidden ``k*f`` run forward + backward on the same ``[T, d]`` input,
interleaved (dense, MoE, dense, MoE, ...) so that machine noise hits both alike; the reported figure
is the median over pairs of ``time(MoE) / time(dense)``.
"""

from __future__ import annotations

import collections
import math
import os
import statistics
import time
import warnings
from dataclasses import dataclass

import torch

from moue.config import ModelConfig
from moue.moe import MoE, SwiGLU
from moue.runtime import configure_process, tune_malloc

__all__ = ["MoEShape", "SHAPES", "bench_moe"]


@dataclass(frozen=True)
class MoEShape:
    name: str
    tokens: int
    d_model: int
    expert_hidden: int
    pool_size: int
    window: int
    top_k: int


SHAPES = (
    MoEShape("main", 4096, 256, 512, 16, 16, 2),
    MoEShape("fine", 4096, 256, 128, 64, 64, 8),
    MoEShape("pooled", 4096, 256, 512, 64, 16, 2),
)


def _time_fwd_bwd(fn, params: list[torch.Tensor], x: torch.Tensor, grad: torch.Tensor) -> float:
    for p in (x, *params):
        p.grad = None  # as after optimizer.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    y = fn(x)
    y.backward(grad)
    return time.perf_counter() - t0


def bench_shape(shape: MoEShape, *, repeats: int = 15, warmup: int = 3, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        # one layer of a larger pool leaves the experts of the other layers' windows unused here
        warnings.filterwarnings("ignore", message=r"model.stride .* experts are in no layer's window")
        cfg = ModelConfig(n_layers=1, d_model=shape.d_model, n_heads=4, pool_size=shape.pool_size,
                          window=shape.window, stride=0, top_k=shape.top_k,
                          expert_hidden=shape.expert_hidden, balance="switch")
    moe = MoE(cfg)
    dense = SwiGLU(shape.d_model, shape.top_k * shape.expert_hidden)
    for p in dense.parameters():
        torch.nn.init.normal_(p, std=cfg.init_std)
    x = torch.randn(shape.tokens, shape.d_model, requires_grad=True)
    grad = torch.randn(shape.tokens, shape.d_model)

    def moe_layer(x_TD: torch.Tensor) -> torch.Tensor:
        y_TD, route, _ = moe(0, x_TD, None)
        aux, _ = moe.finish([route])
        return y_TD + aux  # the aux loss joins the graph as a scalar

    ratios, dense_s, moe_s = [], [], []
    for i in range(warmup + repeats):
        td = _time_fwd_bwd(dense, list(dense.parameters()), x, grad)
        tm = _time_fwd_bwd(moe_layer, list(moe.parameters()), x, grad)
        if i >= warmup:
            dense_s.append(td)
            moe_s.append(tm)
            ratios.append(tm / td)
    return {
        "ratio": statistics.median(ratios),
        "dense_ms": 1e3 * statistics.median(dense_s),
        "moe_ms": 1e3 * statistics.median(moe_s),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
    }


def bench_moe(*, repeats: int = 15, shapes: tuple[MoEShape, ...] = SHAPES) -> dict:
    """Results per shape plus the ``ratio_<shape>`` summary keys and the environment."""
    malloc_tuned = tune_malloc()
    out: dict = {
        "malloc_tuned": malloc_tuned,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "dtype": "float32",
        "device": "cpu",
        "repeats": repeats,
        "shapes": {},
    }
    for shape in shapes:
        res = bench_shape(shape, repeats=repeats)
        out["shapes"][shape.name] = {**shape.__dict__, **res}
        out[f"ratio_{shape.name}"] = res["ratio"]
    return out


LARGE_GPU_SHAPE = MoEShape("large", 32768, 1024, 512, 64, 64, 8)


def bench_moe_cuda(*, repeats: int = 20, warmup: int = 5) -> dict:
    """The Triton and grouped-matmul paths against a dense SwiGLU of hidden ``k*f``, bf16, on CUDA.

    Same interleaving as the CPU benchmark; times are CUDA-event times of forward + backward.
    ``fraction_<backend>_<shape>`` = dense time / MoE time (1.0: dense-equivalent throughput).
    """
    device = torch.device("cuda")
    out: dict = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0), "dtype": "bfloat16",
                 "repeats": repeats, "shapes": {}}
    for shape in (*SHAPES, LARGE_GPU_SHAPE):
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"model.stride .* experts are in no layer's window")
            base = ModelConfig(n_layers=1, d_model=shape.d_model, n_heads=4, pool_size=shape.pool_size,
                               window=shape.window, stride=0, top_k=shape.top_k,
                               expert_hidden=shape.expert_hidden, balance="switch")
        dense = SwiGLU(shape.d_model, shape.top_k * shape.expert_hidden).to(device, torch.bfloat16)
        x = torch.randn(shape.tokens, shape.d_model, device=device, dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn_like(x)
        from moue.triton_moe import LARGE, choose_blocks

        row = {**shape.__dict__, "blocks": "LARGE" if choose_blocks(
            shape.tokens * shape.top_k, shape.d_model, shape.expert_hidden) is LARGE else "SMALL"}
        for backend in ("triton", "grouped_mm"):
            moe = MoE(base.replace(dispatch=backend)).to(device, torch.bfloat16)

            def layer(x_TD, moe=moe):
                y_TD, route, _ = moe(0, x_TD, None)
                aux, _ = moe.finish([route])
                return y_TD + aux.to(y_TD.dtype)

            ratios = []
            for i in range(warmup + repeats):
                times = []
                for fn, params in ((dense, list(dense.parameters())), (layer, list(moe.parameters()))):
                    for p in (x, *params):
                        p.grad = None
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn(x).backward(grad)
                    end.record()
                    torch.cuda.synchronize()
                    times.append(start.elapsed_time(end))
                if i >= warmup:
                    ratios.append(times[1] / times[0])
            ratio = statistics.median(ratios)
            row[f"ratio_{backend}"] = ratio
            out[f"fraction_{backend}_{shape.name}"] = 1.0 / ratio
        out["shapes"][shape.name] = row
    return out


def _best_time(fn, *, repeats: int, warmup: int) -> float:
    """The shortest of ``repeats`` timed calls of ``fn``, after ``warmup`` untimed ones (seconds)."""
    for _ in range(warmup):
        fn()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_gflops(*, n: int = 1024, repeats: int = 10, dtype: torch.dtype = torch.float32) -> float:
    """Dense ``n x n x n`` matmul throughput of this machine (best of ``repeats``)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / _best_time(lambda: a @ b, repeats=repeats, warmup=3) / 1e9


def model_gemms(model, tokens: int) -> list[tuple[int, int, int, int]]:
    """The GEMMs of one forward pass of ``model`` (a ``ModelConfig``) over ``tokens`` tokens, as
    ``(rows, inner, cols, groups)``: ``rows`` split evenly into ``groups`` products with weights of
    their own (an MoE layer's experts under a balanced routing, dropless). Attention's projections,
    the routed experts, shared experts, dense FFNs and the head; not the attention scores (a fused
    kernel, no GEMM of ours) nor the routers' small matrices."""
    D, T, moe = model.d_model, tokens, set(model.moe_layers)
    out = []
    for layer in range(model.n_layers):
        out += [(T, D, 3 * D, 1), (T, D, D, 1)]  # qkv, out
        if layer in moe:
            F, w = model.expert_hidden, model.window
            S = T * model.top_k  # (token, slot) pairs; expert and unified routing choose as many
            out += [(S, D, 2 * F, w), (S, F, D, w)]
            if model.n_shared:
                out += [(T, D, 2 * model.n_shared * F, 1), (T, model.n_shared * F, D, 1)]
        else:
            out += [(T, D, 2 * model.dense_hidden, 1), (T, model.dense_hidden, D, 1)]
    return out + [(T, D, model.vocab_size, 1)]


def gemm_gflops(model, tokens: int, *, repeats: int = 5) -> tuple[float, float]:
    """``(GFLOP/s, seconds)`` of the GEMMs one training step of ``model`` runs (``model_gemms``,
    each as forward ``x W``, input gradient ``dy W^T`` and weight gradient ``x^T dy``), each timed
    alone at its shape (best of ``repeats``), fp32: the rate of the step's matmuls when nothing
    else runs between them, and the time they need at that rate."""
    flops = seconds = 0.0
    for (rows, inner, cols, groups), n in collections.Counter(model_gemms(model, tokens)).items():
        m = rows // groups
        x, dy = torch.randn(groups, m, inner), torch.randn(groups, m, cols)
        w, y, dx, dw = (torch.randn(groups, inner, cols), torch.empty(groups, m, cols),
                        torch.empty(groups, m, inner), torch.empty(groups, inner, cols))

        def step() -> None:
            for g in range(groups):  # each group its own weights and rows, as a grouped matmul has them
                torch.mm(x[g], w[g], out=y[g])
                torch.mm(dy[g], w[g].t(), out=dx[g])
                torch.mm(x[g].t(), dy[g], out=dw[g])

        flops += n * 3 * 2 * groups * m * inner * cols
        seconds += n * _best_time(step, repeats=repeats, warmup=1)
    return flops / seconds / 1e9, seconds


def _train_rate(cfg, *, steps: int, warmup: int, cache_dir) -> tuple[float, object, float]:
    """(model GFLOP/s, result, warm-up seconds) of ``cfg`` trained ``warmup + steps`` steps: the rate
    over the last ``steps`` (over all of them when ``warmup`` is 0), and the training time beyond
    what all the steps would have taken at that rate (compilation, mostly)."""
    import dataclasses

    from moue.train import NullSink, train

    batch = cfg.train.batch_tokens
    every = warmup if warmup else 10 * steps  # a mark at the end of the warm-up, then at the end
    tc = dataclasses.replace(cfg.train, tokens=(warmup + steps) * batch, eval_every_tokens=every * batch)
    sink = NullSink()
    result = train(dataclasses.replace(cfg, train=tc), sink, cache_dir=cache_dir)
    if not warmup:
        return result.counts.flops_per_token * result.tokens / result.train_s / 1e9, result, 0.0
    tokens_per_s = sink.reports[-1][1]["tokens_per_s"]  # the last interval: after the warm-up
    warm_s = result.train_s - (warmup + steps) * batch / tokens_per_s  # beyond the steady rate
    return result.counts.flops_per_token * tokens_per_s / 1e9, result, warm_s


def bench_train(cfg, *, steps: int = 20, cache_dir, compile_: bool = False, composite_: bool = False,
                rounds: int = 3) -> dict:
    """Train ``cfg`` (a ``TrialConfig``) for ``steps`` steps; model GFLOP/s vs matmul GFLOP/s.

    Model FLOPs come from the counting module (``flops_per_token``, its convention) over the time
    spent inside training steps; the matmul reference is measured before and after training, in
    this process, at the same dtype (fp32), and averaged. Where the rest goes: ``gemm_gflops`` is
    the rate of the step's own GEMMs, each timed alone (``gemm_gflops()``), and
    ``gemm_step_fraction`` the share of an eager step they need at that rate; the rest of the step
    is everything else (attention kernels, elementwise work, dispatch, the optimizer, Python).
    With ``compile_``, the same trial also trains with ``train.compile = true``
    (``MoUEModel.compile_regions``) right after, each mode after ``steps`` warm-up steps (the
    compiled mode's first steps compile), and the figures of both modes are reported side by side
    (``ratio`` stays the eager one). With ``composite_``, the eager trial trains ``rounds`` more
    times each with the fused RoPE and RMSNorm (``moue.fused``) and with the composite ops,
    alternating, and ``fused_over_composite`` is the ratio of the two modes' median rates.
    """
    import dataclasses
    import resource

    configure_process(cfg.train.threads)  # before the matmul reference: both at the same threads
    warmup = steps if compile_ else 0
    refs = [matmul_gflops()]
    model, result, eager_warm_s = _train_rate(cfg, steps=steps, warmup=warmup, cache_dir=cache_dir)
    refs.append(matmul_gflops())
    out: dict = {}
    if compile_:
        ccfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, compile=True))
        c_model, _, warm_s = _train_rate(ccfg, steps=steps, warmup=warmup, cache_dir=cache_dir)
        refs.append(matmul_gflops())
        c_matmul = (refs[1] + refs[2]) / 2
        out = {"model_gflops_compiled": c_model, "matmul_gflops_compiled": c_matmul,
               "ratio_compiled": c_model / c_matmul, "compiled_over_eager": c_model / model,
               "compile_warmup_s": warm_s, "eager_warmup_s": eager_warm_s, "warmup_steps": warmup}
    if composite_:
        from moue.fused import composite

        rates: dict[str, list[float]] = {"fused": [], "composite": []}
        for _ in range(rounds):  # alternating, so that machine noise hits both alike
            rates["fused"].append(_train_rate(cfg, steps=steps, warmup=0, cache_dir=cache_dir)[0])
            with composite():
                rates["composite"].append(_train_rate(cfg, steps=steps, warmup=0, cache_dir=cache_dir)[0])
        out.update(model_gflops_fused=rates["fused"], model_gflops_composite=rates["composite"],
                   fused_over_composite=statistics.median(rates["fused"]) / statistics.median(rates["composite"]))
    matmul = (refs[0] + refs[1]) / 2
    tc = cfg.train
    gemm, gemm_s = gemm_gflops(cfg.model, tc.batch_tokens)
    step_gflop = result.counts.flops_per_token * tc.batch_tokens / 1e9
    return {
        "model_gflops": model,
        "matmul_gflops": matmul,
        "ratio": model / matmul,
        "gemm_gflops": gemm,
        "gemm_step_fraction": gemm_s * model / step_gflop,
        **out,
        "tokens_per_s": result.tokens_per_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "steps": steps,
        "batch_tokens": tc.batch_tokens,
        "flops_per_token": result.counts.flops_per_token,
        "n_params_active": result.counts.n_params_active,
        "n_params_total": result.counts.n_params_total,
        "count_convention": result.counts.convention,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dtype": "float32",
    }


def bench_cooldown(cfg, *, at: tuple[int, ...], frac: float, seeds: tuple[int, ...], cache_dir) -> dict:
    """Cooldown branches against separate cosine runs (issue 13, a cheap data axis).

    Per seed: one WSD run of ``cfg.train.tokens`` (decaying over its last ``frac`` of the steps)
    with a cooldown branch at each of ``at`` (``frac`` of the tokens seen), and one separate
    cosine run of each branch's length and of the main run's length. Reports each point's loss
    both ways, their difference per seed against the seed spread of the cosine runs, and the
    tokens and training time of the branches against the separate runs they replace."""
    import dataclasses
    import statistics
    import time

    from moue.train import NullSink, train

    def run(tc):
        t0 = time.perf_counter()
        sink = NullSink()
        result = train(dataclasses.replace(cfg, train=tc), sink, cache_dir=cache_dir)
        return sink.reports[-1][1], result, time.perf_counter() - t0

    base = cfg.train
    points: dict[int, dict] = {}
    cost = {"wsd_tokens": 0, "wsd_s": 0.0, "separate_tokens": 0, "separate_s": 0.0}
    for seed in seeds:
        wsd = dataclasses.replace(base, seed=seed, schedule="wsd", decay_frac=frac, cooldown_at=tuple(at),
                                  cooldown_frac=frac, eval_every_tokens=base.tokens)
        final, result, wall = run(wsd)
        branch_tokens = sum(int(final[f"final/cooldown/{t}/branch_tokens"]) for t in at)
        cost["wsd_tokens"] += result.tokens + branch_tokens
        cost["wsd_s"] += wall
        lengths = {int(final[f"final/cooldown/{t}/tokens"]): final[f"final/cooldown/{t}/val_loss"] for t in at}
        lengths[result.tokens] = final["final/val_loss"]
        for tokens, branch_loss in lengths.items():
            cosine = dataclasses.replace(base, seed=seed, schedule="cosine", tokens=tokens, eval_every_tokens=tokens)
            c_final, c_result, c_wall = run(cosine)
            if tokens != result.tokens:  # the main run's own length is trained by the WSD run anyway
                cost["separate_tokens"] += c_result.tokens
                cost["separate_s"] += c_wall
            p = points.setdefault(tokens, {"tokens": tokens, "wsd": [], "cosine": []})
            p["wsd"].append(branch_loss)
            p["cosine"].append(c_final["final/val_loss"])
    rows = []
    for tokens in sorted(points):
        p = points[tokens]
        diffs = [a - b for a, b in zip(p["wsd"], p["cosine"])]
        spread = statistics.stdev(p["cosine"]) if len(p["cosine"]) > 1 else float("nan")
        rows.append({**p, "diff": diffs, "mean_diff": statistics.fmean(diffs), "cosine_seed_sd": spread,
                     "within_seed_noise": abs(statistics.fmean(diffs)) <= 2 * spread if spread == spread else None})
    main_tokens = max(points)  # the WSD run's own length (the longest point)
    return {"points": rows, "seeds": list(seeds), "cooldown_frac": frac, "branch_at": list(at),
            "main_tokens": main_tokens, **cost,
            "branch_tokens_vs_separate": (cost["wsd_tokens"] - len(seeds) * main_tokens) / max(1, cost["separate_tokens"]),
            "torch": torch.__version__}


def synthetic_step(cfg):
    """``(model, step)``: ``cfg``'s model (a ``TrialConfig``'s) and one training step of it on fixed
    random tokens at the trial's batch (the trial's AdamW, ``moue.train.adamw``, at a small LR; the
    trial's gradient clipping): what the dry run's estimate times (``moue.studies.estimate.step_cost``)
    and ``profile_step`` takes apart."""
    import dataclasses

    import torch.nn.functional as F

    from moue.model import MoUEModel
    from moue.train import adamw

    tc = cfg.train
    torch.manual_seed(0)
    model = MoUEModel(cfg.model)
    opt = adamw(model, dataclasses.replace(tc, lr=1e-4), torch.device("cpu"))
    x = torch.randint(0, cfg.model.vocab_size, (tc.batch_size, tc.seq_len))

    def step() -> None:
        out = model(x)
        loss = F.cross_entropy(out.logits.float().flatten(0, 1), x.flatten()) + out.aux_loss
        loss.backward()
        with torch.profiler.record_function("Optimizer.clip_grad_norm"):  # the optimizer's, in a profile
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or math.inf)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step


# ---- where a training step's time goes (moue bench train --profile)

_SCOPES = (("Attention", "attention"), ("Router", "router"), ("MoE", "moe"), ("RMSNorm", "norms"))
_DISPATCH_OPS = ("index_select", "index_add", "scatter", "gather", "argsort", "sort", "bincount", "cumsum",
                 "nonzero", "index", "new_zeros", "zeros", "fill_")
CATEGORIES = ("attention", "router", "dispatch", "experts", "norms", "embedding, head and loss", "optimizer")


def _category(scope: str | None, op: str) -> str:
    if scope == "moe":  # the MoE layer less its router: moving tokens, or the expert FFNs
        return "dispatch" if any(op.removeprefix("aten::").startswith(d) for d in _DISPATCH_OPS) else "experts"
    return scope or "embedding, head and loss"


def profile_step(cfg, *, steps: int = 3, warmup: int = 2) -> dict:
    """Where a training step of ``cfg`` (a ``TrialConfig``) spends its time: the profiler's self
    CPU time of every op, by the model part it ran in (forward: the module that called it, through
    ``record_function`` scopes the benchmark adds with hooks; backward: the forward op it
    differentiates, by the autograd sequence number; ``Optimizer.step``: the optimizer), in ms per
    step and as fractions. Random tokens, the trial's threads; timings include the profiler's own
    overhead, so the fractions are what to read."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from moue.runtime import set_threads

    set_threads(cfg.train.threads or None)
    model, step = synthetic_step(cfg)
    stack: list = []
    labels = dict(_SCOPES)
    for module in model.modules():
        label = labels.get(type(module).__name__)
        if label is None:
            continue
        module.register_forward_pre_hook(lambda m, a, label=label: stack.append(record_function(f"moue::{label}").__enter__()))
        module.register_forward_hook(lambda m, a, out: stack.pop().__exit__(None, None, None))

    for _ in range(warmup):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = list(prof.events())

    def chain(e):
        while e is not None:
            yield e
            e = e.cpu_parent

    def scope_of(e) -> str | None:
        for a in chain(e):
            if a.name.startswith("moue::"):
                return a.name.removeprefix("moue::")
        return None

    def in_backward(e) -> bool:
        return any(a.name.startswith("autograd::engine::evaluate_function") for a in chain(e))

    forward_scope = {e.sequence_nr: scope_of(e) for e in events
                     if getattr(e, "sequence_nr", -1) >= 0 and not in_backward(e)}
    ms = dict.fromkeys(CATEGORIES, 0.0)
    ops: dict[str, dict[str, float]] = {c: {} for c in CATEGORIES}
    for e in events:
        if e.name.startswith(("moue::", "ProfilerStep")):
            continue
        names = [a.name for a in chain(e)]
        if any(n.startswith(("Optimizer.step", "Optimizer.zero_grad", "Optimizer.clip_grad_norm")) for n in names):
            cat = "optimizer"
        else:
            node = next((a for a in chain(e) if a.name.startswith("autograd::engine::evaluate_function")), None)
            if node is not None:  # backward: the scope of the forward op it differentiates
                fwd = node.name.rsplit(": ", 1)[-1]
                cat = _category(forward_scope.get(node.sequence_nr), e.name if e is not node else fwd)
            else:
                cat = _category(scope_of(e), e.name)
        t = e.self_cpu_time_total / 1e3 / steps
        ms[cat] += t
        ops[cat][e.name] = ops[cat].get(e.name, 0.0) + t
    total = sum(ms.values())
    top = {c: dict(sorted(o.items(), key=lambda kv: -kv[1])[:3]) for c, o in ops.items()}
    return {"ms_per_step": total, "ms": ms, "fraction": {k: v / total for k, v in ms.items()}, "top_ops_ms": top,
            "ops_ms": ops, "steps": steps}
