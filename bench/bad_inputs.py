"""Bad input through train.py, as a user types it: time to the refusal and files left behind.

    python bench/bad_inputs.py [--teacher PATH]

Each case runs ``python train.py experiment=none max_steps=4 teacher=none ...`` plus its
overrides in an empty folder (run_dir and cache_dir inside it) and prints: the exit code
(2: refused), seconds until the process ended, the first line of the message, whether a
traceback was printed, and how many files the attempt created (goal: 0). Cases that need the
real teacher use ``--teacher`` (default: the demo's SmolLM2 under ~/.cache/fbi; run the demo
once first).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cases(tmp: Path, teacher: Path) -> list[tuple[str, list[str]]]:
    (tmp / "bert").mkdir()
    (tmp / "bert" / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    (tmp / "binary").mkdir()
    (tmp / "binary" / "a.txt").write_bytes(b"text\n" + bytes(range(256)))
    (tmp / "shards").mkdir()
    (tmp / "shards" / "manifest.json").write_text("{not json")
    (tmp / "a_file").write_text("")
    (tmp / "one").mkdir()
    (tmp / "one" / "doc.txt").write_text((REPO / "README.md").read_text())
    return [
        ("batch not divisible", ["global_batch_size=6", "micro_batch_size=4"]),
        ("fp16 on a CPU", ["precision=fp16", "distributed.device=cpu"]),
        ("resume=true, no checkpoint", ["resume=true"]),
        ("negative learning rate", ["optim.lr=-1"]),
        ("temperature 0", ["distill.temperature=0"]),
        ("ZeRO stage 4", ["zero.stage=4"]),
        ("unknown scheme", ["scheme=bitnet2"]),
        ("another scheme's option", ["scheme=fbi", "scheme.salient_fraction=0.2"]),
        ("another architecture's field", ["model.d_state=16"]),
        ("1-bit route off ZeRO-3", ["zero.gather_signs=true"]),
        ("1-bit route, scheme reads |W|", ["zero=stage3", "zero.gather_signs=true",
                                           "scheme=bitnet"]),
        ("unknown top-level field", ["learning_rate=3e-4"]),
        ("model without its recipe", ["~experiment", "model=fbi_130m"]),
        ("missing BLiMP folder", ["eval_blimp=[/nonexistent/blimp]"]),
        ("run_dir is a file", [f"run_dir={tmp / 'a_file'}"]),
        ("teacher path missing", ["teacher=hf", "teacher.path=/nonexistent/teacher"]),
        ("teacher not a causal LM", ["teacher=hf", f"teacher.path={tmp / 'bert'}"]),
        ("seq_len beyond the teacher", ["teacher=hf", f"teacher.path={teacher}",
                                        "data.seq_len=9000"]),
        ("data.files match nothing", ["data=files", "data.files=[/nonexistent/*.txt]"]),
        ("data.files of two kinds", ["data=files", f"data.files=[{REPO}/README.md,{REPO}/requirements.txt]"]),
        ("binary file named .txt", ["data=files", f"data.files=[{tmp / 'binary'}/*.txt]"]),
        ("one document only", ["data=files", f"data.files=[{tmp / 'one'}/doc.txt]", "teacher=hf",
                               f"teacher.path={teacher}"]),
        ("vocabulary below the characters", ["data=files", f"data.files=[{tmp / 'one'}/doc.txt]",
                                             "tokenizer.vocab_size=40"]),
        ("garbage shard manifest", ["data=shards", f"data.shards_dir={tmp / 'shards'}",
                                    "teacher=hf", f"teacher.path={teacher}"]),
    ]


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", type=Path,
                        default=Path("~/.cache/fbi/teachers/smollm2-135m-instruct").expanduser())
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    print(f"{'case':<34}{'exit':>5}{'seconds':>9}{'traceback':>11}{'files':>7}  message")
    with tempfile.TemporaryDirectory() as root:
        tmp = Path(root)
        for i, (name, overrides) in enumerate(cases(tmp, args.teacher)):
            work = tmp / f"case{i}"  # a plain name: Hydra would parse quotes, commas, "="
            work.mkdir()
            base = ["experiment=none", "max_steps=4", "teacher=none", f"run_dir={work / 'run'}",
                    f"cache_dir={work / 'cache'}"]
            if "~experiment" in overrides:  # the default experiment (demo), as a user gets it
                base = base[1:]
                overrides = [o for o in overrides if o != "~experiment"]
            before = files_under(tmp)
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, str(REPO / "train.py"), *base, *overrides],
                                  cwd=work, env=env, capture_output=True, text=True, timeout=600)
            seconds = time.perf_counter() - start
            created = len(files_under(tmp) - before)
            lines = [ln for ln in proc.stderr.splitlines()
                     if ln.strip() and not ln.startswith("[") and " INFO " not in ln]
            errors = [ln for ln in lines if " ERROR " in ln]  # fbi's refusals; else Hydra's
            message = (errors or lines or ["(no message)"])[0].split(": ", 1)[-1]
            print(f"{name:<34}{proc.returncode:>5}{seconds:>9.1f}"
                  f"{'yes' if 'Traceback' in proc.stderr else 'no':>11}{created:>7}  "
                  f"{message[:110]}", flush=True)


if __name__ == "__main__":
    main()
