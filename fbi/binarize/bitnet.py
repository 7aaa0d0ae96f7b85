"""BitNet (Wang et al., 2023, arXiv 2310.11453): ``y = Quant(Norm(x)) W_b^T`` with binary
weights ``W_b = sign(W - mean(W)) * mean|W|`` and 8-bit absmax activations.

The default is the authors' published code form: the BitNet b1.58 training tips (Microsoft,
2024, §4) define b1 as b1.58's BitLinear with only the weight quantizer swapped, so the input
is RMS-normalized inside the layer (no gain, eps 1e-6) and, the tips' step 2, the model drops
the RMSNorms in front of attention and the MLP (``scheme.block_norms=false``). The paper's
form is ``scheme.norm=layernorm scheme.block_norms=true``: a LayerNorm without affine
parameters, ``(x - E x) / sqrt(Var x + eps)``, inside each BitLinear, and the blocks' norms
kept. Either way every binarized layer, o_proj and down_proj included, quantizes a normalized
input.
Gradients are straight-through estimates (Bengio et al., 2013, arXiv 1308.3432) to the latent
weight and the normalized input; the ``w + (q(w) - w).detach()`` way of writing them comes from
the BitNet b1.58 training tips (Microsoft, 2024), not from this paper. The weight scale is a
statistic of W, not a parameter. The input is quantized, so no fold.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fbi.binarize.fp import DenseLinear
from fbi.binarize.packing import pack_signs, shape_tensor, sign, straight_through, unpack_signs
from fbi.config import SchemeConfig, one_of, require

# nn.LayerNorm's default eps; LlamaRMSNorm's default (the tips write ``RMSNorm(x)`` only)
NORM_EPS = {"layernorm": 1e-5, "rmsnorm": 1e-6}


@dataclass
class BitNetConfig(SchemeConfig):
    name: str = "bitnet"
    # The parameter-free norm applied to the input before quantization: rmsnorm (the authors'
    # code, the b1.58 tips), layernorm (the BitNet paper's), none (fbi's earlier form).
    norm: str = "rmsnorm"
    # Keep the RMSNorms in front of attention and the MLP: the tips' step 2 removes them, as
    # each BitLinear normalizes its own input; true is the paper's and fbi's earlier form.
    block_norms: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        one_of(self.norm, (*NORM_EPS, "none"), "scheme.norm")
        require(self.block_norms or self.norm != "none", "scheme.block_norms",
                "false removes the blocks' norms, but scheme.norm=none leaves the layers' "
                "inputs unnormalized too; set scheme.block_norms=true or choose a scheme.norm")


def absmax8(x: torch.Tensor) -> torch.Tensor:
    """Per-token (last dim) 8-bit absmax fake quantization with identity gradient."""
    with torch.no_grad():
        scale = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
        q = (x * scale).round().clamp(-128, 127) / scale
    return straight_through(x, q)


def normalize(x: torch.Tensor, norm: str) -> torch.Tensor:
    """``norm`` over the last dim without affine parameters, computed in fp32 at least as
    LlamaRMSNorm does, returned in x's dtype."""
    if norm == "none":
        return x
    eps, shape = NORM_EPS[norm], (x.shape[-1],)
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    out = F.layer_norm(xf, shape, eps=eps) if norm == "layernorm" else F.rms_norm(xf, shape, eps=eps)
    return out.to(x.dtype)


class BitNetLinear(DenseLinear):
    Config = BitNetConfig
    QUANTIZES_ACTIVATIONS = True

    @classmethod
    def keeps_block_norms(cls, cfg: BitNetConfig) -> bool:
        return cfg.block_norms

    def weight_formula(self, weight) -> torch.Tensor:
        with torch.no_grad():
            q = sign(weight - weight.mean()) * weight.abs().mean()
        return straight_through(weight, q)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return absmax8(normalize(x, self.cfg.norm))

    @torch.no_grad()
    def pack(self) -> dict[str, torch.Tensor]:
        w = self.weight
        return {"signs": pack_signs(sign(w - w.mean())), "shape": shape_tensor(w.shape),
                "scale": w.abs().mean().reshape(1)}

    @staticmethod
    def unpack(packed: dict[str, torch.Tensor]) -> torch.Tensor:
        s = unpack_signs(packed["signs"], tuple(packed["shape"].tolist())).to(packed["scale"].dtype)
        return s * packed["scale"]
