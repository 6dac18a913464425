"""Data pipeline: documents -> tokens -> blocks of ``K``-token chunks -> batches.

1. **Readers** (:func:`read_documents`): text, JSONL, WikiText and Python files or glob patterns, in a deterministic
   order; no document is silently dropped or cut, bad input raises :class:`DataError` naming file and line.
2. **Tokenizer** (:class:`TextTokenizer`): a byte-level BPE trained here (exact round trip) or any ``tokenizer.json``.
3. **Token cache** (:func:`build_token_cache`): the corpus tokenised once, EOS after every document, memory-mapped.
4. **Blocks** (:class:`PackedBlocks`): the stream cut into blocks of ``block_len`` tokens, the last one padded.
5. **Batches** (:class:`BlockLoader`): infinite, seeded, resumable and rank-sharded.

:func:`prepare_data` assembles them from a :class:`~calm_models.config.DataConfig`; with no files configured it uses the
Python standard library's own source, which every installation has.

Axis key: ``n`` tokens of a stream, ``L`` block length, ``b`` blocks of a batch, ``N`` blocks.
"""

from __future__ import annotations

import glob as _glob
import hashlib
import itertools
import json
import logging
import os
import re
import sysconfig
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from calm_models._layers import atomic_write
from calm_models.config import DataConfig
from calm_models.errors import CalmError

logger = logging.getLogger(__name__)

#: Token strings tried, in order, as the EOS of a loaded tokenizer.
EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")
_DEFAULT_EOS = "<|endoftext|>"
_CACHE_VERSION = 2
_ENCODE_BATCH_CHARS, _ENCODE_BATCH_DOCS = 1 << 20, 1024
_WIKI_TITLE = re.compile(r"^ = (?!=)(.*?)(?<!=) = $")  # " = Title = ", not " = = Sub = = "
_STDLIB_EXCLUDED = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})


class DataError(CalmError, ValueError):
    """Bad data or data configuration; the message names the file and line, or the field."""


@dataclass(frozen=True)
class Document:
    """One document: its ``text`` exactly as read, and its ``source`` (``"file:line"``)."""

    text: str
    source: str


# -------------------------------------------------------------------------------------- readers


def expand_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Files and glob patterns (``**`` any depth) -> files in order; each file once.

    Raises:
        DataError: A missing path, a directory, a pattern matching nothing, or no path at all.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> for name in ("b.txt", "a.txt", "c.md"):
        ...     _ = (d / name).write_text("x")
        >>> [p.name for p in expand_paths([str(d / "*.txt"), d / "c.md", d / "a.txt"])]
        ['a.txt', 'b.txt', 'c.md']
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not isinstance(paths, Sequence) or not paths:
        raise DataError(f"paths: expected a path, a glob pattern or a list of them, got {paths!r}")
    out: list[Path] = []
    for item in paths:
        text = os.path.expanduser(os.fspath(item))
        path = Path(text)
        if path.is_file():
            matches = [path]
        elif path.is_dir():
            raise DataError(f"{text}: is a directory; pass a glob pattern such as '{text}/**/*.txt'")
        elif any(c in text for c in "*?["):
            matches = [m for m in sorted(Path(m) for m in _glob.glob(text, recursive=True)) if m.is_file()]
            if not matches:
                raise DataError(f"{text}: the glob pattern matches no file")
        else:
            raise DataError(f"{text}: no such file")
        seen = {p.resolve() for p in out}
        out += [m for m in matches if m.resolve() not in seen]
    return out


def detect_format(path: str | os.PathLike) -> str:
    """``jsonl`` (.jsonl/.ndjson), ``wikitext`` (.raw or a first line ``" = Title = "``), ``python`` (.py) or ``text``.

    Example:
        >>> detect_format("corpus/train.jsonl"), detect_format("wiki.valid.raw")
        ('jsonl', 'wikitext')
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".raw", ".py"):
        return {".raw": "wikitext", ".py": "python"}.get(suffix, "jsonl")
    if path.is_file():
        with open(path, "rb") as f:
            for raw in itertools.islice(f, 1000):
                line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                if line.strip():
                    return "wikitext" if _WIKI_TITLE.match(line) else "text"
    return "text"


def _decode(data: bytes, path: Path, errors: str, line: int = 1) -> str:
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        line += data.count(b"\n", 0, e.start)
        hint = "pass errors='replace' to substitute U+FFFD for invalid bytes"
        raise DataError(f"{path}:{line}: not valid UTF-8 ({e.reason} at byte {e.start}); {hint}") from None


def _read_text(path: Path, split_paragraphs: bool, errors: str) -> Iterator[Document]:
    if not split_paragraphs:
        text = _decode(path.read_bytes(), path, errors)
        if text:
            yield Document(text, str(path))
        return
    with open(path, "rb") as f:
        lines = ((lineno, _decode(raw, path, errors, lineno)) for lineno, raw in enumerate(f, start=1))
        for blank, group in itertools.groupby(lines, key=lambda item: not item[1].strip()):
            if not blank:
                block = list(group)
                text = re.sub(r"\r?\n$", "", "".join(line for _, line in block))
                yield Document(text, f"{path}:{block[0][0]}")


def _read_jsonl(path: Path, text_field: str) -> Iterator[Document]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(raw.decode("utf-8").lstrip("\ufeff"))
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                kind = type(record).__name__
                raise DataError(f"{where}: expected a JSON object with a {text_field!r} field, got {kind}")
            if text_field not in record:
                raise DataError(f"{where}: no {text_field!r} field (keys: {sorted(record)})")
            if not isinstance(text := record[text_field], str):
                raise DataError(f"{where}: the {text_field!r} field must be a string, got {type(text).__name__}")
            yield Document(text, where)


def _read_wikitext(path: Path, errors: str) -> Iterator[Document]:
    lines: list[str] = []
    start, article = 1, 0  # article 0: text before the first heading
    with open(path, "rb") as f:
        for lineno, raw in enumerate(itertools.chain(f, [None]), start=1):
            line = None if raw is None else _decode(raw, path, errors, lineno)
            if line is None or _WIKI_TITLE.match(line.rstrip("\r\n")):
                if lines and (article > 0 or "".join(lines).strip()):
                    yield Document("".join(lines), f"{path}:{start} (article {article})")
                lines, start, article = [], lineno, article + 1
            if line is not None:
                lines.append(line)


def read_documents(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    format: str = "auto",
    split_paragraphs: bool = False,
    text_field: str = "text",
    errors: str = "strict",
) -> Iterator[Document]:
    """The documents of files, streaming, in a deterministic order.

    Formats (``auto`` picks one per file with :func:`detect_format`): ``text`` (a file is one document; with
    ``split_paragraphs`` each block of non-blank lines is one), ``jsonl`` (the ``text_field`` of each object),
    ``wikitext`` (each top-level ``" = Title = "`` heading starts a document; non-blank text before the first is one
    too), ``python`` (a file is one document, invalid UTF-8 replaced). Text is kept exactly; ``errors`` is ``strict`` or
    ``replace`` for invalid UTF-8.

    Raises:
        DataError: A missing file, invalid UTF-8 (strict), invalid JSON or a JSONL line without
            a string text field (naming file and line), or no document at all.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / "a.jsonl").write_text('{"text": "one"}\\n\\n{"text": "two"}\\n')
        >>> [(doc.text, Path(doc.source).name) for doc in read_documents(d / "a.jsonl")]
        [('one', 'a.jsonl:1'), ('two', 'a.jsonl:3')]
    """
    if format not in ("auto", "text", "jsonl", "wikitext", "python"):
        raise DataError(f"format: expected one of auto, text, jsonl, wikitext, python, got {format!r}")
    if errors not in ("strict", "replace"):
        raise DataError(f"errors: expected 'strict' or 'replace', got {errors!r}")
    files = expand_paths(paths)
    count = 0
    for path in files:
        kind = detect_format(path) if format == "auto" else format
        if kind == "jsonl":
            docs = _read_jsonl(path, text_field)
        elif kind == "wikitext":
            docs = _read_wikitext(path, errors)
        else:  # text; a python file is one document, its invalid UTF-8 replaced
            docs = _read_text(path, split_paragraphs, errors) if kind == "text" else _read_text(path, False, "replace")
        for doc in docs:
            count += 1
            yield doc
    if count == 0:
        names = ", ".join(str(p) for p in files[:5]) + (", ..." if len(files) > 5 else "")
        raise DataError(f"empty corpus: no document in {len(files)} file(s) ({names})")


def _limit_bytes(docs: Iterable[Document], max_bytes: int | None) -> Iterator[Document]:
    """Documents until their UTF-8 size reaches ``max_bytes``; the one crossing it is cut and last."""
    if max_bytes is None:
        yield from docs
        return
    left = max_bytes
    for doc in docs:
        data = doc.text.encode("utf-8")
        if len(data) >= left:
            if head := data[:left].decode("utf-8", errors="ignore"):
                yield Document(head, doc.source + ("" if len(data) == left else f" (cut at max_bytes={max_bytes})"))
            return
        left -= len(data)
        yield doc


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def stdlib_source_files(
    *, max_bytes: int | None = None, split: str = "train", root: str | os.PathLike | None = None
) -> list[Path]:
    """The Python standard library's ``.py`` files (no tests, no site-packages): the default corpus.

    About 5% of the files (``sha256(relative path) mod 1000 < 50``) are the ``"valid"`` split, the rest ``"train"``, so
    a file's split never depends on which other files exist. With ``max_bytes``, files are taken in the order of the
    same hash (spread over all packages) while they fit.

    Example:
        >>> train, valid = stdlib_source_files(), stdlib_source_files(split="valid")
        >>> len(train) > 10 * len(valid) > 0, set(train).isdisjoint(valid)
        (True, True)
    """
    if split not in ("train", "valid"):
        raise DataError(f"split: expected 'train' or 'valid', got {split!r}")
    base = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    selected = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_EXCLUDED)
        for path in (Path(dirpath) / name for name in filenames if name.endswith(".py")):
            rel = path.relative_to(base).as_posix()
            h = _stable_hash(rel)
            if (h % 1000 < 50) == (split == "valid"):
                selected.append((h, rel, path))
    if not selected:
        raise DataError(f"no Python source files found under {base} (split={split!r})")
    if max_bytes is not None:
        kept, total = [], 0
        for item in sorted(selected):
            size = item[2].stat().st_size
            if total + size <= max_bytes:
                kept.append(item)
                total += size
        if not kept:
            raise DataError(f"max_bytes={max_bytes}: smaller than every stdlib source file")
        selected = kept
    return [path for _, _, path in sorted(selected, key=lambda item: item[1])]


# ------------------------------------------------------------------------------------ tokenizer


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` with a known end-of-sequence token.

    Encoding adds no special token (the pipeline appends EOS after each document itself); special-token strings inside a
    text are encoded as ordinary text, so a document cannot forge a boundary. Byte-level BPE tokenizers
    (:meth:`train_bpe`, GPT-2, Llama-3) round-trip every string. ``pad_id`` is ``eos_id``.

    Args:
        tokenizer: The tokenizer (copied).
        eos_token: The EOS token; ``None`` tries :data:`EOS_CANDIDATES` in order.

    Example:
        >>> tok = TextTokenizer.train_bpe(["the cat sat on the mat"] * 20, vocab_size=300)
        >>> tok.decode(tok.encode("the cat ate a hat"))
        'the cat ate a hat'
    """

    def __init__(self, tokenizer: Any, *, eos_token: str | None = None) -> None:
        from tokenizers import Tokenizer

        json_str = tokenizer.to_str()
        self._tok = Tokenizer.from_str(json_str)
        if hasattr(self._tok, "encode_special_tokens"):
            self._tok.encode_special_tokens = True
        self.fingerprint = hashlib.sha256(json_str.encode("utf-8")).hexdigest()
        if eos_token is None:
            eos_token = next((t for t in EOS_CANDIDATES if self._tok.token_to_id(t) is not None), None)
            if eos_token is None:
                raise DataError(
                    f"no end-of-sequence token found (tried {list(EOS_CANDIDATES)}); "
                    "pass eos_token= (data.eos_token) explicitly"
                )
        elif self._tok.token_to_id(eos_token) is None:
            raise DataError(f"eos_token: {eos_token!r} is not in the tokenizer's vocabulary")
        self.eos_token = eos_token
        self.eos_id = self.pad_id = self._tok.token_to_id(eos_token)

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2) -> TextTokenizer:
        """A byte-level BPE (GPT-2 pre-tokenizer) of ``vocab_size`` tokens; ``<|endoftext|>`` is id 0.

        Example:
            >>> TextTokenizer.train_bpe(["aaaa bbbb"] * 10, vocab_size=260).vocab_size
            260
        """
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if not isinstance(vocab_size, int) or vocab_size < 257:
            raise DataError(f"vocab_size: expected an int >= 257 (256 bytes + EOS), got {vocab_size!r}")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[_DEFAULT_EOS],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok, eos_token=_DEFAULT_EOS)

    @classmethod
    def load(cls, path: str | os.PathLike, *, eos_token: str | None = None) -> TextTokenizer:
        """Any ``tokenizer.json`` (ours, GPT-2, Llama-3...); a :class:`DataError` if it is not one."""
        from tokenizers import Tokenizer

        path = Path(path).expanduser()
        if not path.is_file():
            raise DataError(f"{path}: no such tokenizer file")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a plain Exception
            raise DataError(f"{path}: not a valid tokenizer.json ({e})") from None
        try:
            return cls(tok, eos_token=eos_token)
        except DataError as e:
            raise DataError(f"{path}: {e}") from None

    def save(self, path: str | os.PathLike) -> None:
        """Write a standard ``tokenizer.json`` atomically."""
        atomic_write(Path(path).expanduser(), self._tok.to_str().encode("utf-8"))

    @property
    def backend(self) -> Any:
        """The wrapped ``tokenizers.Tokenizer``."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of a text (no special tokens added)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of many texts, encoded in parallel."""
        fast = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [enc.ids for enc in fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int] | np.ndarray | torch.Tensor, *, skip_special_tokens: bool = False) -> str:
        """Text of 1-D ids; out-of-range ids are a ``ValueError`` naming the first."""
        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().numpy()
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 1:
            raise ValueError(f"ids: expected a 1-D sequence, got shape {tuple(ids.shape)}")
        bad = (ids < 0) | (ids >= self.vocab_size)
        if bad.any():
            first = int(bad.argmax())
            raise ValueError(f"ids must lie in [0, {self.vocab_size}), got {int(ids[first])} at index {first}")
        return self._tok.decode(ids.tolist(), skip_special_tokens=skip_special_tokens)

    def decode_batch(
        self, batch: Sequence[Sequence[int]] | torch.Tensor, *, skip_special_tokens: bool = False
    ) -> list[str]:
        """Texts of a batch of id sequences (rows of a 2-D tensor or a list of lists)."""
        return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in batch]

    def __repr__(self) -> str:
        return f"TextTokenizer(vocab_size={self.vocab_size}, eos_token={self.eos_token!r})"


# ------------------------------------------------------------------------- token streams, cache


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def _encoded_batches(tokenizer: TextTokenizer, docs: Iterable[Document]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(tokens, each document followed by EOS; lengths)`` per batch of documents."""
    dtype, eos = _token_dtype(tokenizer.vocab_size), [tokenizer.eos_id]
    texts, chars = [], 0
    for doc in itertools.chain(docs, [None]):
        if doc is not None:
            texts.append(doc.text)
            chars += len(doc.text)
        if texts and (doc is None or chars >= _ENCODE_BATCH_CHARS or len(texts) >= _ENCODE_BATCH_DOCS):
            ids = tokenizer.encode_batch(texts)
            lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
            flat = itertools.chain.from_iterable(itertools.chain(x, eos) for x in ids)
            yield np.fromiter(flat, dtype=dtype, count=int(lengths.sum())), lengths
            texts, chars = [], 0


def _starts(lengths: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)


def encode_documents(tokenizer: TextTokenizer, docs: Iterable[Document | str]) -> tuple[np.ndarray, np.ndarray]:
    """Tokenise in memory into one stream with an EOS after every document.

    Returns:
        ``(tokens (n,), doc_starts (num_docs,))``; uint16 tokens for vocabularies up to 65536.

    Example:
        >>> tok = TextTokenizer.train_bpe(["ab ab ab"] * 5, vocab_size=260)
        >>> tokens, starts = encode_documents(tok, ["ab", "ab ab"])
        >>> starts.tolist(), int(tokens[-1]) == tok.eos_id
        ([0, 2], True)
    """
    stream = (d if isinstance(d, Document) else Document(d, "<str>") for d in docs)
    parts = list(_encoded_batches(tokenizer, stream))
    tokens = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, _token_dtype(tokenizer.vocab_size))
    lengths = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64)
    return tokens, _starts(lengths)


@dataclass(frozen=True)
class TokenCache:
    """A tokenised corpus on disk: ``tokens`` (memory-mapped, ``(n,)``), ``doc_starts``, its ``meta``.

    ``built`` is ``True`` when this call tokenised the corpus, ``False`` when it reused the cache.
    """

    path: Path
    tokens: np.ndarray
    doc_starts: np.ndarray
    built: bool
    meta: dict

    @property
    def num_documents(self) -> int:
        """Number of documents."""
        return len(self.doc_starts)


def default_cache_dir() -> Path:
    """``$CALM_CACHE``, else ``$XDG_CACHE_HOME/calm_models``, else ``~/.cache/calm_models``.

    Example:
        >>> isinstance(default_cache_dir(), Path)
        True
    """
    if os.environ.get("CALM_CACHE"):
        return Path(os.environ["CALM_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "calm_models"


def _open_cache(tokens_path: Path, docs_path: Path, meta_path: Path) -> TokenCache:
    """Open a complete cache entry, or a :class:`DataError` saying which files to delete."""
    try:
        meta = json.loads(meta_path.read_text())
        dtype, n = np.dtype(meta["dtype"]), int(meta["num_tokens"])
        if tokens_path.stat().st_size != n * dtype.itemsize:
            raise ValueError(f"{tokens_path.stat().st_size} bytes, expected {n * dtype.itemsize}")
        tokens = np.memmap(tokens_path, dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype)
        starts = np.load(docs_path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"token cache {tokens_path} is truncated or corrupt ({exc}); delete {tokens_path.name}, "
            f"{docs_path.name} and {meta_path.name} in {tokens_path.parent} to rebuild it"
        ) from None
    return TokenCache(tokens_path, tokens, starts, built=False, meta=meta)


def build_token_cache(
    tokenizer: TextTokenizer,
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    cache_dir: str | os.PathLike | None = None,
    *,
    format: str = "auto",
    split_paragraphs: bool = False,
    text_field: str = "text",
    errors: str = "strict",
    max_bytes: int | None = None,
    progress: bool | None = None,
) -> TokenCache:
    """Tokenise a corpus once into a flat memory-mapped file and reuse it afterwards.

    Documents are tokenised in batches and streamed to disk, an EOS after each. The key hashes the files' paths, sizes
    and mtimes, the tokenizer, the reader options and ``max_bytes`` (the document crossing it is cut and is the last).
    In ``cache_dir``: ``tokens-<key>.bin`` (raw ``meta["dtype"]``), ``docs-<key>.npy`` (document starts), and last
    ``meta-<key>.json`` (a complete entry); each is renamed from a temporary file, so no reader sees a partial cache.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / "a.txt").write_text("hello world")
        >>> tok = TextTokenizer.train_bpe(["hello world"] * 5, vocab_size=270)
        >>> first = build_token_cache(tok, d / "a.txt", d / "cache", progress=False)
        >>> again = build_token_cache(tok, d / "a.txt", d / "cache", progress=False)
        >>> first.built, again.built, tok.decode(again.tokens)
        (True, False, 'hello world<|endoftext|>')
    """
    files = expand_paths(paths)
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    reader = dict(format=format, split_paragraphs=bool(split_paragraphs), text_field=text_field, errors=errors)
    options = {**reader, "max_bytes": max_bytes}
    key_data = dict(version=_CACHE_VERSION, tokenizer=tokenizer.fingerprint, eos_id=tokenizer.eos_id, options=options)
    key_data["files"] = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True).encode()).hexdigest()[:20]
    paths3 = (cache_dir / f"tokens-{key}.bin", cache_dir / f"docs-{key}.npy", cache_dir / f"meta-{key}.json")
    if paths3[2].is_file():
        logger.info("reusing token cache %s", paths3[0])
        return _open_cache(*paths3)
    cache_dir.mkdir(parents=True, exist_ok=True)
    docs = _limit_bytes(read_documents(files, **reader), max_bytes)
    stats = {"num_tokens": 0, "num_documents": 0, "text_bytes": 0, "truncated": False}
    lengths: list[np.ndarray] = []
    start = time.perf_counter()
    bar = tqdm(desc=f"tokenising {len(files)} file(s)", unit="doc", disable=None if progress is None else not progress)

    def counted(docs: Iterable[Document]) -> Iterator[Document]:
        for doc in docs:
            stats["text_bytes"] += len(doc.text.encode("utf-8"))
            stats["truncated"] |= doc.source.endswith(f"(cut at max_bytes={max_bytes})")
            yield doc

    def write_tokens(fh) -> None:
        with bar:
            for tokens, lens in _encoded_batches(tokenizer, counted(docs)):
                fh.write(tokens.tobytes())
                lengths.append(lens)
                stats["num_tokens"] += len(tokens)
                stats["num_documents"] += len(lens)
                bar.update(len(lens))

    atomic_write(paths3[0], write_tokens)
    atomic_write(paths3[1], lambda fh: np.save(fh, _starts(np.concatenate(lengths))))
    seconds = round(time.perf_counter() - start, 3)
    meta = {**key_data, "key": key, "dtype": _token_dtype(tokenizer.vocab_size).name, **stats, "seconds": seconds}
    atomic_write(paths3[2], json.dumps(meta, indent=1).encode())
    return replace(_open_cache(*paths3), built=True, meta=meta)


# ------------------------------------------------------------------------------ blocks, batches


class Batch(NamedTuple):
    """Token ids ``(b, L)`` and the bool mask of real tokens (``False`` on padding)."""

    tokens: torch.Tensor
    mask: torch.Tensor


class PackedBlocks:
    """A token stream cut into non-overlapping blocks of ``block_len`` tokens.

    Block ``i`` holds ``tokens[i*L : (i+1)*L]``; documents (each ending with EOS) are packed back to back across blocks.
    The last block is padded with ``pad_id`` (default: the stream's last token, its EOS); :meth:`batch` masks padding.

    Example:
        >>> blocks = PackedBlocks(np.arange(10, dtype=np.uint16), block_len=4, chunk_size=2, pad_id=0)
        >>> len(blocks), blocks.num_tokens, blocks.num_padding
        (3, 10, 2)
        >>> blocks.batch([2])
        Batch(tokens=tensor([[8, 9, 0, 0]]), mask=tensor([[ True,  True, False, False]]))
    """

    def __init__(self, tokens: np.ndarray, block_len: int, chunk_size: int, *, pad_id: int | None = None) -> None:
        if not isinstance(block_len, int) or block_len <= 0 or block_len % chunk_size:
            raise DataError(f"block_len: expected a positive multiple of chunk_size={chunk_size}, got {block_len!r}")
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.detach().cpu().numpy()
        if not isinstance(tokens, np.ndarray) or tokens.ndim != 1 or len(tokens) == 0:
            raise DataError("tokens: expected a non-empty 1-D token stream (the stream is empty)")
        self.tokens, self.block_len, self.chunk_size = tokens, block_len, chunk_size
        self.pad_id = int(tokens[-1]) if pad_id is None else int(pad_id)
        self.num_tokens = len(tokens)
        self.num_blocks = -(-self.num_tokens // block_len)
        self.num_padding = self.num_blocks * block_len - self.num_tokens
        self._num_full = self.num_tokens // block_len
        self._full = tokens[: self._num_full * block_len].reshape(self._num_full, block_len)
        rest = tokens[self._num_full * block_len :]
        self._tail = np.concatenate([rest, np.full(block_len - len(rest), self.pad_id)]).astype(np.int64)

    def __len__(self) -> int:
        return self.num_blocks

    def __getitem__(self, index: int) -> torch.Tensor:
        """Block ``index`` (negative from the end) as an int64 ``(L,)`` tensor."""
        return self.get_batch([index])[0]

    def _indices(self, indices: Any) -> np.ndarray:
        if isinstance(indices, torch.Tensor):
            indices = indices.detach().cpu().numpy()
        idx = np.asarray(indices)
        if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise TypeError(f"indices: expected 1-D integers, got shape {idx.shape} {idx.dtype}")
        idx = np.where(idx < 0, idx + self.num_blocks, idx).astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_blocks):
            raise IndexError(f"indices: block index out of range for {self.num_blocks} blocks")
        return idx

    def get_batch(self, indices: Any) -> torch.Tensor:
        """Blocks ``(b,)`` (negative from the end) as an int64 ``(b, L)`` CPU tensor."""
        idx = self._indices(indices)
        full = idx < self._num_full
        out = np.empty((len(idx), self.block_len), dtype=np.int64)
        out[full] = self._full[idx[full]]
        out[~full] = self._tail
        return torch.from_numpy(out)

    def batch(self, indices: Any) -> Batch:
        """Blocks with the mask of their real tokens: a :class:`Batch`."""
        idx = torch.from_numpy(self._indices(indices))
        pos = idx[:, None] * self.block_len + torch.arange(self.block_len)
        return Batch(self.get_batch(idx), pos < self.num_tokens)

    def __repr__(self) -> str:
        fields = ("num_blocks", "block_len", "num_tokens", "num_padding")
        return f"PackedBlocks({', '.join(f'{name}={getattr(self, name)}' for name in fields)})"


class BlockLoader:
    """Infinite, deterministic, resumable and rank-sharded batches of blocks.

    Each epoch is a permutation of the blocks (seeded by a hash of ``(seed, epoch)``). With global batch
    ``G = batch_size * world_size``, a step takes the next ``G`` blocks of the permutation and rank ``r`` keeps rows
    ``[r*B, (r+1)*B)``: ``W`` processes see exactly the batches of one process with batch ``G``. When fewer than ``G``
    blocks are left the next epoch begins. The position is kept in blocks, so a run resumes exactly even with another
    batch size or world size (same seed and data).

    Example:
        >>> blocks = PackedBlocks(np.arange(40), block_len=4, chunk_size=2)
        >>> loader = BlockLoader(blocks, batch_size=3, seed=0)
        >>> state, expected = loader.state_dict(), next(loader)
        >>> resumed = BlockLoader(blocks, batch_size=3, seed=0)
        >>> resumed.load_state_dict(state)
        >>> torch.equal(next(resumed).tokens, expected.tokens)
        True
    """

    def __init__(
        self,
        blocks: PackedBlocks,
        batch_size: int,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank: expected an int in [0, {world_size}), got {rank!r}")
        self.blocks, self.batch_size, self.rank = blocks, batch_size, rank
        self.seed, self.shuffle = seed, bool(shuffle)
        self.global_batch_size = batch_size * world_size
        self.num_blocks = len(blocks)
        if self.num_blocks < self.global_batch_size:
            raise DataError(
                f"the dataset has {self.num_blocks} blocks, fewer than one global batch "
                f"of {self.global_batch_size} (batch_size={batch_size} x world_size="
                f"{world_size}); use more data, a smaller batch or a shorter block_len"
            )
        self.epoch, self.offset = 0, 0  # position: blocks of this epoch already taken
        self._perm_epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    @property
    def steps_per_epoch(self) -> int:
        """Full global batches per epoch."""
        return self.num_blocks // self.global_batch_size

    def permutation(self, epoch: int) -> torch.Tensor:
        """Block order of an epoch (the identity without shuffling)."""
        if not self.shuffle:
            return torch.arange(self.num_blocks)
        seed = _stable_hash(f"calm_models.BlockLoader:{self.seed}:{epoch}") >> 1
        return torch.randperm(self.num_blocks, generator=torch.Generator().manual_seed(seed))

    def __iter__(self) -> BlockLoader:
        return self

    def __next__(self) -> Batch:
        """The next :class:`Batch` of this rank, ``(B, L)``."""
        if self.offset + self.global_batch_size > self.num_blocks:
            self.epoch, self.offset = self.epoch + 1, 0
        if self._perm_epoch != self.epoch:
            self._perm, self._perm_epoch = self.permutation(self.epoch), self.epoch
        start = self.offset + self.rank * self.batch_size
        self.offset += self.global_batch_size
        return self.blocks.batch(self._perm[start : start + self.batch_size])

    def state_dict(self) -> dict[str, Any]:
        """The position, for an exact resume: ``epoch``, ``offset`` and the identity of the data."""
        return {name: getattr(self, name) for name in ("epoch", "offset", "seed", "shuffle", "num_blocks")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at a saved position (any batch size or world size; same seed and data).

        Raises:
            ValueError: A state of another seed, shuffle setting or dataset, or malformed.
        """
        for name in ("seed", "shuffle", "num_blocks"):
            if (saved := state.get(name)) != (ours := getattr(self, name)):
                raise ValueError(f"the saved data position has {name}={saved!r} but this run has {name}={ours!r}")
        epoch, offset = int(state["epoch"]), int(state["offset"])
        if epoch < 0 or not 0 <= offset <= self.num_blocks:
            raise ValueError(f"invalid data position epoch={epoch}, offset={offset}")
        self.epoch, self.offset = epoch, offset


# ------------------------------------------------------------------------------------- assembly


def prepare_data(
    cfg: DataConfig, run_dir: str | os.PathLike, *, chunk_size: int, progress: bool | None = None
) -> tuple[TextTokenizer, PackedBlocks, PackedBlocks]:
    """The tokenizer and the train/validation blocks of a run.

    Resolves the training source (``train_files`` or the standard library), loads or trains the tokenizer (kept as
    ``run_dir/tokenizer.json``), tokenises both splits into the shared cache and cuts them into blocks padded with EOS.
    In a multi-process run call it on rank 0 first.

    Example:
        >>> import tempfile
        >>> run_dir = Path(tempfile.mkdtemp())
        >>> cfg = DataConfig(vocab_size=300, block_len=64, max_train_bytes=30_000,
        ...                  max_valid_bytes=10_000, cache_dir=str(run_dir / "cache"))
        >>> tok, train, valid = prepare_data(cfg, run_dir, chunk_size=4, progress=False)
        >>> tok.vocab_size, train.block_len, (run_dir / "tokenizer.json").is_file()
        (300, 64, True)
    """
    if cfg.block_len % chunk_size:
        raise DataError(f"block_len: expected a positive multiple of chunk_size={chunk_size}, got {cfg.block_len}")
    run_dir = Path(run_dir).expanduser()
    run_dir.mkdir(parents=True, exist_ok=True)
    options = {name: getattr(cfg, name) for name in ("format", "split_paragraphs", "text_field", "errors")}
    stdlib = {**options, "format": "python"}
    if cfg.train_files:
        train_paths, train_options = expand_paths(cfg.train_files), options
    else:
        train_paths, train_options = stdlib_source_files(max_bytes=cfg.max_train_bytes), stdlib
    tokenizer = _run_tokenizer(cfg, run_dir, train_paths, train_options)

    def cache(paths, opts, max_bytes):
        return build_token_cache(tokenizer, paths, cfg.cache_dir, max_bytes=max_bytes, progress=progress, **opts).tokens

    train_tokens = cache(train_paths, train_options, cfg.max_train_bytes)
    if cfg.valid_files:
        valid_tokens = cache(cfg.valid_files, options, cfg.max_valid_bytes)
    elif not cfg.train_files:
        valid_paths = stdlib_source_files(split="valid", max_bytes=cfg.max_valid_bytes)
        valid_tokens = cache(valid_paths, stdlib, cfg.max_valid_bytes)
    else:
        n = len(train_tokens)
        held = max(1, round(cfg.valid_fraction * n / cfg.block_len)) * cfg.block_len
        if n - held < cfg.block_len:
            raise DataError(
                f"train_files: {n} tokens are too few to hold out {held} validation "
                f"tokens (valid_fraction={cfg.valid_fraction}, block_len="
                f"{cfg.block_len}) and keep a training block; add data or set valid_files"
            )
        train_tokens, valid_tokens = train_tokens[: n - held], train_tokens[n - held :]
    return tokenizer, *(
        PackedBlocks(t, cfg.block_len, chunk_size, pad_id=tokenizer.eos_id) for t in (train_tokens, valid_tokens)
    )


def _run_tokenizer(cfg: DataConfig, run_dir: Path, train_paths: list[Path], options: dict[str, Any]) -> TextTokenizer:
    saved = run_dir / "tokenizer.json"
    if cfg.tokenizer is not None:
        tokenizer = TextTokenizer.load(cfg.tokenizer, eos_token=cfg.eos_token)
    elif saved.is_file():
        tokenizer = TextTokenizer.load(saved, eos_token=cfg.eos_token)
        if tokenizer.vocab_size > cfg.vocab_size:
            raise DataError(
                f"vocab_size: {saved} has {tokenizer.vocab_size} tokens but vocab_size={cfg.vocab_size}; "
                "delete it to train a new tokenizer or fix vocab_size"
            )
        return tokenizer
    else:
        budget = min(cfg.tokenizer_train_bytes, cfg.max_train_bytes or cfg.tokenizer_train_bytes)
        docs = _limit_bytes(read_documents(train_paths, **options), budget)
        tokenizer = TextTokenizer.train_bpe((d.text for d in docs), cfg.vocab_size)
    tokenizer.save(saved)
    return tokenizer
