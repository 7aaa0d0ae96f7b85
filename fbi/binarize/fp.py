"""Full precision: the baseline every scheme is compared against, the layer the factory hands
out for modules a scheme leaves unbinarized, and the interface every scheme layer keeps.

A scheme is one layer class deriving from ``DenseLinear``. It overrides what differs:
``weight_formula`` (the effective weight from its parameters, with its gradient estimator),
``reset_scales`` (its extra parameters from the latent weight), ``pack``/``unpack`` (export),
``quantize_input`` and ``QUANTIZES_ACTIVATIONS`` (schemes whose forward is not linear in x),
``normalize_output`` (a parameter-free function of the product, e.g. OneBit's LayerNorm) and
``fold_refusal`` (why the forward is not a dense linear map, if it is not),
``SCALES`` (its parameters that are scales, never weight-decayed under ``optim.decay=matrices``),
``SIGN_ONLY`` (its forward reads the latent weight only through ``sign``),
``extra_patterns`` (layers it binarizes beyond the architecture's default, e.g. PB-LLM's head),
``keeps_block_norms`` (False where its layers normalize their own input and the scheme's
recipe removes the blocks' norms, BitNet b1.58's) and ``Config`` (its options: a dataclass deriving from ``SchemeConfig``).
"""

from __future__ import annotations

import torch
from torch import nn

from fbi.binarize.recompute import recomputed_linear
from fbi.config import SchemeConfig


class DenseLinear(nn.Linear):
    """``y = x W^T`` with W drawn with standard deviation ``init_std``: from N(0, init_std^2)
    (``init="normal"``, as LLaMA/GPT-NeoX) or uniformly in +-sqrt(3) init_std
    (``init="uniform"``: ``nn.Linear``'s own Kaiming-uniform when init_std = 1/sqrt(3 in),
    as mamba-ssm and Bi-Mamba leave their projections)."""

    Config = SchemeConfig
    SCALES: tuple[str, ...] = ()
    QUANTIZES_ACTIVATIONS = False
    # Forward reads the latent weight only through sign(W), with the identity straight-through
    # gradient: ZeRO-3 may then gather its signs alone (fbi.sign_gather).
    SIGN_ONLY = False

    def __init__(self, in_features: int, out_features: int, init_std: float = 0.02,
                 cfg: SchemeConfig | None = None, init: str = "normal") -> None:
        self.init_std, self.init = init_std, init
        self.cfg = cfg if cfg is not None else self.Config()
        super().__init__(in_features, out_features, bias=False)
        self.make_scales()
        self.reset_scales()

    def reset_parameters(self) -> None:
        if self.init == "uniform":
            bound = 3 ** 0.5 * self.init_std
            nn.init.uniform_(self.weight, -bound, bound)
        else:
            nn.init.normal_(self.weight, mean=0.0, std=self.init_std)

    def make_scales(self) -> None:
        """Create the scheme's extra parameters (shapes only)."""

    def reset_scales(self) -> None:
        """Derive the scheme's extra parameters from the (random) latent weight."""

    @torch.no_grad()
    def init_from_dense(self, weight: torch.Tensor) -> None:
        """Start from a pretrained dense (out, in) weight."""
        self.weight.copy_(weight)
        self.reset_scales()

    def weight_params(self) -> tuple[torch.Tensor, ...]:
        return (self.weight,)

    def weight_formula(self, weight: torch.Tensor) -> torch.Tensor:
        """The effective (out, in) weight from ``weight_params()``, gradient estimator included."""
        return weight

    def effective_weight(self) -> torch.Tensor:
        """The (out_features, in_features) weight the forward pass multiplies by."""
        return self.weight_formula(*self.weight_params())

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def normalize_output(self, y: torch.Tensor) -> torch.Tensor:
        """Applied to ``x W_eff^T``; parameter-free, so a packed export keeps it."""
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if type(self) is DenseLinear:
            return nn.functional.linear(x, self.weight.to(x.dtype))
        return self.normalize_output(recomputed_linear(
            self.weight_formula, self.quantize_input(x), *self.weight_params()))

    @classmethod
    def extra_patterns(cls, cfg: SchemeConfig) -> tuple[str, ...]:
        """Module-path patterns binarized besides the architecture's default ones."""
        return ()

    @classmethod
    def keeps_block_norms(cls, cfg: SchemeConfig) -> bool:
        """Whether the model keeps the norms in front of the blocks' binarized layers."""
        return True

    @classmethod
    def fold_refusal(cls) -> str | None:
        """Why the scheme's forward is not a dense linear map of x (None: it folds)."""
        if cls.QUANTIZES_ACTIVATIONS:
            return "quantizes its input activations"
        return None

    @torch.no_grad()
    def fold(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing the same function (Hugging Face export)."""
        reason = self.fold_refusal()
        if reason:
            raise NotImplementedError(
                f"{type(self).__name__} {reason}: its forward is not linear in x, so it "
                "cannot be folded into a dense nn.Linear; export it packed"
            )
        dense = nn.Linear(self.in_features, self.out_features, bias=False)
        dense.weight.copy_(self.effective_weight())
        return dense

    @torch.no_grad()
    def pack(self) -> dict[str, torch.Tensor]:
        """Export tensors; ``unpack(pack())`` is bit-identical to ``effective_weight()``."""
        return {"weight": self.weight.detach().clone()}

    @staticmethod
    def unpack(packed: dict[str, torch.Tensor]) -> torch.Tensor:
        return packed["weight"]

    def bits_per_weight(self) -> float:
        """Storage of the packed export, scales included, per (out x in) weight."""
        packed = self.pack()
        packed.pop("shape", None)  # metadata, not per-weight storage
        bits = sum(t.numel() * t.element_size() * 8 for t in packed.values())
        return bits / (self.in_features * self.out_features)
