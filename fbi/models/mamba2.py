"""Mamba-2 language model: embeddings, blocks of (RMSNorm -> SSD mixer) with residuals, final
norm, output head (tied to the embeddings by default). No MLP, no attention.

Module and parameter names follow ``transformers``' ``Mamba2ForCausalLM`` (``backbone.layers.N
.mixer.in_proj`` ...), so a state dict moves between the two unchanged. Only ``in_proj`` and
``out_proj`` come from the linear factory; the convolution, ``dt_bias``, ``A_log``, ``D`` and
the norms are the architecture's own full-precision parameters (Bi-Mamba keeps them so).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fbi.binarize import LinearFactory
from fbi.config import one_of, require
from fbi.models.llama import Embedding, RMSNorm
from fbi.models.ssd import mamba_ssm_kernel, scan


@dataclass
class Mamba2Config:
    """A Mamba-2 language model (``model.arch=mamba2``; Dao & Gu, 2024): blocks of RMSNorm +
    SSD mixer, no MLP, tied embeddings, as Bi-Mamba (Tang et al., 2024) binarizes it. The
    mixer width is ``expand * d_model``, split into heads of ``head_dim``; B and C are shared
    by ``n_groups`` groups of heads. Field names follow ``transformers.Mamba2Config``'s
    meaning (see ``fbi.models.mamba2.to_hf_config``)."""

    arch: str = "mamba2"
    n_layers: int = 4
    d_model: int = 256
    vocab_size: Optional[int] = None
    d_state: int = 128
    d_conv: int = 4
    expand: int = 2
    head_dim: int = 64
    n_groups: int = 1
    chunk_size: int = 256  # SSD chunk: quadratic inside, recurrent across chunks
    conv_bias: bool = True
    dt_min: float = 0.001  # initial time steps, log-uniform in [dt_min, dt_max]
    dt_max: float = 0.1
    dt_floor: float = 1e-4
    # A = -exp(A_log) starts uniform in [a_init_min, a_init_max] per head, as mamba-ssm and
    # Bi-Mamba draw it (transformers starts A at -1..-heads instead).
    a_init_min: float = 1.0
    a_init_max: float = 16.0
    # Keep the residual stream in fp32 between blocks (mamba-ssm's residual_in_fp32, on in
    # Bi-Mamba's configs); the blocks still compute in the model's dtype.
    residual_in_fp32: bool = False
    norm_eps: float = 1e-5
    init_std: float = 0.02  # embeddings (and in_proj/out_proj with proj_init=normal)
    # in_proj and out_proj as mamba-ssm and Bi-Mamba draw them (bimamba_mixer_seq_simple.py):
    # kaiming_uniform is nn.Linear's default, U(+-1/sqrt(in)), out_proj redrawn so and divided
    # by sqrt(n_layers); normal is fbi's earlier N(0, init_std), N(0, init_std / sqrt(n_layers)).
    proj_init: str = "kaiming_uniform"
    tie_embeddings: bool = True
    # auto: mamba-ssm's fused kernels on a GPU when the package imports, else the PyTorch
    # chunked scan | torch | mamba_ssm (refused where it cannot run)
    scan: str = "auto"

    def __post_init__(self) -> None:
        require(self.arch == "mamba2", "model.arch", f"{self.arch!r} is not Mamba-2's")
        for name in ("n_layers", "d_model", "d_state", "d_conv", "expand", "head_dim",
                     "n_groups", "chunk_size"):
            require(getattr(self, name) > 0, f"model.{name}", "must be a positive integer")
        inner = self.expand * self.d_model
        require(inner % self.head_dim == 0, "model.head_dim",
                f"expand * d_model = {inner} is not divisible by {self.head_dim}; pick a divisor")
        require((inner // self.head_dim) % self.n_groups == 0, "model.n_groups",
                f"{self.n_groups} must divide the {inner // self.head_dim} heads")
        require(0 < self.dt_min <= self.dt_max, "model.dt_min", "needs 0 < dt_min <= dt_max")
        require(0 < self.a_init_min <= self.a_init_max, "model.a_init_min",
                "needs 0 < a_init_min <= a_init_max (mamba-ssm: 1 and 16)")
        one_of(self.scan, ("auto", "torch", "mamba_ssm"), "model.scan")
        one_of(self.proj_init, ("kaiming_uniform", "normal"), "model.proj_init")

    @property
    def n_heads(self) -> int:
        return self.expand * self.d_model // self.head_dim

class GatedRMSNorm(nn.Module):
    """RMSNorm of ``y * silu(z)`` over groups of ``group_size`` channels (one per B/C group)."""

    def __init__(self, dim: int, group_size: int, eps: float) -> None:
        super().__init__()
        self.eps, self.group_size = eps, group_size
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        g = (y.float() * F.silu(z.float())).unflatten(-1, (-1, self.group_size))
        g = (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)).flatten(-2)
        return self.weight * g.to(y.dtype)


class Mixer(nn.Module):
    """in_proj -> (z | x, B, C | dt); causal depthwise conv + SiLU on (x, B, C); the SSD scan;
    gated norm with z; out_proj."""

    def __init__(self, cfg: Mamba2Config, prefix: str, make_linear: LinearFactory) -> None:
        super().__init__()
        self.cfg = cfg
        self.d_inner = cfg.expand * cfg.d_model
        self.n_heads = cfg.n_heads
        self.bc_dim = cfg.n_groups * cfg.d_state
        self.conv_dim = self.d_inner + 2 * self.bc_dim
        # Kaiming-uniform (a = sqrt 5) is U(+-1/sqrt(in)): standard deviation 1/sqrt(3 in).
        uniform = cfg.proj_init == "kaiming_uniform"
        init = "uniform" if uniform else "normal"
        in_std = 1 / math.sqrt(3 * cfg.d_model) if uniform else cfg.init_std
        out_std = 1 / math.sqrt(3 * self.d_inner) if uniform else cfg.init_std
        self.in_proj = make_linear(f"{prefix}.in_proj", cfg.d_model,
                                   self.d_inner + self.conv_dim + self.n_heads, in_std, init)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, cfg.d_conv, groups=self.conv_dim,
                                padding=cfg.d_conv - 1, bias=cfg.conv_bias)
        # Time steps start log-uniform in [dt_min, dt_max]; dt_bias holds softplus^-1 of them.
        dt = torch.exp(torch.rand(self.n_heads) * (math.log(cfg.dt_max) - math.log(cfg.dt_min))
                       + math.log(cfg.dt_min)).clamp(min=cfg.dt_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        # One decay rate per head, A = -exp(A_log) uniform in [a_init_min, a_init_max] as
        # mamba-ssm and Bi-Mamba draw it (1..16: most heads start with short memory, some long).
        a = torch.empty(self.n_heads).uniform_(cfg.a_init_min, cfg.a_init_max)
        self.A_log = nn.Parameter(torch.log(a))
        self.D = nn.Parameter(torch.ones(self.n_heads))
        for p in (self.dt_bias, self.A_log, self.D):  # mamba-ssm's mark (optim.decay=all_but_ssm)
            p._no_weight_decay = True
        self.norm = GatedRMSNorm(self.d_inner, self.d_inner // cfg.n_groups, cfg.norm_eps)
        # Residual-branch outputs scaled by 1/sqrt(layers) (GPT-2; Mamba's prenorm rescale).
        self.out_proj = make_linear(f"{prefix}.out_proj", self.d_inner, cfg.d_model,
                                    out_std / math.sqrt(cfg.n_layers), init)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        b, length, _ = u.shape
        z, xbc, dt = self.in_proj(u).split([self.d_inner, self.conv_dim, self.n_heads], dim=-1)
        xbc = F.silu(self.conv1d(xbc.transpose(1, 2))[..., :length].transpose(1, 2))
        x, Bm, Cm = xbc.split([self.d_inner, self.bc_dim, self.bc_dim], dim=-1)
        dt = F.softplus(dt.float() + self.dt_bias.float())
        y = scan(
            x.unflatten(-1, (self.n_heads, self.cfg.head_dim)), dt, -torch.exp(self.A_log.float()),
            Bm.unflatten(-1, (self.cfg.n_groups, self.cfg.d_state)),
            Cm.unflatten(-1, (self.cfg.n_groups, self.cfg.d_state)), self.D,
            self.cfg.chunk_size, self.cfg.scan,
        )
        return self.out_proj(self.norm(y.flatten(-2), z).to(u.dtype))


class Block(nn.Module):
    """``x + mixer(norm(x))``; with ``residual_in_fp32`` the sum is kept in fp32 (mamba-ssm's
    option) while the norm's output goes to the mixer in the parameters' dtype."""

    def __init__(self, cfg: Mamba2Config, index: int, make_linear: LinearFactory) -> None:
        super().__init__()
        self.residual_in_fp32 = cfg.residual_in_fp32
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = Mixer(cfg, f"backbone.layers.{index}.mixer", make_linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x.float() if self.residual_in_fp32 else x
        return residual + self.mixer(self.norm(x).to(self.norm.weight.dtype))


class Backbone(nn.Module):
    """``Mamba2Model`` in transformers' naming."""

    def __init__(self, cfg: Mamba2Config, make_linear: LinearFactory) -> None:
        super().__init__()
        self.embeddings = Embedding(cfg.vocab_size, cfg.d_model, cfg.init_std)
        self.layers = nn.ModuleList(Block(cfg, i, make_linear) for i in range(cfg.n_layers))
        self.norm_f = RMSNorm(cfg.d_model, cfg.norm_eps)


class Mamba2LM(nn.Module):
    """Causal LM: token ids (B, S) -> next-token logits (B, S, vocab_size)."""

    def __init__(self, cfg: Mamba2Config, make_linear: LinearFactory) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = Backbone(cfg, make_linear)
        self.lm_head = make_linear("lm_head", cfg.d_model, cfg.vocab_size, cfg.init_std)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.backbone.embeddings(input_ids)
        for layer in self.backbone.layers:
            x = layer(x)
        return self.lm_head(self.backbone.norm_f(x).to(self.backbone.norm_f.weight.dtype))


def scan_that_runs(cfg: Mamba2Config) -> str:
    """``mamba_ssm`` or ``torch``: what ``model.scan`` resolves to here (auto takes mamba-ssm's
    kernels where the package imports, which it does on CUDA machines only)."""
    if cfg.scan == "mamba_ssm" or (cfg.scan == "auto" and mamba_ssm_kernel() is not None):
        return "mamba_ssm"
    return "torch"


def activation_bytes(cfg: Mamba2Config) -> float:
    """Per token and block in 16-bit training, counting what backward keeps: the block input
    and norm output (2 d), in_proj's output (2 di + 2 gn + h), the conv output before and after
    SiLU (2 (di + 2 gn)), dt in fp32 (2 h), the scan output and the gated product in fp32
    (4 di) and out_proj's input (di); di = expand d, gn = groups x state, h = heads. That is
    all with mamba-ssm's fused scan. The PyTorch chunked scan (``scan_that_runs``) keeps its
    fp32 intermediates on top, measured on fbi.models.ssd.chunked_scan (chunk Q, state N,
    head dim P): the (Q x Q) decays and scores per head (12 h Q), B and C per head (20 h N),
    x and x dt copies (16 h P), the chunk states (8 h P N / Q) and per-head decays (12 h)."""
    di, gn, h = cfg.expand * cfg.d_model, cfg.n_groups * cfg.d_state, cfg.n_heads
    fused = 2.0 * (2 * cfg.d_model + 9 * di + 6 * gn + 3 * h)
    if scan_that_runs(cfg) == "mamba_ssm":
        return fused
    q, n, p = cfg.chunk_size, cfg.d_state, cfg.head_dim
    return fused + h * (12 * q + 20 * n + 16 * p + 8 * p * n / q + 12)


def flops_per_token(cfg: Mamba2Config, seq_len: int) -> float:
    """Training FLOPs per token (3 x forward): 6 per weight of in_proj, out_proj and the
    output head; the depthwise convolution; and the chunked scan per head (chunk Q, state N,
    head dim P): scores C B^T over the chunk (2 Q N), their product with x (2 Q P), the chunk
    states (2 N P) and their read-out (2 N P). ``seq_len`` does not enter: the work per token
    is fixed by the chunk, not the context."""
    di, gn, h = cfg.expand * cfg.d_model, cfg.n_groups * cfg.d_state, cfg.n_heads
    q, n, p = cfg.chunk_size, cfg.d_state, cfg.head_dim
    proj = cfg.d_model * (2 * di + 2 * gn + h) + di * cfg.d_model
    mixing = 2 * (di + 2 * gn) * cfg.d_conv + h * (2 * q * n + 2 * q * p + 4 * n * p)
    return 6.0 * (cfg.n_layers * proj + cfg.d_model * cfg.vocab_size) + 3.0 * cfg.n_layers * mixing


def to_hf_config(cfg: Mamba2Config):
    from transformers import Mamba2Config as HFMamba2Config

    return HFMamba2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
        num_heads=cfg.n_heads, head_dim=cfg.head_dim, state_size=cfg.d_state, expand=cfg.expand,
        n_groups=cfg.n_groups, conv_kernel=cfg.d_conv, chunk_size=cfg.chunk_size,
        use_bias=False, use_conv_bias=cfg.conv_bias, hidden_act="silu",
        layer_norm_epsilon=cfg.norm_eps, initializer_range=cfg.init_std,
        time_step_min=cfg.dt_min, time_step_max=cfg.dt_max, time_step_floor=cfg.dt_floor,
        time_step_limit=(0.0, float("inf")), residual_in_fp32=cfg.residual_in_fp32,
        tie_word_embeddings=cfg.tie_embeddings,
    )


def from_hf_config(hf) -> Mamba2Config:
    if hf.use_bias or hf.hidden_act != "silu" or tuple(hf.time_step_limit) != (0.0, float("inf")):
        raise ValueError("this Mamba-2 config uses projection biases, another activation or a "
                         "time-step limit, which fbi's Mamba-2 does not implement")
    return Mamba2Config(
        n_layers=hf.num_hidden_layers, d_model=hf.hidden_size, vocab_size=hf.vocab_size,
        d_state=hf.state_size, d_conv=hf.conv_kernel, expand=hf.expand, head_dim=hf.head_dim,
        n_groups=hf.n_groups, chunk_size=hf.chunk_size, conv_bias=hf.use_conv_bias,
        dt_min=hf.time_step_min, dt_max=hf.time_step_max, dt_floor=hf.time_step_floor,
        norm_eps=hf.layer_norm_epsilon, init_std=hf.initializer_range,
        tie_embeddings=bool(hf.tie_word_embeddings), residual_in_fp32=bool(hf.residual_in_fp32),
    )


def to_hf_state_dict(state: dict) -> dict:
    """fbi names are ``Mamba2ForCausalLM``'s: the mapping is the identity."""
    return dict(state)


def from_hf_state_dict(state: dict) -> dict:
    return dict(state)
