"""The model card (``README.md``) written into every export: what the model is, how it was
trained and evaluated, and the command that wrote it, as the Hugging Face Hub shows it."""

from __future__ import annotations

import dataclasses

from fbi.lm import Trained
from fbi.models import architecture


def model_card(trained: Trained, sizes: dict, export_format: str, command: str | None = None,
               dtype: str = "float32") -> str:
    """Markdown with Hub metadata. ``sizes``: ``fbi.export.packed.packed_tensors``'s;
    ``export_format``: "hf" (folded dense weights) or "packed"; ``dtype``: the storage of the
    dense weights (hf) or of the full-precision parts (packed)."""
    arch = architecture(trained.model_cfg)
    cfg = dataclasses.asdict(trained.model_cfg)
    scheme = trained.scheme_cfg.name
    about = trained.provenance
    if sizes["binarized_weights"]:
        bits = (f"{sizes['binarized_weights']:,} weights of its linear layers binarized, "
                f"{sizes['bits_per_binarized_weight']:.3f} bits each when packed (signs and "
                "scales)")
    else:
        bits = "no binarized layers (full precision)"
    stored = {"hf": f"folded into dense {dtype} weights: the same function, at the dense size",
              "packed": "packed: signs 8 per byte; the full-precision parts (embeddings, norms, "
                        f"output head) in {dtype}"}
    title = {"hf": f"{arch.hf_class} folded from an fbi model trained with the {scheme} scheme",
             "packed": f"{arch.hf_class} with packed {scheme} layers"}
    teacher = about.get("teacher")
    teacher = "unknown" if teacher is None else (
        "none (cross-entropy on the data only)" if teacher == "none"
        else f"{about.get('teacher_path')} ({teacher}: distillation)")
    start = trained.start_id
    rows = [
        ("architecture", f"{arch.hf_class}: " + ", ".join(
            f"{k} {v}" for k, v in cfg.items() if isinstance(v, (int, float, bool, str)))),
        ("scheme", f"{scheme}: {bits}; this export: {stored[export_format]}"),
        ("tokens seen", f"{about['tokens']:,} (step {about['step']})" if about else "unknown"),
        ("teacher", teacher),
        ("data", about.get("data", "unknown")),
        ("context", f"{trained.max_length} tokens (trained)"),
        ("document start", f"token id {start}: training put it before every document; "
                           "prepend it to a text"),
    ]
    evaluation = about.get("evaluation", {})
    lines = [
        "---", "library_name: transformers" if export_format == "hf" else "library_name: fbi",
        f"tags: [{', '.join(dict.fromkeys(['fbi', 'binarized', scheme]))}]", "pipeline_tag: text-generation", "---", "",
        f"# {title[export_format]}, exported by fbi", "",
        "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), "",
        "## Evaluation", "",
    ]
    if evaluation:
        lines += ["The run's own evaluations up to this checkpoint (`metrics.jsonl`; perplexity "
                  "on its held-out split, BLiMP accuracy):", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in sorted(evaluation.items())]
    else:
        lines.append("None logged by the run; measure with `python -m fbi eval`.")
    lines += ["", "## Produced by", "", "```bash", command or "fbi.export (Python)", "```"]
    if about.get("run"):
        lines.append(f"from the run directory `{about['run']}` (its `config.yaml` holds the "
                     "training configuration).")
    if export_format == "hf":
        lines += ["", "## Use", "", "```python",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  "model = AutoModelForCausalLM.from_pretrained(PATH)",
                  "tok = AutoTokenizer.from_pretrained(PATH)",
                  "ids = [model.config.document_start_token_id] + tok(text, add_special_tokens=False).input_ids",
                  "```"]
    return "\n".join(lines) + "\n"
