"""Binarization schemes, and the one seam through which models get their linear layers.

A model never imports a scheme: it calls the factory from ``linear_factory`` with each
layer's qualified name. Layers whose name matches one of ``scheme.binarize``'s patterns get
the scheme's layer; the others stay dense. A scheme is one layer class (see ``fp.DenseLinear``
for the interface, and its options as a ``SchemeConfig`` subclass, its ``Config``); adding one
is its module, its yaml in ``conf/scheme/`` and one line here.
"""

from __future__ import annotations

from dataclasses import fields
from fnmatch import fnmatch
from typing import Any, Callable, Sequence, Union

from torch import nn

from fbi.binarize.bitnet import BitNetLinear
from fbi.binarize.bitnet158 import BitNet158Linear
from fbi.binarize.fbi import FBILinear
from fbi.binarize.fbi_w1a1 import FBIW1A1Linear
from fbi.binarize.fp import DenseLinear
from fbi.binarize.onebit import OneBitLinear
from fbi.binarize.pbllm import PBLLMLinear
from fbi.config import SchemeConfig, scheme_schema

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


def scheme_config(scheme: Union[str, SchemeConfig], **options: Any) -> SchemeConfig:
    """The typed config of a scheme: ``scheme_config("pbllm", salient_fraction=0.2)``; a
    config given as the base ``SchemeConfig`` gets its scheme's defaults."""
    if isinstance(scheme, SchemeConfig):
        options = {**{f.name: getattr(scheme, f.name) for f in fields(scheme)}, **options}
        scheme = options.pop("name")
    return scheme_schema(scheme)(name=scheme, **options)


def linear_factory(scheme: Union[str, SchemeConfig], patterns: Sequence[str]) -> LinearFactory:
    """Layers named by one of ``patterns`` get ``scheme``'s layer (with its options), the
    others stay dense."""
    scheme = scheme_config(scheme)
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
