"""A scheme layer of a packed export run straight from its bits: ``PackedLinear``.

It keeps the scheme's own input quantizer and output function and replaces the dense product
with the sign product of ``fbi.kernels.forms``: on CPU the compiled kernel (``fbi.kernels.cpu``)
for decode-sized batches and torch's int8 GEMM on the signs and exact int8 pieces of the input
from ``cpu.PREFILL_TOKENS`` tokens on; on a GPU the Triton kernel (``fbi.kernels.triton_sign``).
Memory is the bits, plus one layer's int8 signs (1 byte a weight) once a prefill has run.
"""

from __future__ import annotations

import torch
from torch import nn

from fbi.kernels import cpu
from fbi.kernels.forms import SignProduct, sign_product

def sign_matmul(bits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``u @ S^T`` (n, rows) in fp32 for S = +-1 from ``bits`` (rows, nb) and u (n, 8 nb)."""
    if bits.is_cuda:
        from fbi.kernels.triton_sign import sign_matmul as triton_sign_matmul

        return triton_sign_matmul(bits, u)
    return cpu.sign_matmul(bits, u)


def apply(form: SignProduct, x: torch.Tensor) -> torch.Tensor:
    """``x W_eff^T`` in fp32 for x (..., in) fp32: the binary product of the rescaled input,
    rescaled outputs, the rank-1 term. On CPU below ``cpu.PREFILL_TOKENS`` tokens (decode) all
    of it is one call, ``cpu.sign_linear``; from there on the binary product is
    ``cpu.int8_matmul`` (its planes summed into one int8 matrix)."""
    if not form.bits.is_cuda and x.numel() < cpu.PREFILL_TOKENS * form.in_features:
        return cpu.sign_linear(form, x.contiguous())
    shape = x.shape
    x = x.reshape(-1, form.in_features)
    u = x if form.in_scale is None else x * form.in_scale
    if not form.bits.is_cuda:
        y = cpu.int8_matmul(form.bits, u, planes=form.planes)
    else:
        u = nn.functional.pad(u, (0, 8 * form.bits.shape[1] - form.in_features)).contiguous()
        y = sign_matmul(form.bits, u)
        if form.planes == 2:
            y = y[:, :form.out_features] + y[:, form.out_features:]
    if form.out_scale is not None:
        y = y * form.out_scale
    if form.has_rank1:
        dot = x.sum(1, keepdim=True) if form.beta_in is None else x @ form.beta_in[:, None]
        y = y + (dot if form.beta_out is None else dot * form.beta_out)
    return y.view(*shape[:-1], form.out_features)


class PackedLinear(nn.Module):
    """A scheme layer rebuilt from its export on the packed kernels: ``scheme_layer`` (on the
    meta device) lends its input and output functions, ``packed`` its ``pack()`` tensors."""

    def __init__(self, scheme_layer: nn.Module, packed: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.in_features, self.out_features = scheme_layer.in_features, scheme_layer.out_features
        self.quantize_input = scheme_layer.quantize_input
        self.normalize_output = scheme_layer.normalize_output
        self.fold_refusal = scheme_layer.fold_refusal
        self.unpack = type(scheme_layer).unpack
        self.packed = packed
        form = sign_product(scheme_layer.cfg, packed)
        self.form = form
        for name in ("bits", "in_scale", "out_scale", "beta_in", "beta_out"):
            # buffers, so that .to(device) moves them; not persistent: the export holds them
            self.register_buffer(name, getattr(form, name), persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for name in ("bits", "in_scale", "out_scale", "beta_in", "beta_out"):
            setattr(self.form, name, getattr(self, name))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.quantize_input(x)
        y = self.normalize_output(apply(self.form, q if q.dtype == torch.float32 else q.float()))
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def pack(self) -> dict[str, torch.Tensor]:
        return dict(self.packed)

    def fold(self) -> nn.Linear:
        dense = nn.Linear(self.in_features, self.out_features, bias=False)
        dense.weight.data.copy_(self.unpack(self.packed))
        return dense
