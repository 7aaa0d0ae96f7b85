"""Writes that are all or nothing: a reader sees the old state or the new, never half."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


@contextlib.contextmanager
def staging_dir(dest: Path) -> Iterator[Path]:
    """Yield an empty temporary sibling of `dest`; on success rename it to `dest`.

    On an exception the temporary folder is removed and `dest` is left untouched. If another
    process completed `dest` meanwhile, its copy wins and ours is discarded.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Same parent folder, so the final rename stays on one file system and is atomic. Not
    # tempfile.mkdtemp: its mode 0700 would survive the rename and lock a shared cache to one user.
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        yield tmp
        try:
            os.replace(tmp, dest)
        except OSError:
            if not dest.is_dir():
                raise
            log.info("%s was completed by another process; keeping that copy", dest)
    finally:
        # Already gone after a successful rename; otherwise a failed or superseded attempt.
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, payload: dict) -> None:
    write_text(path, json.dumps(payload, indent=1))
