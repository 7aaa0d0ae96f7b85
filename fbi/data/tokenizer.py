"""The student's tokenizer: a Hugging Face tokenizer, or a sentencepiece model.

With a teacher, the student uses the teacher's tokenizer. Without one, a sentencepiece
model is trained on the corpus. Either way the vocabulary has a fingerprint, compared
against the teacher's and against the token shards' before any training starts.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Iterable, Protocol

from fbi.config import ConfigError

log = logging.getLogger(__name__)


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int
    bos_id: int | None
    fingerprint: str
    source: str

    def encode(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, ids: list[int]) -> str: ...

    def token_id(self, token: str) -> int | None:
        """The id of ``token`` as a single vocabulary entry, or None."""

    def save(self, directory: Path) -> None:
        """A ``transformers`` tokenizer folder giving the same ids (``AutoTokenizer`` reads it)."""


def vocab_fingerprint(vocab: dict[str, int]) -> str:
    """Stable hash of the token -> id table: equal iff the vocabularies are equal."""
    blob = json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class HFTokenizer:
    def __init__(self, path: str) -> None:
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(path)
        self.source = str(path)
        self.vocab_size = len(self._tok)
        eos = self._tok.eos_token_id
        if eos is None:
            eos = self._tok.bos_token_id
        if eos is None:
            raise ConfigError(
                f"tokenizer.path: the tokenizer at {path} has neither an EOS nor a BOS token "
                "to separate documents; use a tokenizer that defines one"
            )
        self.eos_id = int(eos)
        self.bos_id = self._tok.bos_token_id
        self._vocab = self._tok.get_vocab()
        self.fingerprint = vocab_fingerprint(self._vocab)

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self._tok(texts, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)

    def save(self, directory: Path) -> None:
        """A ``transformers`` tokenizer folder (``AutoTokenizer.from_pretrained`` reads it)."""
        self._tok.save_pretrained(directory)

    def token_id(self, token: str) -> int | None:
        return self._vocab.get(token)


class SentencePieceTokenizer:
    def __init__(self, model_file: str) -> None:
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.source = str(model_file)
        self.vocab_size = self._sp.get_piece_size()
        self.eos_id = self._sp.eos_id()
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.fingerprint = vocab_fingerprint(
            {self._sp.id_to_piece(i): i for i in range(self.vocab_size)}
        )

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)

    def token_id(self, token: str) -> int | None:
        piece = self._sp.piece_to_id(token)
        return piece if self._sp.id_to_piece(piece) == token else None

    def save(self, directory: Path) -> None:
        """A ``transformers`` tokenizer folder that gives this model's ids for every text.

        transformers' own conversion (``LlamaTokenizer``) skips the model's normalizer (here
        ``nmt_nfkc`` with runs of whitespace collapsed, so newlines and double spaces become one
        piece) and treats text such as ``<unk>`` as a special token. This one rebuilds the
        normalizer from the model's own spec (its precompiled character map, whitespace
        rules, dummy prefix), and ``split_special_tokens`` keeps control symbols out of text,
        as sentencepiece does: the ids are sentencepiece's (tested on WikiText).
        """
        from sentencepiece import sentencepiece_model_pb2
        from tokenizers import AddedToken, Regex
        from tokenizers import Tokenizer as Backend
        from tokenizers import decoders, models, normalizers, pre_tokenizers
        from transformers import PreTrainedTokenizerFast
        from transformers.tokenization_utils_base import generate_merges

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(self._sp.serialized_model_proto())
        spec, trainer = proto.normalizer_spec, proto.trainer_spec
        if trainer.model_type != trainer.BPE:
            raise ValueError(f"{self.source}: only sentencepiece BPE models convert to transformers")
        vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
        merges = generate_merges({p.piece: i for i, p in enumerate(proto.pieces) if p.type == p.NORMAL})
        backend = Backend(models.BPE(vocab, merges, unk_token=trainer.unk_piece, fuse_unk=True,
                                     byte_fallback=trainer.byte_fallback))
        steps = [normalizers.Precompiled(spec.precompiled_charsmap)] if spec.precompiled_charsmap else []
        if spec.remove_extra_whitespaces:  # sentencepiece's whitespace here is " " only
            steps += [normalizers.Replace(Regex("^ +| +$"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
        if spec.add_dummy_prefix:
            steps.append(normalizers.Prepend(" "))
        backend.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "\u2581")])
        # sentencepiece never merges across a word boundary: splitting before each ▁ is the same
        backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never", split=True)
        backend.decoder = decoders.Sequence(
            [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
            + ([decoders.Strip(" ", 1, 0)] if spec.add_dummy_prefix else []))
        backend.add_tokens([AddedToken(p.piece, normalized=False) for p in proto.pieces
                            if p.type == p.USER_DEFINED])  # matched in text, as sentencepiece does
        names = {"unk_token": trainer.unk_id, "bos_token": self.bos_id, "eos_token": self.eos_id}
        PreTrainedTokenizerFast(
            tokenizer_object=backend, split_special_tokens=True,
            **{k: self._sp.id_to_piece(i) for k, i in names.items() if i is not None and i >= 0},
        ).save_pretrained(directory)


def load_tokenizer(path: str) -> Tokenizer:
    """A ``.model`` file is sentencepiece; a directory is loaded by ``AutoTokenizer``."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"tokenizer.path: {p} does not exist")
    if p.is_file() and p.suffix == ".model":
        return SentencePieceTokenizer(str(p))
    return HFTokenizer(str(p))


def train_sentencepiece(texts: Iterable[str], vocab_size: int, model_file: Path) -> Tokenizer:
    """BPE on the corpus, written atomically to ``model_file``."""
    import sentencepiece as spm

    model_file.parent.mkdir(parents=True, exist_ok=True)
    tmp_prefix = model_file.with_name(model_file.stem + ".tmp")
    lines = (line for text in texts for line in text.splitlines() if line.strip())
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines, model_prefix=str(tmp_prefix), vocab_size=vocab_size,
            model_type="bpe", character_coverage=0.9995, byte_fallback=True,
            pad_id=-1, bos_id=1, eos_id=2, unk_id=0, num_threads=2,
            minloglevel=2, input_sentence_size=2_000_000, shuffle_input_sentence=True,
        )
    except RuntimeError as err:  # e.g. fewer pieces than the corpus has characters
        raise ConfigError(
            f"tokenizer.vocab_size: sentencepiece cannot train {vocab_size} pieces on this "
            f"corpus ({str(err).splitlines()[0][-160:]}); choose another tokenizer.vocab_size"
        ) from err
    Path(f"{tmp_prefix}.model").replace(model_file)
    Path(f"{tmp_prefix}.vocab").unlink(missing_ok=True)
    log.info("trained a %d-piece sentencepiece model: %s", vocab_size, model_file)
    return SentencePieceTokenizer(str(model_file))
