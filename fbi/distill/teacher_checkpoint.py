"""The teacher's checkpoint and what every teacher source shares.

``resolve_path`` builds the embedded default (a GGUF file from the package registry) into a
plain checkpoint once; ``teacher_info`` identifies a checkpoint without loading it;
``TeacherSource`` is the interface the loop asks for targets (fbi.distill.teacher builds one).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Callable, Protocol, Sequence

import torch

from fbi.config import ConfigError, TeacherConfig
from fbi.distill.gguf import obtain_gguf_teacher
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
