"""FBI-LLM binarization (Ma et al., 2024): ``W_eff = alpha * sign(W) + beta``.

``alpha`` and ``beta`` are learnable. Their layout (``scheme.layout``) is ``column`` (the
paper's: shaped ``(1, in)``, one pair per input column, so every column takes exactly two
values), ``row`` (``(out, 1)``) or ``tensor`` (``(1, 1)``). They start from the latent weight:
``beta`` is the mean over the group, ``alpha`` the mean absolute deviation from it. The latent
weight stays in full precision and gets the gradient of ``sign`` through the identity
straight-through estimator, so ``dW = alpha * dW_eff``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fbi.binarize.fp import DenseLinear
from fbi.binarize.packing import pack_signs, shape_tensor, sign, sign_ste, unpack_signs
from fbi.binarize.recompute import compute_dtype
from fbi.config import SchemeConfig, one_of

LAYOUT_DIM = {"column": (0,), "row": (1,), "tensor": (0, 1)}  # dims a scale is shared over


@dataclass
class FBIConfig(SchemeConfig):
    name: str = "fbi"
    layout: str = "column"  # alpha/beta per column (the paper's) | row | tensor

    def __post_init__(self) -> None:
        super().__post_init__()
        one_of(self.layout, tuple(LAYOUT_DIM), "scheme.layout")


class _FBILinearFunction(torch.autograd.Function):
    """``x (alpha * sign(W) + beta)^T`` keeping only x and the parameters for backward: sign
    and the effective weight are rebuilt there (one ``copysign`` + ``addcmul`` pass) instead of
    held from forward to backward (composed autograd keeps 2x the weight: sign and W_eff).
    Gradients written by hand: ``dW = alpha * G``, ``dalpha = sum(sign * G)``, ``dbeta = sum(G)``
    over each scale's group, with ``G = grad^T x``."""

    @staticmethod
    def forward(ctx, x, weight, alpha, beta, dims):
        ctx.dims = dims
        x = x.to(compute_dtype(x))
        ctx.save_for_backward(x, weight, alpha, beta)
        return nn.functional.linear(x, _effective(weight, alpha, beta, x.dtype)[1])

    @staticmethod
    def backward(ctx, grad):
        x, weight, alpha, beta = ctx.saved_tensors
        grad = grad.to(x.dtype)
        sgn, w_eff = _effective(weight, alpha, beta, x.dtype)
        grad_x = grad @ w_eff if ctx.needs_input_grad[0] else None
        del w_eff
        g = (grad.reshape(-1, grad.shape[-1]).T @ x.reshape(-1, x.shape[-1])).to(weight.dtype)
        d_alpha = (g * sgn).sum(ctx.dims, keepdim=True).to(alpha.dtype)
        d_beta = g.sum(ctx.dims, keepdim=True).to(beta.dtype)
        return grad_x, g.mul_(alpha.to(g.dtype)), d_alpha, d_beta, None


def _effective(weight, alpha, beta, dtype):
    """(sign(W), alpha * sign(W) + beta) in the compute dtype."""
    sgn = torch.ones_like(weight, dtype=dtype).copysign_(weight + 0.0)
    return sgn, torch.addcmul(beta.to(dtype), alpha.to(dtype), sgn)


class FBILinear(DenseLinear):
    Config = FBIConfig
    SCALES = ("alpha", "beta")
    SIGN_ONLY = True

    def _dims(self) -> tuple[int, ...]:
        return LAYOUT_DIM[self.cfg.layout]

    def make_scales(self) -> None:
        shape = [self.out_features, self.in_features]
        for d in self._dims():
            shape[d] = 1
        self.alpha = nn.Parameter(torch.empty(shape))
        self.beta = nn.Parameter(torch.empty(shape))

    @torch.no_grad()
    def reset_scales(self) -> None:
        beta = self.weight.mean(dim=self._dims(), keepdim=True)
        self.beta.copy_(beta)
        self.alpha.copy_((self.weight - beta).abs().mean(dim=self._dims(), keepdim=True))

    def weight_params(self) -> tuple[torch.Tensor, ...]:
        return self.weight, self.alpha, self.beta

    def weight_formula(self, weight, alpha, beta) -> torch.Tensor:
        return torch.addcmul(beta, alpha, sign_ste(weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quantize_input(x)
        return _FBILinearFunction.apply(x, self.weight, self.alpha, self.beta, self._dims())

    @torch.no_grad()
    def pack(self) -> dict[str, torch.Tensor]:
        return {
            "signs": pack_signs(sign(self.weight)),
            "shape": shape_tensor(self.weight.shape),
            "alpha": self.alpha.detach().clone(),
            "beta": self.beta.detach().clone(),
        }

    @staticmethod
    def unpack(packed: dict[str, torch.Tensor]) -> torch.Tensor:
        s = unpack_signs(packed["signs"], tuple(packed["shape"].tolist())).to(packed["alpha"].dtype)
        return torch.addcmul(packed["beta"], packed["alpha"], s)
