"""The cache job: run the teacher once over the train split and write its targets.

    python -m fbi.distill.cache_writer teacher=cache [the overrides train.py gets]
    torchrun --nproc_per_node 8 -m fbi.distill.cache_writer teacher=cache ...

Takes train.py's overrides, so it finds the same shards and writes where ``teacher=cache``
training reads (``teacher.cache.*``, fbi/distill/cache.py). Rank r of w writes parts
r, r + w, r + 2w, ...: with ``teacher.cache.order=trainer`` (the default) parts follow the
trainer's sample order, so training can start at once and follow behind. One job writes a
cache at a time (fbi/distill/claim.py: a second is refused while the first beats). A job started
again writes only the parts no progress log holds; a finished job records file checksums and
the teacher's validation perplexity in the manifest. Each writer process keeps a heartbeat
and its progress, and records why it stopped (fbi/distill/progress.py), so a trainer waiting
on it can tell a job stopped by ``max_parts`` from one that died or stalled, and name the
command that restarts it.
"""

from __future__ import annotations

import logging
import os
import shlex
from itertools import islice
from pathlib import Path

import hydra
import numpy as np
import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fbi.atomic import write_json
from fbi.config import ConfigError, TrainConfig, register
from fbi.configure import validate
from fbi.data.prepare import ensure_shards
from fbi.data.shards import TokenShards, sha256_file
from fbi.deepspeed_setup import Dist, init_distributed
from fbi.distributed import detect
from fbi.distill import claim
from fbi.distill.cache import (CONTENT_KEYS, LAYOUT_KEYS, MANIFEST, cache_dir, check_teacher,
                               describe, load_manifest, num_parts, refuse_mismatch, Walk)
from fbi.distill.cache_files import CacheFiles, file_names
from fbi.distill.progress import (DONE, FAILED, MAX_PARTS, Heartbeat, Progress, ProgressLog,
                                  writer_name)
from fbi.distill.rows import encode_units, encode_values
from fbi.distill.teacher import OnlineTeacher
from fbi.distill.teacher_checkpoint import hash_weights, resolve_path
from fbi.eval.perplexity import perplexity
from fbi.process_exit import run_and_exit
from fbi.run import on_rank0_first, student_tokenizer

log = logging.getLogger("fbi")

SAMPLE_ROWS = 4096  # positions per sampling chunk: bounds the (rows, V) count table


def encode_topk(logits: torch.Tensor, k: int, temperature: float):
    """(B, S, V) logits -> ids (B, S, k) of the k most likely tokens, their log-probs, and
    (B, S) the log of the probability of all other tokens."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    vals, ids = logp.topk(k, dim=-1)
    tail = torch.logsumexp(logp.scatter(-1, ids, float("-inf")), dim=-1)
    return ids, vals, tail


def encode_sampled(logits: torch.Tensor, draws: int, temperature: float, seed: int):
    """(B, S, V) logits -> ids (B, S, draws) of the distinct tokens among ``draws`` drawn with
    replacement from softmax(logits / T), and their counts (0 in unused slots).

    Deterministic in ``seed``; slots ordered by count, then id, so equal inputs give equal
    bytes."""
    B, S, V = logits.shape
    gen = torch.Generator(device=logits.device).manual_seed(seed)
    rows = logits.reshape(-1, V)
    ids, counts = [], []
    rank_of_id = torch.arange(V - 1, -1, -1, device=logits.device)  # ties: smaller id first
    for a in range(0, rows.shape[0], SAMPLE_ROWS):
        probs = torch.softmax(rows[a:a + SAMPLE_ROWS].float() / temperature, dim=-1)
        drawn = torch.multinomial(probs, draws, replacement=True, generator=gen)
        table = torch.zeros(probs.shape, dtype=torch.int64, device=logits.device)
        table.scatter_add_(1, drawn, torch.ones_like(drawn))
        top = (table * V + rank_of_id).topk(draws, dim=-1).indices
        ids.append(top)
        counts.append(table.gather(1, top))
    return torch.cat(ids).view(B, S, draws), torch.cat(counts).view(B, S, draws)


def part_seed(seed: int, part: int) -> int:
    return int(np.random.SeedSequence([seed, part]).generate_state(1)[0])


def prepare(directory: Path, expected: dict, teacher_path: Path) -> None:
    """Rank 0: check an existing cache is this one (to resume it), or lay out a new one,
    hashing every byte of the teacher's weights once."""
    if (directory / MANIFEST).exists():
        found = load_manifest(directory)
        refuse_mismatch(directory, found, expected, CONTENT_KEYS + LAYOUT_KEYS)
        check_teacher(directory, found, teacher_path)
        return
    directory.mkdir(parents=True, exist_ok=True)
    CacheFiles.create(directory, expected)
    record = hash_weights(teacher_path, directory / "teacher_blocks")
    # last: a reader finds the files in place
    write_json(directory / MANIFEST, {**expected, "teacher_weights": record})


def write_part(files: CacheFiles, train: TokenShards, teacher: OnlineTeacher, manifest: dict,
               sample_ids: np.ndarray, part: int, device: torch.device,
               progress: ProgressLog) -> None:
    batch = torch.from_numpy(train.batch(sample_ids)).to(device)
    logits = teacher.logits(batch[:, :-1])
    T = manifest["temperature"]
    if manifest["mode"] == "topk" and manifest["value_dtype"] == "uint8":
        ids, vals, tail = encode_topk(logits, manifest["slots"], T)
        gen = torch.Generator(device=vals.device).manual_seed(part_seed(manifest["seed"], part))
        vals, tail = encode_units(vals, tail, gen).cpu().numpy(), None
    elif manifest["mode"] == "topk":
        ids, vals, tail = encode_topk(logits, manifest["slots"], T)
        vals = encode_values(vals.cpu(), manifest["value_dtype"])
        tail = encode_values(tail.cpu(), manifest["value_dtype"])
    else:
        ids, vals = encode_sampled(logits, manifest["slots"], T, part_seed(manifest["seed"], part))
        vals, tail = vals.cpu().numpy(), None
    ids = ids.cpu().numpy()
    for j, sample in enumerate(sample_ids):
        shard, row = train.locate(int(sample))
        files.write(shard, row, int(sample), ids[j], vals[j], None if tail is None else tail[j])
    files.flush()  # the rows reach the file before the log says they are there
    progress.append(part)


def generator_key(device: torch.device) -> str:
    """What decides the drawn bytes besides the seed: CPU and CUDA generators, and torch
    versions, may draw differently from the same seed."""
    return f"torch {torch.__version__} on {device.type}"


def restart_command(overrides: list[str], world_size: int) -> str:
    """How a user starts this job again, for the trainer's message when it stopped."""
    launcher = ("python" if world_size == 1 else
                f"torchrun --nproc_per_node {os.environ.get('LOCAL_WORLD_SIZE', world_size)}")
    return f"{launcher} -m fbi.distill.cache_writer {shlex.join(overrides)}".rstrip()


def write_cache(cfg: TrainConfig, dist_info: Dist, command: str = "") -> int:
    """Write this rank's missing parts (at most ``teacher.cache.max_parts``); returns how many
    it wrote. ``command`` restarts the job (recorded for a trainer that outlives it)."""
    from deepspeed.accelerator import get_accelerator

    if cfg.teacher.kind == "none":
        raise ConfigError("teacher: the cache job runs a teacher; pass teacher=cache "
                          "teacher.path=/path/to/model")
    cache = Path(cfg.cache_dir).expanduser().resolve()
    teacher_path = on_rank0_first(dist_info, resolve_path, cfg.teacher)
    tokenizer = on_rank0_first(dist_info, student_tokenizer, cfg, teacher_path, cache, cache)
    shards = on_rank0_first(dist_info, ensure_shards, cfg.data, tokenizer, cache)
    train = TokenShards(shards, "train", cfg.data.seq_len, cfg.data.verify_checksums)
    directory = cache_dir(cfg, shards, teacher_path)
    device = torch.device(get_accelerator().current_device_name())
    expected = {**describe(cfg, teacher_path, shards, train), "generator": generator_key(device)}
    c, name = cfg.teacher.cache, writer_name()
    held = [None, None]  # (job, claim generation), decided by rank 0
    if dist_info.is_main:
        prepare(directory, expected, teacher_path)
        if not load_manifest(directory)["complete"]:
            held = [name, claim.acquire(directory, name, dist_info.world_size, command,
                                        c.dead_after_s)]
    dist.broadcast_object_list(held, src=0)
    manifest = load_manifest(directory)
    if manifest["complete"]:
        log.info("cache %s is already complete", directory)
        return 0
    job, generation = held
    heartbeat = Heartbeat(directory, name, c.heartbeat_s, command, dist_info.rank, c.max_parts,
                          job, dist_info.world_size)
    try:  # a heartbeat from here on: loading a large teacher takes minutes
        teacher = OnlineTeacher(teacher_path, cfg.teacher.dtype, device, cfg.data.seq_len)
        written, stopped_early = write_parts(cfg, dist_info, directory, manifest, train,
                                             teacher, device, ProgressLog(directory, name),
                                             heartbeat, generation)
    except BaseException:
        heartbeat.stop(FAILED)
        raise
    heartbeat.stop(MAX_PARTS if stopped_early else DONE)
    dist.barrier()
    progress = Progress(directory, num_parts(manifest))
    progress.refresh()
    done = [progress.complete()]
    dist.broadcast_object_list(done, src=0)
    if done[0]:
        finish(cfg, dist_info, directory, manifest, teacher, shards, device)
    return written


def write_parts(cfg, dist_info, directory, manifest, train, teacher, device, progress_log,
                heartbeat, generation) -> tuple[int, bool]:
    """This rank's missing parts, at most ``max_parts``: (how many written, whether
    ``max_parts`` left some). Stops if another job claimed the cache meanwhile."""
    walk = Walk(manifest)
    files = CacheFiles(directory, manifest, writable=True,
                       max_open=cfg.teacher.cache.max_open_files)
    progress = Progress(directory, num_parts(manifest))
    progress.refresh()
    todo = progress.missing_every(dist_info.rank, dist_info.world_size)
    limit = cfg.teacher.cache.max_parts
    log.info("cache %s: rank %d of %d writes its missing parts of %d samples%s", directory,
             dist_info.rank, dist_info.world_size, walk.part_samples,
             "" if limit is None else f" (at most {limit})")
    written = 0
    for part in todo if limit is None else islice(todo, limit):
        if not claim.held(directory, generation):
            raise claim.ClaimRefused(
                f"teacher.cache.dir: {directory} was claimed by another cache job while this "
                f"one wrote (it judged this one dead); stopping before part {part}")
        heartbeat.starting(part)
        write_part(files, train, teacher, manifest, walk.part_ids(part),
                   part, device, progress_log)
        heartbeat.finished()
        written += 1
    files.close()
    progress_log.close()
    log.info("cache %s: rank %d wrote %d parts", directory, dist_info.rank, written)
    return written, next(todo, None) is not None


def finish(cfg, dist_info, directory, manifest, teacher, shards, device) -> None:
    """Every part is written: record the teacher's validation perplexity and checksums."""
    val = TokenShards(shards, "val", cfg.data.seq_len, verify=False)
    ppl = perplexity(teacher.logits, val, cfg.eval_batches, cfg.micro_batch_size,
                     dist_info.rank, dist_info.world_size, device)
    if dist_info.is_main:
        manifest["eval"] = {"batches": cfg.eval_batches, "batch_size": cfg.micro_batch_size,
                            "val_ppl_teacher": ppl}
        manifest["files"] = {name: sha256_file(directory / name) for name in file_names(manifest)}
        manifest["complete"] = True
        write_json(directory / MANIFEST, manifest)
        log.info("cache %s complete; teacher val. ppl %.2f", directory, ppl)
    dist.barrier()


register()


@hydra.main(version_base="1.3", config_path="../../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    rank = detect(os.environ).rank  # torchrun, deepspeed or plain srun
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    overrides = list(HydraConfig.get().overrides.task)
    cfg = validate(cfg)
    dist_info = init_distributed(cfg.distributed)
    write_cache(cfg, dist_info, restart_command(overrides, dist_info.world_size))
    dist.destroy_process_group()


if __name__ == "__main__":
    run_and_exit(main)  # as train.py: DeepSpeed's CPU comm threads can abort interpreter teardown
