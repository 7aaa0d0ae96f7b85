"""The packed 1-bit format: a model at its real size, and the loader that rebuilds it.

A folder holds ``model.safetensors`` (each scheme layer's ``pack()`` tensors under
``<layer>.<key>``: signs 8 per byte, ternary digits 5 per byte, int8 codes, and its scales;
every other parameter, the full-precision parts, under its own name), ``fbi_packed.json``
(format version, model and scheme configs, sizes) and the tokenizer. The loader rebuilds the
fbi model with each scheme layer on the packed kernels (``fbi.kernels``, the default: the bits
stay packed, the logits equal the trained model's to fp32 rounding), or with its effective
weight ``unpack(pack())`` (``kernel="dense"``), which equals the trained layer's bit for bit,
so the logits are identical too.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from fbi.binarize import DenseLinear, scheme_config
from fbi.config import ConfigError
from fbi.data.tokenizer import HFTokenizer, Tokenizer, load_tokenizer
from fbi.export.card import model_card
from fbi.kernels.forms import NoKernel
from fbi.kernels.linear import PackedLinear
from fbi.kernels.stored import StoredEmbedding, StoredHead
from fbi.lm import Trained
from fbi.models import architecture, build_model

log = logging.getLogger(__name__)

FORMAT = "fbi-packed"
VERSION = 1
WEIGHTS = "model.safetensors"
PACKED_CONFIG = "fbi_packed.json"  # its presence marks a folder as a packed export
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
KERNELS = ("packed", "dense")


def scheme_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers a scheme built, trained or loaded from an export (those left dense are
    plain ``DenseLinear``)."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, (DenseLinear, UnpackedLinear, PackedLinear))
            and type(m) is not DenseLinear}


def dense_state(model: nn.Module, skip: set[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(parameters outside scheme layers, ties): a tensor shared under several names (a tied
    output head) is stored once, ``ties`` mapping each other name to the stored one."""
    prefixes = tuple(f"{n}." for n in skip)
    state, ties, seen = {}, {}, {}
    for key, value in model.state_dict(keep_vars=True).items():
        if key.startswith(prefixes):
            continue
        if id(value) in seen:
            ties[key] = seen[id(value)]
        else:
            seen[id(value)] = key
            state[key] = value.detach()
    return state, ties


def packed_tensors(model: nn.Module, fp_dtype: torch.dtype = torch.float32):
    """(tensors to write, ties, sizes): the export of ``model`` without writing it."""
    layers = scheme_layers(model)
    tensors, packed_bytes, n_binary = {}, 0, 0
    for name, layer in layers.items():
        for key, t in layer.pack().items():
            tensors[f"{name}.{key}"] = t.detach().contiguous()
            if key != "shape":  # metadata, not storage per weight
                packed_bytes += t.numel() * t.element_size()
        n_binary += layer.in_features * layer.out_features
    dense, ties = dense_state(model, set(layers))
    for key, t in dense.items():
        tensors[key] = t.to(fp_dtype).contiguous()
    n_params = sum(p.numel() for p in model.parameters())  # shared (tied) tensors counted once
    n_latent_scales = sum(p.numel() for layer in layers.values() for p in layer.parameters())
    sizes = {
        "binarized_weights": n_binary,
        "binarized_bytes": packed_bytes,
        "binarized_bf16_bytes": 2 * n_binary,
        "bits_per_binarized_weight": 8 * packed_bytes / n_binary if n_binary else None,
        "total_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
        # the same model in bf16: every parameter, the scheme layers as dense (out x in) weights
        "bf16_bytes": 2 * (n_params - n_latent_scales + n_binary),
    }
    return tensors, ties, sizes


def make_readable(out: Path) -> None:
    """Give the files of an export the permissions the umask allows: safetensors writes
    ``model.safetensors`` as 0600, which other users of a shared filesystem cannot read."""
    umask = os.umask(0)
    os.umask(umask)
    for f in out.rglob("*"):
        if f.is_file():
            f.chmod(f.stat().st_mode | (0o444 & ~umask))


def save_tokenizer(tokenizer: Tokenizer, out: Path) -> str:
    """Write the tokenizer into ``out``; returns the name ``load_tokenizer`` reads there."""
    if isinstance(tokenizer, HFTokenizer):
        tokenizer.save(out)
        return "."
    shutil.copyfile(tokenizer.source, out / "tokenizer.model")
    return "tokenizer.model"


def export_packed(trained: Trained, out: Path, fp_dtype: str = "bfloat16",
                  command: str | None = None) -> dict:
    """Write ``trained`` (an fbi model) to ``out`` in the packed format; returns its sizes.

    ``fp_dtype``: storage of the full-precision parts (embeddings, norms, head). bfloat16
    (the default, as models are shipped) halves them; float32 keeps the logits
    bit-identical to the trained model's. ``command``: what wrote it, for the model card.
    """
    from safetensors.torch import save_file

    if fp_dtype not in DTYPES:
        raise ConfigError(f"--fp-dtype: got {fp_dtype!r}; choose one of {', '.join(DTYPES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors, ties, sizes = packed_tensors(trained.model, DTYPES[fp_dtype])
    save_file(tensors, str(out / WEIGHTS), metadata={"format": FORMAT})
    config = {
        "format": FORMAT, "version": VERSION,
        "model": dataclasses.asdict(trained.model_cfg),
        "scheme": dataclasses.asdict(trained.scheme_cfg),
        "packed_layers": sorted(scheme_layers(trained.model)),
        "ties": ties,
        "fp_dtype": fp_dtype,
        "tokenizer": save_tokenizer(trained.tokenizer, out),
        "tokenizer_fingerprint": trained.tokenizer.fingerprint,
        "start_id": trained.start_id,
        "max_length": trained.max_length,
        "sizes": {**sizes, "file_bytes": (out / WEIGHTS).stat().st_size},
        "provenance": trained.provenance,
    }
    (out / PACKED_CONFIG).write_text(json.dumps(config, indent=1))
    (out / "README.md").write_text(model_card(trained, sizes, "packed", command, fp_dtype))
    make_readable(out)
    return config["sizes"]


class UnpackedLinear(nn.Module):
    """A scheme layer rebuilt from its export: the unpacked effective weight, the scheme's
    own input quantizer, and the packed tensors (so it exports again, packed or folded)."""

    def __init__(self, scheme_layer: DenseLinear, packed: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.in_features, self.out_features = scheme_layer.in_features, scheme_layer.out_features
        # The layer itself lives on the meta device: only its parameter-free input and output
        # functions (config, shape) are used.
        self.quantize_input = scheme_layer.quantize_input
        self.normalize_output = scheme_layer.normalize_output
        self.fold_refusal = scheme_layer.fold_refusal
        self.packed = packed
        self.register_buffer("weight", type(scheme_layer).unpack(packed), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize_output(
            nn.functional.linear(self.quantize_input(x), self.weight.to(x.dtype)))

    def pack(self) -> dict[str, torch.Tensor]:
        return dict(self.packed)

    def fold(self) -> nn.Linear:
        dense = nn.Linear(self.in_features, self.out_features, bias=False)
        dense.weight.data.copy_(self.weight)
        return dense


def read_config(path: Path) -> dict:
    """A model folder's JSON file, refused (ValueError naming it and the fix) when damaged."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:  # JSON and UTF-8 decoding errors
        raise ConfigError(f"MODEL: {path} is not valid JSON ({err}); the file is damaged: restore "
                         "it from a copy, or export the model again") from None
    if not isinstance(config, dict):
        raise ConfigError(f"MODEL: {path} holds a JSON {type(config).__name__}, not an object; "
                         "restore it from a copy, or export the model again")
    return config


def kernel_layer(scheme_layer: DenseLinear, packed: dict[str, torch.Tensor], kernel: str,
                 scheme: str) -> nn.Module:
    """``PackedLinear`` (``kernel="packed"``) or ``UnpackedLinear`` (``"dense"``, and the
    schemes whose weights are not a sign product: PB-LLM, said once in the log)."""
    if kernel == "packed":
        try:
            return PackedLinear(scheme_layer, packed)
        except NoKernel as e:
            if scheme not in _WARNED:
                log.warning("%s; its layers run dense", e)
                _WARNED.add(scheme)
    return UnpackedLinear(scheme_layer, packed)


_WARNED: set[str] = set()


def stored_parts(model: nn.Module) -> dict[str, type]:
    """The weights the packed kernels keep as stored, by key: the token embeddings and a
    full-precision output head (``fbi.kernels.stored``)."""
    parts = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            parts[f"{name}.weight"] = StoredEmbedding
        elif name == "lm_head" and type(module) in (nn.Linear, DenseLinear) \
                and module.bias is None:
            parts[f"{name}.weight"] = StoredHead
    return parts


def load_packed(directory: Path, kernel: str = "packed") -> Trained:
    """The model of a packed export; ``kernel``: ``packed`` (scheme layers on the packed
    kernels, the embeddings and head as stored: ``fbi.kernels.stored``) or ``dense``
    (everything in fp32, bit-identical to the trained model)."""
    from safetensors.torch import load_file

    if kernel not in KERNELS:
        raise ValueError(f"--kernel: got {kernel!r}; choose one of {', '.join(KERNELS)}")
    directory = Path(directory)
    config = read_config(directory / PACKED_CONFIG)
    if config.get("format") != FORMAT or config.get("version") != VERSION:
        raise ConfigError(
            f"{directory / PACKED_CONFIG}: format {config.get('format')} version "
            f"{config.get('version')}; this fbi reads {FORMAT} version {VERSION}"
        )
    model_cfg = architecture(config["model"]["arch"]).config(**config["model"])
    scheme_cfg = scheme_config(config["scheme"]["name"],
                               **{k: v for k, v in config["scheme"].items() if k != "name"})
    tensors = load_file(str(directory / WEIGHTS))
    with torch.device("meta"):
        model = build_model(model_cfg, scheme_cfg)
    for name in config["packed_layers"]:
        prefix = f"{name}."
        packed = {k[len(prefix):]: tensors.pop(k) for k in list(tensors) if k.startswith(prefix)}
        model.set_submodule(name, kernel_layer(model.get_submodule(name), packed, kernel,
                                               scheme_cfg.name))
    as_stored = stored_parts(model) if kernel == "packed" else {}
    tensors = {k: v if k in as_stored else v.float() for k, v in tensors.items()}
    for name, stored in config["ties"].items():
        tensors[name] = tensors[stored]
    model.load_state_dict(tensors, strict=True, assign=True)
    for name, stored in config["ties"].items():  # assign=True gave each name its own tensor
        owner, _, attr = name.rpartition(".")
        stored_owner, _, stored_attr = stored.rpartition(".")
        setattr(model.get_submodule(owner), attr,
                getattr(model.get_submodule(stored_owner), stored_attr))
    for key, stored_type in as_stored.items():  # after the ties: a tied pair shares one tensor
        owner = key.rpartition(".")[0]
        weight = model.get_submodule(owner).weight
        model.set_submodule(owner, stored_type(nn.Parameter(weight, requires_grad=False)))
    tokenizer = load_tokenizer(str(directory / config["tokenizer"]))
    if tokenizer.fingerprint != config["tokenizer_fingerprint"]:
        raise ConfigError(f"{directory}: the tokenizer saved there is not the model's (fingerprint)")
    return Trained(model.eval(), model, tokenizer, config["start_id"], config["max_length"],
                   str(directory), model_cfg, scheme_cfg, config.get("provenance", {}))
