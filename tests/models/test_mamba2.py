"""Mamba-2: the chunked SSD scan against the step-by-step recurrence, the model against
transformers' Mamba2ForCausalLM (its PyTorch path), binarization through the scheme seam,
and the paper sizes' parameter counts. mamba-ssm's kernels (model.scan=auto on CUDA) are
compared with the chunked scan only on a GPU with mamba-ssm installed (skipped on CPU, where
the refusal to use them is tested instead)."""

import pytest
import torch
from transformers import Mamba2Config as HFMamba2Config, Mamba2ForCausalLM

from fbi.binarize import SCHEMES, scheme_config
from fbi.binarize.fp import DenseLinear
from fbi.configure import compose
from fbi.models.mamba2 import Mamba2Config
from fbi.models import build_model, from_hf, to_hf
from fbi.models.ssd import chunked_scan, mamba_ssm_kernel, mamba_ssm_scan, sequential_scan


def scan_inputs(length=13, heads=4, groups=2, p=3, n=5, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return [rand(2, length, heads, p).requires_grad_(),
            torch.nn.functional.softplus(rand(2, length, heads)).requires_grad_(),
            (-torch.rand(heads, generator=g, dtype=dtype) * 2).requires_grad_(),
            rand(2, length, groups, n).requires_grad_(), rand(2, length, groups, n).requires_grad_(),
            rand(heads).requires_grad_()]


@pytest.mark.parametrize("chunk", [1, 4, 5, 13, 16])
def test_chunked_scan_equals_the_sequential_recurrence_with_gradients(chunk):
    inputs = scan_inputs()
    ref = sequential_scan(*inputs)
    ours = chunked_scan(*inputs, chunk_size=chunk)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    weights = torch.randn_like(ref)
    ref_grads = torch.autograd.grad((ref * weights).sum(), inputs)
    our_grads = torch.autograd.grad((ours * weights).sum(), inputs)
    for a, b in zip(our_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def tiny_hf(tie: bool = True) -> Mamba2ForCausalLM:
    torch.manual_seed(0)
    hf = Mamba2ForCausalLM(HFMamba2Config(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_heads=4, head_dim=16,
        state_size=8, expand=2, n_groups=2, conv_kernel=4, chunk_size=8,
        tie_word_embeddings=tie, residual_in_fp32=False)).eval()
    with torch.no_grad():  # away from their initial values, so that each mapping is checked
        for name, p in hf.named_parameters():
            if name.endswith(("norm.weight", "norm_f.weight", ".D", "dt_bias", "conv1d.bias")):
                p.add_(0.2 * torch.randn_like(p))
    return hf


@pytest.mark.parametrize("tie", [True, False])
def test_fp_model_matches_transformers_mamba2(tie):
    hf = tiny_hf(tie)
    cfg, ours = from_hf(hf, "fp")
    assert cfg.tie_embeddings == tie
    ids = torch.randint(0, 97, (2, 21))  # not a multiple of the chunk
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)


def test_folded_binary_model_matches_transformers_mamba2():
    cfg, ours = from_hf(tiny_hf(), "fbi")
    binary = sorted(n for n, m in ours.named_modules() if type(m) is not DenseLinear
                    and isinstance(m, DenseLinear))
    assert binary == [f"backbone.layers.{i}.mixer.{p}" for i in range(2) for p in ("in_proj", "out_proj")]
    ids = torch.randint(0, 97, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(to_hf(ours.eval(), cfg)(ids).logits, ours(ids),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_every_scheme_binarizes_the_mamba_projections(name):
    cfg = Mamba2Config(n_layers=1, d_model=32, d_state=8, head_dim=16, chunk_size=4, vocab_size=40)
    torch.manual_seed(0)
    model = build_model(cfg, scheme_config(name, **({"hadamard_block": 16} if name == "fbi_w1a1" else {})))
    layers = {n: type(m) for n, m in model.named_modules() if isinstance(m, DenseLinear)}
    assert layers == {"backbone.layers.0.mixer.in_proj": SCHEMES[name],
                      "backbone.layers.0.mixer.out_proj": SCHEMES[name], "lm_head": DenseLinear}
    ids = torch.randint(0, 40, (2, 9))
    model(ids).logsumexp(-1).mean().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n


def test_causal():
    cfg = Mamba2Config(n_layers=2, d_model=32, d_state=8, head_dim=16, chunk_size=4, vocab_size=50)
    model = build_model(cfg, "fbi").eval()
    ids = torch.randint(0, 50, (1, 12))
    changed = ids.clone()
    changed[0, 7:] = (changed[0, 7:] + 1) % 50
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[:, :7], model(changed)[:, :7])
        assert not torch.allclose(model(ids)[:, 7:], model(changed)[:, 7:])


@pytest.mark.parametrize("size,expected", [("780m", 780e6), ("1p3b", 1.3e9), ("2p7b", 2.7e9)])
def test_paper_sizes_on_the_meta_device(size, expected):
    # Mamba-2's sizes are named with its GPT-NeoX vocabulary (50,280 tokens).
    cfg = compose(["experiment=none", "max_steps=1", f"model=bimamba_{size}", "model.vocab_size=50280"])
    with torch.device("meta"):
        model = build_model(cfg.model, cfg.scheme)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(expected, rel=0.04)


@pytest.mark.skipif(mamba_ssm_kernel() is not None, reason="mamba-ssm is installed")
def test_asking_for_mamba_ssm_without_it_is_refused():
    cfg = Mamba2Config(n_layers=1, d_model=32, d_state=8, head_dim=16, vocab_size=40, scan="mamba_ssm")
    with pytest.raises(ValueError, match="model.scan=mamba_ssm"):
        build_model(cfg, "fbi")


@pytest.mark.skipif(not torch.cuda.is_available() or mamba_ssm_kernel() is None,
                    reason="needs a GPU with mamba-ssm (requirements-mamba.txt)")
def test_mamba_ssm_kernels_equal_the_chunked_scan():
    inputs = [t.detach().float().cuda().requires_grad_() for t in scan_inputs(length=100, p=16, n=16)]
    ours = chunked_scan(*inputs, chunk_size=32)
    theirs = mamba_ssm_scan(*inputs, chunk_size=32)
    torch.testing.assert_close(theirs, ours, rtol=2e-3, atol=2e-3)
