"""Full precision: the baseline every scheme is compared against, and the layer the
factory hands out for modules a scheme leaves unbinarized."""

from __future__ import annotations

import torch
from torch import nn


class DenseLinear(nn.Linear):
    """``y = x W^T`` with W initialized from N(0, init_std^2), as in LLaMA/GPT-NeoX."""

    def __init__(self, in_features: int, out_features: int, init_std: float = 0.02) -> None:
        self.init_std = init_std
        super().__init__(in_features, out_features, bias=False)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=self.init_std)

    def effective_weight(self) -> torch.Tensor:
        """The (out_features, in_features) weight the forward pass multiplies by."""
        return self.weight
