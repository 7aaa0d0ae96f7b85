"""The parts of the authors' recipes that live above one layer: which layers a scheme
replaces (PB-LLM's ``run_qat.py`` replaces every ``nn.Linear``, the output head included) and
what the model keeps around them (BitNet b1.58's training tips, step 2: no RMSNorm before
attention and SwiGLU), checked against an independent construction; and the SIGN_ONLY
probe's reach (magnitudes over many orders, both modes)."""

import pytest
import torch
from torch import nn

from fbi.binarize import SCHEMES, binarized_layers, scheme_config
from fbi.binarize.fp import DenseLinear
from fbi.binarize.packing import sign_ste
from fbi.binarize.sign_only import magnitude_dependence
from fbi.models import build_model
from fbi.models.llama import ModelConfig, RMSNorm, to_hf_config
from fbi.models.mamba2 import Mamba2Config

CFG = ModelConfig(n_layers=2, d_model=32, d_ff=64, n_heads=2, vocab_size=50)


@pytest.mark.parametrize("opts,head", [({}, True), ({"lm_head": False}, False),
                                       ({"binarize": ["model.layers.*"]}, False)])
def test_pbllm_binarizes_the_output_head_as_run_qat_does(opts, head):
    model = build_model(CFG, scheme_config("pbllm", **opts))
    names = set(binarized_layers(model))
    assert ("lm_head" in names) == head
    assert {n for n in names if n != "lm_head"} == {
        f"model.layers.{i}.{m}" for i in range(2) for m in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}


def test_pbllm_leaves_a_head_tied_to_the_embeddings_dense():
    mamba = Mamba2Config(n_layers=1, d_model=32, vocab_size=50, head_dim=8, d_state=8, chunk_size=8)
    assert mamba.tie_embeddings
    model = build_model(mamba, scheme_config("pbllm"))
    assert type(model.lm_head) is DenseLinear
    assert model.lm_head.weight is model.backbone.embeddings.weight
    # Named explicitly, a tied head is binarized and shares its latent weight with the dense
    # embedding (the 1-bit route keeps such a weight on the plain gather: test_sign_gather).
    tied = ModelConfig(n_layers=1, d_model=32, d_ff=64, n_heads=2, vocab_size=50, tie_embeddings=True)
    model = build_model(tied, scheme_config("pbllm", binarize=["lm_head"]))
    assert type(model.lm_head) is not DenseLinear
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("name,opts,kept", [
    ("bitnet158", {}, False), ("bitnet", {}, False), ("bitnet158", {"block_norms": True}, True),
    ("bitnet", {"norm": "layernorm", "block_norms": True}, True), ("fbi", {}, True),
    ("bitnet158", {"binarize": []}, True)])
def test_block_norms_are_removed_where_the_recipe_removes_them(name, opts, kept):
    model = build_model(CFG, scheme_config(name, **opts))
    norms = [n for n, m in model.model.layers.named_modules() if isinstance(m, RMSNorm)]
    assert len(norms) == (4 if kept else 0)
    assert isinstance(model.model.norm, RMSNorm)  # the final norm stays: the head is dense
    assert any("input_layernorm" in k for k in model.state_dict()) == kept


def test_b158_model_equals_transformers_llama_without_block_norms():
    """An independent construction of the tips' model: transformers' LlamaForCausalLM with
    its two block norms replaced by the identity and the same BitLinear layers and weights."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = build_model(CFG, scheme_config("bitnet158")).double()
    hf_cfg = to_hf_config(CFG)
    hf_cfg._attn_implementation = "eager"
    hf = LlamaForCausalLM(hf_cfg).double()
    hf.model.embed_tokens.weight = model.model.embed_tokens.weight
    hf.model.norm.weight = model.model.norm.weight
    hf.lm_head = model.lm_head
    for ours, theirs in zip(model.model.layers, hf.model.layers):
        theirs.input_layernorm, theirs.post_attention_layernorm = nn.Identity(), nn.Identity()
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(theirs.self_attn, proj, getattr(ours.self_attn, proj))
        for proj in ("gate_proj", "up_proj", "down_proj"):
            setattr(theirs.mlp, proj, getattr(ours.mlp, proj))
    ids = torch.randint(0, 50, (2, 11))
    # both build their rotary tables in fp32, hence not 1e-10
    torch.testing.assert_close(model(ids), hf(ids).logits, rtol=1e-6, atol=1e-6)
    kept = build_model(CFG, scheme_config("bitnet158", block_norms=True)).double()
    kept.load_state_dict(model.state_dict(), strict=False)  # unit-gain norms kept: another model
    assert (kept(ids) - model(ids)).abs().max() > 1e-3


class _ClipsAtFive(DenseLinear):
    """Declares SIGN_ONLY but clips the latent weight at |W| <= 5 before its sign-based STE:
    the gradient is zero beyond the clip, which a probe drawing |W| < 3 misses."""
    SIGN_ONLY = True

    def weight_formula(self, weight):
        return sign_ste(weight.clamp(-5, 5))


class _ReadsMagnitudeInEval(DenseLinear):
    """Declares SIGN_ONLY; in eval mode its output is scaled by mean|W|."""
    SIGN_ONLY = True

    def weight_formula(self, weight):
        scale = 1.0 if self.training else weight.detach().abs().mean()
        return sign_ste(weight) * scale


@pytest.mark.parametrize("cls,found", [(_ClipsAtFive, ["weight gradient (train)", "weight gradient (eval)"]),
                                       (_ReadsMagnitudeInEval, ["output (eval)", "input gradient (eval)",
                                                                "weight gradient (eval)"])])
def test_sign_only_probe_sees_large_magnitudes_and_eval_mode(cls, found):
    assert magnitude_dependence(cls, scheme_config("fbi")) == found


@pytest.mark.parametrize("name", sorted(n for n, layer in SCHEMES.items() if layer.SIGN_ONLY))
def test_true_sign_only_schemes_still_pass_the_wider_probe(name):
    assert magnitude_dependence(SCHEMES[name], scheme_config(name)) == []
