"""Hydra entry point: compose the config, validate it, hand it to fbi.loop.

    python train.py experiment=demo
    torchrun --nproc_per_node 8 train.py experiment=fbi_130m teacher.path=... zero=stage3
"""

import logging
import os
import sys

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fbi.callbacks import TrainingHalted
from fbi.checkpoint import CheckpointError
from fbi.config import check_experiment, register
from fbi.configure import validate
from fbi.distributed import LaunchError, detect
from fbi.loop import train
from fbi.process_exit import leave, run_and_exit
from fbi.refusal import refusals

register()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    rank = detect(os.environ).rank  # torchrun, deepspeed or plain srun
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
    )
    if rank != 0 or not sys.stderr.isatty():  # progress bars only on an interactive rank 0
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    hydra_cfg = HydraConfig.get()
    # A refusal (exit 2) or a halt (exit 3) explains itself; its traceback only with FBI_DEBUG=1.
    with refusals(None, also=(LaunchError,), halts=(CheckpointError, TrainingHalted),
                  say=logging.getLogger("fbi").error, exit=leave):
        check_experiment(Path(__file__).parent / "conf", dict(hydra_cfg.runtime.choices),
                         list(hydra_cfg.overrides.task))
        train(validate(cfg))


if __name__ == "__main__":
    # The run is complete when main returns (checkpoint written, logs closed, process group
    # destroyed): leave without the interpreter's teardown, which DeepSpeed's threads can abort.
    run_and_exit(main)
