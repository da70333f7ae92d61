"""Grouped matmul with a grouped backward: the expert matmuls of the CPU / grouped_mm path.

Its own module so that both dispatch backends use it without importing each other
(``moue.moe`` imports the Triton backend lazily; the Triton backward recomputes with this).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["grouped_mm"]

_grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm


class _GroupedMM(torch.autograd.Function):
    """``out[s] = a[s] @ b[group(s)]`` with groups given by cumulative ends ``offs``.

    Wraps ``grouped_mm`` so that backward also runs as grouped matmuls and tolerates the
    non-contiguous (expanded) gradients autograd may hand it, which the raw op rejects.
    """

    @staticmethod
    def forward(ctx, a_SK: torch.Tensor, b_GKN: torch.Tensor, offs_G: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a_SK, b_GKN, offs_G)
        return _grouped_mm(a_SK, b_GKN, offs=offs_G)

    @staticmethod
    def backward(ctx, grad_SN: torch.Tensor):
        a_SK, b_GKN, offs_G = ctx.saved_tensors
        grad_SN = grad_SN.contiguous()
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_a = _grouped_mm(grad_SN, b_GKN.transpose(-2, -1), offs=offs_G)
        if ctx.needs_input_grad[1]:
            # 2D x 2D with groups along the reduction dim gives one [K, N] block per group
            grad_b = _grouped_mm(a_SK.t(), grad_SN, offs=offs_G)
        return grad_a, grad_b, None


@torch.compiler.disable  # torch 2.13's meta kernel for _grouped_mm accepts bf16 only: run it eagerly
def grouped_mm(a_SK: torch.Tensor, b_GKN: torch.Tensor, offs_G: torch.Tensor) -> torch.Tensor:
    return _GroupedMM.apply(a_SK, b_GKN, offs_G)
