"""LLaMA-style decoder: RMSNorm, rotary embeddings, SwiGLU, grouped-query attention.

Module and parameter names follow ``transformers``' ``LlamaForCausalLM`` so that a state
dict moves between the two unchanged. The model knows nothing about binarization: every
linear layer comes from the ``make_linear`` factory, keyed by its module path in the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fbi.binarize import LinearFactory, keeps_block_norms
from fbi.config import require


@dataclass
class ModelConfig:
    """The LLaMA-style decoder (``model.arch=llama``). ``vocab_size`` is filled from the
    tokenizer at run time. Each architecture has its own dataclass beside its model; the
    ``model.arch`` field of the composed config chooses which one validates the group."""

    arch: str = "llama"
    n_layers: int = 4
    d_model: int = 256
    d_ff: int = 688
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # None: as many as query heads (no grouping)
    vocab_size: Optional[int] = None
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        require(self.arch == "llama", "model.arch", f"{self.arch!r} is not the transformer's")
        for name in ("n_layers", "d_model", "d_ff", "n_heads"):
            require(getattr(self, name) > 0, f"model.{name}", "must be a positive integer")
        require(
            self.d_model % self.n_heads == 0,
            "model.d_model",
            f"{self.d_model} is not divisible by model.n_heads={self.n_heads}; pick a multiple",
        )
        require(
            (self.d_model // self.n_heads) % 2 == 0,
            "model.n_heads",
            f"head dim {self.d_model // self.n_heads} must be even for rotary embeddings",
        )
        kv = self.n_kv_heads or self.n_heads
        require(
            self.n_heads % kv == 0,
            "model.n_kv_heads",
            f"{kv} must divide model.n_heads={self.n_heads} (grouped-query attention)",
        )

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32 as LLaMA does: bf16 variance loses too much precision.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Embedding(nn.Embedding):
    """Token embeddings drawn from N(0, init_std^2) inside ``__init__``, where
    ``deepspeed.zero.Init`` still sees the whole tensor (it partitions a module once its
    ``__init__`` returns: an init applied afterwards would touch an empty shard)."""

    def __init__(self, num_embeddings: int, dim: int, init_std: float) -> None:
        self.init_std = init_std
        super().__init__(num_embeddings, dim)

    def reset_parameters(self) -> None:
        super().reset_parameters()  # its draw kept: initial weights as in earlier fbi versions
        nn.init.normal_(self.weight, std=self.init_std)


def rotary_tables(seq_len: int, head_dim: int, theta: float, device, dtype):
    """cos and sin, each (seq_len, head_dim), in the half-split layout of LLaMA/HF."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device).float(), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, prefix: str, make_linear: LinearFactory) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        kv_dim = self.n_kv_heads * self.head_dim
        std = cfg.init_std
        self.q_proj = make_linear(f"{prefix}.q_proj", cfg.d_model, cfg.d_model, std)
        self.k_proj = make_linear(f"{prefix}.k_proj", cfg.d_model, kv_dim, std)
        self.v_proj = make_linear(f"{prefix}.v_proj", cfg.d_model, kv_dim, std)
        self.o_proj = make_linear(f"{prefix}.o_proj", cfg.d_model, cfg.d_model, std)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, prefix: str, make_linear: LinearFactory) -> None:
        super().__init__()
        std = cfg.init_std
        self.gate_proj = make_linear(f"{prefix}.gate_proj", cfg.d_model, cfg.d_ff, std)
        self.up_proj = make_linear(f"{prefix}.up_proj", cfg.d_model, cfg.d_ff, std)
        self.down_proj = make_linear(f"{prefix}.down_proj", cfg.d_ff, cfg.d_model, std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int, make_linear: LinearFactory) -> None:
        super().__init__()
        prefix = f"model.layers.{index}"
        # Identity where the scheme's layers normalize their own input (BitNet b1.58's tips)
        norm = (lambda: RMSNorm(cfg.d_model, cfg.norm_eps)) if keeps_block_norms(make_linear) \
            else nn.Identity
        self.input_layernorm = norm()
        self.self_attn = Attention(cfg, f"{prefix}.self_attn", make_linear)
        self.post_attention_layernorm = norm()
        self.mlp = MLP(cfg, f"{prefix}.mlp", make_linear)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Embeddings, blocks and final norm: ``LlamaModel`` in transformers' naming."""

    def __init__(self, cfg: ModelConfig, make_linear: LinearFactory) -> None:
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.d_model, cfg.init_std)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, make_linear) for i in range(cfg.n_layers)
        )
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)


class LlamaLM(nn.Module):
    """Causal LM: token ids (B, S) -> next-token logits (B, S, vocab_size)."""

    def __init__(self, cfg: ModelConfig, make_linear: LinearFactory) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg, make_linear)
        self.lm_head = make_linear("lm_head", cfg.d_model, cfg.vocab_size, cfg.init_std)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        cos, sin = rotary_tables(
            input_ids.shape[1], self.cfg.d_model // self.cfg.n_heads, self.cfg.rope_theta,
            x.device, x.dtype,
        )
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.model.norm(x))


def activation_bytes(cfg: ModelConfig) -> float:
    """Per token and block in 16-bit training with fused (flash) attention: 34 bytes per hidden
    unit (Korthikanti et al., 2022, without the attention-score term)."""
    return 34.0 * cfg.d_model


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 per weight of the attention, MLP and output-head products,
    plus attention's scores and weighted sum (12 n_layers d_model seq_len, the causal mask not
    discounted: PaLM's convention, as torchtitan and OLMo-core count)."""
    d, kv = cfg.d_model, (cfg.n_kv_heads or cfg.n_heads) * (cfg.d_model // cfg.n_heads)
    per_layer = d * (d + 2 * kv) + d * d + 3 * d * cfg.d_ff
    return 6.0 * (cfg.n_layers * per_layer + d * cfg.vocab_size) + 12.0 * cfg.n_layers * d * seq_len


def to_hf_config(cfg: ModelConfig):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads or cfg.n_heads, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings,
        initializer_range=cfg.init_std, attention_bias=False, mlp_bias=False,
    )


def from_hf_config(hf) -> ModelConfig:
    rope = hf.rope_parameters or {}  # transformers 5 keeps rope_theta here
    if rope.get("rope_type", "default") != "default" or hf.attention_bias or hf.mlp_bias \
            or hf.hidden_act != "silu":
        raise ValueError("this LLaMA config uses rope scaling, biases or another activation, "
                         "which fbi's decoder does not implement")
    theta = rope.get("rope_theta", 10000.0)
    return ModelConfig(
        n_layers=hf.num_hidden_layers, d_model=hf.hidden_size, d_ff=hf.intermediate_size,
        n_heads=hf.num_attention_heads, n_kv_heads=hf.num_key_value_heads,
        vocab_size=hf.vocab_size, rope_theta=theta, norm_eps=hf.rms_norm_eps,
        init_std=hf.initializer_range, tie_embeddings=bool(hf.tie_word_embeddings),
    )


def to_hf_state_dict(state: dict) -> dict:
    """fbi names are ``LlamaForCausalLM``'s: the mapping is the identity."""
    return dict(state)


def from_hf_state_dict(state: dict) -> dict:
    return {k: v for k, v in state.items() if "rotary_emb" not in k}

