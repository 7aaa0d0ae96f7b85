"""DeepSpeed: process group, the JSON config generated from ours, and the engine."""

from __future__ import annotations

import contextlib
import logging
import math
import os
from pathlib import Path
from typing import Iterable

import torch
import torch.utils.checkpoint

from fbi import distributed, sign_gather
from fbi.config import DistributedConfig, TrainConfig
from fbi.distributed import Dist
from fbi.models import architecture
from fbi.sign_buckets import checkpoint_contexts


def init_distributed(settings: DistributedConfig | None = None,
                     run_dir: Path | None = None) -> Dist:
    """Join the job's process group (fbi.distributed; NCCL's flight recorder dumps into
    ``run_dir``) and hand it to DeepSpeed's comm layer."""
    import deepspeed

    info = distributed.init_distributed(settings, run_dir=run_dir)
    deepspeed.init_distributed(dist_backend="nccl" if info.device.startswith("cuda") else "gloo")
    unlink_shm_buffer(info)
    return info


def unlink_shm_buffer(info: Dist) -> None:
    """On CPU with every rank on one host (its launcher sets LOCAL_SIZE), DeepSpeed's
    shared-memory all-reduce gives each rank a 69 MB buffer in /dev/shm and never unlinks it,
    so each run left 69 MB a rank behind. Once every rank has mapped every buffer (they do in
    ``init_distributed``; the barrier waits for all), each unlinks its own name: the mappings
    hold until the processes exit, and then nothing is left."""
    if info.device != "cpu" or os.environ.get("LOCAL_SIZE") != str(info.world_size):
        return
    torch.distributed.barrier()
    name = "_".join(["deepspeed_allreduce_buffer", str(os.getuid()),
                     os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""),
                     str(info.rank)])
    Path("/dev/shm", name).unlink(missing_ok=True)


def uses_torch_adam(cfg: TrainConfig) -> bool:
    if cfg.optim.impl == "auto":
        return not torch.cuda.is_available()
    return cfg.optim.impl == "torch"


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict:
    """The DeepSpeed JSON, derived from the Hydra config alone."""
    zero = cfg.zero
    zero_section: dict = {"stage": zero.stage}
    if zero.stage > 0:
        zero_section.update(
            overlap_comm=zero.overlap_comm,
            reduce_bucket_size=zero.bucket_size,
            allgather_bucket_size=zero.bucket_size,
        )
    if zero.stage == 3:
        zero_section["stage3_param_persistence_threshold"] = zero.param_persistence_threshold
    if zero.offload_optimizer:
        zero_section["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if zero.offload_params:
        zero_section["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    torch_adam = uses_torch_adam(cfg)
    fp32_grads = zero.grad_dtype == "fp32" and cfg.precision in ("bf16", "fp16")
    return {
        "train_batch_size": cfg.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps(world_size),
        "gradient_clipping": cfg.optim.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": cfg.optim.lr,
                "betas": [cfg.optim.beta1, cfg.optim.beta2],
                "eps": cfg.optim.eps,
                "weight_decay": cfg.optim.weight_decay,
                "torch_adam": torch_adam,
            },
        },
        "zero_force_ds_cpu_optimizer": not torch_adam,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {"enabled": cfg.precision == "fp16", "initial_scale_power": 16},
        # fp32 parameters, the engine's forward under torch.autocast(bfloat16)
        "torch_autocast": {"enabled": cfg.precision == "bf16_mixed", "dtype": "bfloat16"},
        "zero_optimization": zero_section,
        **({"data_types": {"grad_accum_dtype": "fp32"}, "communication_data_type": "fp32"}
           if fp32_grads else {}),
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def lr_lambda(cfg: TrainConfig):
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine to ``min_lr`` at the
    schedule's horizon (``TrainConfig.schedule_steps``), the FBI-LLM/LLaMA recipe. The first
    step already has a non-zero rate."""
    warmup, total = cfg.optim.warmup_steps, cfg.schedule_steps()
    floor = cfg.optim.min_lr / cfg.optim.lr

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def param_groups(model: torch.nn.Module, weight_decay: float, decay: str) -> list[dict]:
    """``decay="matrices"``: decay only 2-D tensors named ``weight``, not norms, not scheme
    scales (alpha, beta); ``"all"``: every parameter, as the official FBI-LLM code does;
    ``"all_but_ssm"``: every parameter but those marked ``_no_weight_decay`` (mamba-ssm's
    convention: Mamba-2's A_log, D, dt_bias)."""
    decayed, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # Under zero.Init a parameter is an empty shard; ds_shape is its real shape.
        is_matrix = name.endswith(".weight") and len(getattr(p, "ds_shape", p.shape)) >= 2
        exempt = decay == "all_but_ssm" and getattr(p, "_no_weight_decay", False)
        (decayed if (decay != "matrices" and not exempt) or is_matrix else no_decay).append(p)
    groups = [
        {"params": decayed, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]  # ZeRO cannot flatten an empty group


def activation_checkpointing(model: torch.nn.Module, cfg: TrainConfig) -> None:
    """Recompute each block (the architecture's ``blocks``) in backward instead of keeping its
    activations: the block's forward is wrapped from outside, its module path unchanged. On
    the 1-bit route the recomputation reuses the signs the forward gathered
    (``fbi.sign_buckets.checkpoint_contexts``)."""
    if not cfg.zero.activation_checkpointing:
        return
    contexts = (checkpoint_contexts if cfg.zero.gather_signs
                else torch.utils.checkpoint.noop_context_fn)
    for block in architecture(cfg.model).blocks(model):
        block.forward = _checkpointed(block, contexts)


def _checkpointed(block: torch.nn.Module, contexts):
    def forward(*args, **kwargs):
        # Looked up at call time, so that the class's forward stays the one that runs.
        run = type(block).forward.__get__(block)
        if not torch.is_grad_enabled():
            return run(*args, **kwargs)
        # Non-reentrant, so that ZeRO-3's parameter-gather hooks fire again on recompute.
        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False,
                                                 context_fn=contexts, **kwargs)

    return forward


def build_context(cfg: TrainConfig, ds_config: dict):
    """Where the student is built: under ZeRO-3 inside ``zero.Init``, which partitions each
    layer as soon as its ``__init__`` returns, so no rank ever holds the whole model."""
    if cfg.zero.stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.Init(config_dict_or_path=ds_config)


def initialize(model: torch.nn.Module, cfg: TrainConfig, ds_config: dict):
    import deepspeed

    activation_checkpointing(model, cfg)
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, cfg.optim.weight_decay, cfg.optim.decay),
        config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)),
    )
    if cfg.zero.gather_signs:
        routes = sign_gather.install(engine, architecture(cfg.model).blocks(engine.module))
        log = logging.getLogger("fbi")
        log.log(
            logging.INFO if routes.routed else logging.WARNING,
            "zero.gather_signs: %d binarized layers all-gather packed signs instead of their "
            "latent weights, in %d gathers per forward; %d have weights below "
            "zero.param_persistence_threshold=%d, which DeepSpeed keeps whole on every rank "
            "(nothing to gather)", len(routes.routed), routes.buckets, len(routes.whole),
            cfg.zero.param_persistence_threshold)
        for name, others in routes.shared.items():
            log.warning("zero.gather_signs: %s keeps the plain route: its weight is shared with "
                        "%s, which needs it whole", name, ", ".join(others))
    return engine


def held_parameters(params: Iterable[torch.nn.Parameter]) -> tuple[int, int]:
    """(elements this rank keeps, elements in all): ZeRO-3 keeps a shard (``ds_tensor``) of
    each parameter, the other stages all of it."""
    params = list(params)
    held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
    return held, sum(getattr(p, "ds_numel", p.numel()) for p in params)
