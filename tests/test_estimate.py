"""The memory estimate counts what a real model and optimizer hold."""

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
    assert checkpointed.bytes["parameters"] == 4 * est.parameters / 4  # recomputed, not kept
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
