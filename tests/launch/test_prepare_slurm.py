"""launch/slurm/prepare_data.sbatch on a real SLURM cluster (two slurmd nodes on this
machine): an array of 2 tasks writes the same shards as one worker in-process."""

from __future__ import annotations

import json
import sys

import pytest

from fbi.config import DataConfig
from fbi.data.prepare import prepare, source_key
from fbi.data.tokenizer import load_tokenizer
from fbi_testing import REPO, wikitext_lines

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def test_an_array_of_two_tasks_writes_the_shards_of_one_worker(slurm, tmp_path, tokenizer_dir):
    src = tmp_path / "corpus"
    src.mkdir()
    lines = wikitext_lines(100_000)
    for f in range(4):  # 4 files of 40 one-line-group documents
        rows = ["\n".join(lines[i::160]) for i in range(f * 40, f * 40 + 40)]
        (src / f"part{f}.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    tok = load_tokenizer(str(tokenizer_dir))
    cfg = DataConfig(name="files", corpus=None, files=[f"{src}/*.jsonl"], shard_tokens=5000)
    prepare(cfg, tok, tmp_path / "one", tmp_path, source_key(cfg, tok, tmp_path))
    job = slurm.sbatch(
        "--partition=debug", "--array=0-1", "--cpus-per-task=1", "--time=10",
        f"--output={tmp_path}/%x-%A_%a.out", str(REPO / "launch" / "slurm" / "prepare_data.sbatch"),
        "teacher=none", f"tokenizer.path={tokenizer_dir}", "data=files",
        f"data.files=[{src}/*.jsonl]", "data.shard_tokens=5000", f"data.shards_dir={tmp_path / 'two'}",
        f"cache_dir={tmp_path / 'cache'}", cwd=REPO,
        env={"PYTHON": sys.executable, "LOG_DIR": str(tmp_path / "logs"), "PYTHONPATH": str(REPO)})
    for task in (0, 1):
        info = slurm.wait(f"{job}_{task}", timeout=300)
        logs = "\n".join(p.read_text() for p in tmp_path.glob("*.out"))
        assert info["JobState"] == "COMPLETED", logs[-3000:] + slurm.logs()
    summaries = [json.loads((tmp_path / "logs" / f"worker-{w}.json").read_text()) for w in (0, 1)]
    assert [s["files"] for s in summaries] == [2, 2] and all(s["workers"] == 2 for s in summaries)
    one, two = (sorted((p.name, p.read_bytes()) for p in (tmp_path / d).iterdir() if p.is_file())
                for d in ("one", "two"))
    assert len(one) > 10 and one == two
