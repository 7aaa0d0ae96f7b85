"""Packed 1-bit export: bit-identical logits after reloading, and the real size on disk."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fbi.binarize import SCHEMES, scheme_config
from fbi.models.llama import ModelConfig
from fbi.models.mamba2 import Mamba2Config
from fbi.data.tokenizer import load_tokenizer
from fbi.export.packed import export_packed, load_packed
from fbi.models import build_model
from fbi.lm import Trained
from fbi.trained import load


def tiny_trained(scheme: str, tokenizer_dir, tie: bool = False, arch: str = "llama") -> Trained:
    tokenizer = load_tokenizer(str(tokenizer_dir))
    if arch == "llama":
        model_cfg = ModelConfig(n_layers=2, d_model=64, d_ff=96, n_heads=4, n_kv_heads=2,
                                vocab_size=tokenizer.vocab_size, tie_embeddings=tie)
    else:
        model_cfg = Mamba2Config(n_layers=2, d_model=32, d_state=8, head_dim=16, n_groups=2,
                                 chunk_size=8, vocab_size=tokenizer.vocab_size, tie_embeddings=tie)
    scheme_cfg = scheme_config(scheme, **({"hadamard_block": 16} if scheme == "fbi_w1a1" else {}))
    torch.manual_seed(0)
    model = build_model(model_cfg, scheme_cfg)
    with torch.no_grad():  # trained-looking scales: not the values reset_scales derives
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return Trained(model.eval(), model, tokenizer, tokenizer.eos_id, 32, "test", model_cfg,
                   scheme_cfg)


@pytest.mark.parametrize("scheme,tie,arch", [(s, False, "llama") for s in sorted(SCHEMES)]
                         + [("fbi", True, "llama"), ("fbi", True, "mamba2"), ("bitnet", False, "mamba2")])
def test_reloaded_logits_are_bit_identical(tmp_path, tokenizer_dir, scheme, tie, arch):
    trained = tiny_trained(scheme, tokenizer_dir, tie, arch)
    sizes = export_packed(trained, tmp_path / "packed", fp_dtype="float32")
    loaded = load(tmp_path / "packed", kernel="dense")
    ids = torch.randint(0, trained.model_cfg.vocab_size, (2, 24))
    with torch.no_grad():
        assert torch.equal(loaded.logits(ids), trained.logits(ids))
    assert loaded.tokenizer.fingerprint == trained.tokenizer.fingerprint
    if tie:
        params = dict(loaded.model.named_parameters())  # tied: one tensor, listed once
        assert "lm_head.weight" not in params
    if scheme != "fp":  # what the layers say they store, weighted by their size
        layers = [m for m in trained.model.modules() if type(m) is SCHEMES[scheme]]
        n = sum(m.in_features * m.out_features for m in layers)
        bits = sum(m.bits_per_weight() * m.in_features * m.out_features for m in layers) / n
        assert sizes["bits_per_binarized_weight"] == pytest.approx(bits, rel=1e-6)


def test_bfloat16_parts_halve_the_dense_bytes(tmp_path, tokenizer_dir):
    trained = tiny_trained("fbi", tokenizer_dir)
    fp32 = export_packed(trained, tmp_path / "a", fp_dtype="float32")
    bf16 = export_packed(trained, tmp_path / "b")  # the default
    assert bf16["binarized_bytes"] == fp32["binarized_bytes"]
    dense = fp32["total_bytes"] - fp32["binarized_bytes"]
    assert bf16["total_bytes"] - bf16["binarized_bytes"] == pytest.approx(dense / 2, rel=0.01)
    assert bf16["total_bytes"] < bf16["bf16_bytes"] < fp32["total_bytes"]  # smaller than bf16
    ids = torch.randint(0, trained.model_cfg.vocab_size, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(load_packed(tmp_path / "b").logits(ids), trained.logits(ids),
                                   rtol=0.05, atol=0.05)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_packed_export_of_a_zero3_run_is_bit_identical_and_real_size(tmp_path, zero3_run, capsys):
    from fbi.cli import main

    main(["export", str(zero3_run), "--format", "packed", "--fp-dtype", "float32",
          "--out", str(tmp_path / "packed")])
    sizes = json.loads(capsys.readouterr().out)
    trained, packed = load(zero3_run), load(tmp_path / "packed", kernel="dense")
    ids = torch.randint(0, trained.model_cfg.vocab_size, (2, 32))
    with torch.no_grad():
        assert torch.equal(packed.logits(ids), trained.logits(ids))
    # n/8 bytes of signs per binarized weight plus the scales (alpha, beta) in fp32
    layers = [m for m in trained.model.modules() if type(m) is SCHEMES["fbi"]]
    n = sum(m.weight.numel() for m in layers)
    scales = sum(4 * (m.alpha.numel() + m.beta.numel()) for m in layers)
    assert sizes["binarized_weights"] == n
    assert sizes["binarized_bytes"] == pytest.approx(n / 8 + scales, rel=0.05)
    assert sizes["file_bytes"] == (tmp_path / "packed" / "model.safetensors").stat().st_size
    assert sizes["binarized_size_vs_bf16"] == pytest.approx((n / 8 + scales) / (2 * n), rel=0.05)
    assert math.isclose(sizes["bits_per_binarized_weight"], 8 * sizes["binarized_bytes"] / n)
