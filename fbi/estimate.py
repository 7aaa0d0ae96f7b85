"""Per-GPU memory of a configuration, before launching it: ``python -m fbi.estimate``.

    python -m fbi.estimate experiment=fbi_7b teacher.path=/models/Llama-2-7b-hf \
        data.shards_dir=/shards/amber --world-size 64 --gpu-gib 80

The student is built on the meta device (no memory, no initialization), so the largest
recipe is counted in seconds on any machine. Figures are per rank and in GiB:

- parameters, gradients and optimizer state follow ZeRO's partitioning (Rajbhandari et al.,
  2020): stage 1 partitions the optimizer state, 2 also the gradients, 3 also the
  parameters; with bf16/fp16 the optimizer keeps an fp32 master copy beside Adam's two
  moments (12 bytes per parameter, 8 in fp32 training);
- activations of one block per token in 16-bit, from the architecture's registry entry
  (``fbi.models``; a transformer block with fused attention keeps 34 bytes per hidden unit,
  Korthikanti et al., 2022; a Mamba-2 block counts the scan that will run: mamba-ssm's fused
  kernel, or the PyTorch chunked scan's fp32 intermediates where the package does not
  import); with activation checkpointing only each block's input is kept, plus one block
  recomputed;
- the logits, the teacher's logits and the loss's gradient buffer: three fp32
  ``micro_batch x seq x vocab`` tensors;
- an online teacher's weights in its dtype, whole on every rank unless ``teacher.zero3``.

It is an estimate: allocator fragmentation, communication buckets and the framework's own
buffers come on top (typically a few GiB).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from fbi.binarize import binarized_layers
from fbi.config import ConfigError, TrainConfig
from fbi.configure import compose
from fbi.models import architecture, build_model
from fbi.models.mamba2 import scan_that_runs

GIB = 2**30
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class Estimate:
    parameters: int  # student parameters
    binary_parameters: int  # in layers the scheme binarizes
    bytes: dict[str, float]  # per rank, by kind

    @property
    def total(self) -> float:
        return sum(self.bytes.values())


def count_parameters(cfg: TrainConfig) -> tuple[int, int]:
    """(all, binarized) parameters of the student, built on the meta device."""
    with torch.device("meta"):
        model = build_model(cfg.model, cfg.scheme)
    total = sum(p.numel() for p in model.parameters())
    binary = sum(m.weight.numel() for m in binarized_layers(model).values())
    return total, binary


def teacher_parameters(cfg: TrainConfig) -> tuple[int, int | None]:
    """(parameters, vocabulary) of the teacher from its ``config.json``; (0, None) without one."""
    if cfg.teacher.kind != "hf" or not cfg.teacher.path:
        return 0, None
    config_file = Path(cfg.teacher.path).expanduser() / "config.json"
    if not config_file.exists():
        return 0, None
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_file.parent)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters()), config.vocab_size


def estimate(cfg: TrainConfig, world_size: int, teacher_params: int | None = None) -> Estimate:
    """``teacher_params`` overrides the count read from the teacher's ``config.json``."""
    counted, teacher_vocab = teacher_parameters(cfg)
    teacher_params = counted if teacher_params is None else teacher_params
    vocab = cfg.model.vocab_size or teacher_vocab
    if vocab is None:
        raise ConfigError(
            "model.vocab_size: unknown without the teacher's config.json; pass "
            "model.vocab_size=N (e.g. 32000 for LLaMA-2's tokenizer)"
        )
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))
    total, binary = count_parameters(cfg)
    stage, w = cfg.zero.stage, world_size
    # bf16_mixed: fp32 parameters (no master copy), 16-bit activations under autocast
    width = 4 if cfg.precision == "bf16_mixed" else DTYPE_BYTES[cfg.precision]
    act_width = 2 if cfg.precision == "bf16_mixed" else width
    grad_width = 4 if cfg.zero.grad_dtype == "fp32" else width
    optim_width = 8 + (4 if width == 2 else 0)  # Adam moments (+ fp32 master copy)
    tokens = cfg.micro_batch_size * cfg.data.seq_len
    d, layers = cfg.model.d_model, cfg.model.n_layers
    # counted in 16-bit by the architecture: twice that in fp32
    block = architecture(cfg.model).activation_bytes(cfg.model) * (1 if act_width == 2 else 2)
    if cfg.zero.activation_checkpointing:  # each block's input: the residual stream
        resid_width = 4 if getattr(cfg.model, "residual_in_fp32", False) else act_width
        activations = layers * tokens * d * resid_width + tokens * block
    else:
        activations = layers * tokens * block
    logit_tensors = 3 if cfg.teacher.kind != "none" else 2
    teacher_width = DTYPE_BYTES[cfg.teacher.dtype]
    parts = {
        "parameters": total * width / (w if stage >= 3 else 1),
        "gradients": total * grad_width / (w if stage >= 2 else 1),
        "optimizer": 0.0 if cfg.zero.offload_optimizer else
        total * optim_width / (w if stage >= 1 else 1),
        "activations": activations,
        "logits": logit_tensors * tokens * vocab * 4,
        "teacher": teacher_params * teacher_width / (w if cfg.teacher.zero3 else 1),
    }
    if cfg.zero.offload_params:
        parts["parameters"] = 0.0
    if cfg.zero.gather_signs:
        # each layer's gathered signs, kept for backward (with activation checkpointing, for
        # the recomputation: fbi.sign_buckets)
        parts["parameters"] += binary / 8
    return Estimate(total, binary, parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world-size", type=int, default=8, help="ranks (GPUs) in the job")
    parser.add_argument("--gpu-gib", type=float, default=80.0, help="memory of one GPU")
    parser.add_argument("--teacher-params", type=float, default=None,
                        help="teacher parameters in billions, when its config.json is not here")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args, overrides = parser.parse_known_args(argv)
    cfg = compose(overrides)
    cfg.grad_accum_steps(args.world_size)  # refuses a batch the world size cannot split
    teacher = None if args.teacher_params is None else int(args.teacher_params * 1e9)
    est = estimate(cfg, args.world_size, teacher)
    if args.json:
        print(json.dumps({"parameters": est.parameters, "binary_parameters": est.binary_parameters,
                          "bytes_per_rank": est.bytes, "total_gib": est.total / GIB}))
        return
    print(f"student {cfg.model.arch}/{cfg.scheme.name}: {est.parameters / 1e6:.1f}M parameters "
          f"({est.binary_parameters / 1e6:.1f}M binarized), {cfg.precision}, ZeRO stage "
          f"{cfg.zero.stage}, {args.world_size} ranks, micro-batch {cfg.micro_batch_size} x "
          f"{cfg.data.seq_len}, activation checkpointing "
          f"{'on' if cfg.zero.activation_checkpointing else 'off'}"
          + (f", {scan_that_runs(cfg.model)} scan" if cfg.model.arch == "mamba2" else ""))
    for kind, value in est.bytes.items():
        print(f"  {kind:<12} {value / GIB:8.2f} GiB")
    verdict = "fits" if est.total <= args.gpu_gib * GIB else "does NOT fit"
    print(f"  {'total':<12} {est.total / GIB:8.2f} GiB per rank: {verdict} in {args.gpu_gib:g} GiB")


if __name__ == "__main__":
    try:
        main()
    except ConfigError as err:
        sys.exit(f"fbi.estimate: {err}")
