"""FLOPs per token of each architecture against torch's own FLOP counter on a real forward +
backward, and the MFU arithmetic."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fbi.configure import compose
from fbi.flops import mfu, peak_flops, table_peak
from fbi.models import architecture, build_model


def counted_per_token(model, tokens: torch.Tensor) -> dict[str, float]:
    with FlopCounterMode(display=False) as counter:
        model(tokens).float().sum().backward()
    counts = {str(op).split(".")[-1]: n for op, n in counter.get_flop_counts()["Global"].items()}
    return {op: n / tokens.numel() for op, n in counts.items()}


@pytest.mark.parametrize("scheme", ["fp", "fbi"])
def test_transformer_flops_are_the_products_torch_counts_plus_attention(scheme):
    cfg = compose(["experiment=none", "max_steps=1", "model=fbi_tiny", "model.vocab_size=96",
                   f"scheme={scheme}"])
    seq = 48
    counted = counted_per_token(build_model(cfg.model, cfg.scheme), torch.randint(0, 96, (2, seq)))
    # torch's counter does not see CPU attention kernels: add QK^T and AV, two (seq x seq x d)
    # products per layer and sequence, forward 2 FLOPs per multiply-add, training 3x forward.
    attention = 3 * 2 * 2 * seq * seq * cfg.model.d_model * cfg.model.n_layers / seq
    assert set(counted) == {"mm"}
    formula = architecture(cfg.model).flops_per_token(cfg.model, seq)
    assert formula == pytest.approx(counted["mm"] + attention, rel=1e-9)


def test_mamba2_flops_are_the_products_and_scan_torch_counts():
    cfg = compose(["experiment=none", "max_steps=1", "model=bimamba_tiny", "model.vocab_size=96"])
    seq = 2 * cfg.model.chunk_size  # whole chunks: the scan pads the last one
    counted = counted_per_token(build_model(cfg.model, cfg.scheme), torch.randint(0, 96, (2, seq)))
    # The depthwise convolution counted forward only (x3 for training): torch's counter
    # ignores the groups of a grouped convolution's backward.
    conv = 3 * counted["convolution"]
    formula = architecture(cfg.model).flops_per_token(cfg.model, seq)
    assert formula == pytest.approx(counted["mm"] + counted["bmm"] + conv, rel=1e-3)


def test_mfu_and_peaks():
    # 1000 tokens/s x 6e9 FLOPs per token on 2 devices of 10 TFLOP/s: 30% of what they could.
    assert mfu(1000.0, 6e9, 2, 10e12) == pytest.approx(0.3)
    assert peak_flops(torch.device("cpu")) is None  # no MFU without a known peak
    assert peak_flops(torch.device("cpu"), 2.5) == 2.5e12  # logging.peak_tflops overrides


@pytest.mark.parametrize("name,tflops", [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A10G", 70.0), ("NVIDIA L40", 181.0), ("NVIDIA L4", 121.0), ("NVIDIA GeForce GTX 1080", None),
])
def test_gpu_names_find_their_own_peak(name, tflops):
    # Names that contain others (A100 / A10, L40 / L4) must not take the shorter name's peak.
    assert table_peak(name) == (None if tflops is None else tflops * 1e12)
