"""Model FLOPs utilization (MFU): the training FLOPs a step needs, over what the devices could
have done in its time. FLOPs per token come from each architecture (``fbi.models``): 6 per
weight of every matrix product (forward 2, backward 4), embeddings excluded, plus the
sequence mixing (attention, or Mamba-2's chunked scan). Binarized layers count as the dense
products they compute; a binary model and its full-precision baseline have the same MFU
denominator, so their MFUs compare like their speeds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fbi.models import ARCHITECTURES, architecture

# Dense (no sparsity) bf16/fp16 tensor-core peaks, TFLOP/s per device, from the vendors'
# datasheets. Matched against torch.cuda.get_device_name() in order: specific names first.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("GH200", 989.4), ("H200", 989.4),
    ("H100", 989.4), ("H800", 989.4), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0),
    ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0), ("V100", 125.0),
    ("MI300X", 1307.4), ("MI250X", 383.0),
)


def peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """FLOP/s one device can do at most: ``override_tflops`` (logging.peak_tflops) if set, else
    the table's figure for this GPU; None where unknown (CPUs, unlisted GPUs): no MFU then."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    return table_peak(torch.cuda.get_device_name(device))


def table_peak(device_name: str) -> float | None:
    return next((tflops * 1e12 for key, tflops in PEAK_TFLOPS if key in device_name), None)


def mfu(tokens_per_s: float, flops_per_token: float, devices: int, peak: float) -> float:
    return tokens_per_s * flops_per_token / (devices * peak)


def teacher_forward_flops(model: nn.Module, seq_len: int) -> float:
    """Forward FLOPs per token of a ``transformers`` teacher: its fbi architecture's count
    where there is one (a third of training's), else 2 per weight (mixing not counted)."""
    hf = getattr(model, "module", model)  # under its own ZeRO-3 engine
    arch = next((a for a in ARCHITECTURES.values() if a.hf_class == type(hf).__name__), None)
    if arch is None:
        return 2.0 * sum(getattr(p, "ds_numel", p.numel()) for p in hf.parameters())
    return arch.flops_per_token(arch.from_hf_config(hf.config), seq_len) / 3


@dataclass(frozen=True)
class Utilization:
    """What a training token costs (the student's training, the online teacher's forward)
    on how many devices of which peak FLOP/s (None: unknown, no MFU)."""

    student_flops_per_token: float
    teacher_flops_per_token: float
    devices: int
    peak: float | None

    @classmethod
    def of(cls, model_cfg, seq_len: int, teacher: nn.Module | None, devices: int,
           device: torch.device, peak_tflops: float | None) -> "Utilization":
        student = architecture(model_cfg).flops_per_token(model_cfg, seq_len)
        taught = 0.0 if teacher is None else teacher_forward_flops(teacher, seq_len)
        return cls(student, taught, devices, peak_flops(device, peak_tflops))

    def metrics(self, tokens_per_s: float) -> dict[str, float]:
        """Achieved TFLOP/s per device and, with a known peak, MFU (fractions of it)."""
        per_device = tokens_per_s / self.devices
        out = {"tflops_per_device": per_device * self.student_flops_per_token / 1e12}
        if self.teacher_flops_per_token:
            out["teacher_tflops_per_device"] = per_device * self.teacher_flops_per_token / 1e12
        if self.peak:
            out["mfu"] = mfu(tokens_per_s, self.student_flops_per_token, self.devices, self.peak)
            if self.teacher_flops_per_token:
                out["mfu_teacher"] = mfu(tokens_per_s, self.teacher_flops_per_token,
                                         self.devices, self.peak)
        return out
