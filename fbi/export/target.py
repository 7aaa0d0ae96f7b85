"""Where an export may be written, and writing it whole.

An export goes into a new or empty folder, or replaces an earlier export of the same format
(every file in it one that an export writes). It never writes into a run directory or a folder
inside one, nor into a folder holding a checkpoint, an export of the other format or data it
did not write: those are refused before anything loads, naming the folder and what it holds.
The export is written beside ``--out`` and moved into place at the end, so a failed export
leaves the earlier one (or nothing) rather than a mixture.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from fnmatch import fnmatch
from pathlib import Path
from typing import Iterator

from fbi.config import ConfigError
from fbi.export.packed import PACKED_CONFIG

HF_MARK = "fbi_export.json"  # written by export --format hf: the folder is fbi's
MARKS = {"packed": PACKED_CONFIG, "hf": HF_MARK}
# What export_packed / export_hf write (safetensors shards, the tokenizer's files, the card).
EXPORT_FILES = ("model*.safetensors", "model.safetensors.index.json", PACKED_CONFIG, HF_MARK,
                "README.md", "config.json", "generation_config.json", "tokenizer*",
                "special_tokens_map.json", "added_tokens.json", "chat_template*")


def is_run(folder: Path) -> bool:
    return (folder / "config.yaml").is_file() or (folder / "checkpoints").is_dir()


def holds(folder: Path) -> str:
    """What ``folder`` holds, in words, for a refusal."""
    if is_run(folder):
        return "a training run (config.yaml, checkpoints/)"
    if (folder / PACKED_CONFIG).is_file():
        return f"a packed export ({PACKED_CONFIG})"
    if (folder / HF_MARK).is_file():
        return f"a Hugging Face export ({HF_MARK})"
    if (folder / "config.json").is_file():
        return "a Hugging Face checkpoint (config.json) that fbi did not write"
    if (folder / "manifest.json").is_file():
        return "token shards (manifest.json)"
    names = sorted(p.name for p in folder.iterdir())
    return f"{len(names)} entries an export did not write ({', '.join(names[:3])}" + (
        ", ...)" if len(names) > 3 else ")")


def check_out(out: Path, fmt: str, model: Path) -> None:
    """Refuse an ``--out`` the export must not write into (ConfigError naming the folder, what
    it holds, and the fix). Reads only folder listings."""
    out = Path(out).expanduser().resolve()
    fix = "name a new or empty folder, e.g. --out exports/NAME"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out: {out} is a file; {fix}")
    for folder in (out, *out.parents):
        if folder.is_dir() and is_run(folder):
            where = "is" if folder == out else "is inside"
            raise ConfigError(f"--out: {out} {where} the run directory {folder}, which holds "
                              f"{holds(folder)}; an export never writes into a run: {fix}")
    if out == Path(model).expanduser().resolve():
        raise ConfigError(f"--out: {out} is the model being exported; {fix}")
    if not out.exists() or not any(out.iterdir()):
        return
    foreign = [p.name for p in out.iterdir()
               if not (p.is_file() and any(fnmatch(p.name, g) for g in EXPORT_FILES))]
    if (out / MARKS[fmt]).is_file() and not foreign:
        return  # an earlier export of this format: replaced whole
    raise ConfigError(f"--out: {out} holds {holds(out)}; an export writes only into a new or "
                      f"empty folder or over an earlier --format {fmt} export: {fix}")


@contextlib.contextmanager
def replacing(out: Path) -> Iterator[Path]:
    """A fresh folder beside ``out`` to write the export into; moved to ``out`` (replacing an
    earlier export) when the body succeeds, removed when it fails."""
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f".{out.name}.writing-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        yield work
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if out.exists():
        out.rename(old)
    work.rename(out)
    shutil.rmtree(old, ignore_errors=True)
