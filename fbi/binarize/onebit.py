"""OneBit (Xu et al., 2024, arXiv 2402.11295): ``Y = LayerNorm([(X * g) sign(W)^T] * h)``.

``g`` (in_features) and ``h`` (out_features) are full-precision vectors; the product is
normalized over the output features by a LayerNorm without affine parameters (the paper's
eq. 5, ``nn.LayerNorm(out_features, elementwise_affine=False)`` in the authors' code). As the
authors' ``SignSTEFunc``, the gradient of sign is ``1.001 - tanh(W)^2``, not the identity,
so the layer reads |W| in backward (not ``SIGN_ONLY``); and the output norm makes the
forward non-linear in x (no fold into a dense layer).

Initialization as the authors': from scratch ``g = h = 1``; from a dense W, the
sign-value-independent decomposition ``|W| ~ h g^T`` and a latent weight ``0.01 sign(W)``
(their ``build_start_ckpt.py``). They fit the rank-1 factor with scikit-learn's
``NMF(n_components=1, init="random", random_state=0)``; ``_nmf_rank1`` replays that fit (its
random start, coordinate descent, stopping rule) in numpy, so g and h are theirs, split
between the two as theirs (the product alone would hide the split from the output, which the
LayerNorm rescales, but not from the gradients of g and h). ``sign(0) = +1`` (one bit per
weight), where ``torch.sign`` gives 0.

``onebit_fold`` is fbi's earlier form: no LayerNorm (so the layer folds into the dense weight
``h sign(W) g`` for a transformers checkpoint), the identity straight-through gradient (so
it is ``SIGN_ONLY``), the latent weight kept as the dense W, ``h`` the row's mean |W| from
scratch, and from a dense W the exact rank-1 SVD of |W| split evenly, ``|h| = |g|``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fbi.binarize.fp import DenseLinear
from fbi.binarize.packing import pack_signs, shape_tensor, sign, sign_ste, unpack_signs

LAYERNORM_EPS = 1e-5  # nn.LayerNorm's default, as the authors' layer uses it
LATENT_FROM_DENSE = 0.01  # |latent weight| after init from a dense model (authors' script)


class _TanhSign(torch.autograd.Function):
    """sign(W) forward; ``grad * (1.001 - tanh(W)^2)`` backward (the authors' SignSTEFunc)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(w)
        return sign(w)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (w,) = ctx.saved_tensors
        return grad * (1.001 - torch.tanh(w) ** 2)


def _nmf_rank1(weight: torch.Tensor, tol: float = 1e-4, max_iter: int = 200
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, g), (out,) and (in,): scikit-learn's ``NMF(n_components=1, init="random",
    random_state=0)`` fit to |W| (its defaults: coordinate descent, tol 1e-4, 200 iterations),
    as the authors' ``build_start_ckpt.py`` calls it, in W's precision (float64 stays float64,
    anything else float32 as their float32 checkpoint)."""
    dtype = np.float64 if weight.dtype == torch.float64 else np.float32
    x = np.ascontiguousarray(weight.detach().abs().cpu().numpy().astype(dtype))
    rng = np.random.RandomState(0)  # sklearn's random init: H drawn before W, then |.|
    avg = np.sqrt(x.mean())
    h_t = np.abs(avg * rng.standard_normal(size=(1, x.shape[1])).astype(dtype)).T.copy()
    w = np.abs(avg * rng.standard_normal(size=(x.shape[0], 1)).astype(dtype))

    def update(factor: np.ndarray, data: np.ndarray, other: np.ndarray) -> float:
        """One coordinate-descent sweep over ``factor`` (sklearn's _update_cdnmf_fast at rank 1:
        a Newton step per entry, clipped at 0); returns the projected-gradient violation,
        summed in order in the factor's precision as the Cython loop does."""
        hess = np.dot(other.T, other)[0, 0]
        grad = -np.dot(data, other)[:, 0] + hess * factor[:, 0]
        pg = np.where(factor[:, 0] == 0, np.minimum(grad, 0), grad)
        violation = np.cumsum(np.abs(pg))[-1] if pg.size else 0.0
        if hess != 0:
            factor[:, 0] = np.maximum(factor[:, 0] - grad / hess, 0)
        return float(violation)

    for n_iter in range(1, max_iter + 1):
        violation = update(w, x, h_t) + update(h_t, x.T, w)
        if n_iter == 1:
            first = violation
        if first == 0 or violation / first <= tol:
            break
    return torch.from_numpy(w[:, 0]).to(weight.dtype), torch.from_numpy(h_t[:, 0]).to(weight.dtype)


def _svid(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, g): the exact rank-1 non-negative factors of |W| (out,), (in,), split evenly."""
    u, s, vh = torch.linalg.svd(weight.abs().double(), full_matrices=False)
    # |W| is non-negative, so its top singular vectors can be taken non-negative.
    return (u[:, 0] * s[0].sqrt()).abs(), (vh[0] * s[0].sqrt()).abs()


class OneBitLinear(DenseLinear):
    SCALES = ("g", "h")

    def make_scales(self) -> None:
        self.g = nn.Parameter(torch.empty(self.in_features))
        self.h = nn.Parameter(torch.empty(self.out_features))

    @torch.no_grad()
    def reset_scales(self) -> None:
        self.g.fill_(1.0)
        self.h.fill_(1.0)

    @torch.no_grad()
    def init_from_dense(self, weight: torch.Tensor) -> None:
        h, g = _nmf_rank1(weight)
        self.h.copy_(h)
        self.g.copy_(g)
        self.weight.copy_(sign(weight) * LATENT_FROM_DENSE)

    def weight_params(self) -> tuple[torch.Tensor, ...]:
        return self.weight, self.g, self.h

    def weight_formula(self, weight, g, h) -> torch.Tensor:
        return _TanhSign.apply(weight) * g[None, :] * h[:, None]

    def normalize_output(self, y: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(y, (self.out_features,), eps=LAYERNORM_EPS)

    @classmethod
    def fold_refusal(cls) -> str | None:
        return "normalizes its output (the paper's LayerNorm; scheme=onebit_fold folds)"

    @torch.no_grad()
    def pack(self) -> dict[str, torch.Tensor]:
        return {"signs": pack_signs(sign(self.weight)), "shape": shape_tensor(self.weight.shape),
                "g": self.g.detach().clone(), "h": self.h.detach().clone()}

    @staticmethod
    def unpack(packed: dict[str, torch.Tensor]) -> torch.Tensor:
        s = unpack_signs(packed["signs"], tuple(packed["shape"].tolist())).to(packed["g"].dtype)
        return s * packed["g"][None, :] * packed["h"][:, None]


class OneBitFoldLinear(OneBitLinear):
    """fbi's variant: ``[(X * g) sign(W)^T] * h``, identity STE, dense latent weight."""

    SIGN_ONLY = True

    @torch.no_grad()
    def reset_scales(self) -> None:
        self.g.fill_(1.0)
        self.h.copy_(self.weight.abs().mean(dim=1))  # the effective weight at W's scale

    @torch.no_grad()
    def init_from_dense(self, weight: torch.Tensor) -> None:
        h, g = _svid(weight)
        self.h.copy_(h)
        self.g.copy_(g)
        self.weight.copy_(weight)

    def weight_formula(self, weight, g, h) -> torch.Tensor:
        return sign_ste(weight) * g[None, :] * h[:, None]

    def normalize_output(self, y: torch.Tensor) -> torch.Tensor:
        return y

    @classmethod
    def fold_refusal(cls) -> str | None:
        return None
