"""The teacher-target cache on disk, and the teacher source that reads it.

Layout of ``teacher.cache.dir`` (written by ``python -m fbi.distill.cache_writer``):

    manifest.json        what the cache was made from and how (see ``describe``); ``complete``
    <shard>.ids          (samples, seq_len, slots) token ids, uint16 when the vocabulary fits
    <shard>.vals         topk: log-probs (value_dtype) or uint8 units of 1/255 (fbi/distill/
                         rows.py); sampled: draw counts (uint8/uint16)
    <shard>.tail         topk in a float format: (samples, seq_len) log of the probability
                         outside the ids
    <shard>.crc          a CRC-32 per row binding the sample id to the row's bytes
                         (fbi/distill/cache_files.py: rows move by pread/pwrite through a
                         bounded set of open files)
    teacher_blocks/      sha256 of every MiB of the teacher's weight files, hashed once when
                         the cache was created (``teacher_weights`` in the manifest)
    progress/, writers/  which parts are written, and whether the writers live and progress
                         (fbi/distill/progress.py: a few files per writer process)
    claims/              which job writes the cache (fbi/distill/claim.py: one at a time)

One set of files per token shard of the train split, row ``i`` of a file holding the targets
of the shard's sample ``i``: a global sample id addresses its entry the way it addresses its
tokens. Slots are k (topk) or draws (sampled). Bytes per token with a 49k vocabulary: top-k
32 in float16 32 * (2 + 2) + 2 = 130, in uint8 32 * (2 + 1) = 96, top-k 12 in uint8 36;
sampled: 3 per draw. Every row read is checked (``rows.bad_rows``): a row never written, an
id outside the vocabulary, a NaN or weights that do not sum to one stop the run, naming the
row; then its checksum, which catches what no rule can (ids and values of different writes).

Work is cut into parts of ``part_samples`` samples taken in the walk order (``Walk``: the
training sampler's epoch 0 for ``order=trainer``, ids in order for ``sequential``), computed
per position both ways, so neither writer nor trainer holds the order of the whole split.
A part is computed as one teacher batch and its number enters its writer's progress log only
after its rows are on disk, so an interrupted job redoes exactly the parts not logged, with
identical bytes, and a trainer following a running job reads an entry once its part is logged.
The loop asks ``CacheTeacher.wait`` before each step (all ranks together): it returns when the
step's parts are written, or says why the wait ended (a signal; writers gone), so that the
loop checkpoints and stops as at a step boundary.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from fbi.config import ConfigError, TrainConfig
from fbi.data.sampler import GlobalSampler
from fbi.data.shards import Manifest as ShardManifest, TokenShards, sha256_file, token_dtype
from fbi.distributed import detect
from fbi.distill.cache_files import CacheFiles, row_checksum
from fbi.distill.progress import Liveness, Progress
from fbi.distill.rows import bad_rows, decode_units, decode_values, sum_tolerance
from fbi.distill.targets import SparseTargets, label_tail
from fbi.distill.teacher_checkpoint import Measure, WaitEnded, check_weights, teacher_info

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
# 1: a marker file per part; 2: no row checksums (python -m fbi.distill.convert DIR)
FORMAT = 3
POLL_S = 0.2  # how often a waiting trainer looks at the progress logs
# Must agree for a trainer to use the cache: they decide what the targets mean.
CONTENT_KEYS = ("format", "mode", "slots", "temperature", "seq_len", "vocab_size", "teacher",
                "tokenizer_fingerprint", "token_shards")
# Must also agree for a writer to resume into the cache: they decide where each entry goes.
# ``generator``: torch version and device kind (CPU and CUDA draw differently); the writer
# adds it to ``describe``'s manifest.
LAYOUT_KEYS = ("value_dtype", "id_dtype", "count_dtype", "order", "seed", "shuffle",
               "part_samples", "teacher_dtype", "generator")


def cache_dir(cfg: TrainConfig, shards_dir: Path, teacher_path: Path) -> Path:
    """``teacher.cache.dir``, or a folder per shards, teacher (its quick fingerprint) and
    target kind under ``cache_dir``: a second teacher on the same shards gets its own."""
    c = cfg.teacher.cache
    if c.dir:
        return Path(c.dir).expanduser().resolve()
    detail = f"topk{c.k}" if c.mode == "topk" else f"sampled{c.draws}"
    return (Path(cfg.cache_dir).expanduser().resolve() / "logits" / shards_dir.name
            / f"teacher-{teacher_info(teacher_path)['fingerprint']}"
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
        "teacher": info["fingerprint"],  # quick; "teacher_weights" holds every byte's hash
        "tokenizer_fingerprint": shards.tokenizer_fingerprint,
        "token_shards": [{"file": s.file, "tokens": s.tokens, "sha256": s.sha256, "samples": n}
                         for s, n in zip(shards.splits["train"], train.samples_per_shard)],
        "value_dtype": c.value_dtype,
        "id_dtype": token_dtype(info["vocab_size"]).name,
        "count_dtype": "uint8" if c.draws < 256 else "uint16",
        "order": c.order,
        "seed": cfg.seed,
        "shuffle": cfg.data.shuffle,
        "part_samples": c.part_samples,
        "teacher_dtype": cfg.teacher.dtype,
        "num_samples": train.num_samples,
        "teacher_path": str(teacher_path),
        "complete": False,
    }


def refuse_mismatch(directory: Path, found: dict, expected: dict, keys: Sequence[str]) -> None:
    if found.get("format") in (1, 2):
        what = {1: "a marker file per part", 2: "no row checksums"}[found["format"]]
        raise ConfigError(f"teacher.cache.dir: {directory} is a format-{found['format']} cache "
                          f"({what}); convert it once: python -m fbi.distill.convert "
                          f"{directory}")
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


def check_teacher(directory: Path, manifest: dict, teacher_path: Path) -> None:
    """The teacher is the cache's (``check_weights``), checked by this process alone."""
    check_weights(teacher_path, manifest["teacher_weights"], directory / "teacher_blocks",
                  f"the cache {directory}")


def check_teacher_on_every_rank(directory: Path, manifest: dict, teacher_path: Path) -> None:
    """``check_teacher`` on every rank, the first of each node first (a collective): a copy
    hashed in full is recorded as verified, and the others sample it."""
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    first = not distributed or detect(os.environ).local_rank == 0
    if first:
        check_teacher(directory, manifest, teacher_path)
    if distributed:
        dist.barrier()
    if not first:
        check_teacher(directory, manifest, teacher_path)


class Walk:
    """The order the cache job writes samples in, evaluated per position: the training
    sampler's epoch 0 (``order=trainer``, with the manifest's seed and ``shuffle``) or ids in
    order (``sequential``). Memory does not grow with the split (but for the legacy
    ``shuffle=full``, whose order is a stored permutation)."""

    def __init__(self, manifest: dict) -> None:
        self.num_samples, self.part_samples = manifest["num_samples"], manifest["part_samples"]
        self.sampler = (None if manifest["order"] == "sequential" else
                        GlobalSampler(self.num_samples, manifest["seed"], manifest["shuffle"]))

    def part_ids(self, part: int) -> np.ndarray:
        """The sample ids of ``part``, in the order the writer runs them as one batch."""
        start = part * self.part_samples
        stop = min(start + self.part_samples, self.num_samples)
        if self.sampler is None:
            return np.arange(start, stop, dtype=np.int64)
        return self.sampler.sample_ids(start, stop)

    def parts(self, sample_ids: Sequence[int]) -> list[int]:
        """The parts that hold ``sample_ids``, sorted."""
        ids = np.asarray(sample_ids, dtype=np.int64)
        positions = ids if self.sampler is None else self.sampler.epoch_positions(ids)
        return sorted(set((positions // self.part_samples).tolist()))


def num_parts(manifest: dict) -> int:
    return -(-manifest["num_samples"] // manifest["part_samples"])


def load_manifest(directory: Path) -> dict:
    manifest = json.loads((directory / MANIFEST).read_text())
    manifest.setdefault("shuffle", "feistel")  # caches written before it was recorded
    return manifest


class CacheRowError(ValueError):
    """A row read from the cache cannot be a teacher's targets (see ``rows.bad_rows``)."""


class CacheWaitError(RuntimeError):
    """A read outside the loop (which asks ``wait`` first) found its part unwritten for good."""


def agree(flags: list[bool], device: torch.device) -> list[bool]:
    """Element-wise OR over all ranks (a collective when the process group has several)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return flags
    t = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(x) for x in t.tolist()]


class CacheTeacher:
    """Reads exactly the entries of each batch's sample ids; ``wait`` follows a running cache
    job until they are written."""

    kind = "cache"

    def __init__(self, cfg: TrainConfig, teacher_path: Path, shards_dir: Path,
                 train: TokenShards, tokenizer_fingerprint: str, device: torch.device) -> None:
        self.dir = cache_dir(cfg, shards_dir, teacher_path)
        self.wait_s, self.device = cfg.teacher.cache.wait_s, device
        self.tail = cfg.teacher.cache.tail
        self.eval_key = {"batches": cfg.eval_batches, "batch_size": cfg.micro_batch_size}
        expected = describe(cfg, teacher_path, shards_dir, train)
        if expected["tokenizer_fingerprint"] != tokenizer_fingerprint:
            raise ConfigError(f"teacher.path: the student's tokenizer differs from the one the "
                              f"token shards in {shards_dir} were made with")
        self._wait_for_manifest()
        self.manifest = load_manifest(self.dir)
        refuse_mismatch(self.dir, self.manifest, expected, CONTENT_KEYS)
        check_teacher_on_every_rank(self.dir, self.manifest, teacher_path)
        written = (self.manifest["seed"], self.manifest["shuffle"])
        if self.manifest["order"] == "trainer" and written != (cfg.seed, cfg.data.shuffle):
            log.warning("teacher.cache: written in the order of seed %d, data.shuffle=%s; this "
                        "run uses seed %d, data.shuffle=%s: a run that follows a running cache "
                        "job will wait more", *written, cfg.seed, cfg.data.shuffle)
        self.vocab_size = self.manifest["vocab_size"]
        self.train = train
        # Every rank must take the same branch in ``wait`` (a collective when not complete).
        self.complete = not agree([not self.manifest["complete"]], device)[0]
        if self.complete and cfg.teacher.cache.verify:
            self._verify()
        self.walk = Walk(self.manifest)
        self.progress = Progress(self.dir, num_parts(self.manifest))
        self.liveness = Liveness(self.dir, cfg.teacher.cache.dead_after_s, self.wait_s,
                                 cfg.teacher.cache.stall_parts)
        self.files = CacheFiles(self.dir, self.manifest,
                                max_open=cfg.teacher.cache.max_open_files)
        log.info("teacher targets from cache %s (%s, %d slots, %s)", self.dir,
                 self.manifest["mode"], self.manifest["slots"],
                 "complete" if self.complete else "being written")

    def _verify(self) -> None:
        for name, digest in self.manifest["files"].items():
            if sha256_file(self.dir / name) != digest:
                raise ConfigError(f"teacher.cache.dir: {self.dir / name} fails its sha256 "
                                  "checksum; delete the cache and write it again")

    def _wait_for_manifest(self) -> None:
        """Before the loop: nothing to checkpoint yet, so a plain timeout."""
        path = self.dir / MANIFEST
        if not path.exists():
            log.info("waiting for %s from the cache job (up to %.0f s)", path, self.wait_s)
        deadline = time.monotonic() + self.wait_s
        while not path.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"teacher.cache: {path} not written after {self.wait_s:.0f} s; start (or "
                    f"check) the cache job: python -m fbi.distill.cache_writer with this run's "
                    f"overrides, or raise teacher.cache.wait_s"
                )
            time.sleep(POLL_S)

    def wait(self, micro_batches: Sequence[Sequence[int]],
             interrupted: Callable[[], str | None]) -> WaitEnded | None:
        """Return once every part of this step's sample ids is written on every rank (a
        collective while the cache is incomplete: call it on all ranks before each step).

        ``interrupted()`` names a signal received, or None. The wait ends early, with the
        reason, on a signal or when the cache job's writers are gone (``Liveness``)."""
        if self.complete:
            return None
        return self._wait(self.walk.parts([i for ids in micro_batches for i in ids]), interrupted,
                          micro_batches, self.device)

    def _wait(self, parts: list[int], interrupted, micro_batches, device) -> WaitEnded | None:
        """``wait``'s loop; ``device`` None: this rank alone (no collective)."""
        waiting = False
        while True:
            missing = self.progress.missing(parts)
            if missing:
                self.progress.refresh()
                missing = self.progress.missing(parts)
            signal = interrupted()
            gone = self.liveness.gone() if waiting else None
            flags = [bool(missing), bool(signal), bool(gone)]
            any_missing, any_signal, any_gone = flags if device is None else agree(flags, device)
            if not any_missing:
                break
            if any_signal:
                return WaitEnded(f"{signal or 'a signal to another rank'} while waiting for the "
                                 "cache job", fatal=False)
            if any_gone:
                what = f"part {missing[0]} is not written and " if missing else ""
                return WaitEnded(f"teacher.cache {self.dir}: {what}"
                                 f"{gone or 'another rank found the writers gone'}", fatal=True)
            if not waiting:
                waiting = True
                self.liveness.reset()
                if missing:
                    log.info("waiting for part %d (sample ids %s) from the cache job",
                             missing[0], [list(ids) for ids in micro_batches])
            time.sleep(POLL_S)
        return None

    def targets(self, sample_ids: Sequence[int], inputs: torch.Tensor) -> SparseTargets:
        if not self.complete:
            ended = self._wait(self.walk.parts(sample_ids), lambda: None, [sample_ids], None)
            if ended is not None:
                raise CacheWaitError(ended.reason)
        m = self.manifest
        rows = [self.train.locate(int(i)) for i in sample_ids]
        read = [self.files.read(s, r) for s, r in rows]
        ids, vals = np.stack([r.ids for r in read]), np.stack([r.vals for r in read])
        if m["mode"] == "sampled":
            weights, tail = torch.from_numpy(vals.astype(np.float32)) / m["slots"], None
        elif m["value_dtype"] == "uint8":
            weights, tail = decode_units(vals)
        else:
            weights = decode_values(vals, m["value_dtype"]).exp()
            tail = decode_values(np.stack([r.tail for r in read]), m["value_dtype"]).exp()
        self._check(sample_ids, rows, ids, weights, tail)
        self._check_sums(sample_ids, rows, read)
        targets = SparseTargets(torch.from_numpy(ids.astype(np.int64)), weights, tail)
        if self.tail == "label" and tail is not None:
            labels = torch.from_numpy(self.train.batch(sample_ids)[:, 1:].astype(np.int64))
            targets = label_tail(targets, labels)
        return targets.to(self.device)

    def _check(self, sample_ids, rows, ids, weights, tail) -> None:
        m = self.manifest
        tolerance = 1e-5 if m["mode"] == "sampled" else sum_tolerance(m["value_dtype"],
                                                                       m["slots"])
        for (b, position), what in bad_rows(ids, weights, tail, m["vocab_size"], tolerance):
            shard, row = rows[b]
            stem = Path(m["token_shards"][shard]["file"]).stem
            raise CacheRowError(
                f"teacher.cache {self.dir}: row {row} of {stem}.ids/.vals (sample id "
                f"{sample_ids[b]}, part {self.walk.parts([sample_ids[b]])[0]}), position "
                f"{position}, holds {what}; the cache is damaged: delete it and write it "
                "again with python -m fbi.distill.cache_writer")

    def _check_sums(self, sample_ids, rows, read) -> None:
        for sample, (shard, row), r in zip(sample_ids, rows, read):
            if row_checksum(sample, r.ids, r.vals, r.tail) == r.crc:
                continue
            part = self.walk.parts([sample])[0]
            writer = self.progress.writer_of(part)
            stem = Path(self.manifest["token_shards"][shard]["file"]).stem
            raise CacheRowError(
                f"teacher.cache {self.dir}: row {row} of {stem} (sample id {sample}, part "
                f"{part}, written by {writer or 'no writer on record'}) fails its checksum "
                f"({stem}.crc): its ids and values are not what the writer wrote; the cache is "
                "damaged: delete it and write it again with python -m "
                "fbi.distill.cache_writer")

    def val_ppl(self, measure: Measure) -> float | None:
        """The value the cache job measured on the same validation batches, if it has."""
        recorded = load_manifest(self.dir).get("eval") or {}
        same = {k: recorded.get(k) for k in self.eval_key} == self.eval_key
        return recorded.get("val_ppl_teacher") if same else None
