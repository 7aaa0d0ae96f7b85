"""A linear layer whose effective weight is recomputed in backward instead of kept.

``torch.nn.functional.linear(x, formula(W, ...))`` keeps the effective weight (and every
full-size intermediate of the formula: sign masks, STE differences) alive from forward to
backward. Here backward saves only x and the parameters themselves, which exist anyway, and
rebuilds the formula once to push ``dL/dW_eff`` through it. The effective weight is built in
the compute dtype (autocast's where it is on, else x's), so a bf16 forward never materializes
an fp32 copy of the matrix, and under autocast x is kept in bf16 as autocast's own linear would.
"""

from __future__ import annotations

from typing import Callable

import torch


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear over x computes in: autocast's where it is enabled, else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class _RecomputedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, formula: Callable, x: torch.Tensor, *params: torch.Tensor):
        ctx.formula = formula
        x = x.to(compute_dtype(x))
        ctx.save_for_backward(x, *params)
        with torch.no_grad():
            w = formula(*params).to(x.dtype)
        return torch.nn.functional.linear(x, w)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, *params = ctx.saved_tensors
        needs = ctx.needs_input_grad[2:]
        with torch.enable_grad():
            leaves = [p.detach().requires_grad_(n) for p, n in zip(params, needs)]
            w = ctx.formula(*leaves).to(x.dtype)
        grad = grad.to(x.dtype)
        grad_x = grad @ w.detach() if ctx.needs_input_grad[1] else None
        grads = [None] * len(params)
        if any(needs):
            grad_w = grad.reshape(-1, grad.shape[-1]).T @ x.reshape(-1, x.shape[-1])
            wanted = [leaf for leaf, n in zip(leaves, needs) if n]
            got = iter(torch.autograd.grad(w, wanted, grad_w))
            grads = [next(got) if n else None for n in needs]
        return (None, grad_x, *grads)


def recomputed_linear(formula: Callable, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
    """``x @ formula(*params)^T`` with nothing full-size kept for backward but x and params."""
    return _RecomputedLinear.apply(formula, x, *params)
