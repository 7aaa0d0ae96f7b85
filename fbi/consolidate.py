"""A checkpoint of any ZeRO stage -> one fp32 state dict that the fbi model loads.

    python -m fbi.consolidate runs/demo [--tag step_00000200] --out student.pt
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from fbi.checkpoint import checkpoints_dir, complete_tags


def consolidate(run_dir: Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    run_dir = Path(run_dir)
    tags = complete_tags(run_dir)
    if not tags:
        raise FileNotFoundError(f"run_dir: {checkpoints_dir(run_dir)} has no complete checkpoint")
    tag = tag or tags[-1]
    folder = checkpoints_dir(run_dir) / tag
    if not (folder / "complete.json").exists():
        raise FileNotFoundError(f"--tag: {folder} is not a complete checkpoint; choose from {tags}")
    if any(folder.glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoints_dir(run_dir)), tag=tag)
    else:  # stage 0: rank 0 wrote the whole model
        state = torch.load(folder / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    return {k: v.float() for k, v in state.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--tag", default=None, help="checkpoint folder; default: the newest")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.save(consolidate(args.run_dir, args.tag), args.out)


if __name__ == "__main__":
    main()
