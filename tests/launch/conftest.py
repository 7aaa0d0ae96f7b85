"""What the launch tests train: the tiny student from the tiny teacher, with short timeouts."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def overrides(tmp_path_factory, corpus, teacher_dir) -> list[str]:
    cache = tmp_path_factory.mktemp("cache")
    return [
        f"cache_dir={cache}", "teacher=hf", f"teacher.path={teacher_dir}", "teacher.dtype=float32",
        "data=files", f"data.files=[{corpus}/*.txt]", "data.seq_len=32", "data.val_fraction=0.05",
        "model.n_layers=2", "model.d_model=64", "model.d_ff=128", "model.n_heads=4",
        "global_batch_size=8", "micro_batch_size=4", "logging.log_every=1", "eval_batches=2",
        "optim.lr=3e-3", "optim.warmup_steps=2", "distributed.rendezvous_timeout_s=60",
        "distributed.timeout_s=120",
    ]
