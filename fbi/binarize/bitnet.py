"""BitNet (Wang et al., 2023, arXiv 2310.11453): weights ``sign(W - mean(W)) * mean|W|``,
activations 8-bit absmax per token, straight-through estimators for both.

The scale is a statistic of W, not a parameter, and the estimator is the identity
(``dW = dW_eff``), as in the paper's ``w + (q(w) - w).detach()``. The input is quantized, so the
forward is not linear in x: no fold.
"""

from __future__ import annotations

import torch

from fbi.binarize.fp import DenseLinear
from fbi.binarize.packing import pack_signs, shape_tensor, sign, straight_through, unpack_signs


def absmax8(x: torch.Tensor) -> torch.Tensor:
    """Per-token (last dim) 8-bit absmax fake quantization with identity gradient."""
    with torch.no_grad():
        scale = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
        q = (x * scale).round().clamp(-128, 127) / scale
    return straight_through(x, q)


class BitNetLinear(DenseLinear):
    QUANTIZES_ACTIVATIONS = True

    def weight_formula(self, weight) -> torch.Tensor:
        with torch.no_grad():
            q = sign(weight - weight.mean()) * weight.abs().mean()
        return straight_through(weight, q)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return absmax8(x)

    @torch.no_grad()
    def pack(self) -> dict[str, torch.Tensor]:
        w = self.weight
        return {"signs": pack_signs(sign(w - w.mean())), "shape": shape_tensor(w.shape),
                "scale": w.abs().mean().reshape(1)}

    @staticmethod
    def unpack(packed: dict[str, torch.Tensor]) -> torch.Tensor:
        s = unpack_signs(packed["signs"], tuple(packed["shape"].tolist())).to(packed["scale"].dtype)
        return s * packed["scale"]
