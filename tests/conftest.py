"""Session fixtures built with fbi_testing: corpus, tokenizer, tiny teacher, download cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fbi_testing import make_teacher, make_tokenizer, wikitext_lines


@pytest.fixture(scope="session")
def fbi_cache(tmp_path_factory) -> Path:
    """Download cache: $FBI_CACHE if set, so that repeated runs reuse the teacher; else a temp dir."""
    if "FBI_CACHE" in os.environ:
        return Path(os.environ["FBI_CACHE"])
    return tmp_path_factory.mktemp("fbi_cache")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """Three text files of WikiText-2 (about 120 kB): the corpus train.py tokenizes."""
    directory = tmp_path_factory.mktemp("corpus")
    lines = wikitext_lines(120_000)
    for i in range(3):
        (directory / f"part{i}.txt").write_text("\n".join(lines[i::3]))
    return directory


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("tokenizer"), 512, wikitext_lines(200_000))


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return make_teacher(tmp_path_factory.mktemp("teacher"), tokenizer_dir)
