"""The fbi decoder is LLaMA: same logits as transformers' LlamaForCausalLM on its weights."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fbi.models.llama import ModelConfig
from fbi.binarize.fbi import FBILinear
from fbi.models import build_model


def tiny_hf(tie: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=tie, max_position_embeddings=128,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1 so that their weights are checked too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("tie", [False, True])
def test_fp_model_matches_transformers_llama(tie):
    hf = tiny_hf(tie)
    cfg = ModelConfig(n_layers=2, d_model=64, d_ff=112, n_heads=8, n_kv_heads=2,
                      vocab_size=97, tie_embeddings=tie)
    ours = build_model(cfg, "fp").eval()
    missing, unexpected = ours.load_state_dict(hf.state_dict(), strict=False)
    assert not missing and all("rotary" in k for k in unexpected)
    ids = torch.randint(0, 97, (3, 33))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)


def test_causal():
    cfg = ModelConfig(n_layers=2, d_model=32, d_ff=64, n_heads=4, vocab_size=50)
    model = build_model(cfg, "fbi").eval()
    ids = torch.randint(0, 50, (1, 12))
    changed = ids.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 50
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[:, :8], model(changed)[:, :8])
        assert not torch.allclose(model(ids)[:, 8:], model(changed)[:, 8:])


def test_fbi_scheme_binarizes_blocks_only():
    cfg = ModelConfig(n_layers=2, d_model=32, d_ff=64, n_heads=4, vocab_size=50)
    model = build_model(cfg, "fbi")
    binary = {n for n, m in model.named_modules() if isinstance(m, FBILinear)}
    assert len(binary) == 2 * 7
    assert all(n.startswith("model.layers.") for n in binary)
    assert not isinstance(model.lm_head, FBILinear)
