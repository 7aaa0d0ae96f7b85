"""OneBit (Xu et al., 2024, arXiv 2402.11295): ``Y = [(X * g) sign(W)^T] * h``.

``g`` (in_features) and ``h`` (out_features) are full-precision vectors, so the effective
weight is ``h[:, None] * sign(W) * g[None, :]``. From a dense model they come from the
sign-value-independent decomposition (SVID): ``|W| ~ a b^T`` by its top singular pair,
``h = a``, ``g = b``. From scratch (random latent W), ``g = 1`` and ``h`` the row's mean |W|,
so the effective weight starts at the latent weight's scale. Identity STE for sign.
"""

from __future__ import annotations

import torch
from torch import nn

from fbi.binarize.fp import DenseLinear
from fbi.binarize.packing import pack_signs, shape_tensor, sign, sign_ste, unpack_signs


class OneBitLinear(DenseLinear):
    SCALES = ("g", "h")
    SIGN_ONLY = True

    def make_scales(self) -> None:
        self.g = nn.Parameter(torch.empty(self.in_features))
        self.h = nn.Parameter(torch.empty(self.out_features))

    @torch.no_grad()
    def reset_scales(self) -> None:
        self.g.fill_(1.0)
        self.h.copy_(self.weight.abs().mean(dim=1))

    @torch.no_grad()
    def init_from_dense(self, weight: torch.Tensor) -> None:
        self.weight.copy_(weight)
        u, s, vh = torch.linalg.svd(weight.abs().double(), full_matrices=False)
        # |W| is non-negative, so its top singular vectors can be taken non-negative.
        a, b = (u[:, 0] * s[0].sqrt()).abs(), (vh[0] * s[0].sqrt()).abs()
        self.h.copy_(a)
        self.g.copy_(b)

    def weight_params(self) -> tuple[torch.Tensor, ...]:
        return self.weight, self.g, self.h

    def weight_formula(self, weight, g, h) -> torch.Tensor:
        return sign_ste(weight) * g[None, :] * h[:, None]

    @torch.no_grad()
    def pack(self) -> dict[str, torch.Tensor]:
        return {"signs": pack_signs(sign(self.weight)), "shape": shape_tensor(self.weight.shape),
                "g": self.g.detach().clone(), "h": self.h.detach().clone()}

    @staticmethod
    def unpack(packed: dict[str, torch.Tensor]) -> torch.Tensor:
        s = unpack_signs(packed["signs"], tuple(packed["shape"].tolist())).to(packed["g"].dtype)
        return s * packed["g"][None, :] * packed["h"][:, None]
