"""The online teacher: a frozen Hugging Face causal LM that returns next-token logits.

It is never in the optimizer and runs under ``no_grad``. ``resolve_path`` builds the
embedded default (a GGUF file from the package registry) into a plain checkpoint once.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from fbi.config import TeacherConfig

log = logging.getLogger(__name__)


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


class OnlineTeacher:
    def __init__(self, path: Path, dtype: str, device: torch.device) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=getattr(torch, dtype)
        ).to(device)
        self.model.eval().requires_grad_(False)
        self.vocab_size = int(self.model.config.vocab_size)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, S) token ids -> (B, S, vocab) logits at each position."""
        return self.model(input_ids=input_ids, use_cache=False).logits
