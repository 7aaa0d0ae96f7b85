"""An lm-evaluation-harness model: ``--model fbi --model_args path=RUN_DIR_OR_EXPORT``.

Importing this module registers ``fbi`` with lm-eval (0.4.x discovers no plugins by itself,
so ``python -m fbi lm-eval ...`` imports it, then runs lm-eval's own command line). ``path``
is anything ``fbi.trained.load`` reads: a run directory (newest checkpoint, any ZeRO stage),
a packed export (on the packed kernels; ``kernel=dense`` in ``--model_args`` unpacks it) or a
Hugging Face checkpoint. Log-likelihoods are computed by
``fbi.eval.likelihood``, the code behind ``python -m fbi eval``.
"""

from __future__ import annotations

import logging
from functools import cached_property

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import simple_parse_args_string

from fbi.config import ConfigError
from fbi.eval.likelihood import continuation_logprobs
from fbi.eval.perplexity import strided_nll
from fbi.generate import cached_model, generate_ids
from fbi.progress import Progress
from fbi.trained import load

log = logging.getLogger(__name__)


MODEL_ARGS = ("path", "tag", "batch_size", "device", "max_length")


def parse_batch_size(value: int | str) -> int:
    """A positive integer; lm-eval's ``auto`` (no search here) gives the default 8."""
    if str(value).startswith("auto"):
        return 8
    if not str(value).isdigit() or int(value) < 1:
        raise ConfigError(f"batch_size: got {value!r}; give a positive integer (or auto for 8)")
    return int(value)


@register_model("fbi")
class FbiLM(TemplateLM):
    def __init__(self, path: str, tag: str | None = None, batch_size: int | str = 8,
                 device: str | None = None, max_length: int | None = None,
                 kernel: str | None = None, **_ignored) -> None:
        super().__init__()
        if device is None or (device.startswith("cuda") and not torch.cuda.is_available()):
            # lm-eval's command line asks for cuda:0 unless told otherwise
            device = "cuda" if torch.cuda.is_available() else "cpu"
            log.info("fbi lm-eval model on %s", device)
        self.batch_size = parse_batch_size(batch_size)
        self.trained = load(path, tag, kernel)
        self.trained.model.to(device)
        self._device = torch.device(device)
        self.max_length = int(max_length or self.trained.max_length)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """lm-eval's command line passes ``--batch_size`` and ``--device`` (defaults 1 and
        cuda:0 even when not given) beside ``--model_args``: settings in ``--model_args`` win,
        as they name this model's own, instead of arriving twice (a TypeError)."""
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        unknown = sorted(set(arg_dict) - set(MODEL_ARGS))
        if unknown:  # a typo would otherwise go unnoticed
            raise ConfigError(f"--model_args: {', '.join(unknown)} not understood by --model fbi; "
                             f"its arguments are {', '.join(MODEL_ARGS)}")
        if "path" not in arg_dict:
            raise ConfigError("--model_args: name the model, path=RUN_DIR (a run directory, a "
                             "packed export or a Hugging Face checkpoint)")
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**extra, **arg_dict})

    @cached_property
    def cached_model(self):
        """What generates with a key-value cache (``fbi.generate.cached_model``), built once."""
        return cached_model(self.trained)

    @property
    def eot_token_id(self) -> int:
        return self.trained.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.trained.start_id

    @property
    def tokenizer_name(self) -> str:
        return self.trained.tokenizer.source

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.trained.tokenizer.encode([string])[0]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        # Keep the last max_length + 1 tokens (lm-eval's left truncation): the model sees
        # max_length of them and scores the continuation's.
        sequences = [(ctx + cont)[-(self.max_length + 1):] for _, ctx, cont in requests]
        n_scored = [min(len(cont), len(seq) - 1) for (_, _, cont), seq in zip(requests, sequences)]
        with Progress("lm-eval loglikelihood", -(-len(sequences) // self.batch_size), "batches",
                      enabled=not disable_tqdm) as progress:
            logprobs, greedy = continuation_logprobs(self.trained.logits, sequences, n_scored,
                                                     self.batch_size, self._device,
                                                     progress=progress)
        return list(zip(logprobs, greedy))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Summed log-probability of whole texts, in disjoint windows of max_length tokens
        (the first token conditioned on the document-start token)."""
        out = []
        with Progress("lm-eval loglikelihood_rolling", len(requests), "texts",
                      enabled=not disable_tqdm) as progress:
            for (text,) in (req.args for req in requests):
                ids = torch.tensor([self.prefix_token_id] + self.tok_encode(text))
                nll, _ = strided_nll(self.trained.logits, ids, self.max_length + 1,
                                     self.max_length, self._device)
                out.append(-nll)
                progress.update()
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with ``do_sample`` and ``temperature``) continuations, generated
        with a key-value cache (``fbi.generate``), stopped at and cut before the first
        ``until`` string."""
        out = []
        progress = Progress("lm-eval generate_until", len(requests), "requests",
                            enabled=not disable_tqdm)
        for context, gen_kwargs in (req.args for req in requests):
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(gen_kwargs.get("temperature", 0.0)) if gen_kwargs.get("do_sample") else 0.0
            new = generate_ids(
                self.trained, [self.prefix_token_id] + self.tok_encode(context),
                int(gen_kwargs.get("max_gen_toks", 256)), temperature=temperature,
                device=self._device, stop=until, model=self.cached_model,
            )
            text = self.trained.tokenizer.decode([t for t in new if t != self.eot_token_id])
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
            progress.update()
        progress.close()
        return out
