"""Teacher sources: what the loop asks for a batch's targets.

Every source answers ``targets(sample_ids, inputs)`` with the teacher's dense (B, S, V)
logits, sparse targets (fbi.distill.targets.SparseTargets), or None (no teacher), and
``val_ppl(measure)`` with the teacher's validation perplexity or None. Three exist:

- ``NoTeacher``: plain cross-entropy training.
- ``OnlineTeacher``: a frozen Hugging Face causal LM run at every step; optionally
  partitioned across ranks by its own ZeRO-3 inference engine.
- ``fbi.distill.cache.CacheTeacher``: targets written once by ``fbi.distill.cache_writer``.

The checkpoint itself (where it is, what it is) and the interface are in
``fbi.distill.teacher_checkpoint``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch

from fbi.distill.cache import CacheTeacher
from fbi.distill.teacher_checkpoint import (Measure, TeacherSource, WaitEnded, check_context,
                                            teacher_info)


class Ready:
    """Sources whose targets are always at hand: ``wait`` has nothing to wait for."""

    def wait(self, micro_batches: Sequence[Sequence[int]],
             interrupted: Callable[[], str | None]) -> WaitEnded | None:
        return None


class NoTeacher(Ready):
    kind = "none"
    vocab_size = None

    def targets(self, sample_ids: Sequence[int], inputs: torch.Tensor) -> None:
        return None

    def val_ppl(self, measure: Measure) -> None:
        return None


class OnlineTeacher(Ready):
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
        return CacheTeacher(cfg, path, shards_dir, train_data, tokenizer.fingerprint, device)
    return OnlineTeacher(path, cfg.teacher.dtype, device, cfg.data.seq_len,
                         cfg.teacher.zero3, cfg.micro_batch_size)
