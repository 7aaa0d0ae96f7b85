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
from fbi.config import ConfigError
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


def test_fp32_scan_at_chunk_256_is_within_1e_5_of_float64():
    """Mamba-2's initialization (dt from softplus of dt_bias in [1e-3, 0.1] plus noise, A in
    [-16, -1]) over two chunks of 256: each decay summed from its own steps (segment sums),
    not as a difference of running sums, keeps the fp32 output within 1e-5 of a float64
    recurrence and its gradients within 2e-6 of their largest value (the running-sum
    difference: 9e-5 and up to 1.4e-5)."""
    import math

    g = torch.Generator().manual_seed(0)
    b, length, heads, p, n = 1, 512, 8, 16, 32
    dt0 = torch.exp(torch.rand(heads, generator=g) * math.log(100) + math.log(1e-3)).double()
    dt = torch.nn.functional.softplus(torch.randn(b, length, heads, generator=g, dtype=torch.float64)
                                      + dt0 + torch.log(-torch.expm1(-dt0)))
    inputs = [torch.randn(b, length, heads, p, generator=g, dtype=torch.float64), dt,
              -(torch.rand(heads, generator=g, dtype=torch.float64) * 15 + 1),
              torch.randn(b, length, 1, n, generator=g, dtype=torch.float64),
              torch.randn(b, length, 1, n, generator=g, dtype=torch.float64),
              torch.ones(heads, dtype=torch.float64)]
    ref_in = [t.clone().requires_grad_() for t in inputs]
    ours_in = [t.float().requires_grad_() for t in inputs]
    # The float64 reference chunked otherwise: equal to the recurrence to 1e-10 (test above).
    ref, ours = chunked_scan(*ref_in, chunk_size=64), chunked_scan(*ours_in, chunk_size=256)
    assert ours.dtype == torch.float32
    assert (ours.double() - ref).abs().max() <= 1e-5
    weights = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    ref_grads = torch.autograd.grad((ref * weights).sum(), ref_in)
    our_grads = torch.autograd.grad((ours * weights.float()).sum(), ours_in)
    for a, r in zip(our_grads, ref_grads):
        assert (a.double() - r).abs().max() <= 2e-6 * r.abs().max()


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
def test_asking_for_mamba_ssm_without_it_is_refused_before_anything_runs():
    """At start-up (preflight, before any run file), naming the way out; the 780M recipe is
    sized for the fused scan, so it refuses here; the estimate still counts it."""
    from fbi.estimate import estimate
    from fbi.preflight import check_scan

    recipe = ["experiment=bimamba_780m", "teacher.path=/t", "data.shards_dir=/s",
              "model.vocab_size=32000"]
    cfg = compose(recipe)
    assert cfg.model.scan == "mamba_ssm" and not cfg.zero.activation_checkpointing
    with pytest.raises(ConfigError, match="model.scan: mamba_ssm, but the mamba-ssm package does "
                                          "not import here.*zero.activation_checkpointing=true"):
        check_scan(cfg)
    check_scan(compose(recipe + ["model.scan=auto", "zero.activation_checkpointing=true"]))
    fused = estimate(cfg, world_size=4).bytes["activations"]
    torch_scan = estimate(compose(recipe + ["model.scan=auto"]), world_size=4).bytes["activations"]
    assert torch_scan > 4 * fused  # the PyTorch scan's fp32 intermediates


@pytest.mark.skipif(not torch.cuda.is_available() or mamba_ssm_kernel() is None,
                    reason="needs a GPU with mamba-ssm (requirements-mamba.txt)")
def test_mamba_ssm_kernels_equal_the_chunked_scan():
    inputs = [t.detach().float().cuda().requires_grad_() for t in scan_inputs(length=100, p=16, n=16)]
    ours = chunked_scan(*inputs, chunk_size=32)
    theirs = mamba_ssm_scan(*inputs, chunk_size=32)
    torch.testing.assert_close(theirs, ours, rtol=2e-3, atol=2e-3)


def test_a_starts_uniform_in_1_to_16_as_mamba_ssm_draws_it():
    cfg = Mamba2Config(n_layers=1, d_model=1280, d_state=8, head_dim=16, vocab_size=40)
    torch.manual_seed(0)
    a = torch.exp(build_model(cfg, "fp").backbone.layers[0].mixer.A_log.detach())
    assert a.numel() == 160 and a.min() >= 1 and a.max() <= 16
    assert 7.0 < a.mean() < 10.0 and (a > 8.5).float().mean().item() == pytest.approx(0.5, abs=0.15)
    narrow = Mamba2Config(n_layers=1, d_model=64, d_state=8, head_dim=16, vocab_size=40,
                          a_init_min=2.0, a_init_max=3.0)
    a = torch.exp(build_model(narrow, "fp").backbone.layers[0].mixer.A_log.detach())
    assert a.min() >= 2 - 1e-6 and a.max() <= 3 + 1e-6


def test_residual_in_fp32_keeps_the_stream_fp32_in_a_bf16_model():
    """mamba-ssm's residual_in_fp32: the blocks' sum is fp32, the mixer computes in bf16, and
    transformers' Mamba2 gets the flag."""
    torch.manual_seed(0)
    base = dict(n_layers=2, d_model=32, d_state=8, head_dim=16, chunk_size=8, vocab_size=50)
    ids = torch.randint(0, 50, (2, 17))
    fp32 = build_model(Mamba2Config(**base), "fbi")
    outs = {}
    for flag in (False, True):
        model = build_model(Mamba2Config(**base, residual_in_fp32=flag), "fbi")
        model.load_state_dict(fp32.state_dict())
        model = model.to(torch.bfloat16)
        block = model.backbone.layers[0]
        x = model.backbone.embeddings(ids)
        assert block(x).dtype == (torch.float32 if flag else torch.bfloat16)
        assert block.mixer(block.norm(x).to(torch.bfloat16)).dtype == torch.bfloat16
        outs[flag] = model(ids).float()
    exact = fp32(ids)
    assert (outs[True] - exact).abs().mean() < (outs[False] - exact).abs().mean()
    assert to_hf(fp32, Mamba2Config(**base, residual_in_fp32=True)).config.residual_in_fp32


@pytest.mark.parametrize("n_layers", [1, 4])
def test_projections_start_as_bimamba_draws_them(n_layers):
    """Bi-Mamba's ``bimamba_mixer_seq_simple.py`` (mamba-ssm's ``_init_weights``): in_proj keeps
    ``nn.Linear``'s default Kaiming-uniform draw; out_proj is redrawn the same way and divided
    by sqrt(n_layer) (one residual per layer, no MLP). Each projection fbi builds, from the
    same random state, equals that reference draw."""
    cfg = Mamba2Config(n_layers=n_layers, d_model=24, vocab_size=40, d_state=8, head_dim=8,
                       chunk_size=8)
    calls = []

    def recording(name, n_in, n_out, std, init="normal"):
        calls.append((name, n_in, n_out, std, init))
        return DenseLinear(n_in, n_out, init_std=std, init=init)

    from fbi.models.mamba2 import Mamba2LM
    Mamba2LM(cfg, recording)
    assert sorted({c[0].rsplit(".", 1)[-1] for c in calls}) == ["in_proj", "lm_head", "out_proj"]
    for name, n_in, n_out, std, init in calls:
        if name == "lm_head":
            continue
        torch.manual_seed(7)
        ours = DenseLinear(n_in, n_out, init_std=std, init=init).weight.detach()
        torch.manual_seed(7)
        reference = torch.nn.Linear(n_in, n_out, bias=False).weight.detach()
        if name.endswith("out_proj"):
            reference = reference / n_layers ** 0.5
        torch.testing.assert_close(ours, reference, rtol=1e-6, atol=0)


def test_projections_keep_the_earlier_normal_draw_on_request():
    cfg = Mamba2Config(n_layers=4, d_model=64, vocab_size=40, d_state=8, head_dim=16,
                       chunk_size=8, proj_init="normal")
    torch.manual_seed(0)
    model = build_model(cfg, "fp")
    mixer = model.backbone.layers[0].mixer
    assert abs(mixer.in_proj.weight.std().item() / 0.02 - 1) < 0.05
    assert abs(mixer.out_proj.weight.std().item() / 0.01 - 1) < 0.05
