"""BitNet b1.58 (Ma et al., 2024, arXiv 2402.17764) as its training tips write BitLinear:
``x_q = absmax8(RMSNorm(x))``, ternary weights ``RoundClip(W / mean|W|, -1, 1) * mean|W|``,
``y = x_q W_q^T``. The tips write only ``x_norm = RMSNorm(x)``; that this norm has no trained
gain and LlamaRMSNorm's default eps 1e-6 is our inference from their pseudo-code, not their
statement. Their step 2, "remove RMSNorm before attention and SwiGLU" (each BitLinear
normalizes its own input), is the default (``scheme.block_norms=false``: the model builds no
``input_layernorm``/``post_attention_layernorm``); ``true`` keeps them, fbi's earlier form.
Straight-through gradients written ``w + (q(w) - w).detach()`` as the tips do (the estimator:
Bengio et al., 2013). Packed 5 ternary digits per byte (1.6 bits per weight)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fbi.binarize.bitnet import BitNetConfig, BitNetLinear, absmax8, normalize
from fbi.binarize.fp import DenseLinear
from fbi.binarize.packing import pack_ternary, shape_tensor, straight_through, unpack_ternary


@dataclass
class BitNet158Config(BitNetConfig):
    name: str = "bitnet158"
    norm: str = "rmsnorm"  # rmsnorm (the tips') | layernorm | none (fbi's earlier form)
    block_norms: bool = False  # the tips' step 2 removes them; true: fbi's earlier form


def _gamma(w: torch.Tensor) -> torch.Tensor:
    return w.abs().mean().clamp(min=1e-5)


class BitNet158Linear(DenseLinear):
    Config = BitNet158Config
    QUANTIZES_ACTIVATIONS = True
    keeps_block_norms = BitNetLinear.keeps_block_norms

    def weight_formula(self, weight) -> torch.Tensor:
        with torch.no_grad():
            gamma = _gamma(weight)
            q = (weight / gamma).round().clamp(-1, 1) * gamma
        return straight_through(weight, q)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return absmax8(normalize(x, self.cfg.norm))

    @torch.no_grad()
    def pack(self) -> dict[str, torch.Tensor]:
        gamma = _gamma(self.weight)
        t = (self.weight / gamma).round().clamp(-1, 1)
        return {"trits": pack_ternary(t), "shape": shape_tensor(self.weight.shape),
                "scale": gamma.reshape(1)}

    @staticmethod
    def unpack(packed: dict[str, torch.Tensor]) -> torch.Tensor:
        t = unpack_ternary(packed["trits"], tuple(packed["shape"].tolist())).to(packed["scale"].dtype)
        return t * packed["scale"]
