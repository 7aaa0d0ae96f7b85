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


class SignSTE(torch.autograd.Function):
    """``sign`` with ``sign(0) = +1`` (two values, never three); gradient passed unchanged."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor) -> torch.Tensor:
        return torch.where(weight >= 0, 1.0, -1.0).to(weight.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


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
        return self.alpha * SignSTE.apply(self.weight) + self.beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.effective_weight())
