"""Refusals that need only the configuration and the file system: run before the process
group, the teacher, the shards or any run file, so a wrong setting fails in seconds and
leaves nothing behind. ``fbi.loop.train`` calls them first, then takes the run directory's lock.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import torch

from fbi import checkpoint
from fbi.binarize import SCHEMES
from fbi.binarize.sign_only import verify_sign_only
from fbi.config import ConfigError, TrainConfig
from fbi.data.prepare import builder_for, corpus_files
from fbi.models.ssd import mamba_ssm_kernel


def check_precision(cfg: TrainConfig) -> None:
    on_cpu = cfg.distributed.device == "cpu" or not torch.cuda.is_available()
    if on_cpu and cfg.precision == "fp16":
        raise ConfigError(
            "precision: fp16 needs a GPU (DeepSpeed's CPU path has no fp16 optimizer); this "
            "process trains on the CPU: use precision=fp32 (or bf16)"
        )


def check_scan(cfg: TrainConfig) -> None:
    """A Mamba-2 recipe sized for mamba-ssm's fused scan (``model.scan=mamba_ssm``) refuses
    to start without it instead of running the PyTorch scan, which keeps several times the
    activations (fbi.models.mamba2.activation_bytes)."""
    if getattr(cfg.model, "scan", None) == "mamba_ssm" and mamba_ssm_kernel() is None:
        raise ConfigError(
            "model.scan: mamba_ssm, but the mamba-ssm package does not import here. This "
            "configuration's memory plan assumes its fused scan; install requirements-mamba.txt "
            "on the CUDA machines, or run the PyTorch scan with model.scan=auto and "
            "zero.activation_checkpointing=true (check the fit with python -m fbi.estimate)"
        )


def check_sign_route(cfg: TrainConfig) -> None:
    """``zero.gather_signs``: the scheme's ``SIGN_ONLY`` probed on a small layer, not taken on
    trust (fbi.binarize.sign_only)."""
    if cfg.zero.gather_signs:
        verify_sign_only(SCHEMES[cfg.scheme.name], cfg.scheme)


def check_teacher(cfg: TrainConfig) -> None:
    """The teacher folder is a Hugging Face causal LM whose context covers data.seq_len."""
    if cfg.teacher.kind == "none":
        return
    path = Path(cfg.teacher.path).expanduser()
    config_file = path / "config.json"
    if not config_file.exists():
        if cfg.teacher.gguf is not None and cfg.teacher.gguf.requirement:
            return  # built from the GGUF on first use
        what = "does not exist" if not path.exists() else "has no config.json"
        raise ConfigError(
            f"teacher.path: {path} {what}; point teacher.path at a local Hugging Face "
            "checkpoint folder (save_pretrained), or use teacher=none"
        )
    try:
        config = json.loads(config_file.read_text())
    except ValueError as err:
        raise ConfigError(f"teacher.path: {config_file} is not valid JSON ({err})") from None
    archs = config.get("architectures") or []
    if not any(a.endswith("ForCausalLM") for a in archs):
        raise ConfigError(
            f"teacher.path: {path} holds {', '.join(archs) or 'a model of no declared architecture'}"
            ", not a causal language model (…ForCausalLM); point it at a causal LM checkpoint"
        )
    context = config.get("max_position_embeddings")
    if context is not None and cfg.data.seq_len > context:
        raise ConfigError(
            f"data.seq_len: {cfg.data.seq_len} is beyond the teacher's context "
            f"(max_position_embeddings={context} in {config_file}); choose data.seq_len <= "
            f"{context}"
        )


def check_data_files(cfg: TrainConfig) -> None:
    """``data.files`` match files of one readable kind (their contents are checked when
    they are tokenized: fbi.data.prepare)."""
    if cfg.data.files:
        builder_for(corpus_files(cfg.data, Path(cfg.cache_dir).expanduser()))


def check_writable(run_dir: Path) -> None:
    """A run directory this process can create and write into. A host folder mounted into a
    container (``docker run -v /scratch/runs:/runs``) keeps its host owner, whom the image's
    user (uid 1001) usually is not."""
    target = run_dir
    while not target.exists() and target != target.parent:
        target = target.parent
    if os.access(target, os.W_OK | os.X_OK):
        return
    st = target.stat()
    raise ConfigError(
        f"run_dir: {run_dir} cannot be written: {target} belongs to uid {st.st_uid} gid "
        f"{st.st_gid} ({stat.filemode(st.st_mode)}) and this process runs as uid {os.getuid()} "
        f"gid {os.getgid()}; in a container run as the folder's owner (docker run --user "
        '"$(id -u):$(id -g)" ...), or make the folder writable for this user, or choose '
        "another run_dir"
    )


def preflight(cfg: TrainConfig, world_size: int) -> Path:
    """Every refusal that reads only; returns the run directory."""
    cfg.grad_accum_steps(world_size)
    check_precision(cfg)
    check_scan(cfg)
    check_sign_route(cfg)
    check_teacher(cfg)
    check_data_files(cfg)
    run_dir = Path(cfg.run_dir).expanduser().resolve()
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run_dir: {run_dir} is a file; choose a folder")
    check_writable(run_dir)
    checkpoint.resume_candidates(cfg, run_dir)  # refuses resume=true without one, max_steps
    return run_dir

