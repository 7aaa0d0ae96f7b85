"""A standard ``transformers`` checkpoint of an fbi model: no fbi code needed to load it.

Each scheme layer is folded into a dense weight (its effective weight, so the function is the
same); schemes whose forward is not linear in x (activation quantizers, OneBit's output
LayerNorm) cannot be folded, and are refused with the reason.
Config and names go through the architecture's mapping in ``fbi.models.ARCHITECTURES``.
Layers loaded from a packed export fold too (``UnpackedLinear``), which is why this folds
itself rather than using ``fbi.models.folded_state_dict`` (trained layers only).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fbi.export.card import model_card
from fbi.export.packed import DTYPES, make_readable, packed_tensors, scheme_layers
from fbi.kernels.linear import PackedLinear
from fbi.kernels.stored import StoredEmbedding, StoredHead
from fbi.lm import Trained


class CannotFold(ValueError):
    """The scheme's forward is not a dense linear map of its input."""


def folded_state(model: torch.nn.Module, scheme: str,
                 keep: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
    """The state dict with every scheme layer folded into a dense weight, but those in
    ``keep`` (left out: the caller places them as modules)."""
    state = dict(model.state_dict())
    for name, layer in scheme_layers(model).items():
        if name in keep:
            continue
        reason = layer.fold_refusal()
        if reason:
            raise CannotFold(
                f"scheme {scheme}: {type(layer).__name__} {reason}, so its layers are not "
                "dense linear maps and a transformers checkpoint cannot compute the same "
                "function; export it with --format packed instead"
            )
        for key in [k for k in state if k.startswith(f"{name}.")]:
            del state[key]
        state[f"{name}.weight"] = layer.fold().weight
    return state


def to_transformers(trained: Trained, keep_packed: bool = False) -> torch.nn.Module:
    """The architecture's ``transformers`` model (``LlamaForCausalLM``, ``Mamba2ForCausalLM``:
    the mapping of ``fbi.models.ARCHITECTURES``) with every scheme layer folded, in memory.
    Raises CannotFold for schemes whose forward is not linear in x (activation quantizers,
    OneBit's output LayerNorm). ``keep_packed``: layers on the packed kernels
    (``PackedLinear``) go in as they are, shared with ``trained.model`` and never folded, so
    every sign-only scheme gets the model's cache and nothing dense is built."""
    import transformers

    from fbi.models import architecture

    if trained.model_cfg is None:
        raise ValueError(f"{trained.source}: not an fbi model (a run directory or a packed export)")
    arch = architecture(trained.model_cfg)
    keep = frozenset(n for n, m in scheme_layers(trained.model).items()
                     if keep_packed and isinstance(m, PackedLinear))
    state = arch.to_hf_state_dict(folded_state(trained.model, trained.scheme_cfg.name, keep))
    # the head and embeddings as stored (fbi.kernels.stored) go in as modules too: their
    # weights keep the export's dtype, which transformers' own modules would not compute in
    stored = frozenset(n for n, m in trained.model.named_modules()
                       if keep_packed and isinstance(m, (StoredHead, StoredEmbedding)))
    config = arch.to_hf_config(trained.model_cfg)
    config.bos_token_id, config.eos_token_id = trained.tokenizer.bos_id, trained.tokenizer.eos_id
    # What training put before every document (EOS under the default data.separator=eos):
    # fbi.trained.load_hf reads it back; a transformers user prepends it to a text.
    config.document_start_token_id = trained.start_id
    if hasattr(config, "max_position_embeddings"):  # attention models: the trained context
        config.max_position_embeddings = trained.max_length
    # Modules a scheme removed (BitNet's block norms: each BitLinear normalizes its own input)
    # are identities in the transformers twin too, so the state dict matches it key for key.
    removed = [n for n, m in trained.model.named_modules() if isinstance(m, torch.nn.Identity)]
    if not keep:
        hf = getattr(transformers, arch.hf_class)(config)
        for name in removed:
            hf.set_submodule(name, torch.nn.Identity())
        hf.load_state_dict(state, strict=True)
        return hf.eval()
    with torch.device("meta"):  # no dense copy: the parameters are trained.model's own
        hf = getattr(transformers, arch.hf_class)(config)
    for name in removed:
        hf.set_submodule(name, torch.nn.Identity())
    for name in keep | stored:  # fbi's names are the transformers model's (identity mapping)
        hf.set_submodule(name, trained.model.get_submodule(name))
    hf.load_state_dict(state, strict=True, assign=True)
    if arch.hf_head_casts_input and isinstance(hf.lm_head, StoredHead) \
            and hf.lm_head.weight.dtype != torch.float32:
        # a bf16 head would round the hidden states the model casts to its dtype: the twin
        # gets a float32 copy (trained.model keeps the stored one)
        hf.lm_head = StoredHead(torch.nn.Parameter(hf.lm_head.weight.float(), requires_grad=False))
    for name, module in list(hf.named_modules()):  # buffers computed at init (rotary inv_freq)
        if any(b.is_meta for b in module.buffers(recurse=False)):
            hf.set_submodule(name, type(module)(config=config))
    return hf.eval()


def export_hf(trained: Trained, out: Path, dtype: str = "float32", command: str | None = None) -> Path:
    """Write ``to_transformers(trained)`` with the tokenizer and a model card (``command``:
    what wrote it): a checkpoint that ``AutoModelForCausalLM`` and ``AutoTokenizer`` load
    without fbi."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype: got {dtype!r}; choose one of {', '.join(DTYPES)}")
    hf = to_transformers(trained)
    out = Path(out)
    hf.to(DTYPES[dtype]).save_pretrained(out)
    trained.tokenizer.save(out)
    (out / "README.md").write_text(model_card(trained, packed_tensors(trained.model)[2], "hf", command,
                                                  dtype))
    (out / "fbi_export.json").write_text(json.dumps(
        {"source": trained.source, "scheme": trained.scheme_cfg.name}, indent=1))
    make_readable(out)
    return out
