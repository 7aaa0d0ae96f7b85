"""The teacher cache's files at corpus scale: creation, a part's write and flush, reads with
their checksums, open descriptors, memory maps and resident memory, the writer's list of
missing parts; the code before issue 29 side by side where it still runs.

    python bench/cache_scale.py --shards 2000
    python bench/cache_scale.py --shards 25200 --compare-ref none

Synthetic cache of the default targets (sampled, 12 draws: uint16 ids + uint8 counts, 36
bytes per token), Amber's geometry: shards of 50M tokens (24,402 samples of 2,049 tokens),
parts of 16 samples (32,768 tokens) drawn across all shards as ``order=trainer`` does. The
files are sparse: only the rows written take disk. No teacher runs: the figures are the
cache's own I/O, which must stay well below a teacher's time per part.

``--compare-ref REF`` (default ``main``) loads ``fbi/distill/cache.py`` of that git revision
and runs its ``CacheArrays`` on the same geometry (skipped above ``--compare-max`` shards:
it needs 2 descriptors and 2 maps per shard). The missing-parts figure is measured at
``--parts`` parts (tracemalloc) and scaled to Amber's 38.45M parts.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from itertools import islice
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fbi.distill.cache_files import CacheFiles, row_checksum  # noqa: E402
from fbi.distill.progress import Progress  # noqa: E402

SEQ, DRAWS, PART = 2048, 12, 16
SAMPLES_PER_SHARD = 50_000_000 // (SEQ + 1)
AMBER_SHARDS, AMBER_PARTS = 25_200, 38_450_000


def manifest(shards: int) -> dict:
    return {"mode": "sampled", "value_dtype": "uint8", "id_dtype": "uint16",
            "count_dtype": "uint8", "seq_len": SEQ, "slots": DRAWS,
            "token_shards": [{"file": f"train_{i:06d}.bin", "samples": SAMPLES_PER_SHARD}
                             for i in range(shards)]}


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def maps() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def synthetic_rows(rng, n: int):
    ids = rng.integers(0, 32_000, (n, SEQ, DRAWS), dtype=np.uint16)
    counts = np.zeros((n, SEQ, DRAWS), np.uint8)
    counts[..., 0] = DRAWS
    return ids, counts


def part_rows(rng, shards: int, parts: int) -> list[list[tuple[int, int]]]:
    return [[(int(rng.integers(shards)), int(rng.integers(SAMPLES_PER_SHARD)))
             for _ in range(PART)] for _ in range(parts)]


def measure_new(directory: Path, shards: int, parts: int, max_open: int) -> dict:
    m = manifest(shards)
    t = time.perf_counter()
    CacheFiles.create(directory, m)
    create_s = time.perf_counter() - t
    rng = np.random.default_rng(0)
    ids, counts = synthetic_rows(rng, PART)
    plan = part_rows(rng, shards, parts)
    base_fds, base_maps, base_rss = fds(), maps(), rss_mb()
    writer = CacheFiles(directory, m, writable=True, max_open=max_open)
    write_s, flush_s, peak_fds, peak_maps, peak_rss = [], [], 0, 0, 0.0
    for rows in plan:
        t = time.perf_counter()
        for j, (shard, row) in enumerate(rows):
            writer.write(shard, row, shard * SAMPLES_PER_SHARD + row, ids[j], counts[j], None)
        t2 = time.perf_counter()
        writer.flush()
        write_s.append(t2 - t)
        flush_s.append(time.perf_counter() - t2)
        peak_fds, peak_maps = max(peak_fds, fds() - base_fds), max(peak_maps, maps() - base_maps)
        peak_rss = max(peak_rss, rss_mb() - base_rss)
    writer.close()
    reader = CacheFiles(directory, m, max_open=max_open)
    rows = [r for part in plan for r in part]
    order = np.random.default_rng(1).permutation(len(rows))
    t = time.perf_counter()
    read = [reader.read(*rows[i]) for i in order]
    read_s = time.perf_counter() - t
    t = time.perf_counter()
    for i, r in zip(order, read):
        shard, row = rows[i]
        assert row_checksum(shard * SAMPLES_PER_SHARD + row, r.ids, r.vals, r.tail) == r.crc
    crc_s = time.perf_counter() - t
    reader_fds, reader_maps = fds() - base_fds, maps() - base_maps
    part_io = np.median(np.add(write_s, flush_s))
    return {
        "create_s": round(create_s, 3),
        "part_write_s_median": round(float(np.median(write_s)), 5),
        "part_flush_s_median": round(float(np.median(flush_s)), 5),
        "part_io_tokens_per_s": round(PART * SEQ / part_io),
        "writer_peak_fds_added": peak_fds, "writer_peak_maps_added": peak_maps,
        "writer_rss_growth_mb": round(peak_rss, 1),
        "reader_fds_added": reader_fds, "reader_maps_added": reader_maps,
        "read_row_ms": round(1e3 * read_s / len(rows), 4),
        "checksum_row_ms": round(1e3 * crc_s / len(rows), 4),
        "checksum_share_of_read": round(crc_s / (read_s + crc_s), 3),
    }


def load_old(ref: str):
    source = subprocess.run(["git", "show", f"{ref}:fbi/distill/cache.py"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_cache.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_cache", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure_old(old, directory: Path, shards: int, parts: int) -> dict:
    m = {**manifest(shards), "temperature": 1.0}
    t = time.perf_counter()
    old.CacheArrays.create(directory, m)
    create_s = time.perf_counter() - t
    base_fds, base_maps = fds(), maps()
    try:
        arrays = old.CacheArrays(directory, m, "r+")
    except OSError as e:
        return {"create_s": round(create_s, 3), "open": f"failed: {e}"}
    rng = np.random.default_rng(0)
    ids, counts = synthetic_rows(rng, PART)
    flush_s = []
    for rows in part_rows(rng, shards, parts):
        for j, (shard, row) in enumerate(rows):
            arrays.shards[shard][0][row] = ids[j]
            arrays.shards[shard][1][row] = counts[j]
        t = time.perf_counter()
        arrays.flush()
        flush_s.append(time.perf_counter() - t)
    return {"create_s": round(create_s, 3),
            "part_flush_s_median": round(float(np.median(flush_s)), 5),
            "fds_added": fds() - base_fds, "maps_added": maps() - base_maps}


def missing_memory(parts: int) -> dict:
    progress = Progress(Path(tempfile.mkdtemp()), parts)  # nothing written: all missing
    tracemalloc.start()
    old = progress.missing(range(0, parts))
    old_peak = tracemalloc.get_traced_memory()[1]
    del old
    tracemalloc.reset_peak()
    todo = progress.missing_every(0, 1)
    sum(1 for _ in islice(todo, 1000))
    new_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    scale = AMBER_PARTS / parts
    return {"parts_measured": parts, "list_mb": round(old_peak / 2**20, 1),
            "generator_mb": round(new_peak / 2**20, 2),
            "list_mb_at_amber": round(old_peak * scale / 2**20),
            "generator_mb_at_amber": round(new_peak / 2**20, 2),
            "progress_bits_mb_at_amber": round(AMBER_PARTS / 8 / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, nargs="+", default=[2000])
    parser.add_argument("--part-count", type=int, default=40, help="parts written per run")
    parser.add_argument("--max-open", type=int, default=256)
    parser.add_argument("--compare-ref", default="main", help="git revision, or none")
    parser.add_argument("--compare-max", type=int, default=4000)
    parser.add_argument("--parts", type=int, default=4_000_000, help="for the missing list")
    parser.add_argument("--dir", type=Path, default=None, help="where the sparse files go")
    args = parser.parse_args()
    old = None if args.compare_ref == "none" else load_old(args.compare_ref)
    out = {"geometry": {"seq_len": SEQ, "draws": DRAWS, "part_samples": PART,
                        "samples_per_shard": SAMPLES_PER_SHARD, "max_open": args.max_open}}
    for shards in args.shards:
        with tempfile.TemporaryDirectory(dir=args.dir, prefix="cache-scale-") as d:
            row = {"new": measure_new(Path(d), shards, args.part_count, args.max_open)}
        if old is not None and shards <= args.compare_max:
            with tempfile.TemporaryDirectory(dir=args.dir, prefix="cache-scale-old-") as d:
                row["old"] = measure_old(old, Path(d), shards, args.part_count)
            row["old/new"] = {k: round(row["old"][k] / max(row["new"][k], 1e-9), 1)
                              for k in ("create_s", "part_flush_s_median")
                              if k in row["old"]}
        out[f"shards={shards}"] = row
    out["missing_parts"] = missing_memory(args.parts)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
