"""Which checkpoint a run resumes from: the newest complete one, never a cut-off save."""

import json

import pytest

from fbi.checkpoint import (
    COMPLETE, checkpoints_dir, complete_tags, needs_universal, resume_target,
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
