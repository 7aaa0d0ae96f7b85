"""The memory estimate counts what a real model and optimizer hold."""

import pytest
import torch

from fbi.binarize.fbi import FBILinear
from fbi.configure import compose
from fbi.estimate import GIB, estimate, main
from fbi.models import build_model


def test_counts_match_a_materialized_model_and_its_optimizer(capsys):
    cfg = compose(["experiment=demo", "model.vocab_size=96", "model.n_layers=2"])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.scheme.name, cfg.scheme.binarize)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randint(0, 96, (1, 8))).sum().backward()
    opt.step()
    state_bytes = sum(t.numel() * t.element_size() for s in opt.state.values()
                      for t in s.values() if t.dim() > 0)
    est = estimate(cfg, world_size=1)
    assert est.parameters == sum(p.numel() for p in model.parameters())
    assert est.binary_parameters == sum(
        m.weight.numel() for m in model.modules() if isinstance(m, FBILinear))
    assert est.bytes["optimizer"] == state_bytes  # fp32: Adam's two moments, no master copy
    assert est.bytes["parameters"] == 4 * est.parameters
    # ZeRO-3 on 4 ranks in bf16: a quarter of the 16-bit weights, gradients reduced in fp32,
    # and the fp32 master copy beside the moments.
    sharded = estimate(compose(["experiment=demo", "model.vocab_size=96", "model.n_layers=2",
                                "zero=stage3", "precision=bf16", "zero.grad_dtype=fp32"]), 4)
    assert sharded.bytes["parameters"] == 2 * est.parameters / 4
    assert sharded.bytes["gradients"] == 4 * est.parameters / 4
    assert sharded.bytes["optimizer"] == 12 * est.parameters / 4
    # the 1-bit route: the gathered signs of every binarized weight stay from forward to backward
    signs = estimate(compose(["experiment=demo", "model.vocab_size=96", "model.n_layers=2",
                              "zero=stage3", "precision=bf16", "zero.grad_dtype=fp32",
                              "zero.gather_signs=true"]), 4)
    assert signs.bytes["parameters"] == sharded.bytes["parameters"] + est.binary_parameters / 8
    checkpointed = estimate(compose(["experiment=demo", "model.vocab_size=96", "model.n_layers=2",
                                     "zero=stage3", "zero.gather_signs=true",
                                     "zero.activation_checkpointing=true"]), 4)
    # kept for the recomputation, which gathers nothing
    assert checkpointed.bytes["parameters"] == 4 * est.parameters / 4 + est.binary_parameters / 8
    main(["experiment=demo", "model.vocab_size=96", "model.n_layers=2", "--world-size", "1",
          "--gpu-gib", "1e-6"])
    out = capsys.readouterr().out
    assert "does NOT fit" in out and f"{est.total / GIB:8.2f} GiB per rank" in out


def test_bimamba_counts_match_the_materialized_model():
    cfg = compose(["experiment=bimamba_demo", "model.vocab_size=96", "model.n_layers=2"])
    model = build_model(cfg.model, cfg.scheme)
    est = estimate(cfg, world_size=1)
    assert est.parameters == sum(p.numel() for p in model.parameters())
    assert est.binary_parameters == sum(
        m.weight.numel() for m in model.modules() if isinstance(m, FBILinear)) > 0
    assert est.bytes["parameters"] == 4 * est.parameters


def test_the_pytorch_scans_activations_are_what_it_keeps_for_backward():
    """activation_bytes counts the scan that runs: with the PyTorch chunked scan, what its
    autograd graph keeps (distinct storages, inputs excluded), measured on a shape unlike the
    ones its per-token terms were read from."""
    from fbi.models.mamba2 import Mamba2Config
    from fbi.models.mamba2 import activation_bytes
    from fbi.models.ssd import chunked_scan

    cfg = Mamba2Config(d_model=80, d_state=24, head_dim=20, chunk_size=40, scan="torch")
    b, length, h, p, n = 2, 4 * cfg.chunk_size, cfg.n_heads, cfg.head_dim, cfg.d_state
    inputs = [torch.randn(b, length, h, p), torch.rand(b, length, h) + 0.01, -torch.rand(h),
              torch.randn(b, length, 1, n), torch.randn(b, length, 1, n), torch.randn(h)]
    inputs = [t.requires_grad_() for t in inputs]
    own = {t.untyped_storage().data_ptr() for t in inputs}
    kept = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in own:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunked_scan(*inputs, chunk_size=cfg.chunk_size)
    measured = sum(kept.values()) / (b * length)
    fused = activation_bytes(Mamba2Config(d_model=80, d_state=24, head_dim=20, chunk_size=40,
                                          scan="mamba_ssm"))
    assert activation_bytes(cfg) - fused == pytest.approx(measured, rel=0.03)
