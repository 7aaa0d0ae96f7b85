"""Binarization schemes, and the one seam through which models get their linear layers.

A model never imports a scheme: it calls the factory from ``linear_factory`` with each
layer's qualified name. Layers whose name matches one of ``scheme.binarize``'s patterns get
the scheme's layer; the others stay dense. A scheme is one layer class (see ``fp.DenseLinear``
for the interface); adding one is its module, its yaml in ``conf/scheme/`` and one line here.
"""

from __future__ import annotations

from fnmatch import fnmatch
from typing import Callable, Sequence, Union

from torch import nn

from fbi.binarize.bitnet import BitNetLinear
from fbi.binarize.bitnet158 import BitNet158Linear
from fbi.binarize.fbi import FBILinear
from fbi.binarize.fbi_w1a1 import FBIW1A1Linear
from fbi.binarize.fp import DenseLinear
from fbi.binarize.onebit import OneBitLinear
from fbi.binarize.pbllm import PBLLMLinear

SCHEMES: dict[str, type[DenseLinear]] = {
    "fp": DenseLinear,
    "fbi": FBILinear,
    "bitnet": BitNetLinear,
    "bitnet158": BitNet158Linear,
    "onebit": OneBitLinear,
    "pbllm": PBLLMLinear,
    "fbi_w1a1": FBIW1A1Linear,
}

LinearFactory = Callable[[str, int, int, float], nn.Module]
"""``(qualified_name, in_features, out_features, init_std) -> layer``."""


def linear_factory(scheme: Union[str, "SchemeConfig"], patterns: Sequence[str]) -> LinearFactory:  # noqa: F821
    """``scheme``: a ``SchemeConfig`` (its options reach the layers) or just a scheme name."""
    if isinstance(scheme, str):
        from fbi.config import SchemeConfig

        scheme = SchemeConfig(name=scheme, binarize=list(patterns))
    layer_cls = SCHEMES[scheme.name]

    def make(name: str, in_features: int, out_features: int, init_std: float) -> nn.Module:
        if any(fnmatch(name, p) for p in patterns):
            return layer_cls(in_features, out_features, init_std=init_std, cfg=scheme)
        return DenseLinear(in_features, out_features, init_std=init_std)

    return make


def scale_parameter_names(model: nn.Module) -> set[str]:
    """Qualified names of every scheme scale in ``model`` (never decayed under ``matrices``)."""
    return {
        f"{module_name}.{p}" if module_name else p
        for module_name, module in model.named_modules()
        if isinstance(module, DenseLinear)
        for p in module.SCALES
    }
