"""FBI-LLM binarization (Ma et al., 2024): ``W_eff = alpha * sign(W) + beta``.

``alpha`` and ``beta`` are learnable. Their layout (``scheme.layout``) is ``column`` (the
paper's: shaped ``(1, in)``, one pair per input column, so every column takes exactly two
values), ``row`` (``(out, 1)``) or ``tensor`` (``(1, 1)``). They start from the latent weight:
``beta`` is the mean over the group, ``alpha`` the mean absolute deviation from it. The latent
weight stays in full precision and gets the gradient of ``sign`` through the identity
straight-through estimator, so ``dW = alpha * dW_eff``.
"""

from __future__ import annotations

import torch
from torch import nn

from fbi.binarize.fp import DenseLinear
from fbi.binarize.packing import pack_signs, shape_tensor, sign, sign_ste, unpack_signs

LAYOUT_DIM = {"column": (0,), "row": (1,), "tensor": (0, 1)}  # dims a scale is shared over


class FBILinear(DenseLinear):
    SCALES = ("alpha", "beta")

    def _dims(self) -> tuple[int, ...]:
        return LAYOUT_DIM[self.cfg.layout if self.cfg is not None else "column"]

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
