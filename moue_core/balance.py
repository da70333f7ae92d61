"""Balance losses (docs/MODEL.md section 3), each normalised so uniform routing gives its coefficient.

Inputs, per layer ``l`` over the active window (width ``w``), stacked across layers:

    frac_Lw[l, j]  fraction of the layer's T*k routed slots sent to window slot j (no gradient)
    prob_Lw[l, j]  mean router score of slot j over the layer's tokens (differentiable): softmax(z)
                   for softmax/trajectory routers, the NormRouter scores for ``norm`` (router.py)
    ids_Lw[l, j]   pool id of window slot j of layer l

"Uniform routing" means every layer spreads its slots and probabilities evenly over its own
window: ``frac = prob = 1/w``. Under it each loss below equals ``coef`` exactly:

- ``switch``: per layer ``coef * w * sum_j f_j p_j``, averaged over layers.
- ``pool`` (UniPool): ``fbar_j = mean_l f_j^l`` and ``pbar_j = mean_l p_j^l`` over all layers
  (zero where ``j`` is outside ``C_l``), loss ``coef * sum_j fbar_j pbar_j / sum_j u_j^2`` with
  ``u_j = n_j / (L w)`` the uniform ``fbar``. When the windows tile the pool evenly ``sum u_j^2 =
  1/P`` and this is UniPool's ``coef * P * sum_j fbar_j pbar_j``; otherwise the normaliser keeps the
  uniform value at ``coef``.
- ``exposure`` (MoUE-style universal balance; our design, MoUE's equations are not published).
  With per-depth weights ``gamma_l > 0`` (all 1 by default), ``Gamma_j = sum_(l: j in C_l) gamma_l``:

      r_j     = w * sum_(l: j in C_l) gamma_l f_j^l / Gamma_j    expert j's load over the layers that
                                                                  reach it, against its share 1/w of
                                                                  each of their windows (1 = fair)
      r_j^l   = w * f_j^l                                         its load in layer l against its share
      a_j^l   = sqrt(r_j * r_j^l)                                 (no gradient)
      loss    = coef * sum_l (gamma_l / sum_m gamma_m) * sum_(j in C_l) a_j^l p_j^l

  Every layer is charged for each expert of its window the geometric mean of the expert's
  exposure-corrected pool-wide load and its load in that layer. The pool-wide factor is UniPool's
  pool-level balance with MoUE's exposure correction (an expert reachable from more layers may
  carry proportionally more); the per-layer factor is what makes the charge depth-aware: a layer
  pays for an expert's pool-wide overload in proportion to its own use of it, and a layer that
  collapses onto a few experts pays even when the pool as a whole is balanced. ``pool`` charges
  every layer that reaches ``j`` the same ``fbar_j``, so the two differ, in value and gradient,
  whenever the layers' loads differ, also when every expert is reachable from the same number of
  layers (where the older ``fhat``-only form was ``pool`` to 7 digits). Uniform routing: ``r = r^l
  = 1`` and ``sum_j p_j^l = 1``, so the loss is ``coef`` for every topology and every ``gamma``.
- ``none``: zero.

Previous micro-batch (``model.balance_prev_batch``, UniPool's default for its pool loss): the
pool-level statistic (``fbar`` of ``pool``, ``r`` of ``exposure``) is taken from the previous
training micro-batch, detached, and no pool-level loss is applied until one exists (UniPool's
``PoolAuxLossAccumulator`` returns no loss for the first micro-batch; Centaurus-Alpha/UniPool,
``megatron/core/transformer/moe/moe_utils.py``). ``pooled_statistic`` computes it;
``moue.moe.MoE`` keeps it.

z-loss (ST-MoE): ``coef * mean over layers of mean_t logsumexp(z_t)^2``; independent of the above.
"""

from __future__ import annotations

import torch

__all__ = ["balance_loss", "pooled_statistic", "pool_fraction", "exposure_load", "z_loss", "LOSSES", "POOLED"]


def _scatter_sum(values_Lw: torch.Tensor, ids_Lw: torch.Tensor, pool_size: int) -> torch.Tensor:
    """Sum each pool expert's entries over layers: ``[L, w] -> [P]``."""
    out_P = values_Lw.new_zeros(pool_size)
    return out_P.index_add(0, ids_Lw.reshape(-1), values_Lw.reshape(-1))


def _depth_weights(frac_Lw: torch.Tensor, gamma_L: torch.Tensor | None) -> torch.Tensor:
    """``gamma_l`` as an ``[L, 1]`` column (ones when unset)."""
    if gamma_L is None:
        return frac_Lw.new_ones(frac_Lw.shape[0], 1)
    return gamma_L.to(frac_Lw.dtype).reshape(-1, 1)


def pool_fraction(frac_Lw: torch.Tensor, ids_Lw: torch.Tensor, pool_size: int, gamma_L=None) -> torch.Tensor:
    """``fbar_j = mean_l f_j^l``, the pool loss's load statistic."""
    return _scatter_sum(frac_Lw.detach(), ids_Lw, pool_size) / frac_Lw.shape[0]


def exposure_load(frac_Lw: torch.Tensor, ids_Lw: torch.Tensor, pool_size: int, gamma_L=None) -> torch.Tensor:
    """``r_j = w * sum_(l reaching j) gamma_l f_j^l / Gamma_j`` (0 for unreachable experts)."""
    frac_Lw = frac_Lw.detach()
    gamma_L1 = _depth_weights(frac_Lw, gamma_L)
    reach_P = _scatter_sum(gamma_L1.expand_as(frac_Lw), ids_Lw, pool_size)  # Gamma_j
    load_P = _scatter_sum(gamma_L1 * frac_Lw, ids_Lw, pool_size)
    return frac_Lw.shape[1] * load_P / reach_P.clamp_min(torch.finfo(load_P.dtype).tiny)


# model.balance -> its pool-level load statistic (the one balance_prev_batch takes from the last batch)
POOLED = {"pool": pool_fraction, "exposure": exposure_load}


def pooled_statistic(kind: str, frac_Lw: torch.Tensor, ids_Lw: torch.Tensor, pool_size: int,
                     gamma_L: torch.Tensor | None = None) -> torch.Tensor | None:
    """The detached pool-level statistic of loss ``kind`` (``None`` for a loss without one)."""
    fn = POOLED.get(kind)
    return None if fn is None else fn(frac_Lw, ids_Lw, pool_size, gamma_L)


def _switch(frac_Lw, prob_Lw, ids_Lw, pool_size, *, coef, pooled_P, gamma_L):
    w = frac_Lw.shape[1]
    per_layer_L = w * (frac_Lw * prob_Lw).sum(dim=1)
    return coef * per_layer_L.mean()


def _pool(frac_Lw, prob_Lw, ids_Lw, pool_size, *, coef, pooled_P, gamma_L):
    L, w = frac_Lw.shape
    exposure_P = _scatter_sum(torch.ones_like(frac_Lw), ids_Lw, pool_size)  # n_j
    pbar_P = _scatter_sum(prob_Lw, ids_Lw, pool_size) / L
    uniform_P = exposure_P / (L * w)
    return coef * (pooled_P.to(pbar_P.dtype) * pbar_P).sum() / uniform_P.pow(2).sum()


def _exposure(frac_Lw, prob_Lw, ids_Lw, pool_size, *, coef, pooled_P, gamma_L):
    w = frac_Lw.shape[1]
    gamma_L1 = _depth_weights(frac_Lw, gamma_L)
    charge_Lw = (pooled_P.to(frac_Lw.dtype)[ids_Lw] * w * frac_Lw).sqrt()  # a_j^l
    per_layer_L1 = (charge_Lw * prob_Lw).sum(dim=1, keepdim=True)
    return coef * (gamma_L1 * per_layer_L1).sum() / gamma_L1.sum()


def _none(frac_Lw, prob_Lw, ids_Lw, pool_size, *, coef, pooled_P, gamma_L):
    return prob_Lw.new_zeros(())


# model.balance -> its loss (the formulas of the module docstring); moue.config.BALANCES names them
LOSSES = {"switch": _switch, "pool": _pool, "exposure": _exposure, "none": _none}


def balance_loss(
    kind: str,
    coef: float,
    *,
    frac_Lw: torch.Tensor,
    prob_Lw: torch.Tensor,
    ids_Lw: torch.Tensor,
    pool_size: int,
    prev_P: torch.Tensor | None = None,
    gamma_L: torch.Tensor | None = None,
) -> torch.Tensor:
    """The balance loss ``kind`` (a key of ``LOSSES``: ``switch`` | ``pool`` | ``exposure`` | ``none``).

    ``prev_P``: the pool-level statistic of the previous micro-batch (``pooled_statistic``) to use
    instead of this batch's (``pool``, ``exposure``); ``gamma_L``: per-depth weights (``exposure``)."""
    if kind not in LOSSES:
        raise ValueError(f"unknown balance loss {kind!r}")
    if coef == 0:
        return prob_Lw.new_zeros(())
    frac_Lw = frac_Lw.detach().to(prob_Lw.dtype)
    pooled_P = prev_P if prev_P is not None else pooled_statistic(kind, frac_Lw, ids_Lw, pool_size, gamma_L)
    return LOSSES[kind](frac_Lw, prob_Lw, ids_Lw, pool_size, coef=coef, pooled_P=pooled_P, gamma_L=gamma_L)


def z_loss(coef: float, lse_LT: list[torch.Tensor]) -> torch.Tensor:
    """ST-MoE router z-loss: ``coef * mean_l mean_t logsumexp(z_lt)^2``."""
    return coef * torch.stack([lse.pow(2).mean() for lse in lse_LT]).mean()
