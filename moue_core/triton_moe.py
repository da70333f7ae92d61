"""Triton kernels for the routed experts (the GPU path of docs/MODEL.md section 5).

Tokens arrive sorted by expert (``moue.moe.dispatch`` does the one argsort): ``token_S`` is
the token row of each of the ``S = T*k`` routed slots, ``offs_P`` the cumulative end of each
expert's group, ``gates_S`` the gate of each slot. Two kernels then do the whole expert compute:

1. ``_up_kernel``: ``h[s] = silu(x[token_s] W_gate[e]) * (x[token_s] W_up[e])``. The token gather is
   fused into the loads of the first projection (no ``x[token_S]`` copy is materialised), the
   gate and up projections accumulate side by side in fp32 and SwiGLU is applied in registers
   before the one store of ``h``.
2. ``_down_kernel``: ``y[s] = gate_s * (h[s] W_out[e])``, the gate multiply fused into the
   epilogue of the second projection.

The caller sums ``y`` back to token order with one ``index_add`` (dropless: every slot lands).

Offsets on device, no host synchronisation: a program handles one ``BLOCK_M``-row tile of one
expert. Tile ends ``cumsum(cdiv(count_e, BLOCK_M))`` are computed with torch ops on the device;
the grid is launched for the upper bound ``cdiv(S, BLOCK_M) + P`` tiles (each expert adds at most
one partial tile), and each program finds its expert by counting the tile ends ``<= pid`` in
``BLOCK_P``-wide vector loads. Programs past the last tile mask all their loads and stores.
Nothing is read back to the host, so the launch never waits for the router.

Block sizes (:class:`Blocks`, chosen per call by :func:`choose_blocks`; ``BLOCK_P = 128`` experts
per scan step in both): bf16 (or fp32) inputs, fp32 accumulation, output in the input dtype.

- ``SMALL`` (the default): ``BLOCK_M = 64`` rows (a tile of one expert), ``BLOCK_N = 64`` output
  columns, ``BLOCK_K = 32`` reduction step, 4 warps, 3 stages. Little padding when experts get few
  tokens (fine-grained pools, small batches).
- ``LARGE`` (``S >= 8192`` routed slots and ``d, f >= 256``, e.g. the benchmark's T = 32768,
  d = 1024, f = 512, 64 experts, k = 8): ``BLOCK_M = 128``, ``BLOCK_K = 64``, 8 warps, 3 stages;
  ``BLOCK_N = 64`` in the first kernel (it keeps two accumulators, gate and up) and 128 in the
  second. Bigger row tiles halve the reloads of the expert weights per token row. Compiled for the
  large shape (``moue.triton_aot.compile_report``): 126 / 112 registers, 97 KiB shared, pipelined ``cp.async``
  loads on sm_90a; 192 / 196 registers, 64 KiB on sm_80. ``BLOCK_N = 128`` in the first kernel
  was rejected: it spills 3.6 KB of registers per thread on sm_80 and sits at 255 on sm_90a.

Both compile for sm_80 (``mma``) and sm_90a (``wgmma``) without a GPU through Triton's AOT path;
:func:`moue.triton_aot.compile_report` gives registers, spills (local memory) and shared memory per kernel from the
cubin (``cuobjdump -res-usage``), and the tests require no spills and a tensor-core instruction in
the PTX. Whether the LARGE tiles are the fastest on an H100 is for ``moue bench moe --device cuda``
to say; without a GPU nothing here has been timed.

Backward: ``TritonExperts`` recomputes the forward with grouped matmuls (activation recomputation;
``moue.grouped.gated_experts``, whose backward is grouped matmuls too) and differentiates that, so
training runs end to end on this path; fused backward kernels are future work.

On CPU the kernels run under ``TRITON_INTERPRET=1`` (correctness tests only; speed needs a GPU).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["triton_experts", "triton_available", "Blocks", "SMALL", "LARGE", "choose_blocks", "KERNELS", "BLOCK_P"]

BLOCK_P = 128


@dataclass(frozen=True)
class Blocks:
    """Tile sizes and launch settings of the two kernels (see the module docstring)."""

    m: int  # rows of one expert per program (BLOCK_M), both kernels
    n_up: int  # output columns per program in the first kernel (two accumulators)
    n_down: int  # output columns per program in the second kernel
    k: int  # reduction step (BLOCK_K)
    warps: int
    stages: int


SMALL = Blocks(m=64, n_up=64, n_down=64, k=32, warps=4, stages=3)
LARGE = Blocks(m=128, n_up=64, n_down=128, k=64, warps=8, stages=3)
BLOCK_M = SMALL.m  # the default tile height (kept for callers that size buffers by it)


def choose_blocks(S: int, D: int, F: int) -> Blocks:
    """``LARGE`` tiles for big problems (``S`` routed slots, model width ``D``, expert width ``F``)."""
    return LARGE if S >= 8192 and min(D, F) >= 256 else SMALL


def triton_available(device: torch.device) -> bool:
    """Triton runs on CUDA, or anywhere under the interpreter (``TRITON_INTERPRET=1``)."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _find_tile(pid, tile_ends_ptr, offs_ptr, P, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr):
    """(expert, first row of this tile, end row of the expert) for program ``pid``; a program past
    the last tile gets an end row of 0, so every row mask is false."""
    e = 0
    for p0 in range(0, P, BLOCK_P):
        idx = p0 + tl.arange(0, BLOCK_P)
        ends = tl.load(tile_ends_ptr + idx, mask=idx < P, other=2147483647)
        e += tl.sum((ends <= pid).to(tl.int32), axis=0)
    valid = e < P
    e = tl.minimum(e, P - 1)
    prev = tl.maximum(e - 1, 0)
    tiles_before = tl.where(e > 0, tl.load(tile_ends_ptr + prev), 0)
    row_start = tl.where(e > 0, tl.load(offs_ptr + prev), 0)
    row_end = tl.where(valid, tl.load(offs_ptr + e), 0)
    row0 = row_start + (pid - tiles_before) * BLOCK_M
    return e, row0, row_end


@triton.jit
def _up_kernel(x_ptr, tok_ptr, w_ptr, offs_ptr, tile_ends_ptr, h_ptr,
               D, F, P,
               stride_xt, stride_we, stride_wd, stride_wf, stride_hs,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e, row0, row_end = _find_tile(pid_m, tile_ends_ptr, offs_ptr, P, BLOCK_P, BLOCK_M)
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    tok = tl.load(tok_ptr + rows, mask=row_ok, other=0)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < F
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w_base = w_ptr + e.to(tl.int64) * stride_we
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        a = tl.load(x_ptr + tok.to(tl.int64)[:, None] * stride_xt + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # the fused token gather
        w_mask = k_ok[:, None] & col_ok[None, :]
        wg = tl.load(w_base + ks[:, None] * stride_wd + cols[None, :] * stride_wf, mask=w_mask, other=0.0)
        wu = tl.load(w_base + ks[:, None] * stride_wd + (cols[None, :] + F) * stride_wf, mask=w_mask, other=0.0)
        acc_gate += tl.dot(a, wg)
        acc_up += tl.dot(a, wu)
    h = acc_gate * tl.sigmoid(acc_gate) * acc_up
    tl.store(h_ptr + rows.to(tl.int64)[:, None] * stride_hs + cols[None, :], h.to(h_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _down_kernel(h_ptr, w_ptr, gate_ptr, offs_ptr, tile_ends_ptr, y_ptr,
                 F, D, P,
                 stride_hs, stride_we, stride_wf, stride_wd, stride_ys,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e, row0, row_end = _find_tile(pid_m, tile_ends_ptr, offs_ptr, P, BLOCK_P, BLOCK_M)
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < D
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w_base = w_ptr + e.to(tl.int64) * stride_we
    for k0 in range(0, F, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < F
        a = tl.load(h_ptr + rows.to(tl.int64)[:, None] * stride_hs + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_base + ks[:, None] * stride_wf + cols[None, :] * stride_wd,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc += tl.dot(a, w)
    gate = tl.load(gate_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    y = acc * gate[:, None]  # the gate multiply, fused into the epilogue
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * stride_ys + cols[None, :], y.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def _launch(x_TD, token_S, gates_S, w_in_PDF2, w_out_PFD, offs_P, blocks: Blocks | None = None) -> torch.Tensor:
    S, D = token_S.shape[0], x_TD.shape[1]
    P, F = w_out_PFD.shape[0], w_out_PFD.shape[1]
    b = blocks or choose_blocks(S, D, F)
    counts_P = torch.diff(offs_P, prepend=offs_P.new_zeros(1))
    tile_ends_P = torch.cumsum((counts_P + b.m - 1) // b.m, 0).to(torch.int32)
    max_tiles = triton.cdiv(S, b.m) + P
    x_TD, w_in_PDF2, w_out_PFD = x_TD.contiguous(), w_in_PDF2.contiguous(), w_out_PFD.contiguous()
    h_SF = torch.empty(S, F, device=x_TD.device, dtype=x_TD.dtype)
    _up_kernel[(max_tiles, triton.cdiv(F, b.n_up))](
        x_TD, token_S, w_in_PDF2, offs_P, tile_ends_P, h_SF, D, F, P,
        x_TD.stride(0), w_in_PDF2.stride(0), w_in_PDF2.stride(1), w_in_PDF2.stride(2), h_SF.stride(0),
        BLOCK_M=b.m, BLOCK_N=b.n_up, BLOCK_K=b.k, BLOCK_P=BLOCK_P, num_warps=b.warps, num_stages=b.stages)
    y_SD = torch.empty(S, D, device=x_TD.device, dtype=x_TD.dtype)
    _down_kernel[(max_tiles, triton.cdiv(D, b.n_down))](
        h_SF, w_out_PFD, gates_S.contiguous(), offs_P, tile_ends_P, y_SD, F, D, P,
        h_SF.stride(0), w_out_PFD.stride(0), w_out_PFD.stride(1), w_out_PFD.stride(2), y_SD.stride(0),
        BLOCK_M=b.m, BLOCK_N=b.n_down, BLOCK_K=b.k, BLOCK_P=BLOCK_P, num_warps=b.warps, num_stages=b.stages)
    return y_SD


class TritonExperts(torch.autograd.Function):
    """Forward with the Triton kernels; backward by recomputing with grouped matmuls."""

    @staticmethod
    def forward(ctx, x_TD, token_S, gates_S, w_in_PDF2, w_out_PFD, offs_P, blocks=None):
        ctx.save_for_backward(x_TD, token_S, gates_S, w_in_PDF2, w_out_PFD, offs_P)
        return _launch(x_TD, token_S, gates_S, w_in_PDF2, w_out_PFD, offs_P, blocks)

    @staticmethod
    def backward(ctx, grad_SD):
        from moue.grouped import gated_experts

        x_TD, token_S, gates_S, w_in, w_out, offs_P = ctx.saved_tensors
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(need) for t, need in
                      zip((x_TD, gates_S, w_in, w_out), (ctx.needs_input_grad[i] for i in (0, 2, 3, 4)))]
            x, g, wi, wo = leaves
            y = gated_experts(x.index_select(0, token_S), g, wi, wo, offs_P)
            wanted = [t for t in leaves if t.requires_grad]
            grads = iter(torch.autograd.grad(y, wanted, grad_SD))
        gx, gg, gwi, gwo = (next(grads) if t.requires_grad else None for t in leaves)
        return gx, None, gg, gwi, gwo, None, None


@torch.compiler.disable  # like grouped_mm: a graph break around the launch (untested under compile without a GPU)
def triton_experts(x_TD, token_S, gates_S, w_in_PDF2, w_out_PFD, offs_P, blocks: Blocks | None = None) -> torch.Tensor:
    """``y_S = gate_s * expert_e(x[token_s])`` for tokens sorted by expert (see module docstring);
    ``blocks`` forces a tile configuration (default: :func:`choose_blocks`)."""
    return TritonExperts.apply(x_TD, token_S.to(torch.int32), gates_S, w_in_PDF2, w_out_PFD, offs_P, blocks)


# the kernels by name, for the ahead-of-time compile report (moue_core/triton_aot.py)
KERNELS = {"_up_kernel": _up_kernel, "_down_kernel": _down_kernel}
