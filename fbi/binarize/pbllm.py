"""PB-LLM (Shang et al., 2023, arXiv 2310.00034): partially binarized weights, as the authors'
training code (``BinaryXnorExceptOutliersLinear``, hahnyuan/PB-LLM) trains them.

``scheme.form=authors`` (the default). At initialization (from scratch, or from a dense
weight) the salient weights are chosen once and kept: the ``salient_fraction / 2`` smallest
and the ``salient_fraction / 2`` largest values of W (signed, over the whole matrix; their
``kthvalue`` thresholds, strict inequalities). The whole weight is then rounded to an
asymmetric 8-bit grid per output row (``min + k (max - min) / 255``, k in 0..255). Salient
weights are frozen at their grid values (no gradient); the others become
``alpha * sign(W)`` with ``alpha`` the mean |W| over all non-salient weights of the matrix
(one per tensor, no gradient). Their gradient is the authors' ``STEBinary(W) * binary_scale``
(``outlier_quantizer.py``): the identity through sign, times alpha, so ``alpha * G``
(``scheme.gradient=scaled``, the default; ``identity`` is fbi's earlier G). As ``run_qat.py``
replaces every ``nn.Linear``, the output head is binarized too (``scheme.lm_head=true``, the
default, when ``scheme.binarize`` is left to the architecture; ``false`` keeps it dense, fbi's
earlier form). Differences from the authors' code, kept small on purpose: the grid's zero point is the row
minimum (theirs rounds it to an integer, ``round(min)``, which for rows inside (-0.5, 0.5)
sends negative codes through a uint8 cast); ``sign(0) = +1``; alpha is recomputed at every
forward (theirs keeps the last training value in eval mode); the forward snaps salient
weights back onto their grid, so weight decay cannot move them (the authors train with none).

``scheme.form=reselect`` is fbi's earlier variant: the salient weights are the largest |W|,
re-selected at every forward and trained (identity gradient); symmetric 8-bit absmax per row
over the salient ones; alpha per row (the binary ones' gradient as ``scheme.gradient`` says;
fbi's earlier form: ``scheme.gradient=identity``).

Export: a salient bitmap (1 bit per weight), signs of the binary ones (1 bit each), 8-bit codes
of the salient ones, per-row scales.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fbi.binarize.fp import DenseLinear
from fbi.binarize.packing import (pack_signs, shape_tensor, sign, sign_ste, straight_through,
                                  unpack_signs)
from fbi.config import SchemeConfig, one_of, require


@dataclass
class PBLLMConfig(SchemeConfig):
    name: str = "pbllm"
    salient_fraction: float = 0.1  # share of weights kept at 8 bits
    form: str = "authors"  # authors: fixed mask, frozen salient weights | reselect (fbi's)
    # binary weights' gradient: scaled (the authors' STEBinary(W) * alpha: alpha G) | identity (G)
    gradient: str = "scaled"
    lm_head: bool = True  # binarize the output head too, as run_qat.py replaces every nn.Linear

    def __post_init__(self) -> None:
        super().__post_init__()
        one_of(self.gradient, ("scaled", "identity"), "scheme.gradient")
        require(0.0 <= self.salient_fraction <= 1.0, "scheme.salient_fraction",
                f"got {self.salient_fraction}; choose a share in [0, 1]")
        one_of(self.form, ("authors", "reselect"), "scheme.form")


def salient_mask(w: torch.Tensor, fraction: float) -> torch.Tensor:
    """The authors' outlier rule: values below the ``int(n f / 2)``-th smallest or above the
    ``int(n (1 - f / 2))``-th smallest (1-based), n = numel."""
    flat, n = w.detach().reshape(-1), w.numel()
    low, high = int(n * fraction / 2), int(n * (1 - fraction / 2))
    mask = torch.zeros_like(w, dtype=torch.bool)
    if low >= 1:
        mask |= w < flat.kthvalue(low).values
    if high < n:
        mask |= w > flat.kthvalue(high).values
    return mask


def row_grid(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(step, zero), each (out, 1): the asymmetric 8-bit grid ``zero + k step`` of each row."""
    lo, hi = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    return ((hi - lo) / 255).clamp(min=1e-12), lo


def snap(w: torch.Tensor, step: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (w - zero).div(step).round().clamp(0, 255) * step + zero


def _reselect_parts(w: torch.Tensor, fraction: float):
    """fbi's variant: (mask of the largest |W|, int8 codes, per-row step, per-row alpha)."""
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


class PBLLMLinear(DenseLinear):
    Config = PBLLMConfig

    @classmethod
    def extra_patterns(cls, cfg: PBLLMConfig) -> tuple[str, ...]:
        return ("lm_head",) if cfg.lm_head else ()

    def make_scales(self) -> None:
        if self.cfg.form == "authors":  # the fixed mask, packed (1 bit per weight), and grid
            n = self.in_features * self.out_features
            self.register_buffer("salient_bits", torch.zeros(-(-n // 8), dtype=torch.uint8))
            self.register_buffer("step", torch.ones(self.out_features, 1))
            self.register_buffer("zero", torch.zeros(self.out_features, 1))

    @torch.no_grad()
    def reset_scales(self) -> None:
        if self.cfg.form != "authors":
            return
        w = self.weight
        mask = salient_mask(w, self.cfg.salient_fraction)
        step, zero = row_grid(w)
        w.copy_(snap(w, step, zero))  # the authors round the whole weight once
        self.salient_bits.copy_(pack_signs(mask.to(w.dtype) * 2 - 1))
        self.step.copy_(step)
        self.zero.copy_(zero)

    def salient(self) -> torch.Tensor:
        """The fixed (out, in) bool mask of the salient weights (form=authors)."""
        return unpack_signs(self.salient_bits, tuple(self.weight.shape)) > 0

    @staticmethod
    def _alpha(w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The mean |W| over all non-salient weights: one per tensor."""
        return torch.where(mask, 0, w.abs()).sum() / (~mask).sum().clamp(min=1)

    def _binary(self, weight: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """``alpha * sign(W)``; gradient alpha G (the authors') or G (``gradient=identity``)."""
        if self.cfg.gradient == "scaled":
            return sign_ste(weight) * alpha
        return straight_through(weight, alpha * sign(weight))

    def weight_formula(self, weight) -> torch.Tensor:
        if self.cfg.form == "reselect":
            with torch.no_grad():
                mask, codes, step, alpha = _reselect_parts(weight, self.cfg.salient_fraction)
                salient = codes.to(step.dtype) * step
            return torch.where(mask, straight_through(weight, salient), self._binary(weight, alpha))
        mask = self.salient()
        with torch.no_grad():
            frozen = snap(weight, self.step.to(weight.dtype), self.zero.to(weight.dtype))
            alpha = self._alpha(weight, mask)
        return torch.where(mask, frozen, self._binary(weight, alpha))

    @torch.no_grad()
    def pack(self) -> dict[str, torch.Tensor]:
        w = self.weight
        if self.cfg.form == "reselect":
            mask, codes, step, alpha = _reselect_parts(w, self.cfg.salient_fraction)
            codes = codes[mask]
        else:
            mask, step, zero = self.salient(), self.step.to(w.dtype), self.zero.to(w.dtype)
            codes = (w - zero).div(step).round().clamp(0, 255).to(torch.uint8)[mask]
            alpha = self._alpha(w, mask).reshape(1, 1)
        packed = {"salient": pack_signs(mask.to(w.dtype) * 2 - 1),
                  "signs": pack_signs(sign(w[~mask])), "codes": codes,
                  "shape": shape_tensor(w.shape), "step": step, "alpha": alpha}
        if self.cfg.form == "authors":
            packed["zero"] = zero.clone()
        return packed

    @staticmethod
    def unpack(packed: dict[str, torch.Tensor]) -> torch.Tensor:
        shape = tuple(packed["shape"].tolist())
        step, dtype = packed["step"], packed["alpha"].dtype
        mask = unpack_signs(packed["salient"], shape) > 0
        signs = torch.ones(shape, dtype=dtype)
        signs[~mask] = unpack_signs(packed["signs"], (int((~mask).sum()),)).to(dtype)
        values = torch.zeros(shape, dtype=dtype)
        values[mask] = packed["codes"].to(dtype)
        # codes are signed (symmetric, reselect) or offset from the row minimum (authors)
        salient = values * step + packed["zero"] if "zero" in packed else values * step
        return torch.where(mask, salient, packed["alpha"] * signs)
