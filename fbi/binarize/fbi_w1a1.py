"""FBI-LLM weights with 1-bit activations, QuEST-style (Panferov et al., 2025, arXiv 2502.05003).

The input is rotated by a normalized block-Hadamard matrix H (``scheme.hadamard_block``, 128, or the largest power of two
dividing in_features when that is smaller)
along features, then binarized per token: ``x_q = sqrt(2/pi) * RMS(Hx) * sign(Hx)`` (the
MSE-optimal 1-bit scale for Gaussian data). Its gradient is the straight-through estimate
masked by QuEST's trust region: it passes only where ``|Hx - x_q| <= trust * scale``. The
latent weight lives in the rotated basis (``init_from_dense`` stores ``W H^T``), binarized as
FBI-LLM's ``alpha * sign(W) + beta``; then ``y = x_q W_eff^T`` is a product of binary
matrices plus the rank-1 ``beta`` term. Not linear in x: no fold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fbi.binarize.fbi import FBIConfig, FBILinear
from fbi.config import require


def hadamard(n: int) -> torch.Tensor:
    """Normalized (orthogonal) Sylvester Hadamard matrix, n a power of two."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def rotate(x: torch.Tensor, block: int) -> torch.Tensor:
    """Apply H blockwise along the last dim (block must divide it)."""
    h = hadamard(block).to(x.dtype).to(x.device)
    return (x.reshape(*x.shape[:-1], -1, block) @ h.T).reshape(x.shape)


@dataclass
class FBIW1A1Config(FBIConfig):
    name: str = "fbi_w1a1"
    hadamard_block: int = 128  # rotation block (a power of two)
    trust: float = 1.0  # the activation gradient passes where |Hx - q| <= trust * scale

    def __post_init__(self) -> None:
        super().__post_init__()
        block = self.hadamard_block
        require(block > 0 and block & (block - 1) == 0, "scheme.hadamard_block",
                f"got {block}; choose a power of two such as 128")
        require(self.trust > 0, "scheme.trust", f"got {self.trust}; choose a positive factor")


class _TrustSign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, trust: float):
        scale = math.sqrt(2 / math.pi) * x.pow(2).mean(dim=-1, keepdim=True).sqrt()
        q = torch.ones_like(x).copysign_(x + 0.0) * scale
        ctx.save_for_backward((x - q).abs() <= trust * scale)
        return q

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inside,) = ctx.saved_tensors
        return grad * inside, None


class FBIW1A1Linear(FBILinear):
    Config = FBIW1A1Config
    QUANTIZES_ACTIVATIONS = True

    def _block(self) -> int:
        """``hadamard_block``, or the largest power of two dividing in_features if smaller
        (LLaMA's d_ff is often not a multiple of 128)."""
        return math.gcd(self.cfg.hadamard_block, self.in_features & -self.in_features)

    @torch.no_grad()
    def init_from_dense(self, weight: torch.Tensor) -> None:
        self.weight.copy_(rotate(weight, self._block()))
        self.reset_scales()

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return _TrustSign.apply(rotate(x, self._block()), self.cfg.trust)
