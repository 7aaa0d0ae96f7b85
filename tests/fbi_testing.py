"""Test helpers: a real corpus slice, a real BPE tokenizer, a tiny real teacher, train.py.

Everything is built here from the repository's own data (``data/wikitext-2``) and the
installed libraries; nothing comes from a hub or from outside the clone.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from fbi.distributed import free_port

REPO = Path(__file__).resolve().parents[1]
WIKITEXT = REPO / "data" / "wikitext-2"
# DeepSpeed's gloo backend JIT-compiles its shared-memory comm op on the first process-group
# start (about 70 CPU-seconds), caching it under a name alone, with this checkout's paths in
# its flags: every train.py the suite starts shares this checkout's own cache (conftest sets
# it), so the op is built once per checkout, not once per cache directory in use, and
# checkouts side by side do not rebuild each other's.
TORCH_EXTENSIONS = Path(tempfile.gettempdir()) / f"fbi-torch-ext-{hashlib.sha1(bytes(REPO)).hexdigest()[:8]}"


def wikitext_lines(n_chars: int, split: str = "valid") -> list[str]:
    text = (WIKITEXT / f"{split}.txt").read_text()[:n_chars]
    return [line for line in text.splitlines() if line.strip()]


def make_tokenizer(directory: Path, vocab_size: int, lines: list[str]) -> Path:
    """A byte-level BPE tokenizer trained on ``lines``, saved as a transformers folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(lines, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(directory)
    return directory


def make_teacher(directory: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A tiny ``LlamaForCausalLM`` with the tokenizer beside it, via save_pretrained."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        eos_token_id=tok.eos_token_id,
        initializer_range=0.3,  # peaked next-token distributions: something to learn
    )
    LlamaForCausalLM(cfg).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def run_train(overrides: list[str], cwd: Path = REPO, nproc: int = 1, timeout: int = 600,
              check: bool = True, script: Path = REPO / "train.py",
              launcher: str = "torchrun") -> subprocess.CompletedProcess:
    """``python train.py`` as a user starts it; with ``nproc`` > 1, under torchrun or the
    deepspeed launcher (gloo on CPU)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": str(REPO)}
    if nproc == 1:
        cmd = [sys.executable, str(script)]
    elif launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(nproc), str(script)]
    else:  # Hydra refuses --local_rank, hence --no_local_rank; --num_gpus counts processes
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(nproc),
               "--master_port", str(free_port()), "--no_local_rank", str(script)]
    proc = subprocess.run(cmd + overrides, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def read_steps(run_dir: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl that log a training step."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if "loss" in json.loads(line)]


def held_by_rank0(log: str, module: str = "student") -> tuple[int, int]:
    """(elements rank 0 keeps, elements in all) of ``module``, from train.py's start-up log."""
    held, total = re.search(rf"(\d+) of (\d+) {module} parameters", log).groups()
    return int(held), int(total)
