"""A standard ``transformers`` checkpoint of an fbi model: no fbi code needed to load it.

Each scheme layer is folded into a dense weight (its effective weight, so the function is the
same); schemes that quantize activations cannot be folded, and are refused with the reason.
The fbi LLaMA's module names are ``LlamaForCausalLM``'s, so the state dict moves unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fbi.export.packed import DTYPES, save_tokenizer, scheme_layers
from fbi.trained import Trained

WEIGHTS = "model.safetensors"


class CannotFold(ValueError):
    """The scheme's forward is not a dense linear map of its input."""


def folded_state(model: torch.nn.Module, scheme: str) -> dict[str, torch.Tensor]:
    state = dict(model.state_dict())
    for name, layer in scheme_layers(model).items():
        if layer.QUANTIZES_ACTIVATIONS:
            raise CannotFold(
                f"scheme {scheme}: {type(layer).__name__} quantizes its input activations, so "
                "its layers are not dense linear maps and a transformers checkpoint cannot "
                "compute the same function; export it with --format packed instead"
            )
        for key in [k for k in state if k.startswith(f"{name}.")]:
            del state[key]
        state[f"{name}.weight"] = layer.fold().weight
    return state


def llama_config(trained: Trained) -> dict:
    """``LlamaConfig`` fields for an fbi LLaMA (``fbi.models.llama``)."""
    cfg, tok = trained.model_cfg, trained.tokenizer
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads or cfg.n_heads,
        "head_dim": cfg.d_model // cfg.n_heads, "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "max_position_embeddings": trained.max_length,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False, "mlp_bias": False,
        "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
    }


def export_hf(trained: Trained, out: Path, dtype: str = "float32") -> Path:
    """Write a ``LlamaForCausalLM`` checkpoint (config.json, model.safetensors, tokenizer)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    if dtype not in DTYPES:
        raise ValueError(f"--dtype: got {dtype!r}; choose one of {', '.join(DTYPES)}")
    if trained.model_cfg is None:
        raise ValueError(f"{trained.source}: not an fbi model (a run directory or a packed export)")
    state = folded_state(trained.model, trained.scheme_cfg.name)
    if trained.model_cfg.tie_embeddings:
        state.pop("lm_head.weight")  # transformers ties it back from the embedding
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**llama_config(trained), dtype=dtype)
    config.save_pretrained(out)
    save_file({k: v.detach().to(DTYPES[dtype]).contiguous() for k, v in state.items()},
              str(out / WEIGHTS), metadata={"format": "pt"})
    if save_tokenizer(trained.tokenizer, out) == "tokenizer.model":
        from transformers import LlamaTokenizer

        LlamaTokenizer.from_pretrained(out, add_bos_token=False).save_pretrained(out)
    (out / "fbi_export.json").write_text(json.dumps(
        {"source": trained.source, "scheme": trained.scheme_cfg.name}, indent=1))
    return out
