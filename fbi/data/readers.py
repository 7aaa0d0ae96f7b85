"""Documents of one input file, read as a stream: texts, or token ids already made.

Kinds, by extension (all files of a corpus are of one kind):

- ``.txt``/``.text``: the whole file is one document (UTF-8, universal newlines);
- ``.jsonl``/``.json``: a row per line (or a JSON array), its ``data.text_field``, or with
  ``data.token_field`` a list of token ids (Amber's ``token_ids``);
- ``.parquet``: a row per record, the same fields;
- ``.npy``: token ids; a 1-D array is one document, a 2-D array a document per row;
- ``.bin``: a flat array of ``data.token_dtype`` ids: one document, or with a Megatron
  ``.idx`` of the same stem beside it (``MMIDIDX`` format, version 1), its documents.

Each yields ``(row, document)`` with ``row`` counting from 0 within the file.
"""

from __future__ import annotations

import codecs
import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from fbi.config import ConfigError, DataConfig

KINDS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json",
         ".parquet": "parquet", ".npy": "npy", ".bin": "bin"}
TOKEN_KINDS = ("npy", "bin")
MEGATRON_MAGIC = b"MMIDIDX\x00\x00"
# magic, version (int64), dtype code (uint8), sequence count, document-index count (int64)
MEGATRON_HEADER = 9 + 8 + 1 + 8 + 8
CHECK_CHUNK = 1 << 22  # index entries checked at a time: bounded memory on any corpus
# Megatron-LM's DType codes (megatron/core/datasets/indexed_dataset.py).
MEGATRON_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
                   6: np.float64, 7: np.float32, 8: np.uint16}


def kind_of(files: list[str]) -> str:
    """The kind that reads ``files`` (all of one kind)."""
    kinds = {Path(f).suffix.lower() for f in files}
    unknown = kinds - KINDS.keys()
    if unknown or len({KINDS[k] for k in kinds}) != 1:
        raise ConfigError(
            f"data.files: got extensions {sorted(kinds)}; use files of one kind among "
            f"{sorted(KINDS)}"
        )
    return KINDS[kinds.pop()]


def yields_tokens(cfg: DataConfig, kind: str) -> bool:
    return kind in TOKEN_KINDS or bool(cfg.token_field)


def one_document(path: str, kind: str) -> bool:
    """Whether the file is read as a single document (never split by rows)."""
    refuse_empty(path)
    if kind == "npy":
        return open_npy(path).ndim == 1
    return kind == "text" or (kind == "bin" and not Path(path).with_suffix(".idx").exists())


def refuse_empty(path: str) -> None:
    if os.path.getsize(path) == 0:
        raise ConfigError(f"data.files: {path} is empty (0 bytes); remove it from data.files "
                          "or write it again")


def check_utf8(path: str, chunk: int = 1 << 20, setting: str = "data.files") -> None:
    """Refuse a text file that is not UTF-8 text (a binary file named .txt), naming the byte."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            bad = None
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as err:
                bad = (err.start, err.reason)
            nul = block.find(b"\0")
            if nul >= 0 and (bad is None or nul < bad[0]):
                bad = (nul, "a NUL byte")
            if bad:
                raise ConfigError(
                    f"{setting}: {path} is not UTF-8 text (byte {offset + bad[0]}: {bad[1]}); "
                    f"convert it (iconv -t UTF-8) or remove it from {setting}"
                )
            if not block:
                return
            offset += len(block)


def read_documents(cfg: DataConfig, path: str, kind: str) -> Iterator[tuple[int, object]]:
    """``(row, text)`` or, for token kinds and ``data.token_field``, ``(row, ids)`` with ids
    a 1-D integer array (not yet checked against a vocabulary). A file is checked whole
    (sizes, headers and indices against each other) before its first document."""
    refuse_empty(path)
    if kind == "text":
        check_utf8(path)
        with open(path, encoding="utf-8") as f:
            yield 0, f.read()
    elif kind == "json":
        yield from _json_rows(cfg, path)
    elif kind == "parquet":
        yield from _parquet_rows(cfg, path)
    elif kind == "npy":
        arr = open_npy(path)
        yield from enumerate([arr] if arr.ndim == 1 else arr)
    else:
        yield from _bin_documents(cfg, path)


def _field(cfg: DataConfig) -> str:
    return cfg.token_field or cfg.text_field


def _value(cfg: DataConfig, row: dict, path: str, where: str):
    name = _field(cfg)
    if not isinstance(row, dict) or name not in row:
        keys = sorted(row) if isinstance(row, dict) else type(row).__name__
        setting = "data.token_field" if cfg.token_field else "data.text_field"
        raise ConfigError(f"{setting}: {name!r} is not a field of {path} ({where}); "
                          f"its fields are {keys}")
    value = row[name]
    if cfg.token_field:
        ids = np.asarray(value) if isinstance(value, list) else None
        if ids is None or ids.ndim != 1 or (len(ids) and ids.dtype.kind not in "iu"):
            raise ConfigError(f"data.token_field: {path} ({where}) holds "
                              f"{type(value).__name__} in {name!r}, not a list of token ids")
        return ids.astype(np.int64)
    if not isinstance(value, str):
        raise ConfigError(f"data.text_field: {path} ({where}) holds {type(value).__name__} in "
                          f"{name!r}, not text; name the text field, or set data.token_field "
                          "for token ids")
    return value


def _json_rows(cfg: DataConfig, path: str) -> Iterator[tuple[int, object]]:
    check_utf8(path)
    with open(path, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
        f.seek(0)
        if head.startswith("["):  # one JSON array of rows (small files only: read whole)
            rows = _parse(f.read(), path, "the file")
            for row, value in enumerate(rows):
                yield row, _value(cfg, value, path, f"row {row}")
            return
        row = 0
        for number, line in enumerate(f, 1):
            if line.strip():
                yield row, _value(cfg, _parse(line, path, f"line {number}"), path, f"line {number}")
                row += 1


def _parse(text: str, path: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"data.files: {path} ({where}) is not JSON ({err.msg}); fix or "
                          "remove the file") from None


def _parquet_rows(cfg: DataConfig, path: str) -> Iterator[tuple[int, object]]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as err:  # pyarrow's own error types: name the file
        raise ConfigError(f"data.files: {path} could not be read as parquet "
                          f"({type(err).__name__}: {err}); fix or remove the file") from None
    name = _field(cfg)
    if name not in table.schema_arrow.names:
        setting = "data.token_field" if cfg.token_field else "data.text_field"
        raise ConfigError(f"{setting}: {name!r} is not a column of {path}; columns are "
                          f"{table.schema_arrow.names}")
    import pyarrow as pa

    row = 0
    batches = table.iter_batches(columns=[name], batch_size=1024)
    while True:
        try:
            batch = next(batches, None)
        except (pa.ArrowException, OSError, ValueError) as err:  # a damaged page
            raise ConfigError(f"data.files: {path} is damaged after row {row} "
                              f"({type(err).__name__}: {err}); fix or remove the file") from None
        if batch is None:
            return
        for value in batch.column(0).to_pylist():
            yield row, _value(cfg, {name: value}, path, f"row {row}")
            row += 1


def _bin_documents(cfg: DataConfig, path: str) -> Iterator[tuple[int, np.ndarray]]:
    idx = Path(path).with_suffix(".idx")
    if idx.exists():
        dtype, lengths, pointers, doc_starts = read_megatron_index(idx)
        check_megatron(path, idx, dtype, lengths, pointers, doc_starts)
        tokens = np.memmap(path, dtype=dtype, mode="r")
        for row, (first, end) in enumerate(zip(doc_starts[:-1], doc_starts[1:])):
            if end > first:
                begin = pointers[first] // dtype.itemsize
                yield row, tokens[begin: pointers[end - 1] // dtype.itemsize + lengths[end - 1]]
        return
    if not cfg.token_dtype:
        raise ConfigError(f"data.token_dtype: {path} is a flat array of token ids with no "
                          "Megatron .idx beside it; name its dtype, e.g. data.token_dtype=uint16")
    try:
        dtype = np.dtype(cfg.token_dtype)
    except TypeError:
        raise ConfigError(f"data.token_dtype: {cfg.token_dtype!r} is not a numpy dtype; use "
                          "uint16, uint32, int32 or int64") from None
    size = Path(path).stat().st_size
    if dtype.kind not in "iu":
        raise ConfigError(f"data.token_dtype: {cfg.token_dtype} is not an integer dtype; token "
                          "ids are uint16, uint32, int32 or int64")
    if size % dtype.itemsize:
        raise ConfigError(f"data.files: {path} ({size} bytes) is not a whole array of "
                          f"{dtype.name} ids ({dtype.itemsize} bytes each): cut short, or "
                          "written with another dtype; write it again or name its dtype in "
                          "data.token_dtype")
    yield 0, np.memmap(path, dtype=dtype, mode="r")


def open_npy(path: str) -> np.ndarray:
    """The token ids of a ``.npy`` file, memory-mapped, once its header, dtype and size agree
    (``np.load`` would map a cut file's first part or fail with numpy's own words)."""
    size = os.path.getsize(path)
    fmt = np.lib.format
    try:
        with open(path, "rb") as f:
            version = fmt.read_magic(f)
            header = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}
            if version not in header:
                raise ValueError(f"format version {version} is not 1.0 or 2.0")
            shape, fortran, dtype = header[version](f)
            offset = f.tell()
    except ValueError as err:  # numpy's words for a cut or garbled header
        raise ConfigError(f"data.files: {path} is not a readable .npy file ({err}); it is "
                          "damaged or cut short: write it again (np.save) or remove it") from None
    if len(shape) not in (1, 2) or dtype.kind not in "iu":
        raise ConfigError(f"data.files: {path} holds a {len(shape)}-D {dtype} array; token ids "
                          "are a 1-D or 2-D integer array")
    expected = offset + int(np.prod(shape)) * dtype.itemsize
    if size != expected or expected == offset:
        raise ConfigError(f"data.files: {path} is {size} bytes, its header promises a {shape} "
                          f"{dtype} array ({expected} bytes): {_size_fault(size, expected)}; "
                          "write it again (np.save) or remove it")
    return np.memmap(path, dtype, "r", offset, shape, order="F" if fortran else "C")


def _size_fault(size: int, expected: int) -> str:
    if size < expected:
        return f"{expected - size} bytes are missing (cut short)"
    if size > expected:
        return f"{size - expected} trailing bytes that belong to no token"
    return "no token ids at all"


def read_megatron_index(path: Path) -> tuple[np.dtype, np.ndarray, np.ndarray, np.ndarray]:
    """(dtype, sequence lengths, sequence byte offsets, document start sequences with the end
    appended) of a Megatron-LM ``.idx`` file, once its header and size agree."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(MEGATRON_HEADER)
    fix = "write it again, or remove it and name the .bin's dtype with data.token_dtype"
    if len(head) < MEGATRON_HEADER:
        raise ConfigError(f"data.files: {path} is {size} bytes, shorter than the "
                          f"{MEGATRON_HEADER}-byte header of a Megatron index: cut short; {fix}")
    magic, version, code = head[:9], int.from_bytes(head[9:17], "little"), head[17]
    sequences = int.from_bytes(head[18:26], "little")
    documents = int.from_bytes(head[26:34], "little")
    if magic != MEGATRON_MAGIC or version != 1 or code not in MEGATRON_DTYPES:
        raise ConfigError(f"data.files: {path} is not a Megatron index (MMIDIDX version 1); "
                          "remove it or name the .bin with data.token_dtype")
    dtype = np.dtype(MEGATRON_DTYPES[code])
    if dtype.kind not in "iu":
        raise ConfigError(f"data.files: {path} says its .bin holds {dtype} values (dtype code "
                          f"{code}), not token ids; token ids are integers: convert the "
                          "dataset with an integer dtype (e.g. uint16, code 8)")
    expected = MEGATRON_HEADER + 12 * sequences + 8 * documents
    if size != expected or documents == 0:
        raise ConfigError(f"data.files: {path} is {size} bytes, its header promises {expected} "
                          f"({sequences} sequences, {documents} document-index entries): "
                          f"{_size_fault(size, expected)}; {fix}")

    def table(dtype, at: int, count: int) -> np.ndarray:
        return np.memmap(path, dtype, "r", at, (count,)) if count else np.zeros(0, dtype)

    return (dtype, table(np.int32, MEGATRON_HEADER, sequences),
            table(np.int64, MEGATRON_HEADER + 4 * sequences, sequences),
            table(np.int64, MEGATRON_HEADER + 12 * sequences, documents))


def _first(mask: np.ndarray) -> int | None:
    bad = np.flatnonzero(mask)
    return int(bad[0]) if bad.size else None


def check_megatron(path: str, idx: Path, dtype: np.dtype, lengths: np.ndarray,
                   pointers: np.ndarray, doc_starts: np.ndarray) -> None:
    """The ``.idx`` and its ``.bin`` agree: every sequence lies inside the ``.bin``, whose
    bytes are exactly the sequences' tokens, and the document index runs from sequence 0 to
    the last in order. Read in chunks: memory does not grow with the corpus."""
    size = os.path.getsize(path)
    fix = "write the pair again (both files from one run of the converter)"
    if size % dtype.itemsize:
        raise ConfigError(f"data.files: {path} ({size} bytes) is not a whole array of the "
                          f"{dtype.name} ids {idx} says it holds: cut short or damaged; {fix}")
    tokens = 0
    for start in range(0, len(lengths), CHECK_CHUNK):
        n = np.asarray(lengths[start: start + CHECK_CHUNK], dtype=np.int64)
        at = np.asarray(pointers[start: start + CHECK_CHUNK])
        end = at + n * dtype.itemsize
        i = _first((n < 0) | (at < 0) | (at % dtype.itemsize != 0) | (end > size))
        if i is not None:
            raise ConfigError(
                f"data.files: {idx} puts sequence {start + i} ({int(n[i])} tokens) at bytes "
                f"{int(at[i])}..{int(end[i])}, outside {path} ({size} bytes): the .bin is cut "
                f"short or the .idx belongs to another .bin; {fix}")
        tokens += int(n.sum())
    if tokens * dtype.itemsize != size:
        raise ConfigError(f"data.files: {path} is {size} bytes, {idx} lists {tokens} {dtype.name} "
                          f"tokens ({tokens * dtype.itemsize} bytes): "
                          f"{_size_fault(size, tokens * dtype.itemsize)}; {fix}")
    last = -1
    for start in range(0, len(doc_starts), CHECK_CHUNK):
        d = np.asarray(doc_starts[start: start + CHECK_CHUNK])
        steps = np.diff(np.concatenate([[last if start else 0], d]))
        i = _first((steps < 0) | (d > len(lengths)) | (d < 0))
        if i is not None:
            raise ConfigError(
                f"data.files: {idx}'s document index entry {start + i} is {int(d[i])}, "
                f"outside 0..{len(lengths)} sequences or before the entry above it: the "
                f"index is damaged; {fix}")
        last = int(d[-1])
    if int(doc_starts[0]) != 0 or last != len(lengths):
        raise ConfigError(f"data.files: {idx}'s document index runs from sequence "
                          f"{int(doc_starts[0])} to {last}, not 0 to {len(lengths)} (every "
                          f"sequence): the index is damaged; {fix}")
