"""Binarization schemes, and the one seam through which models get their linear layers.

A model never imports a scheme: it calls the factory from ``linear_factory`` with each
layer's qualified name. Layers whose name matches one of ``scheme.binarize``'s patterns get
the scheme's layer; the others stay dense. Whatever else a model or its export needs to know
about its linear layers (which ones a scheme built, their scales, folding) it asks here too.
A scheme is one layer class (see ``fp.DenseLinear`` for the interface) whose options are a
``SchemeConfig`` subclass, its ``Config``, defined and registered with the scheme: adding one
is its module, its yaml in ``conf/scheme/`` and one line in ``SCHEMES``.
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
from fbi.binarize.onebit import OneBitFoldLinear, OneBitLinear
from fbi.binarize.pbllm import PBLLMLinear
from fbi.config import SchemeConfig, one_of

SCHEMES: dict[str, type[DenseLinear]] = {
    "fp": DenseLinear,
    "fbi": FBILinear,
    "bitnet": BitNetLinear,
    "bitnet158": BitNet158Linear,
    "onebit": OneBitLinear,
    "onebit_fold": OneBitFoldLinear,
    "pbllm": PBLLMLinear,
    "fbi_w1a1": FBIW1A1Linear,
}

SCHEME_CONFIGS: dict[str, type[SchemeConfig]] = {name: layer.Config for name, layer in SCHEMES.items()}
# the schemes whose forward reads the latent weight only through sign(W): the 1-bit route's
SIGN_ONLY: frozenset[str] = frozenset(name for name, layer in SCHEMES.items() if layer.SIGN_ONLY)

LinearFactory = Callable[..., nn.Module]
"""``(qualified_name, in_features, out_features, init_std, init="normal") -> layer``; ``init``
is the distribution of the draw with that standard deviation, normal or uniform
(``fp.DenseLinear``)."""


def scheme_config(scheme: Union[str, SchemeConfig], **options: Any) -> SchemeConfig:
    """The typed config of a scheme: ``scheme_config("pbllm", salient_fraction=0.2)``; a
    config given as the base ``SchemeConfig`` gets its scheme's defaults."""
    if isinstance(scheme, SchemeConfig):
        options = {**{f.name: getattr(scheme, f.name) for f in fields(scheme)}, **options}
        scheme = options.pop("name")
    one_of(scheme, tuple(sorted(SCHEMES)), "scheme.name")
    return SCHEMES[scheme].Config(name=scheme, **options)


def default_patterns(scheme: Union[str, SchemeConfig], architecture: Sequence[str]) -> list[str]:
    """The patterns binarized when ``scheme.binarize`` is unset: the architecture's default
    ones and those the scheme adds (PB-LLM's output head)."""
    scheme = scheme_config(scheme)
    return [*architecture, *SCHEMES[scheme.name].extra_patterns(scheme)]


def linear_factory(scheme: Union[str, SchemeConfig], patterns: Sequence[str]) -> LinearFactory:
    """Layers named by one of ``patterns`` get ``scheme``'s layer (with its options), the
    others stay dense. The factory also answers ``keeps_block_norms`` for the model."""
    scheme = scheme_config(scheme)
    layer_cls = SCHEMES[scheme.name]

    def make(name: str, in_features: int, out_features: int, init_std: float,
             init: str = "normal") -> nn.Module:
        if any(fnmatch(name, p) for p in patterns):
            return layer_cls(in_features, out_features, init_std=init_std, cfg=scheme, init=init)
        return DenseLinear(in_features, out_features, init_std=init_std, init=init)

    make.block_norms = not patterns or layer_cls.keeps_block_norms(scheme)
    return make


def keeps_block_norms(make_linear: LinearFactory) -> bool:
    """Whether a model built with ``make_linear`` keeps the norms in front of its blocks'
    linear layers: False where the scheme's layers normalize their own input and its recipe
    removes those norms (BitNet b1.58's training tips, step 2). A factory not made by
    ``linear_factory`` keeps them."""
    return getattr(make_linear, "block_norms", True)


def linear_layers(model: nn.Module) -> dict[str, DenseLinear]:
    """Every layer the factory built in ``model``, binarized or dense, by module path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, DenseLinear)}


def binarized_layers(model: nn.Module) -> dict[str, DenseLinear]:
    """The layers a scheme built (those left dense excluded), by module path."""
    return {name: m for name, m in linear_layers(model).items() if type(m) is not DenseLinear}


def scale_names(layer: DenseLinear) -> list[str]:
    """A layer's parameters and buffers besides its weight (a scheme's scales, masks...)."""
    return [n for n, _ in layer.named_parameters(recurse=False) if n != "weight"] + [
        n for n, _ in layer.named_buffers(recurse=False)]


def scale_parameter_names(model: nn.Module) -> set[str]:
    """Qualified names of every scheme scale in ``model`` (never decayed under ``matrices``)."""
    return {
        f"{module_name}.{p}" if module_name else p
        for module_name, module in model.named_modules()
        if isinstance(module, DenseLinear)
        for p in module.SCALES
    }
