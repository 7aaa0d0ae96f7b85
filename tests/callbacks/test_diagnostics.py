"""Binary diagnostics against counts made here from the weights themselves."""

from __future__ import annotations

import torch

from fbi.callbacks.diagnostics import NEAR_ZERO, BinaryDiagnostics
from fbi.config import SchemeConfig
from fbi.models.llama import ModelConfig
from fbi.models import build_model


def test_flip_share_near_zero_share_and_scale_statistics():
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_layers=2, d_model=32, d_ff=64, n_heads=2, vocab_size=50),
                        SchemeConfig(name="fbi"))
    diag = BinaryDiagnostics(model, every=1, rank=0, world_size=1)
    first = diag.measure()
    assert "flip/q_proj" not in first  # nothing to compare with yet
    q = [m for name, m in model.named_modules() if name.endswith("q_proj")]
    assert len(q) == 2
    before = [m.weight.detach().clone() for m in q]
    with torch.no_grad():
        q[0].weight[:3] *= -1  # 3 rows of 32 flip sign
    after = diag.measure()
    flipped = sum(int(((b > 0) != (m.weight > 0)).sum()) for b, m in zip(before, q))
    assert flipped == 3 * 32
    assert after["flip/q_proj"] == flipped / sum(m.weight.numel() for m in q)
    assert after["flip/k_proj"] == 0.0
    w = torch.cat([m.weight.detach().flatten().double() for m in q])
    expected = float((w.abs() < NEAR_ZERO * w.abs().mean()).double().mean())
    assert abs(after["near_zero/q_proj"] - expected) < 1e-12
    alphas = torch.cat([m.alpha.detach().flatten() for m in q])
    assert abs(after["alpha_mean/q_proj"] - float(alphas.double().mean())) < 1e-7
    assert after["alpha_min/q_proj"] == float(alphas.min())
    assert after["alpha_max/q_proj"] == float(alphas.max())
