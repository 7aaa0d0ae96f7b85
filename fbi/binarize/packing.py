"""Bit packing, for export and for ZeRO-3's sign all-gather (fbi.sign_gather): signs 8 per byte,
ternary digits 5 per byte (3^5 = 243 <= 256)."""

from __future__ import annotations

import torch


def pack_signs(t: torch.Tensor) -> torch.Tensor:
    """uint8, 8 weights per byte (row-major, zero padded), bit set where ``sign(t)`` is +1: a
    +-1 tensor, or raw weights (``sign(0) = +1``, as ``sign`` below)."""
    positive = torch.signbit(t.reshape(-1) + 0.0).logical_not_().view(torch.uint8)
    bits = torch.nn.functional.pad(positive, (0, (-positive.numel()) % 8)).view(-1, 8)
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=bits.device)
    return (bits * weights).sum(1, dtype=torch.uint8)


def unpack_signs(packed: torch.Tensor, shape: tuple[int, ...],
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """+-1 in ``dtype``, the first ``prod(shape)`` of ``packed``'s weights."""
    n = torch.Size(shape).numel()
    signs = _sign_table(dtype, packed.device).index_select(0, packed.reshape(-1).int())
    return signs.view(-1)[:n].view(shape)


def _sign_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(256, 8): the +-1 values of each byte's bits; one lookup unpacks a byte."""
    bits = (torch.arange(256, device=device).unsqueeze(-1) >> torch.arange(8, device=device)) & 1
    return (bits * 2 - 1).to(dtype)


def pack_ternary(t: torch.Tensor) -> torch.Tensor:
    """{-1, 0, 1} tensor -> uint8, 5 base-3 digits per byte (1.6 bits per weight)."""
    digits = (t.reshape(-1) + 1).to(torch.int32)
    digits = torch.nn.functional.pad(digits, (0, (-digits.numel()) % 5)).reshape(-1, 5)
    powers = torch.tensor([3**i for i in range(5)], dtype=torch.int32, device=digits.device)
    return (digits * powers).sum(1).to(torch.uint8)


def unpack_ternary(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    powers = torch.tensor([3**i for i in range(5)], dtype=torch.int32, device=packed.device)
    digits = (packed.to(torch.int32).reshape(-1, 1) // powers) % 3
    n = torch.Size(shape).numel()
    return (digits.reshape(-1)[:n].float() - 1).reshape(shape)


def shape_tensor(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor(list(shape), dtype=torch.int32)


class _StraightThrough(torch.autograd.Function):
    """Forward: the quantized value exactly; backward: identity to the latent input.
    (``w + (q - w).detach()`` is the same estimator but rounds q by an ulp.)"""

    @staticmethod
    def forward(ctx, w: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return q

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def straight_through(w: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return _StraightThrough.apply(w, q.detach())


def sign(w: torch.Tensor) -> torch.Tensor:
    """+-1 with sign(0) = +1 (two values, never three); no gradient."""
    # copysign maps -0.0 to -1; adding +0.0 first turns -0.0 into +0.0 (IEEE 754).
    return torch.ones_like(w).copysign_(w.detach() + 0.0)


def sign_ste(w: torch.Tensor) -> torch.Tensor:
    """sign with the identity straight-through gradient."""
    return straight_through(w, sign(w))
