"""Bring a teacher cache written by an older version to the current format, in place.

    python -m fbi.distill.convert DIR

Format 1 (a marker file per part) becomes a progress log; format 2 gains the row checksums
(``<shard>.crc``, fbi/distill/cache_files.py) of every row its progress logs hold, read back
once: the rows are trusted as they are on disk now. A cache still being written records the
teacher dtype and the generator its writer used when they are given (``--teacher-dtype``,
``--generator``); without them a writer refuses to resume it, and training reads it.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from fbi.atomic import write_json
from fbi.distill.cache import FORMAT, MANIFEST, Walk, load_manifest, num_parts
from fbi.distill.cache_files import CacheFiles
from fbi.distill.progress import Progress, ProgressLog
from fbi.distill.teacher_checkpoint import hash_weights

log = logging.getLogger(__name__)


def markers_to_log(directory: Path, manifest: dict) -> None:
    """Format 1 to 2: one progress log of the part markers, and the full hash of the teacher
    at ``teacher_path`` (which the quick fingerprint of the manifest must still match)."""
    markers = sorted((directory / "parts").iterdir()) if (directory / "parts").is_dir() else []
    progress = ProgressLog(directory, "converted-from-markers")
    for m in markers:
        progress.append(int(m.name))
    progress.close()
    if "teacher_weights" not in manifest:  # format 1 hashed the ends of the files only
        manifest["teacher_weights"] = hash_weights(Path(manifest["teacher_path"]),
                                                   directory / "teacher_blocks")
    for m in markers:
        m.unlink()
    if markers:
        (directory / "parts").rmdir()
    log.info("%s: %d part markers now in one progress log", directory, len(markers))


def add_checksums(directory: Path, manifest: dict) -> None:
    """Format 2 to 3: the checksum of every written row."""
    CacheFiles.create(directory, manifest)  # the .crc files; the others keep their size
    files = CacheFiles(directory, manifest, writable=True)
    starts = np.cumsum([0] + [s["samples"] for s in manifest["token_shards"]])
    walk, progress = Walk(manifest), Progress(directory, num_parts(manifest))
    progress.refresh()
    parts = 0
    for part in range(progress.num_parts):
        if not progress.has(part):
            continue
        for sample in walk.part_ids(part).tolist():
            shard = int(np.searchsorted(starts, sample, side="right")) - 1
            row = files.read(shard, sample - int(starts[shard]))
            files.write(shard, sample - int(starts[shard]), sample, row.ids, row.vals, row.tail)
        parts += 1
    files.close()
    log.info("%s: checksums of the rows of %d written parts recorded", directory, parts)


def convert(directory: Path, teacher_dtype: str | None = None,
            generator: str | None = None) -> None:
    manifest = load_manifest(directory)
    if manifest["format"] == FORMAT:
        raise SystemExit(f"{directory} is format {FORMAT} already: nothing to convert")
    if manifest["format"] == 1:
        markers_to_log(directory, manifest)
    add_checksums(directory, manifest)
    for key, value in (("teacher_dtype", teacher_dtype), ("generator", generator)):
        if value is not None:
            manifest[key] = value
    manifest["format"] = FORMAT
    write_json(directory / MANIFEST, manifest)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m fbi.distill.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--teacher-dtype", help="the old writer's teacher.dtype (to resume it)")
    parser.add_argument("--generator", help="as a current writer records it, e.g. 'torch "
                        "2.5.1 on cuda' (to resume it)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    convert(args.directory, args.teacher_dtype, args.generator)


if __name__ == "__main__":
    main()
