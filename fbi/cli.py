"""The user's verbs after training: ``python -m fbi export|eval|generate|lm-eval|report``
(also the ``fbi`` console script of ``pip install .``).

    python -m fbi export runs/demo --format packed --out exports/demo-packed
    python -m fbi export runs/demo --format hf --out exports/demo-hf
    python -m fbi eval runs/demo --text data/wikitext-2/test.txt --format wikitext --val runs/demo
    python -m fbi eval runs/demo --blimp data/blimp
    python -m fbi generate runs/demo --prompt "To be, or not to be"
    python -m fbi lm-eval --model fbi --model_args path=runs/demo --tasks ... --include_path DIR
    python -m fbi report runs/a runs/b --out report.png
    python -m fbi data prepare|verify|convert ...    (token shards: fbi.data.cli)

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

from fbi.config import ConfigError
from fbi.refusal import refusals

log = logging.getLogger("fbi")


def check(args) -> None:
    """Refuse (ValueError naming the argument and the fix) what would fail after loading:
    nothing large is read and nothing is written before this passes."""
    import torch

    from fbi.trained import find

    found = find(args.model, args.tag)
    if getattr(args, "kernel", None) == "packed" and found.kind != "packed":
        raise ValueError(f"--kernel packed: {args.model} is a {found.kind} model, not a packed "
                         "export; export it with --format packed first, or leave --kernel out")
    device = getattr(args, "device", "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device: {device}, but this machine has no CUDA device; use --device cpu")
    for name in ("context", "stride", "max_tokens", "val_batches", "batch_size", "samples",
                 "max_new_tokens"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag}: got {value}; give a positive number, or leave {flag} out "
                             "for its default")
    if args.verb == "export":
        check_export(args, found)
    elif args.verb == "eval":
        check_eval(args, found)
    elif args.temperature < 0 or args.top_k < 0:
        raise ConfigError(f"--temperature {args.temperature} --top-k {args.top_k}: choose a "
                         "temperature of 0 (greedy) or more and a top-k of 0 (all tokens) or more")


def check_export(args, found) -> None:
    from fbi.binarize import SCHEMES
    from fbi.export.packed import DTYPES
    from fbi.export.target import check_out

    for flag, value in (("--fp-dtype", args.fp_dtype), ("--dtype", args.dtype)):
        if value not in DTYPES:
            raise ConfigError(f"{flag}: got {value!r}; choose one of {', '.join(DTYPES)}")
    check_out(args.out, args.format, args.model)
    if found.kind == "hf":
        raise ConfigError(f"MODEL: {args.model} is a Hugging Face checkpoint, not an fbi model; "
                         "export a run directory or a packed export")
    reason = SCHEMES[found.scheme].fold_refusal() if args.format == "hf" else None
    if reason:
        raise ConfigError(
            f"--format hf: scheme {found.scheme} {reason}, so its layers are not dense linear "
            "maps and a transformers checkpoint cannot compute the same function; export it "
            "with --format packed instead")


def check_eval(args, found) -> None:
    from fbi.data.readers import check_utf8
    from fbi.eval.blimp import read_pairs
    from fbi.eval.perplexity import TEXT_FORMATS

    if not (args.text or args.val or args.blimp):
        raise ConfigError("eval: name something to measure: --text FILE, --val RUN_DIR or "
                         "--blimp DIR")
    if args.format not in TEXT_FORMATS:
        raise ConfigError(f"--format: got {args.format!r}; choose one of {', '.join(TEXT_FORMATS)}")
    for path in args.text:
        if not Path(path).is_file():
            raise ConfigError(f"--text: {path} is not a file; give local text files")
        check_utf8(path, setting="--text")
        if not Path(path).read_text(encoding="utf-8").strip():
            raise ConfigError(f"--text: {path} holds no text (empty or only blank lines): "
                             "nothing to score; give a text file")
    for path in map(Path, args.blimp):
        if not (path.is_file() or (path.is_dir() and any(path.glob("*.jsonl")))):
            raise ConfigError(f"--blimp: {path} is neither a jsonl file nor a folder of them; "
                             "give data/blimp or jsonl files of minimal pairs")
    if args.blimp:
        read_pairs(args.blimp)
    if args.val is not None and not (args.val / "config.yaml").is_file():
        raise ConfigError(f"--val: {args.val} is not a run directory; give the run whose "
                         "held-out split to measure")
    context = args.context or found.max_length
    if args.stride is not None and context is not None and args.stride > context:
        raise ConfigError(f"--stride: {args.stride} is longer than the context ({context}); "
                         "choose a stride of at most --context")
    if args.context and found.max_length and args.context > found.max_length:
        log.warning("--context %d is longer than the %d tokens %s was trained on: positions "
                    "beyond them were never seen, expect a worse perplexity", args.context,
                    found.max_length, args.model)


def export(args) -> dict:
    from fbi.export.target import replacing
    from fbi.trained import load

    trained = load(args.model, args.tag)
    with replacing(args.out) as work:
        result = write_export(args, trained, work)
    return result


def write_export(args, trained, work: Path) -> dict:
    if args.format == "packed":
        from fbi.export.packed import export_packed

        sizes = export_packed(trained, work, args.fp_dtype, command(args))
        log.info("packed %s: %.3f bits per binarized weight (%d of them), full-precision parts "
                 "in %s; whole model %.2f MB vs %.2f MB in bf16 (%.3f)", args.out,
                 sizes["bits_per_binarized_weight"] or 0, sizes["binarized_weights"], args.fp_dtype,
                 sizes["file_bytes"] / 1e6, sizes["bf16_bytes"] / 1e6,
                 sizes["file_bytes"] / sizes["bf16_bytes"])
        return {"format": "packed", "out": str(args.out), **sizes,
                "size_vs_bf16": sizes["file_bytes"] / sizes["bf16_bytes"],
                "binarized_size_vs_bf16": (sizes["binarized_bytes"] / sizes["binarized_bf16_bytes"]
                                           if sizes["binarized_weights"] else None)}
    from fbi.export.hf import export_hf

    export_hf(trained, work, args.dtype, command(args))
    return {"format": "hf", "out": str(args.out)}


def command(args) -> str:
    """The export command line, for the model card."""
    tag = f" --tag {args.tag}" if args.tag else ""
    dtype = f"--fp-dtype {args.fp_dtype}" if args.format == "packed" else f"--dtype {args.dtype}"
    return (f"python -m fbi export {args.model}{tag} --format {args.format} {dtype} "
            f"--out {args.out}")


def evaluate(args) -> dict:
    from fbi.trained import load

    trained = load(args.model, args.tag, args.kernel)
    trained.model.to(args.device)
    result: dict = {"model": str(args.model)}
    if args.text:
        from fbi.eval.perplexity import read_text, text_perplexity

        context = args.context or trained.max_length
        for path in args.text:
            result[f"ppl/{Path(path).name}"] = text_perplexity(
                trained, read_text(path, args.format), context, args.stride or context, args.device,
                args.max_tokens, Path(path).name)
    if args.val:
        from fbi.eval.perplexity import perplexity
        from fbi.progress import Progress
        from fbi.trained import run_val_split

        data, cfg = run_val_split(args.val)
        batches = cfg.eval_batches if args.val_batches is None else args.val_batches
        with Progress(f"perplexity of {args.val}'s held-out split",
                      -(-min(data.num_samples, batches * cfg.micro_batch_size)
                        // cfg.micro_batch_size), "batches") as progress:
            result["val_ppl"] = perplexity(trained.logits, data, batches, cfg.micro_batch_size,
                                           0, 1, args.device, progress=progress)
    if args.blimp:
        from fbi.eval.blimp import blimp_accuracy, read_pairs

        result["blimp"] = blimp_accuracy(trained.logits, trained.tokenizer, trained.start_id,
                                         read_pairs(args.blimp), args.batch_size, args.device)
    return result


def generate(args) -> dict:
    from fbi.generate import cached_model
    from fbi.generate import generate as sample
    from fbi.trained import load

    trained = load(args.model, args.tag, args.kernel)
    trained.model.to(args.device)
    model = cached_model(trained)
    samples = [sample(trained, args.prompt, args.max_new_tokens, temperature=args.temperature,
                      top_k=args.top_k, seed=args.seed + i, device=args.device, model=model)
               for i in range(args.samples)]
    for text in samples:
        print(args.prompt + text, end="\n\n", file=sys.stderr)
    return {"prompt": args.prompt, "samples": samples}


def lm_eval(argv: list[str]) -> None:
    import fbi.eval.harness  # noqa: F401  (registers --model fbi)
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *argv]
    cli_evaluate()


def data(argv: list[str]) -> None:
    from fbi.configure import compose
    from fbi.data.cli import main as data_main
    from fbi.distill.teacher_checkpoint import resolve_path

    stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # libraries' prints; stdout is the JSON
        result = data_main(argv, compose, lambda cfg: resolve_path(cfg.teacher))
    print(json.dumps(result, indent=1), file=stdout)
    if result.get("ok") is False:
        raise SystemExit(1)


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
    e.add_argument("--fp-dtype", default="bfloat16",
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
    v.add_argument("--kernel", choices=("packed", "dense"), default=None,
                   help="packed export: packed (default: the 1-bit kernels, fbi.kernels) or dense (unpacked fp32)")

    g = verb("generate", generate, "samples from a prompt")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    g.add_argument("--top-k", type=int, default=50)
    g.add_argument("--samples", type=int, default=1)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cpu")
    g.add_argument("--kernel", choices=("packed", "dense"), default=None,
                   help="packed export: packed (default: the 1-bit kernels, fbi.kernels) or dense (unpacked fp32)")

    verbs.add_parser("lm-eval", help="lm-eval's own command line with --model fbi registered",
                     add_help=False)
    verbs.add_parser("report", help="summary and plots of run directories (fbi.report)",
                     add_help=False)
    verbs.add_parser("data", help="token shards: prepare, verify, convert (fbi.data.cli)",
                     add_help=False)
    return p


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        stream=sys.stderr)
    # The one boundary of every verb: an error an input can cause is refused in one
    # paragraph, exit 2, no traceback (fbi.refusal).
    with refusals(f"python -m fbi {argv[0]}" if argv else "python -m fbi"):
        run(argv)


def run(argv: list[str]) -> None:
    if argv[:1] == ["lm-eval"]:
        return lm_eval(argv[1:])
    if argv[:1] == ["data"]:
        return data(argv[1:])
    if argv[:1] == ["report"]:
        from fbi.report import main as report

        return report(argv[1:])
    args = parser().parse_args(argv)
    check(args)
    stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # libraries' prints; stdout is the JSON result
        result = args.fn(args)
    print(json.dumps(result, indent=1), file=stdout)


if __name__ == "__main__":
    main()
