"""RoPE and RMSNorm as autograd functions with hand-written backwards: fewer passes over memory in eager mode.

A small trial's step on CPU is mostly not matmuls (``moue bench train``: about 70% of an eager step
on a 2-core Xeon), and these two were a fifth of it, as chains of elementwise ops autograd records
one by one:

- **RoPE** (``apply_rope``): autograd's graph of ``cat(x1 cos - x2 sin, x1 sin + x2 cos)`` on the
  strided ``[B, H, S, d]`` views of the fused QKV output was ten elementwise passes over a head's
  halves plus the ``cat`` and its backward's slices. Here the rotation is four passes written into
  one contiguous output, and its gradient is the inverse rotation, ``rope(g, cos, -sin)``, with
  nothing saved but the tables.
- **RMSNorm** (``RMSNorm``, an ``nn.RMSNorm`` with the same parameter and state-dict key): the
  forward is ``aten::_fused_rms_norm`` (one op returning the output and ``1/rms``), the backward
  ``dx = rstd (g w - x_hat mean(g w x_hat))``, ``dw = sum(g x_hat)`` in five passes. torch 2.13
  has no CPU kernel for ``_fused_rms_norm_backward``, and its autograd formula for the fused op
  is the composite one.

Measured on the quickstart trial's shapes (``T = 8192``, ``D = 128``, 4 heads of 32; 2-core Xeon,
fp32, forward + backward): RoPE of q and k 12.3 -> 6.6 ms per layer, RMSNorm 3.9 -> 2.8 ms each.

Both fall back to the composite ops where these would not help or are not checked: inside
``torch.compile`` (Inductor fuses the composite itself; the fused functions there were slower),
under autocast (the composite's dtypes are what autocast expects), under ``torch.func``
transforms, on devices other than CPU and CUDA, and inside ``composite()`` (benchmarks, tests);
RMSNorm also for inputs other than float32 / float64 and for ``eps = None``. A second derivative
through them is an error (``once_differentiable``); no part of moue takes one. Values agree with
the composite to float rounding (``tests/test_model_reference.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RMSNorm", "apply_rope", "composite", "rope_reference"]

_forced_composite = False


@contextlib.contextmanager
def composite() -> Iterator[None]:
    """Run the composite ops instead of the fused functions inside this block (``moue bench train
    --composite`` compares the two; tests check they agree)."""
    global _forced_composite
    before, _forced_composite = _forced_composite, True
    try:
        yield
    finally:
        _forced_composite = before


_functorch_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", lambda x: False)


def _eager(x: torch.Tensor) -> bool:
    """Whether the hand-written functions run: eager mode (not compiling, exporting or under
    ``torch.func`` transforms: they have no ``vmap`` / ``jvp`` rules), no autocast, a real device."""
    if _forced_composite or x.device.type not in ("cpu", "cuda") or torch.compiler.is_compiling():
        return False
    if _functorch_wrapped(x):
        return False
    return not torch.is_autocast_enabled(x.device.type)


def rope_reference(x_BHSd: torch.Tensor, cos_Sd: torch.Tensor, sin_Sd: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of each head by position-dependent angles (composite ops)."""
    x1, x2 = x_BHSd.chunk(2, dim=-1)
    cos, sin = cos_Sd.to(x_BHSd.dtype), sin_Sd.to(x_BHSd.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``rope_reference`` in four passes into one contiguous output (``x`` may be any strided view)."""
    h = x.shape[-1] // 2
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    x1, x2, o1, o2 = x[..., :h], x[..., h:], out[..., :h], out[..., h:]
    torch.mul(x1, cos, out=o1)
    o1.addcmul_(x2, sin, value=-1)
    torch.mul(x1, sin, out=o2)
    o2.addcmul_(x2, cos)
    return out


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    @torch.autograd.function.once_differentiable  # a second derivative is an error, not a wrong value
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, -sin), None, None  # a rotation's inverse is its transpose


def apply_rope(x_BHSd: torch.Tensor, cos_Sd: torch.Tensor, sin_Sd: torch.Tensor) -> torch.Tensor:
    """RoPE on ``[B, H, S, d]`` (``cos_Sd``, ``sin_Sd``: ``[S, d/2]`` tables); the tables get no gradient."""
    if not _eager(x_BHSd):
        return rope_reference(x_BHSd, cos_Sd, sin_Sd)
    return _Rope.apply(x_BHSd, cos_Sd.to(x_BHSd.dtype), sin_Sd.to(x_BHSd.dtype))


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], weight, eps)
        ctx.save_for_backward(x, rstd, weight)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, rstd, weight = ctx.saved_tensors
        x_hat = x * rstd
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = torch.linalg.vecdot(grad.reshape(-1, x.shape[-1]).t(), x_hat.reshape(-1, x.shape[-1]).t())
        if not ctx.needs_input_grad[0]:
            return None, grad_w, None
        gw = grad * weight
        mean = torch.linalg.vecdot(gw, x_hat).unsqueeze(-1).div_(x.shape[-1])
        grad_x = gw.sub_(x_hat.mul_(mean)).mul_(rstd)
        return grad_x, grad_w, None


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` over the last dimension, with ``_RMSNorm`` as its eager path (same parameter)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.weight is None or len(self.normalized_shape) != 1 or self.eps is None or not _eager(x)
                or x.dtype not in (torch.float32, torch.float64) or x.dtype != self.weight.dtype):
            return super().forward(x)  # the backward here keeps no low-precision rules
        return _RMSNorm.apply(x, self.weight, self.eps)
