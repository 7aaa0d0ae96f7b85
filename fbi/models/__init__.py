"""Architectures: one registry entry each, everything the rest of fbi knows about a model.

An entry names the dataclass that validates ``model.*`` (chosen by ``model.arch``), the
builder, the linears a scheme binarizes when ``scheme.binarize`` is left unset, the blocks
that activation checkpointing wraps from outside, and the mapping to and from the
``transformers`` class of the same architecture. Models know nothing of schemes beyond
asking the linear factory for a layer by its real module path (``model.layers.0.mlp.up_proj``),
and ask the same seam (``fbi.binarize``) which layers it built, for folding and scales.
Adding an architecture is its module with its config dataclass, and one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatch
from typing import Any, Callable, Sequence

import torch
from torch import nn

from fbi.binarize import (LinearFactory, default_patterns, linear_factory, linear_layers,
                          scale_names)
from fbi.config import SchemeConfig
from fbi.models import llama, mamba2


@dataclass(frozen=True)
class Architecture:
    config: type  # the dataclass of ``model.*``
    build: Callable[[Any, LinearFactory], nn.Module]  # (model config, factory) -> causal LM
    binarize: tuple[str, ...]  # default fnmatch patterns over module paths
    blocks: Callable[[nn.Module], nn.ModuleList]  # the repeated blocks, for checkpointing
    hf_class: str  # the ``transformers`` causal-LM class with the same weights
    to_hf_config: Callable[[Any], Any]  # model config -> transformers config
    from_hf_config: Callable[[Any], Any]  # transformers config -> model config
    # state dicts, fbi names <-> transformers names (dense weights: fold a binary model first)
    to_hf_state_dict: Callable[[dict], dict]
    from_hf_state_dict: Callable[[dict], dict]
    # bytes one block keeps for backward per token in 16-bit training (fbi.estimate)
    activation_bytes: Callable[[Any], float]
    # training FLOPs per token at a sequence length (fbi.flops: MFU)
    flops_per_token: Callable[[Any, int], float]
    # whether ``hf_class`` casts the head's input to the head's dtype (Mamba2ForCausalLM does)
    hf_head_casts_input: bool = False


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(
        config=llama.ModelConfig, build=llama.LlamaLM, binarize=("model.layers.*",),
        blocks=lambda m: m.model.layers, hf_class="LlamaForCausalLM",
        to_hf_config=llama.to_hf_config, from_hf_config=llama.from_hf_config,
        to_hf_state_dict=llama.to_hf_state_dict, from_hf_state_dict=llama.from_hf_state_dict,
        activation_bytes=llama.activation_bytes, flops_per_token=llama.flops_per_token,
    ),
    "mamba2": Architecture(
        config=mamba2.Mamba2Config, build=mamba2.Mamba2LM,
        binarize=("backbone.layers.*.mixer.in_proj", "backbone.layers.*.mixer.out_proj"),
        blocks=lambda m: m.backbone.layers, hf_class="Mamba2ForCausalLM",
        to_hf_config=mamba2.to_hf_config, from_hf_config=mamba2.from_hf_config,
        to_hf_state_dict=mamba2.to_hf_state_dict, from_hf_state_dict=mamba2.from_hf_state_dict,
        activation_bytes=mamba2.activation_bytes, flops_per_token=mamba2.flops_per_token,
        hf_head_casts_input=True,
    ),
}

MODEL_CONFIGS: dict[str, type] = {name: a.config for name, a in ARCHITECTURES.items()}


def architecture(cfg_or_arch: Any) -> Architecture:
    arch = cfg_or_arch if isinstance(cfg_or_arch, str) else cfg_or_arch.arch
    if arch not in ARCHITECTURES:
        raise ValueError(f"model.arch: {arch!r} is unknown; choose one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch]


def binarize_patterns(cfg: Any, scheme: "str | SchemeConfig",
                      binarize: Sequence[str] | None = None) -> list[str]:
    """The patterns in force: ``binarize``, else the scheme's, else the architecture's (with
    those the scheme adds to them: PB-LLM's output head, unless it is tied to the embeddings,
    which stay dense)."""
    if binarize is None and not isinstance(scheme, str):
        binarize = scheme.binarize
    if binarize is not None:
        return list(binarize)
    tied = getattr(cfg, "tie_embeddings", False)
    return [p for p in default_patterns(scheme, architecture(cfg).binarize)
            if not (tied and p == "lm_head")]


def build_model(cfg: Any, scheme: "str | SchemeConfig",
                binarize: Sequence[str] | None = None) -> nn.Module:
    """The causal LM of ``cfg.arch``: token ids (B, S) -> logits (B, S, vocab_size).

    Built where the caller's context says: ``with torch.device("meta")`` to count, under
    ``deepspeed.zero.Init`` to partition each layer as soon as it exists (fbi.deepspeed_setup).
    """
    if cfg.vocab_size is None:
        raise ValueError("model.vocab_size is unset: it is taken from the tokenizer")
    patterns = binarize_patterns(cfg, scheme, binarize)
    return architecture(cfg).build(cfg, linear_factory(scheme, patterns))


def folded_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict with every scheme layer folded into its dense weight (scales
    dropped): what a plain dense model of the same architecture loads."""
    linears = linear_layers(model)
    out = {}
    for key, value in model.state_dict().items():
        owner, _, param = key.rpartition(".")
        if owner not in linears:
            out[key] = value
        elif param == "weight":
            out[key] = linears[owner].fold().weight.detach()
    return out


def to_hf(model: nn.Module, cfg: Any):
    """The ``transformers`` model computing what ``model`` computes (binary layers folded)."""
    import transformers

    arch = architecture(cfg)
    hf = getattr(transformers, arch.hf_class)(arch.to_hf_config(cfg))
    hf.load_state_dict(arch.to_hf_state_dict(folded_state_dict(model)), strict=True)
    return hf.eval()


def from_hf(hf_model, scheme: "str | SchemeConfig" = "fp",
            binarize: Sequence[str] | None = None) -> tuple[Any, nn.Module]:
    """(model config, fbi model) holding a ``transformers`` model's weights; a scheme's layers
    start from the dense weights (``init_from_dense``: latent weight and scales)."""
    arch = next((a for a in ARCHITECTURES.values() if a.hf_class == type(hf_model).__name__), None)
    if arch is None:
        known = ", ".join(a.hf_class for a in ARCHITECTURES.values())
        raise ValueError(f"{type(hf_model).__name__} has no fbi architecture; known: {known}")
    cfg = arch.from_hf_config(hf_model.config)
    model = build_model(cfg, scheme, binarize)
    state = arch.from_hf_state_dict(hf_model.state_dict())
    missing, unexpected = model.load_state_dict(state, strict=False)
    linears = linear_layers(model)
    scales = {f"{n}.{s}" for n, m in linears.items() for s in scale_names(m)}
    if set(missing) - scales or unexpected:
        raise ValueError(f"weights do not match: missing {sorted(set(missing) - scales)}, "
                         f"unexpected {sorted(unexpected)}")
    for name, layer in linears.items():
        layer.init_from_dense(state[f"{name}.weight"])
    return cfg, model
