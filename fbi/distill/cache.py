"""The teacher-target cache on disk, and the teacher source that reads it.

Layout of ``teacher.cache.dir`` (written by ``python -m fbi.distill.cache_writer``):

    manifest.json        what the cache was made from and how (see ``describe``); ``complete``
    <shard>.ids          (samples, seq_len, slots) token ids, uint16 when the vocabulary fits
    <shard>.vals         topk: log-probs (value_dtype); sampled: draw counts (uint8/uint16)
    <shard>.tail         topk only: (samples, seq_len) log of the probability outside the ids
    parts/NNNNNNNN       marker: part N's rows are written and flushed

One set of files per token shard of the train split, row ``i`` of a file holding the targets
of the shard's sample ``i``: a global sample id addresses its entry the way it addresses its
tokens. Slots are k (topk) or draws (sampled). Bytes per token at k=32 with a 49k vocabulary:
32 * (2 + 2) + 2 = 130.

Work is cut into parts of ``part_samples`` samples taken in the walk order (the training
sampler's epoch-0 permutation for ``order=trainer``, ids in order for ``sequential``).
A part is computed as one teacher batch and its marker appears only after its rows are on
disk, so an interrupted job redoes exactly the parts without a marker, with identical bytes,
and a trainer following a running job reads an entry once its part's marker exists.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from fbi.config import ConfigError, TrainConfig
from fbi.data.sampler import GlobalSampler
from fbi.data.shards import Manifest as ShardManifest, TokenShards, sha256_file, token_dtype
from fbi.distill.targets import SparseTargets
from fbi.distill.teacher_checkpoint import Measure, teacher_info

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = 1
# Must agree for a trainer to use the cache: they decide what the targets mean.
CONTENT_KEYS = ("format", "mode", "slots", "temperature", "seq_len", "vocab_size", "teacher",
                "tokenizer_fingerprint", "token_shards")
# Must also agree for a writer to resume into the cache: they decide where each entry goes.
LAYOUT_KEYS = ("value_dtype", "id_dtype", "count_dtype", "order", "seed", "part_samples")


def cache_dir(cfg: TrainConfig, shards_dir: Path) -> Path:
    c = cfg.teacher.cache
    if c.dir:
        return Path(c.dir).expanduser().resolve()
    detail = f"topk{c.k}" if c.mode == "topk" else f"sampled{c.draws}"
    return (Path(cfg.cache_dir).expanduser().resolve() / "logits" / shards_dir.name
            / f"{detail}-T{cfg.distill.temperature:g}-L{cfg.data.seq_len}")


def describe(cfg: TrainConfig, teacher_path: Path, shards_dir: Path,
             train: TokenShards) -> dict:
    """The manifest a cache for this configuration has (before ``complete`` and checksums)."""
    c, info = cfg.teacher.cache, teacher_info(teacher_path)
    if c.mode == "topk" and c.k > info["vocab_size"]:
        raise ConfigError(f"teacher.cache.k: {c.k} exceeds the teacher's vocabulary of "
                          f"{info['vocab_size']}; lower it")
    shards = ShardManifest.load(shards_dir)
    return {
        "format": FORMAT,
        "mode": c.mode,
        "slots": c.k if c.mode == "topk" else c.draws,
        "temperature": cfg.distill.temperature,
        "seq_len": cfg.data.seq_len,
        "vocab_size": info["vocab_size"],
        "teacher": info["fingerprint"],
        "tokenizer_fingerprint": shards.tokenizer_fingerprint,
        "token_shards": [{"file": s.file, "tokens": s.tokens, "sha256": s.sha256, "samples": n}
                         for s, n in zip(shards.splits["train"], train.samples_per_shard)],
        "value_dtype": c.value_dtype,
        "id_dtype": token_dtype(info["vocab_size"]).name,
        "count_dtype": "uint8" if c.draws < 256 else "uint16",
        "order": c.order,
        "seed": cfg.seed,
        "part_samples": c.part_samples,
        "num_samples": train.num_samples,
        "teacher_path": str(teacher_path),
        "complete": False,
    }


def refuse_mismatch(directory: Path, found: dict, expected: dict, keys: Sequence[str]) -> None:
    for key in keys:
        if found.get(key) != expected[key]:
            what = {"teacher": "teacher (fingerprint of teacher.path)",
                    "tokenizer_fingerprint": "tokenizer", "token_shards": "token shards"}
            shown = "" if key == "token_shards" else f": {found.get(key)!r} there, {expected[key]!r} here"
            raise ConfigError(
                f"teacher.cache.dir: {directory} was written for another {what.get(key, key)}"
                f"{shown}; point teacher.cache.dir at a cache made for this run, or write one "
                f"with python -m fbi.distill.cache_writer and the same overrides"
            )


def walk_order(manifest: dict) -> np.ndarray:
    """Sample ids in the order the cache job writes them."""
    n = manifest["num_samples"]
    if manifest["order"] == "sequential":
        return np.arange(n, dtype=np.int64)
    sampler = GlobalSampler(n, manifest["seed"])
    return np.array([sampler.sample_id(p) for p in range(n)], dtype=np.int64)


def num_parts(manifest: dict) -> int:
    return -(-manifest["num_samples"] // manifest["part_samples"])


def marker(directory: Path, part: int) -> Path:
    return directory / "parts" / f"{part:08d}"


def file_names(manifest: dict) -> list[str]:
    kinds = ("ids", "vals", "tail") if manifest["mode"] == "topk" else ("ids", "vals")
    return [f"{Path(s['file']).stem}.{k}" for s in manifest["token_shards"] for k in kinds]


def _vals_dtype(manifest: dict) -> np.dtype:
    if manifest["mode"] == "sampled":
        return np.dtype(manifest["count_dtype"])
    # numpy has no bfloat16: its bits are stored as uint16 and reinterpreted by torch.
    return np.dtype("uint16" if manifest["value_dtype"] == "bfloat16" else manifest["value_dtype"])


class CacheArrays:
    """The cache's files as memmaps, one (ids, vals, tail) triple per token shard."""

    def __init__(self, directory: Path, manifest: dict, mode: str = "r") -> None:
        seq, slots = manifest["seq_len"], manifest["slots"]
        ids_t, vals_t = np.dtype(manifest["id_dtype"]), _vals_dtype(manifest)
        self.directory = directory
        self.shards = []
        for s in manifest["token_shards"]:
            stem, n = Path(s["file"]).stem, max(1, s["samples"])
            ids = np.memmap(directory / f"{stem}.ids", ids_t, mode, shape=(n, seq, slots))
            vals = np.memmap(directory / f"{stem}.vals", vals_t, mode, shape=(n, seq, slots))
            tail = (np.memmap(directory / f"{stem}.tail", vals_t, mode, shape=(n, seq))
                    if manifest["mode"] == "topk" else None)
            self.shards.append((ids, vals, tail))

    @staticmethod
    def create(directory: Path, manifest: dict) -> None:
        """Files of their final size, holes until written (so any rank may fill any row)."""
        seq, slots = manifest["seq_len"], manifest["slots"]
        row_bytes = {"ids": np.dtype(manifest["id_dtype"]).itemsize * slots,
                     "vals": _vals_dtype(manifest).itemsize * slots,
                     "tail": _vals_dtype(manifest).itemsize}
        for name in file_names(manifest):
            stem, kind = name.rsplit(".", 1)
            samples = next(s["samples"] for s in manifest["token_shards"]
                           if Path(s["file"]).stem == stem)
            with open(directory / name, "ab") as f:
                f.truncate(max(1, samples) * seq * row_bytes[kind])

    def flush(self) -> None:
        for arrays in self.shards:
            for a in arrays:
                if a is not None:
                    a.flush()


def encode_values(x: torch.Tensor, value_dtype: str) -> np.ndarray:
    if value_dtype == "bfloat16":
        return x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return x.to(getattr(torch, value_dtype)).numpy()


def decode_values(a: np.ndarray, value_dtype: str) -> torch.Tensor:
    if value_dtype == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(a.astype(np.float32))


def load_manifest(directory: Path) -> dict:
    return json.loads((directory / MANIFEST).read_text())


class CacheTeacher:
    """Reads exactly the entries of each batch's sample ids, waiting for those a running
    cache job has not written yet (``teacher.cache.wait_s``)."""

    kind = "cache"

    def __init__(self, cfg: TrainConfig, teacher_path: Path, shards_dir: Path,
                 train: TokenShards, tokenizer_fingerprint: str, device: torch.device) -> None:
        self.dir = cache_dir(cfg, shards_dir)
        self.wait_s, self.device = cfg.teacher.cache.wait_s, device
        self.eval_key = {"batches": cfg.eval_batches, "batch_size": cfg.micro_batch_size}
        expected = describe(cfg, teacher_path, shards_dir, train)
        if expected["tokenizer_fingerprint"] != tokenizer_fingerprint:
            raise ConfigError(f"teacher.path: the student's tokenizer differs from the one the "
                              f"token shards in {shards_dir} were made with")
        self._wait(lambda: (self.dir / MANIFEST).exists(), f"{self.dir / MANIFEST}")
        self.manifest = load_manifest(self.dir)
        refuse_mismatch(self.dir, self.manifest, expected, CONTENT_KEYS)
        if self.manifest["order"] == "trainer" and self.manifest["seed"] != cfg.seed:
            log.warning("teacher.cache: written in the order of seed %d, this run uses seed %d;"
                        " a run that follows a running cache job will wait more",
                        self.manifest["seed"], cfg.seed)
        self.vocab_size = self.manifest["vocab_size"]
        self.train = train
        self.complete = self.manifest["complete"]
        if self.complete and cfg.teacher.cache.verify:
            self._verify()
        self._part_of = None
        self._done: set[int] = set()
        self._arrays = CacheArrays(self.dir, self.manifest)
        log.info("teacher targets from cache %s (%s, %d slots, %s)", self.dir,
                 self.manifest["mode"], self.manifest["slots"],
                 "complete" if self.complete else "being written")

    def _verify(self) -> None:
        for name, digest in self.manifest["files"].items():
            if sha256_file(self.dir / name) != digest:
                raise ConfigError(f"teacher.cache.dir: {self.dir / name} fails its sha256 "
                                  "checksum; delete the cache and write it again")

    def _wait(self, ready, what: str) -> None:
        if ready():
            return
        log.info("waiting for %s from the cache job (up to %.0f s)", what, self.wait_s)
        deadline = time.monotonic() + self.wait_s
        while not ready():
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"teacher.cache: {what} not written after {self.wait_s:.0f} s; start (or "
                    f"check) the cache job: python -m fbi.distill.cache_writer with this run's "
                    f"overrides, or raise teacher.cache.wait_s"
                )
            time.sleep(0.1)

    def _ensure_written(self, sample_ids: Sequence[int]) -> None:
        if self.complete:
            return
        if self._part_of is None:  # sample id -> part, from the writer's walk order
            order = walk_order(self.manifest)
            self._part_of = np.empty_like(order)
            self._part_of[order] = np.arange(len(order)) // self.manifest["part_samples"]
        waited = False
        for part in {int(self._part_of[i]) for i in sample_ids} - self._done:
            path = marker(self.dir, part)
            waited |= not path.exists()
            self._wait(path.exists, f"part {part} (sample ids {list(sample_ids)})")
            self._done.add(part)
        if waited:  # fresh maps: the rows were written after ours were made
            self._arrays = CacheArrays(self.dir, self.manifest)

    def targets(self, sample_ids: Sequence[int], inputs: torch.Tensor) -> SparseTargets:
        self._ensure_written(sample_ids)
        m = self.manifest
        rows = [self.train.locate(int(i)) for i in sample_ids]
        ids = np.stack([self._arrays.shards[s][0][r] for s, r in rows])
        vals = np.stack([self._arrays.shards[s][1][r] for s, r in rows])
        if m["mode"] == "topk":
            weights = decode_values(vals, m["value_dtype"]).exp()
            tail = decode_values(np.stack([self._arrays.shards[s][2][r] for s, r in rows]),
                                 m["value_dtype"]).exp()
        else:
            weights = torch.from_numpy(vals.astype(np.float32)) / m["slots"]
            tail = None
        ids = torch.from_numpy(ids.astype(np.int64))
        return SparseTargets(ids, weights, tail).to(self.device)

    def val_ppl(self, measure: Measure) -> float | None:
        """The value the cache job measured on the same validation batches, if it has."""
        recorded = load_manifest(self.dir).get("eval") or {}
        same = {k: recorded.get(k) for k in self.eval_key} == self.eval_key
        return recorded.get("val_ppl_teacher") if same else None
