"""FBI-LLM binarization (Ma et al., 2024): ``W_eff = alpha * sign(W) + beta``.

``alpha`` and ``beta`` are learnable and shaped ``(1, in_features)``: one pair per input
column, so every column of the effective weight takes exactly two values. They start from
the latent weight: ``beta`` is the column mean over output rows, ``alpha`` the mean absolute
deviation from it. The latent weight stays in full precision and receives the gradient of
``sign`` through a straight-through estimator with identity gradient.
"""

from __future__ import annotations

import torch
from torch import nn

from fbi.binarize.fp import DenseLinear


class BinaryWeight(torch.autograd.Function):
    """``alpha * sign(W) + beta`` with ``sign(0) = +1`` (two values per column, never three).

    Backward: identity straight-through for W, so ``dW = alpha * dW_eff``; ``dalpha`` and
    ``dbeta`` are the column sums of ``sign(W) * dW_eff`` and ``dW_eff``. Written out by hand
    because the composed ops (``where`` on a bool mask above all) cost several times the
    matmul on CPU when few tokens share the weights.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor):
        # copysign maps -0.0 to -1; adding +0.0 first turns -0.0 into +0.0 (IEEE 754).
        sign = torch.ones_like(weight).copysign_(weight + 0.0)
        ctx.save_for_backward(sign, alpha)
        return torch.addcmul(beta, alpha, sign)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        sign, alpha = ctx.saved_tensors
        return grad * alpha, (grad * sign).sum(0, keepdim=True), grad.sum(0, keepdim=True)


class FBILinear(DenseLinear):
    def __init__(self, in_features: int, out_features: int, init_std: float = 0.02) -> None:
        super().__init__(in_features, out_features, init_std)
        self.alpha = nn.Parameter(torch.empty(1, in_features))
        self.beta = nn.Parameter(torch.empty(1, in_features))
        self.reset_scales()

    @torch.no_grad()
    def reset_scales(self) -> None:
        beta = self.weight.mean(dim=0, keepdim=True)
        self.beta.copy_(beta)
        self.alpha.copy_((self.weight - beta).abs().mean(dim=0, keepdim=True))

    def effective_weight(self) -> torch.Tensor:
        return BinaryWeight.apply(self.weight, self.alpha, self.beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.effective_weight())
