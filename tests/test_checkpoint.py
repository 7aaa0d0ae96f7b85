"""Which checkpoint a run resumes from: the newest complete one, never a cut-off save."""

import json

import pytest

from fbi.checkpoint import (
    COMPLETE, CheckpointError, check_space, checkpoints_dir, complete_tags, needs_universal,
    resume_target,
)
from fbi.config import ConfigError, TrainConfig



def make(run_dir, step, complete=True, world_size=2):
    folder = checkpoints_dir(run_dir) / f"step_{step:08d}"
    folder.mkdir(parents=True)
    if complete:
        (folder / COMPLETE).write_text(json.dumps({"step": step, "consumed": 8 * step,
                                                   "world_size": world_size}))


def test_newest_complete_checkpoint_wins_and_cut_off_saves_are_ignored(tmp_path):
    make(tmp_path, 2)
    make(tmp_path, 10)
    make(tmp_path, 12, complete=False)  # the process died while saving step 12
    assert complete_tags(tmp_path) == ["step_00000002", "step_00000010"]
    assert resume_target(TrainConfig(max_steps=10, resume="auto"), tmp_path) == "step_00000010"
    assert resume_target(TrainConfig(max_steps=10, resume="true"), tmp_path) == "step_00000010"
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        resume_target(TrainConfig(max_steps=10, resume="false"), tmp_path)


def test_resume_true_without_checkpoint_is_refused(tmp_path):
    make(tmp_path, 4, complete=False)
    assert resume_target(TrainConfig(max_steps=10, resume="auto"), tmp_path) is None
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        resume_target(TrainConfig(max_steps=10, resume="true"), tmp_path)


def test_universal_conversion_only_for_partitioned_state_on_a_new_world_size(tmp_path):
    make(tmp_path, 2, world_size=2)
    assert needs_universal(tmp_path, "step_00000002", world_size=1, zero_stage=1)
    assert not needs_universal(tmp_path, "step_00000002", world_size=2, zero_stage=3)
    assert not needs_universal(tmp_path, "step_00000002", world_size=1, zero_stage=0)


def write_listed(run_dir, step, payload=b"x" * 1000):
    """A checkpoint folder with one data file, listed in complete.json as save() lists it."""
    import hashlib

    folder = checkpoints_dir(run_dir) / f"step_{step:08d}"
    folder.mkdir(parents=True)
    (folder / "model.pt").write_bytes(payload)
    (folder / COMPLETE).write_text(json.dumps({
        "step": step, "consumed": 8 * step, "world_size": 1,
        "files": {"model.pt": {"size": len(payload),
                               "sha256": hashlib.sha256(payload).hexdigest()}}}))
    return folder


@pytest.mark.parametrize("harm, says", [
    (lambda f: f.write_bytes(f.read_bytes()[:500]), "has 500 bytes, 1000 were written"),
    (lambda f: f.write_bytes(b"y" + f.read_bytes()[1:]), "does not match its sha256"),
    (lambda f: f.unlink(), "model.pt is missing"),
    (lambda f: (f.parent / COMPLETE).write_text('{"step": 4, "consum'), "unreadable"),
])
def test_a_damaged_newest_checkpoint_is_set_aside_for_the_previous_one(tmp_path, caplog,
                                                                       harm, says):
    from fbi.checkpoint import choose_resume, damage

    write_listed(tmp_path, 2)
    newest = write_listed(tmp_path, 4)
    assert damage(tmp_path, "step_00000004", 0, 1) is None
    harm(newest / "model.pt")
    assert says in damage(tmp_path, "step_00000004", 0, 1)
    cfg = TrainConfig(max_steps=10, resume="auto")
    assert choose_resume(cfg, tmp_path, 0, 1) == "step_00000002"
    assert "step_00000004 is damaged" in caplog.text
    assert (checkpoints_dir(tmp_path) / "damaged_step_00000004").exists()
    assert complete_tags(tmp_path) == ["step_00000002"]


def test_retention_keeps_newest_and_every_mth_and_removes_cut_off_folders(tmp_path):
    from fbi.checkpoint import retain

    for step in (2, 4, 6, 8, 10):
        make(tmp_path, step)
    make(tmp_path, 7, complete=False)  # a save cut off before step 8's
    make(tmp_path, 12, complete=False)  # being written now: newer than any complete one
    retain(tmp_path, keep=2, keep_every=4)
    left = sorted(p.name for p in checkpoints_dir(tmp_path).iterdir())
    assert left == ["step_00000004", "step_00000008", "step_00000010", "step_00000012"]


def test_max_steps_below_the_resumed_step_is_refused(tmp_path):
    make(tmp_path, 10)
    with pytest.raises(ConfigError, match="max_steps: 8 is below the step 10"):
        resume_target(TrainConfig(max_steps=8, resume="auto"), tmp_path)


def test_a_run_that_cannot_fit_one_checkpoint_is_refused_before_training(tmp_path):
    import shutil

    free = shutil.disk_usage(tmp_path).free
    check_space(tmp_path / "run", free // 2)  # fits
    with pytest.raises(CheckpointError, match="free, and one checkpoint of this run takes"):
        check_space(tmp_path / "run", free)  # needs 10% headroom beside the previous one


@pytest.mark.slow
def test_train_py_refuses_another_experiments_checkpoint_and_resumes_its_own(
        tmp_path, tiny_run):
    """Two experiments sharing one run_dir (every default SLURM submission did): the second
    is refused naming the fields that differ, before it touches the folder; the first one's
    own resume may change the resumable fields (steps, micro-batch, logging)."""
    from fbi_testing import read_steps, run_train

    run = tmp_path / "run"
    args = tiny_run + [f"run_dir={run}", "checkpoint_every=1"]
    run_train(args + ["max_steps=1"])
    before = sorted(p.name for p in run.rglob("*"))
    other = run_train(args + ["max_steps=2", "optim.lr=1e-3", "seed=1"], check=False)
    assert other.returncode == 2, other.stderr[-3000:]
    assert ("holds checkpoints of another experiment: optim.lr=0.003 (now 0.001), "
            "seed=0 (now 1)") in other.stderr
    assert sorted(p.name for p in run.rglob("*")) == before
    own = run_train(args + ["max_steps=2", "micro_batch_size=2", "logging.log_every=2"])
    assert "resumed from" in own.stderr
    assert [r["step"] for r in read_steps(run)] == [1, 2]
