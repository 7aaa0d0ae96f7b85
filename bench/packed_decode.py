"""Whole models on the packed kernels against the same models' dense fp32 and bf16 paths.

    python bench/packed_decode.py [--models fbi_130m,fbi_1p3b,bimamba_780m] [--decode 16]
                                  [--prefill 512] [--repeats 3] [--threads 2] [--json FILE]

Each model (``conf/model/NAME``, scheme fbi, vocab 32,000, random weights) is exported packed
(full-precision parts in bf16, the export's default, as models ship) to a temporary folder,
then each path runs in its own process, as ``python -m fbi generate`` would hold it: ``packed``
(``--kernel packed``: the packed layers, the head and embeddings as stored, inside the
transformers twin), ``fp32`` (``--kernel dense``: everything unpacked or widened to fp32,
folded into the twin) and ``bf16`` (that twin in bf16). Per path: decode tokens/s at batch 1
(greedy, with the key-value cache or Mamba-2's state, after an 8-token prompt; the best of
``--repeats`` runs), prefill tokens/s of one ``--prefill``-token forward, peak RSS, and the
largest error of its logits relative to the fp32 path's (over a 64-token text). ``--json FILE``
writes the rows.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from fbi.configure import compose  # noqa: E402

PATHS = ("packed", "fp32", "bf16")
VOCAB = 32000


def tiny_tokenizer(directory: Path) -> Path:
    """A two-token tokenizer: the export needs one, the bench feeds random ids."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<eos>": 0, "a": 1}, unk_token="a"))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(directory)
    return directory


def export(model_name: str, out: Path, max_length: int) -> None:
    from fbi.data.tokenizer import load_tokenizer
    from fbi.export.packed import export_packed
    from fbi.lm import Trained
    from fbi.models import build_model

    cfg = compose([f"model={model_name}", "scheme=fbi", "experiment=none", "max_steps=1",
                   f"model.vocab_size={VOCAB}"])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.scheme, cfg.scheme.binarize).eval()
    tokenizer = load_tokenizer(str(tiny_tokenizer(out.parent / "tokenizer")))
    export_packed(Trained(model, model, tokenizer, 0, max_length, model_name, cfg.model, cfg.scheme),
                  out)


def child(args) -> None:
    """One path in this process: its figures as one JSON line, its logits to a file."""
    from fbi.generate import cached_model
    from fbi.trained import load

    torch.set_num_threads(args.threads)
    trained = load(args.child, kernel="packed" if args.path == "packed" else "dense")
    model = cached_model(trained)
    if args.path == "bf16":
        model = model.to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    text = torch.randint(1, VOCAB, (1, 64), generator=g)
    long = torch.randint(1, VOCAB, (1, args.prefill), generator=g)
    with torch.no_grad():
        torch.save(model(text).logits.float(), Path(args.child) / f"logits_{args.path}.pt")
        model(long[:, :32], use_cache=False)  # warm up (kernel load, allocator)
        start = time.perf_counter()
        model(long, use_cache=False)
        prefill = args.prefill / (time.perf_counter() - start)
        prompt = long[:, :8]
        # no end-of-text token, so every run decodes all its tokens without min_new_tokens,
        # whose processor's arange and isin over the vocabulary (0.7 ms a token) are not the model's
        model.generation_config.eos_token_id = None
        model.generate(prompt, max_new_tokens=2, do_sample=False, pad_token_id=0)
        decode = 0.0
        for _ in range(args.repeats):  # the best run: the least disturbed by the rest of the machine
            start = time.perf_counter()
            out = model.generate(prompt, max_new_tokens=args.decode, do_sample=False, pad_token_id=0)
            decode = max(decode, (out.shape[1] - 8) / (time.perf_counter() - start))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
    print(json.dumps({"decode_tokens_per_s": decode, "prefill_tokens_per_s": prefill,
                      "peak_rss_mb": rss}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="fbi_130m,fbi_1p3b,bimamba_780m")
    parser.add_argument("--decode", type=int, default=16)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3, help="decode runs a path; the best counts")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--path", choices=PATHS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--export", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.export:
        return export(args.export, Path(args.child), max(2048, args.prefill))
    if args.child:
        return child(args)
    rows = []
    print(f"{args.threads} threads; decode: {args.decode} tokens after 8, prefill: {args.prefill}")
    print(f"{'model':>14} {'path':>7} {'decode tok/s':>13} {'prefill tok/s':>14} "
          f"{'peak RSS MB':>12} {'max rel logit err':>18}")
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "packed"
            # in its own process too: the parent holding the built model (5 GB at fbi_1p3b)
            # beside the fp32 path's child would count against the machine, not the path
            subprocess.run([sys.executable, __file__, "--export", name, "--child", str(out),
                            "--prefill", str(args.prefill)], check=True)
            for path in PATHS:
                proc = subprocess.run(
                    [sys.executable, __file__, "--child", str(out), "--path", path,
                     "--decode", str(args.decode), "--prefill", str(args.prefill),
                     "--repeats", str(args.repeats), "--threads", str(args.threads)],
                    capture_output=True, text=True, check=True)
                rows.append({"model": name, "path": path,
                             **json.loads(proc.stdout.strip().splitlines()[-1])})
            want = torch.load(out / "logits_fp32.pt")
            for row in rows[-3:]:
                got = torch.load(out / f"logits_{row['path']}.pt")
                row["max_rel_logit_err"] = float((got - want).abs().max() / want.abs().max())
                print(f"{name:>14} {row['path']:>7} {row['decode_tokens_per_s']:13.2f} "
                      f"{row['prefill_tokens_per_s']:14.1f} {row['peak_rss_mb']:12.0f} "
                      f"{row['max_rel_logit_err']:18.2e}", flush=True)
            fp32 = rows[-2]
            for row in (rows[-3], rows[-1]):
                print(f"{'':>14} {row['path'] + '/fp32':>7}: decode x"
                      f"{row['decode_tokens_per_s'] / fp32['decode_tokens_per_s']:.2f}, prefill x"
                      f"{row['prefill_tokens_per_s'] / fp32['prefill_tokens_per_s']:.2f}, RSS x"
                      f"{row['peak_rss_mb'] / fp32['peak_rss_mb']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
