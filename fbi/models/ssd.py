"""The Mamba-2 state-space recurrence (SSD; Dao & Gu, 2024, "Transformers are SSMs").

Per head h, with a scalar decay per step, the state H (head_dim x d_state) evolves as

    H_t = exp(dt_t * A_h) H_{t-1} + dt_t x_t B_t^T,        y_t = H_t C_t + D_h x_t

``sequential_scan`` runs it step by step: the reference, too slow to train with.
``chunked_scan`` computes the same outputs in chunks of Q steps: inside a chunk as a masked
(Q x Q) product like causal attention, across chunks by carrying one state per chunk, so the
work is O(L Q) instead of O(L^2) and the loop has L / Q iterations instead of L.
``mamba_ssm_scan`` is the same contract served by mamba-ssm's fused Triton kernels (GPU,
optional extra). Shapes: x (B, L, heads, head_dim); dt (B, L, heads), already positive;
A (heads,), negative; Bm, Cm (B, L, groups, d_state), each group shared by heads / groups
consecutive heads; D (heads,). Output like x.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def _per_head(m: torch.Tensor, heads: int) -> torch.Tensor:
    """(..., groups, n) -> (..., heads, n)."""
    return m.repeat_interleave(heads // m.shape[-2], dim=-2)


def segment_sums(a: torch.Tensor) -> torch.Tensor:
    """(..., q) -> (..., q, q): ``[t, s] = sum_{s < i <= t} a_i``, -inf where s > t.

    Each entry sums only its own terms (a masked cumulative sum, the Mamba-2 reference's
    ``segsum``), instead of subtracting two running sums: in fp32 those differ by up to the
    whole chunk's log-decay (hundreds at chunk 256), and their difference loses that much
    absolute precision before it is exponentiated."""
    q = a.shape[-1]
    below = torch.ones(q, q, dtype=torch.bool, device=a.device).tril(-1)
    terms = a[..., :, None].expand(*a.shape, q).masked_fill(~below, 0.0)  # [i, s] = a_i if i > s
    sums = terms.cumsum(dim=-2)
    return sums.masked_fill(~below.logical_or(torch.eye(q, dtype=torch.bool, device=a.device)),
                            float("-inf"))


def sequential_scan(x, dt, A, Bm, Cm, D):
    heads = x.shape[2]
    Bm, Cm = _per_head(Bm, heads), _per_head(Cm, heads)
    state = x.new_zeros(x.shape[0], heads, x.shape[3], Bm.shape[-1])
    out = []
    for t in range(x.shape[1]):
        decay = torch.exp(dt[:, t] * A)[..., None, None]
        state = decay * state + (dt[:, t, :, None] * x[:, t])[..., None] * Bm[:, t, :, None, :]
        out.append((state * Cm[:, t, :, None, :]).sum(-1) + D[:, None] * x[:, t])
    return torch.stack(out, dim=1)


def chunked_scan(x, dt, A, Bm, Cm, D, chunk_size: int):
    """Equal to ``sequential_scan``; computed in float32 at least (float64 stays float64)."""
    dtype = x.dtype
    work = torch.promote_types(dtype, torch.float32)
    b, length, heads, p = x.shape
    q = chunk_size
    pad = -length % q
    # Padding steps carry dt = 0: no input and no decay, and they come after every real step.
    x, dt, Bm, Cm = (F.pad(t.to(work), (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, Bm, Cm))
    c = x.shape[1] // q
    x, Bm, Cm = (t.reshape(b, c, q, *t.shape[2:]) for t in (x, Bm, Cm))
    Bm, Cm = _per_head(Bm, heads), _per_head(Cm, heads)
    dt = dt.reshape(b, c, q, heads)
    xdt = x * dt[..., None]
    # Log-decay per step, (b, heads, c, q), and summed from a chunk's start.
    steps = (dt * A.to(work)).permute(0, 3, 1, 2)
    log_decay = torch.cumsum(steps, dim=-1)
    # [t, s]: the decay from step s to step t of a chunk, as a sum of its own steps.
    segments = segment_sums(steps)

    # Within chunks: y_t += sum_{s<=t} (C_t . B_s) exp(sum_{s<i<=t} dt_i A) dt_s x_s.
    scores = torch.einsum("bcthn,bcshn->bhcts", Cm, Bm) * torch.exp(segments)
    y = torch.einsum("bhcts,bcshp->bcthp", scores, xdt)

    # Each chunk's own contribution to the state at its end, (b, c, heads, p, n).
    to_end = torch.exp(segments[..., -1, :])
    chunk_states = torch.einsum("bhcs,bcshn,bcshp->bchpn", to_end, Bm, xdt)
    # Across chunks: the state entering chunk k, decayed by each whole chunk on the way.
    chunk_decay = torch.exp(log_decay[..., -1])  # (b, heads, c)
    state = torch.zeros_like(chunk_states[:, 0])
    entering = []
    for k in range(c):
        entering.append(state)
        state = chunk_decay[:, :, k, None, None] * state + chunk_states[:, k]
    entering = torch.stack(entering, dim=1)
    y = y + torch.einsum("bcthn,bchpn,bhct->bcthp", Cm, entering, torch.exp(log_decay))

    y = y + D.to(work)[:, None] * x
    return y.reshape(b, c * q, heads, p)[:, :length].to(dtype)


@functools.cache
def mamba_ssm_kernel():
    """mamba-ssm's fused chunked scan, or None where the package does not import."""
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except ImportError:
        return None
    return mamba_chunk_scan_combined


def mamba_ssm_scan(x, dt, A, Bm, Cm, D, chunk_size: int):
    kernel = mamba_ssm_kernel()
    if kernel is None:
        raise RuntimeError("model.scan=mamba_ssm: the mamba-ssm package does not import here; "
                           "install it on a CUDA machine, or use model.scan=torch")
    if not x.is_cuda:
        raise RuntimeError("model.scan=mamba_ssm: its kernels run on CUDA tensors only; "
                           "use model.scan=torch (or auto) on CPU")
    return kernel(x, dt, A, Bm, Cm, chunk_size, D=D)


def scan(x, dt, A, Bm, Cm, D, chunk_size: int, impl: str = "auto"):
    """``impl``: auto (mamba-ssm's kernels on CUDA when installed, else the chunked scan),
    torch, or mamba_ssm."""
    if impl == "mamba_ssm" or (impl == "auto" and x.is_cuda and mamba_ssm_kernel() is not None):
        return mamba_ssm_scan(x, dt, A, Bm, Cm, D, chunk_size)
    return chunked_scan(x, dt, A, Bm, Cm, D, chunk_size)
