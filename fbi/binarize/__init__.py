"""Binarization schemes, and the one seam through which models get their linear layers.

A model never imports a scheme: it calls the factory from ``linear_factory`` with each
layer's qualified name. Layers whose name matches one of the scheme's patterns get the
scheme's layer; the others stay dense. Adding a scheme is one module plus one entry here.
"""

from __future__ import annotations

from fnmatch import fnmatch
from typing import Callable, Sequence

from torch import nn

from fbi.binarize.fbi import FBILinear
from fbi.binarize.fp import DenseLinear

SCHEMES: dict[str, type[DenseLinear]] = {"fp": DenseLinear, "fbi": FBILinear}

LinearFactory = Callable[[str, int, int, float], nn.Module]
"""``(qualified_name, in_features, out_features, init_std) -> layer``."""


def linear_factory(scheme: str, patterns: Sequence[str]) -> LinearFactory:
    layer_cls = SCHEMES[scheme]

    def make(name: str, in_features: int, out_features: int, init_std: float) -> nn.Module:
        chosen = layer_cls if any(fnmatch(name, p) for p in patterns) else DenseLinear
        return chosen(in_features, out_features, init_std=init_std)

    return make

