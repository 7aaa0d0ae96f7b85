"""Each scheme's effective weight as a sign product, the form the kernels run:

    W_eff = out_scale[:, None] * S * in_scale[None, :] + beta_out[:, None] * beta_in[None, :]

with S the mean of ``planes`` +-1 matrices held as bits, so that

    y = out_scale * (S (in_scale * x)) + beta_out * (beta_in . x),

a binary product plus a rank-1 term. A scale left None is all ones. Derived from each scheme's
``unpack`` (the tests check every form against it in float64):

- fbi, fbi_w1a1 (``alpha * sign(W) + beta``): layout ``column`` (the paper's, (1, in)) scales
  the input, ``alpha`` as ``in_scale`` and ``beta`` as ``beta_in``, so the rank-1 term is one
  dot product shared by every output; ``row`` ((out, 1)) scales the outputs, ``beta_out *
  sum(x)``; ``tensor`` is one of each.
- bitnet: one scale per tensor. onebit, onebit_fold: ``g`` per input, ``h`` per output.
- bitnet158: ternary T = (S1 + S2) / 2 with S1 = +1 where T >= 0, S2 = +1 where T > 0, so a
  2-bit kernel is two 1-bit products of the same input (2 bits per weight at run time; the
  export keeps 1.6).
- pbllm has no form: its salient weights are 8-bit values beside the signs (``NoKernel``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from fbi.binarize.packing import pack_signs, unpack_signs, unpack_ternary

ROW_BYTES = 8  # the CPU kernel reads a row's bits 64 weights (8 bytes) at a time


class NoKernel(ValueError):
    """The scheme's packed weights are not a sign product."""


@dataclass
class SignProduct:
    bits: torch.Tensor  # uint8 (planes * out, nb): row o's weight i is bit i % 8 of byte i // 8
    in_features: int
    out_features: int
    planes: int = 1
    in_scale: Optional[torch.Tensor] = None  # (in,)
    out_scale: Optional[torch.Tensor] = None  # (out,) or (1,)
    beta_in: Optional[torch.Tensor] = None  # (in,)
    beta_out: Optional[torch.Tensor] = None  # (out,) or (1,)
    lut: Optional[torch.Tensor] = None  # the bits re-laid for decode's table lookups (CPU)

    @property
    def has_rank1(self) -> bool:
        return self.beta_in is not None or self.beta_out is not None


def row_bits(signs: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """(out, nb) bits, each row starting on its own ``ROW_BYTES`` boundary, from the export's
    row-major stream (``pack_signs``). When in_features is a multiple of 64 (every real
    model's) the stream already is that layout: a view, no copy."""
    if in_features % (8 * ROW_BYTES) == 0:
        return signs[: out_features * in_features // 8].view(out_features, in_features // 8)
    pm = unpack_signs(signs, (out_features, in_features), torch.int8)
    pad = (-in_features) % (8 * ROW_BYTES)
    # padding weights are +1 against zero inputs: they add nothing
    pm = torch.nn.functional.pad(pm, (0, pad), value=1)
    return pack_signs(pm).view(out_features, -1)


def _signs(packed, shape) -> torch.Tensor:
    return row_bits(packed["signs"], *shape)


def _fbi(packed, shape, cfg) -> SignProduct:
    alpha, beta = packed["alpha"].float(), packed["beta"].float()
    bits = _signs(packed, shape)
    if cfg.layout == "column":
        return SignProduct(bits, shape[1], shape[0], in_scale=alpha.reshape(-1), beta_in=beta.reshape(-1))
    return SignProduct(bits, shape[1], shape[0], out_scale=alpha.reshape(-1), beta_out=beta.reshape(-1))


def _bitnet(packed, shape, cfg) -> SignProduct:
    return SignProduct(_signs(packed, shape), shape[1], shape[0], out_scale=packed["scale"].float())


def _onebit(packed, shape, cfg) -> SignProduct:
    return SignProduct(_signs(packed, shape), shape[1], shape[0],
                       in_scale=packed["g"].float(), out_scale=packed["h"].float())


def _bitnet158(packed, shape, cfg) -> SignProduct:
    t = unpack_ternary(packed["trits"], shape).to(torch.int8)
    planes = [row_bits(pack_signs(torch.where(t >= lo, 1, -1).to(torch.int8)), *shape)
              for lo in (0, 1)]
    return SignProduct(torch.cat(planes), shape[1], shape[0], planes=2,
                       out_scale=packed["scale"].float() / 2)


FORMS: dict[str, Callable] = {
    "fbi": _fbi, "fbi_w1a1": _fbi, "bitnet": _bitnet, "bitnet158": _bitnet158,
    "onebit": _onebit, "onebit_fold": _onebit,
}


def sign_product(scheme, packed: dict[str, torch.Tensor]) -> SignProduct:
    """The sign product of one layer's packed tensors; ``scheme``: its SchemeConfig."""
    if scheme.name not in FORMS:
        raise NoKernel(
            f"scheme {scheme.name}: its packed weights are not a sign product (PB-LLM keeps "
            "8-bit salient weights beside the signs), so no packed kernel runs it; load it "
            "with --kernel dense")
    shape = tuple(int(d) for d in packed["shape"].tolist())
    return FORMS[scheme.name](packed, shape, scheme)
