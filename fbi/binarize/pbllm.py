"""PB-LLM (Shang et al., 2023, arXiv 2310.00034): partially binarized weights.

The ``scheme.salient_fraction`` of weights with the largest |W| (over the whole matrix) stay at
8 bits (symmetric absmax per output row over the salient ones); the rest become
``alpha * sign(W)`` with ``alpha`` the row's mean |W| over its non-salient weights. Identity
straight-through gradient to the latent weight. Export: a salient bitmap (1 bit per weight),
signs of the binary ones (1 bit each), int8 codes of the salient ones, two fp scales per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fbi.binarize.fp import DenseLinear
from fbi.binarize.packing import pack_signs, shape_tensor, sign, straight_through, unpack_signs
from fbi.config import SchemeConfig, require


def _parts(w: torch.Tensor, fraction: float):
    """(salient mask, int8 codes, per-row 8-bit step, per-row alpha)."""
    k = round(fraction * w.numel())
    mask = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
    if k:
        mask[w.abs().reshape(-1).topk(k).indices] = True
    mask = mask.reshape(w.shape)
    salient_max = torch.where(mask, w.abs(), 0).amax(dim=1, keepdim=True)
    step = (salient_max / 127).clamp(min=1e-8)
    codes = torch.where(mask, (w / step).round().clamp(-127, 127), 0).to(torch.int8)
    rest = (~mask).sum(dim=1, keepdim=True).clamp(min=1)
    alpha = torch.where(mask, 0, w.abs()).sum(dim=1, keepdim=True) / rest
    return mask, codes, step, alpha


def _assemble(mask, codes, step, alpha, signs):
    return torch.where(mask, codes.to(step.dtype) * step, alpha * signs)


@dataclass
class PBLLMConfig(SchemeConfig):
    name: str = "pbllm"
    salient_fraction: float = 0.1  # share of weights (largest |W|) kept at 8 bits

    def __post_init__(self) -> None:
        super().__post_init__()
        require(0.0 <= self.salient_fraction <= 1.0, "scheme.salient_fraction",
                f"got {self.salient_fraction}; choose a share in [0, 1]")


class PBLLMLinear(DenseLinear):
    Config = PBLLMConfig

    def weight_formula(self, weight) -> torch.Tensor:
        with torch.no_grad():
            q = _assemble(*_parts(weight, self.cfg.salient_fraction), sign(weight))
        return straight_through(weight, q)

    @torch.no_grad()
    def pack(self) -> dict[str, torch.Tensor]:
        mask, codes, step, alpha = _parts(self.weight, self.cfg.salient_fraction)
        return {"salient": pack_signs(mask.float() * 2 - 1),
                "signs": pack_signs(sign(self.weight[~mask])),
                "codes": codes[mask], "shape": shape_tensor(self.weight.shape),
                "step": step, "alpha": alpha}

    @staticmethod
    def unpack(packed: dict[str, torch.Tensor]) -> torch.Tensor:
        shape = tuple(packed["shape"].tolist())
        mask = unpack_signs(packed["salient"], shape) > 0
        codes = torch.zeros(shape, dtype=torch.int8)
        codes[mask] = packed["codes"]
        signs = torch.ones(shape, dtype=packed["alpha"].dtype)
        signs[~mask] = unpack_signs(packed["signs"], (int((~mask).sum()),)).to(signs.dtype)
        return _assemble(mask, codes, packed["step"], packed["alpha"], signs)
