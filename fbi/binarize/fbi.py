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
    """``alpha * sign(W) + beta`` in one pass over W, with ``sign(0) = +1`` (two values per
    column, never three). Backward: identity straight-through for W, so ``dW = alpha * dW_eff``;
    ``dalpha`` and ``dbeta`` are the column sums of ``sign(W) * dW_eff`` and ``dW_eff``.

    Fused rather than composed from ``sign``, ``mul`` and ``add`` because those make three
    weight-sized temporaries per layer per step, which costs as much as the matmul when few
    tokens share the weights; only a one-byte mask is kept for backward.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor):
        positive = weight >= 0
        ctx.save_for_backward(positive, alpha)
        return torch.where(positive, beta + alpha, beta - alpha)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        positive, alpha = ctx.saved_tensors
        signed = torch.where(positive, grad, -grad)
        return grad * alpha, signed.sum(0, keepdim=True), grad.sum(0, keepdim=True)


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
