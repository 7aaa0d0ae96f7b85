"""The user's verbs after training: ``python -m fbi export|eval|generate|lm-eval|report``
(also the ``fbi`` console script of ``pip install .``).

    python -m fbi export runs/demo --format packed --out exports/demo-packed
    python -m fbi export runs/demo --format hf --out exports/demo-hf
    python -m fbi eval runs/demo --text data/wikitext-2/test.txt --format wikitext --val runs/demo
    python -m fbi eval runs/demo --blimp data/blimp
    python -m fbi generate runs/demo --prompt "To be, or not to be"
    python -m fbi lm-eval --model fbi --model_args path=runs/demo --tasks ... --include_path DIR
    python -m fbi report runs/a runs/b --out report.png

MODEL (export, eval, generate) is a run directory (its newest complete checkpoint, any ZeRO
stage and world size; ``--tag`` picks another), a packed export, or a Hugging Face
checkpoint (eval and generate only; e.g. the teacher).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("fbi")


def export(args) -> dict:
    from fbi.trained import load

    trained = load(args.model, args.tag)
    if args.format == "packed":
        from fbi.export.packed import export_packed

        sizes = export_packed(trained, args.out, args.fp_dtype)
        log.info("packed %s: %.3f bits per binarized weight (%d of them); whole model %.2f MB "
                 "vs %.2f MB in bf16", args.out, sizes["bits_per_binarized_weight"] or 0,
                 sizes["binarized_weights"], sizes["file_bytes"] / 1e6, sizes["bf16_bytes"] / 1e6)
        return {"format": "packed", "out": str(args.out), **sizes,
                "size_vs_bf16": sizes["file_bytes"] / sizes["bf16_bytes"],
                "binarized_size_vs_bf16": (sizes["binarized_bytes"] / sizes["binarized_bf16_bytes"]
                                           if sizes["binarized_weights"] else None)}
    from fbi.export.hf import export_hf

    return {"format": "hf", "out": str(export_hf(trained, args.out, args.dtype))}


def evaluate(args) -> dict:
    from fbi.trained import load

    if not (args.text or args.val or args.blimp):
        raise SystemExit("eval: name something to measure: --text FILE, --val RUN_DIR or --blimp DIR")
    trained = load(args.model, args.tag)
    trained.model.to(args.device)
    result: dict = {"model": str(args.model)}
    if args.text:
        from fbi.eval.perplexity import read_text, text_perplexity

        context = args.context or trained.max_length
        for path in args.text:
            result[f"ppl/{Path(path).name}"] = text_perplexity(
                trained, read_text(path, args.format), context, args.stride or context, args.device,
                args.max_tokens)
    if args.val:
        from fbi.eval.perplexity import perplexity
        from fbi.trained import run_val_split

        data, cfg = run_val_split(args.val)
        batches = cfg.eval_batches if args.val_batches is None else args.val_batches
        result["val_ppl"] = perplexity(trained.logits, data, batches, cfg.micro_batch_size,
                                       0, 1, args.device)
    if args.blimp:
        from fbi.eval.blimp import blimp_accuracy, read_pairs

        result["blimp"] = blimp_accuracy(trained.logits, trained.tokenizer, trained.start_id,
                                         read_pairs(args.blimp), args.batch_size, args.device)
    return result


def generate(args) -> dict:
    from fbi.generate import generate as sample
    from fbi.trained import load

    trained = load(args.model, args.tag)
    trained.model.to(args.device)
    samples = [sample(trained, args.prompt, args.max_new_tokens, temperature=args.temperature,
                      top_k=args.top_k, seed=args.seed + i, device=args.device)
               for i in range(args.samples)]
    for text in samples:
        print(args.prompt + text, end="\n\n", file=sys.stderr)
    return {"prompt": args.prompt, "samples": samples}


def lm_eval(argv: list[str]) -> None:
    import fbi.eval.harness  # noqa: F401  (registers --model fbi)
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *argv]
    cli_evaluate()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fbi", description=__doc__.split("\n")[0])
    verbs = p.add_subparsers(dest="verb", required=True)

    def verb(name, fn, help_text):
        sub = verbs.add_parser(name, help=help_text)
        sub.set_defaults(fn=fn)
        sub.add_argument("model", type=Path, help="run directory, packed export or HF checkpoint")
        sub.add_argument("--tag", default=None, help="checkpoint of a run directory (default: newest)")
        return sub

    e = verb("export", export, "packed 1-bit or Hugging Face checkpoint")
    e.add_argument("--format", choices=("packed", "hf"), required=True)
    e.add_argument("--out", type=Path, required=True)
    e.add_argument("--fp-dtype", default="float32",
                   help="packed: storage of the full-precision parts (float32 keeps logits bit-identical)")
    e.add_argument("--dtype", default="float32", help="hf: weight dtype (float32, bfloat16, float16)")

    v = verb("eval", evaluate, "perplexity on text files / a run's held-out split, BLiMP")
    v.add_argument("--text", nargs="*", default=[], help="local text files")
    v.add_argument("--format", default="plain", help="plain | wikitext (lines joined by blank lines)")
    v.add_argument("--context", type=int, default=None, help="window length (default: the model's)")
    v.add_argument("--stride", type=int, default=None, help="window step (default: --context)")
    v.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens")
    v.add_argument("--val", type=Path, default=None, help="a run directory: its held-out split")
    v.add_argument("--val-batches", type=int, default=None, help="default: the run's eval_batches")
    v.add_argument("--blimp", nargs="*", default=[], help="jsonl files or folders of minimal pairs")
    v.add_argument("--batch-size", type=int, default=16)
    v.add_argument("--device", default="cpu")

    g = verb("generate", generate, "samples from a prompt")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    g.add_argument("--top-k", type=int, default=50)
    g.add_argument("--samples", type=int, default=1)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cpu")

    verbs.add_parser("lm-eval", help="lm-eval's own command line with --model fbi registered",
                     add_help=False)
    verbs.add_parser("report", help="summary and plots of run directories (fbi.report)",
                     add_help=False)
    return p


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        stream=sys.stderr)
    if argv[:1] == ["lm-eval"]:
        return lm_eval(argv[1:])
    if argv[:1] == ["report"]:
        from fbi.report import main as report

        return report(argv[1:])
    args = parser().parse_args(argv)
    stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # libraries' prints; stdout is the JSON result
        result = args.fn(args)
    print(json.dumps(result, indent=1), file=stdout)


if __name__ == "__main__":
    main()
