"""Faults injected into real train.py processes on a tiny model: signals, kill -9, two runs on
one run directory, a damaged checkpoint, a non-finite loss. Each resume is compared bitwise
with an uninterrupted run (same world size, CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fbi_testing import REPO, make_tokenizer, wikitext_lines

STEPS = 10


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("tok"), 300, wikitext_lines(60_000))


def args(run_dir: Path, corpus: Path, tokenizer: Path, cache: Path,
         steps: int = STEPS) -> list[str]:
    return [
        f"run_dir={run_dir}", f"cache_dir={cache}", "teacher=none", f"tokenizer.path={tokenizer}",
        "data=files", f"data.files=[{corpus}/*.txt]", "data.seq_len=16", "data.val_fraction=0.05",
        "model.n_layers=1", "model.d_model=32", "model.d_ff=64", "model.n_heads=2",
        "global_batch_size=4", "micro_batch_size=4", "logging.log_every=1", "eval_batches=1",
        "optim.lr=3e-3", "optim.warmup_steps=2", f"max_steps={steps}",
        "logging.diagnostics_every=3",
    ]


def start(overrides: list[str]) -> subprocess.Popen:
    # TORCH_EXTENSIONS_DIR: the checkout's own, from conftest (fbi_testing.TORCH_EXTENSIONS)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), *overrides], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int) -> None:
    deadline = time.monotonic() + 240
    while not any(r.get("step", 0) >= step and "loss" in r for r in rows(run_dir)):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)


def weights(run_dir: Path, step: int) -> dict:
    path = run_dir / "checkpoints" / f"step_{step:08d}" / "mp_rank_00_model_states.pt"
    return torch.load(path, weights_only=False)["module"]


def assert_bitwise(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_signal_kill_and_second_run_then_bitwise_equal_result(tmp_path, corpus, small_tokenizer):
    """SIGINT: checkpoint at the step boundary, exit 0. A second run on the same directory
    meanwhile: refused, nothing touched. kill -9 after a periodic checkpoint: the rerun
    resumes from it, replayed rows are marked. The end: the uninterrupted run's weights.
    The first run is held with SIGSTOP while the others act, so the tiny run cannot finish
    first."""
    steps, cache = 30, tmp_path / "cache"
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "faulty"
    reference = start(args(ref_dir, corpus, small_tokenizer, cache, steps)
                      + ["checkpoint_every=100"])
    assert finish(reference)[0] == 0  # it also builds the shards both runs share

    proc = start(args(run_dir, corpus, small_tokenizer, cache, steps) + ["checkpoint_every=100"])
    wait_for_step(proc, run_dir, 2)
    proc.send_signal(signal.SIGSTOP)
    config_before = (run_dir / "config.yaml").read_bytes()
    second = start(args(run_dir, corpus, small_tokenizer, cache, steps))
    code, err = finish(second)
    assert code == 2 and "is in use by another run" in err and "Traceback" not in err
    assert (run_dir / "config.yaml").read_bytes() == config_before
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGCONT)
    code, err = finish(proc)
    assert code == 0, err[-3000:]
    stopped = max(r["step"] for r in rows(run_dir) if "loss" in r)
    assert stopped < steps and (run_dir / "checkpoints" / f"step_{stopped:08d}").exists()
    assert "stopped after step" in err and "SIGINT" in err

    proc = start(args(run_dir, corpus, small_tokenizer, cache, steps) + ["checkpoint_every=4"])
    wait_for_step(proc, run_dir, stopped + 6)
    proc.kill()  # SIGKILL: no handler, no checkpoint of its own
    proc.wait()
    killed_at = max(r["step"] for r in rows(run_dir) if "loss" in r)
    assert killed_at < steps
    code, err = finish(start(args(run_dir, corpus, small_tokenizer, cache, steps)))
    assert code == 0, err[-3000:]

    assert_bitwise(weights(run_dir, steps), weights(ref_dir, steps))
    ours, theirs = rows(run_dir), {r["step"]: r for r in rows(ref_dir) if "loss" in r}
    first_rows = [r for r in ours if "loss" in r and not r.get("replayed")]
    assert [r["step"] for r in first_rows] == list(range(1, steps + 1))
    assert all(r["loss"] == theirs[r["step"]]["loss"] for r in ours if "loss" in r)
    assert any(r.get("replayed") for r in ours)  # the steps after the kill's checkpoint
    flips = [r for r in ours if "flip/q_proj" in r and not r.get("replayed")]
    assert flips and all(0 <= r["flip/q_proj"] <= 1 for r in flips)

    from fbi.cli import main
    from fbi.report import load, summary

    main(["report", str(ref_dir), str(run_dir), "--out", str(tmp_path / "report.png")])
    assert (tmp_path / "report.png").read_bytes()[:4] == b"\x89PNG"
    faulty = load(run_dir)
    assert [r["loss"] for r in faulty["train"]] == [theirs[s]["loss"] for s in sorted(theirs)]
    assert f"step {steps}" in summary(faulty) and faulty["replayed"] > 0


@pytest.mark.slow
def test_damaged_checkpoint_falls_back_and_spike_rewinds_replay_alike(tmp_path, corpus,
                                                                      small_tokenizer):
    """The newest checkpoint gets one flipped byte: the rerun sets it aside, resumes from the
    previous one and ends with the same weights. The runs rewind on loss spikes (a z-score
    threshold low enough to fire on noise): the same spikes, rewinds and skipped batches
    after the resume, because the loss window travels in the checkpoint and the skipped
    batches in skipped_batches.jsonl."""
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    # A learning rate too small to move the loss: what is left is batch-to-batch noise, on
    # which spikes fire whatever the sample order (a falling loss never spikes).
    common = args(run_dir, corpus, small_tokenizer, cache, 12) + [
        "checkpoint_every=3", "checkpoint_keep=5", "guard.spike_action=rewind",
        "guard.spike_window=4", "guard.spike_z=0.1", "guard.max_rewinds=2", "optim.lr=1e-6",
        "optim.min_lr=0"]
    assert finish(start(common))[0] == 0
    final = weights(run_dir, 12)
    spikes = [json.loads(line) for line in (run_dir / "spikes.jsonl").read_text().splitlines()]
    skipped = (run_dir / "skipped_batches.jsonl").read_text().splitlines()
    assert 1 <= [s["action"] for s in spikes].count("rewind") == len(skipped) <= 2
    window = json.loads((run_dir / "checkpoints" / "step_00000009" / "complete.json").read_text())
    assert len(window["callbacks"]["SpikeDetector"]["losses"]) == 4

    model_file = run_dir / "checkpoints" / "step_00000012" / "mp_rank_00_model_states.pt"
    data = bytearray(model_file.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size: only the hash tells
    model_file.write_bytes(bytes(data))
    code, err = finish(start(common))
    assert code == 0, err[-3000:]
    assert "step_00000012 is damaged" in err and "step_00000009 at step 9" in err
    assert (run_dir / "checkpoints" / "damaged_step_00000012").exists()
    assert_bitwise(weights(run_dir, 12), final)  # steps 10-12 trained again, exactly
    again = [json.loads(line) for line in (run_dir / "spikes.jsonl").read_text().splitlines()]
    assert again[len(spikes):] == [s for s in spikes if s["step"] > 9]
    assert (run_dir / "skipped_batches.jsonl").read_text().splitlines() == skipped


@pytest.mark.slow
def test_non_finite_steps_are_skipped_then_the_run_halts_keeping_the_last_good_checkpoint(
        tmp_path, corpus, small_tokenizer):
    run_dir = tmp_path / "run"
    overrides = args(run_dir, corpus, small_tokenizer, tmp_path / "cache") + [
        "optim.lr=1e3", "optim.min_lr=0", "optim.warmup_steps=0", "checkpoint_every=1",
        "checkpoint_keep=1", "guard.max_nonfinite_steps=3", "max_steps=40"]
    code, err = finish(start(overrides))
    assert code == 3 and "Traceback" not in err
    assert "non-finite loss or gradient norm at 3 steps in a row" in err
    metrics = [r for r in rows(run_dir) if "loss" in r]
    skipped = [r["step"] for r in metrics if r["skipped"]]
    assert len(skipped) >= 3 and skipped[-3:] == list(range(skipped[-1] - 2, skipped[-1] + 1))
    tags = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert len(tags) == 1  # keep=1, and a skipped step never replaced it
    saved = int(tags[0].split("_")[1])
    assert saved < skipped[-3] and saved not in skipped
    assert f"The newest checkpoint {tags[0]}" in err


@pytest.mark.slow
def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path, corpus,
                                                               small_tokenizer):
    """The run directory on a 900 KiB file system: two checkpoints (~370 KiB each) fit, the
    third does not. The failed save is removed, the previous checkpoint stays complete."""
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=900K", "tmpfs", str(small)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        run_dir = small / "run"
        code, err = finish(start(args(run_dir, corpus, small_tokenizer, tmp_path / "cache", 12)
                                 + ["checkpoint_every=3", "eval_batches=0"]))
        assert code == 3 and "Traceback" not in err
        assert "writing" in err and "step_00000009 failed" in err and "free there" in err
        assert "step_00000006 is intact" in err
        tags = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
        assert tags == ["step_00000003", "step_00000006"]
        assert (run_dir / "checkpoints" / "step_00000006" / "complete.json").exists()
    finally:
        subprocess.run(["umount", str(small)], check=True)
