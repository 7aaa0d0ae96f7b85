"""The GPU kernel of packed sign products, in Triton, on the CPU kernel's layout
(``fbi.kernels.forms.row_bits``: row o's weight i is bit i % 8 of byte i // 8, rows padded to
8 bytes, u zero beyond in_features).

Decode (fewer than ``DOT_TOKENS`` tokens) is a matrix-vector product per token, memory-bound:
each program reads the bits of ``BLOCK_O`` rows once (1/32 of fp32's bytes) and sums
``+-u`` in fp32. Prefill turns blocks of bits into +-1 tiles for ``tl.dot`` with
``tf32x3`` inputs (three tf32 products: fp32's accuracy on tensor cores; +-1 is exact).
Checked on CPU by the suite with Triton's interpreter (``TRITON_INTERPRET=1``); timed on a
GPU by bench/gpu_check.py's packed-kernel row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

DOT_TOKENS = 16  # tl.dot needs 16 rows of tokens; fewer run as matrix-vector products


@triton.jit
def _signs(bits_ptr, rows, k, nb, mask_o):
    """+-1 fp32 tile (BLOCK_O, BLOCK_K) of ``rows`` at features ``k``."""
    byte = tl.load(bits_ptr + rows[:, None] * nb + (k[None, :] >> 3), mask=mask_o[:, None], other=0)
    bit = (byte.to(tl.int32) >> (k[None, :] & 7)) & 1
    return (bit * 2 - 1).to(tl.float32)


@triton.jit
def _gemv(bits_ptr, u_ptr, y_ptr, n_rows, nb, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_o, t = tl.program_id(0), tl.program_id(1)
    rows = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    mask_o = rows < n_rows
    acc = tl.zeros((BLOCK_O,), dtype=tl.float32)
    for k0 in range(0, nb * 8, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        u = tl.load(u_ptr + t * nb * 8 + k, mask=k < nb * 8, other=0.0)
        acc += tl.sum(_signs(bits_ptr, rows, k, nb, mask_o) * u[None, :], axis=1)
    tl.store(y_ptr + t * n_rows + rows, acc, mask=mask_o)


@triton.jit
def _gemm(bits_ptr, u_ptr, y_ptr, n_tokens, n_rows, nb, BLOCK_N: tl.constexpr,
          BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    pid_n, pid_o = tl.program_id(0), tl.program_id(1)
    tokens = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    mask_n, mask_o = tokens < n_tokens, rows < n_rows
    acc = tl.zeros((BLOCK_N, BLOCK_O), dtype=tl.float32)
    for k0 in range(0, nb * 8, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        u = tl.load(u_ptr + tokens[:, None] * nb * 8 + k[None, :],
                    mask=mask_n[:, None] & (k[None, :] < nb * 8), other=0.0)
        s = _signs(bits_ptr, rows, k, nb, mask_o)
        acc = tl.dot(u, tl.trans(s), acc, input_precision=PRECISION)
    tl.store(y_ptr + tokens[:, None] * n_rows + rows[None, :], acc,
             mask=mask_n[:, None] & mask_o[None, :])


def sign_matmul(bits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``u @ S^T`` (n, rows) fp32 for S = +-1 from ``bits`` (rows, nb) uint8, u (n, 8 nb) fp32."""
    if bits.dtype != torch.uint8 or u.dtype != torch.float32 or u.shape[1] != 8 * bits.shape[1]:
        raise ValueError(f"sign_matmul: bits {bits.dtype} {tuple(bits.shape)} and u {u.dtype} "
                         f"{tuple(u.shape)}: need uint8 (rows, nb) and float32 (n, 8 nb)")
    bits, u = bits.contiguous(), u.contiguous()
    (rows, nb), n = bits.shape, u.shape[0]
    y = torch.empty(n, rows, dtype=torch.float32, device=u.device)
    if n < DOT_TOKENS:
        _gemv[(triton.cdiv(rows, 64), n)](bits, u, y, rows, nb, BLOCK_O=64, BLOCK_K=128)
    else:
        # the interpreter computes dots in numpy's fp32: tf32x3 is a GPU instruction
        precision = "ieee" if u.device.type == "cpu" else "tf32x3"
        grid = (triton.cdiv(n, 64), triton.cdiv(rows, 64))
        _gemm[grid](bits, u, y, n, rows, nb, BLOCK_N=64, BLOCK_O=64, BLOCK_K=64,
                    PRECISION=precision)
    return y
