"""End to end: train.py distils a binary student from a real (tiny) teacher, then resumes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fbi_testing import REPO, make_tokenizer, run_train, wikitext_lines


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def common(run_dir, corpus, teacher_dir, cache):
    return [
        f"run_dir={run_dir}", f"cache_dir={cache}", "teacher=hf", f"teacher.path={teacher_dir}",
        "teacher.dtype=float32", "data=files", f"data.files=[{corpus}/*.txt]", "data.seq_len=32",
        "data.val_fraction=0.05", "model.n_layers=2", "model.d_model=64", "model.d_ff=128",
        "model.n_heads=4", "global_batch_size=8", "micro_batch_size=4", "logging.log_every=1",
        "eval_batches=4", "optim.lr=3e-3", "optim.warmup_steps=2", "distill.ce_weight=0.0",
    ]


@pytest.mark.slow
def test_distillation_learns_and_resumes_exactly(tmp_path, corpus, teacher_dir):
    cache = tmp_path / "cache"
    args = common(tmp_path / "a", corpus, teacher_dir, cache) + ["optim.decay_steps=24"]
    run_train(args + ["max_steps=12", "checkpoint_every=6"], REPO)
    run_train(args + ["max_steps=24", "checkpoint_every=6", "resume=true"], REPO)
    straight = common(tmp_path / "b", corpus, teacher_dir, cache) + [
        "optim.decay_steps=24", "logging.peak_tflops=0.001"]  # a CPU has no table peak
    console = run_train(straight + ["max_steps=24", "checkpoint_every=100"], REPO).stderr

    resumed = [m for m in read_metrics(tmp_path / "a") if "loss" in m]
    reference = [m for m in read_metrics(tmp_path / "b") if "loss" in m]
    assert [m["step"] for m in resumed] == list(range(1, 25))
    # Loss of the resumed run equals the uninterrupted one, step for step.
    assert [m["loss"] for m in resumed] == [m["loss"] for m in reference]
    first = sum(m["loss"] for m in reference[:3]) / 3
    last = sum(m["loss"] for m in reference[-3:]) / 3
    assert last < first - 0.08  # measured: 6.24 -> 6.08 (the teacher's entropy bounds it below)

    final = read_metrics(tmp_path / "b")[-1]
    assert final["val_ppl_student"] > 1 and final["val_ppl_teacher"] > 1
    run = tmp_path / "b"
    ds = json.loads((run / "ds_config.json").read_text())
    assert ds["train_batch_size"] == 8 and ds["gradient_accumulation_steps"] == 2
    assert ds["optimizer"]["params"]["betas"] == [0.9, 0.95]
    assert (run / "config.yaml").exists() and (run / "tokenizer.json").exists()
    assert (run / "checkpoints" / "step_00000024" / "complete.json").exists()
    assert "mfu" not in resumed[0]  # no peak known for a CPU: no MFU
    phases = ("time_data_s", "time_teacher_s", "time_forward_backward_s", "time_optimizer_s")
    for row in reference:  # what the step's time went to, and the gradient norm (ZeRO-0)
        assert all(row[k] >= 0 for k in phases) and row["time_teacher_s"] > 0
        assert sum(row[k] for k in phases) <= row["step_time_s"] * 1.01
        assert row["grad_norm"] > 0
        assert row["soft_ce"] == row["distill"]  # dense targets: the comparable metric is exact
    assert re.search(r"step 24/24 .* tok/s.* ETA ", console)
    check_mfu(reference, run, teacher_dir, seq_len=32)


def check_mfu(rows: list[dict], run: Path, teacher_dir: Path, seq_len: int) -> None:
    """MFU logged = tokens/s x FLOPs per token / peak, with the FLOPs counted here from the
    student's and the teacher's shapes: 2 per weight of each product and 4 d seq per layer
    for attention, forward; the student's training 3x that."""
    from omegaconf import OmegaConf
    from transformers import AutoConfig

    def forward_flops(layers, d, kv, ff, vocab):
        return 2 * (layers * (d * (d + 2 * kv) + d * d + 3 * d * ff) + d * vocab) \
            + 4 * layers * d * seq_len

    m = OmegaConf.load(run / "config.yaml").model
    kv = (m.n_kv_heads or m.n_heads) * m.d_model // m.n_heads
    student = 3 * forward_flops(m.n_layers, m.d_model, kv, m.d_ff, m.vocab_size)
    t = AutoConfig.from_pretrained(teacher_dir)
    kv = t.num_key_value_heads * t.hidden_size // t.num_attention_heads
    teacher = forward_flops(t.num_hidden_layers, t.hidden_size, kv, t.intermediate_size,
                            t.vocab_size)
    for row in rows:
        assert row["mfu"] == pytest.approx(row["tokens_per_s"] * student / 1e9, rel=1e-9)
        assert row["mfu_teacher"] == pytest.approx(row["tokens_per_s"] * teacher / 1e9, rel=1e-9)
        assert row["tflops_per_device"] == pytest.approx(row["mfu"] * 1e-3, rel=1e-9)


@pytest.mark.slow
def test_no_teacher_trains_a_sentencepiece_tokenizer_uses_ce_and_logs_to_wandb(tmp_path, corpus):
    run = tmp_path / "run"
    args = [
        f"run_dir={run}", f"cache_dir={tmp_path / 'cache'}", "teacher=none", "scheme=fp",
        "tokenizer.vocab_size=600", "data=files", f"data.files=[{corpus}/*.txt]",
        "data.seq_len=32", "model.n_layers=1", "model.d_model=32", "model.d_ff=64",
        "model.n_heads=2", "max_steps=3", "global_batch_size=4", "micro_batch_size=4",
        "logging.log_every=1", "eval_batches=2", "logging.wandb=offline",
    ]
    run_train(args, REPO)
    metrics = read_metrics(run)
    offline = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1 and offline[0].stat().st_size > 0  # real wandb, offline mode
    assert (run / "tokenizer.model").exists()
    assert json.loads((run / "tokenizer.json").read_text())["vocab_size"] == 600
    assert all(m["loss"] == pytest.approx(m["ce"]) for m in metrics if "loss" in m)
    assert "val_ppl_teacher" not in metrics[-1]


def test_student_with_another_tokenizer_is_refused(tmp_path, teacher_dir):
    from fbi.config import ConfigError, TrainConfig, TeacherConfig, TokenizerConfig
    from fbi.run import student_tokenizer

    other = make_tokenizer(tmp_path / "other", 400, wikitext_lines(50_000, "test"))
    cfg = TrainConfig(max_steps=10, teacher=TeacherConfig(kind="hf", path=str(teacher_dir)),
                      tokenizer=TokenizerConfig(path=str(other)))
    with pytest.raises(ConfigError, match="differs from the teacher's"):
        student_tokenizer(cfg, teacher_dir, tmp_path, tmp_path)


def test_bad_values_are_refused_before_any_work(tmp_path):
    proc = run_train([f"run_dir={tmp_path}/r", "global_batch_size=10", "micro_batch_size=4"],
                     REPO, check=False, timeout=120)
    assert proc.returncode != 0
    assert "global_batch_size: 10 sequences cannot be split" in proc.stderr
    assert not (tmp_path / "r").exists()
    proc = run_train([f"run_dir={tmp_path}/r", "resume=true"], REPO, check=False, timeout=120)
    assert "resume=true but" in proc.stderr


@pytest.mark.slow
def test_a_terminal_gets_a_progress_bar_instead_of_step_lines(tmp_path, corpus, teacher_dir):
    """rank 0's stderr on a pseudo-terminal: a tqdm bar with the losses as its postfix, and
    no per-step log lines (a pipe gets the lines: the other tests)."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # 160 columns
    args = common(tmp_path / "run", corpus, teacher_dir, tmp_path / "cache") + ["max_steps=3"]
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=follower,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    os.close(follower)
    out = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    assert proc.wait(timeout=300) == 0
    os.close(leader)
    text = out.decode(errors="replace")
    assert re.search(r"3/3 \[.*step/s.*loss \d", text), repr(text[-2500:])
    assert not re.search(r"step \d+/3 ", text) and "validation after step 3" in text
