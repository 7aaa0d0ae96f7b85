"""Session fixtures built with fbi_testing: corpus, tokenizer, tiny teacher, download cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fbi_testing import TORCH_EXTENSIONS, make_teacher, make_tokenizer, wikitext_lines

# Inherited by every process the tests start (train.py, torchrun, SLURM jobs, benches); a
# cache the developer chose wins.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(TORCH_EXTENSIONS))


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


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, corpus, teacher_dir) -> list[str]:
    """Overrides of the runs that tests start with train.py: the tiny teacher, the test corpus,
    a 2-layer student of width 64, 8 sequences of 32 tokens per step, every step logged, and a
    shard cache of the module's own. Later overrides on the command line win."""
    return [
        f"cache_dir={tmp_path_factory.mktemp('cache')}", "teacher=hf",
        f"teacher.path={teacher_dir}", "teacher.dtype=float32", "data=files",
        f"data.files=[{corpus}/*.txt]", "data.seq_len=32", "data.val_fraction=0.05",
        "model.n_layers=2", "model.d_model=64", "model.d_ff=128", "model.n_heads=4",
        "global_batch_size=8", "micro_batch_size=4", "logging.log_every=1", "eval_batches=2",
        "optim.lr=3e-3", "optim.warmup_steps=2",
    ]


@pytest.fixture(scope="session")
def zero3_run(tmp_path_factory, corpus, teacher_dir) -> Path:
    """A tiny FBI-LLM student trained 3 steps by train.py under ZeRO-3 on 2 processes, with
    an evaluation (val. perplexity, BLiMP) every 2 steps: what export and eval start from."""
    from fbi_testing import REPO, run_train

    tmp = tmp_path_factory.mktemp("zero3_run")
    run_train([
        f"run_dir={tmp / 'run'}", f"cache_dir={tmp / 'cache'}", "teacher=hf",
        f"teacher.path={teacher_dir}", "data=files", f"data.files=[{corpus}/*.txt]",
        "data.seq_len=32", "data.val_fraction=0.05", "model.n_layers=2", "model.d_model=64",
        "model.d_ff=128", "model.n_heads=4", "model.n_kv_heads=2", "global_batch_size=8",
        "micro_batch_size=4", "eval_batches=3", "optim.lr=3e-3", "optim.warmup_steps=2",
        "max_steps=3", "zero=stage3", "eval_every=2",
        f"eval_blimp=[{REPO / 'data' / 'blimp' / 'anaphor_number_agreement.jsonl'}]",
    ], nproc=2)
    return tmp / "run"
