"""Data pipeline for CALM: documents -> tokens -> fixed blocks of ``K``-token chunks -> batches.

The pipeline has five stages, each usable on its own:

1. **Readers** (:func:`read_documents`): plain text, JSONL with a ``text`` field, raw WikiText and
   Python source files; many files and glob patterns at once, in a deterministic order. A
   document is never silently dropped or truncated; bad input raises :class:`DataError` naming
   the file and line.
2. **Tokenizer** (:class:`TextTokenizer`): a thin wrapper of ``tokenizers.Tokenizer`` that trains a
   byte-level BPE (exact round trip of any text) or loads any existing ``tokenizer.json``.
3. **Token cache** (:func:`build_token_cache`): the corpus tokenised once, an EOS appended after
   every document, written atomically to a memory-mapped ``.npy`` keyed on the source files
   (paths, sizes, mtimes), the tokenizer and the reader options.
4. **Blocks** (:class:`PackedBlocks`): the token stream cut into non-overlapping blocks of
   ``block_len`` tokens, a multiple of the CALM chunk size ``K``.
5. **Batches** (:class:`BlockLoader`): an infinite, seeded, resumable, rank-sharded iterator.

:func:`prepare_data` assembles all five from a :class:`DataConfig`. With no files configured it
uses the Python standard library's own source (:func:`stdlib_source_files`), which every Python
installation has, so training runs on a fresh machine with no download.
"""

# Axis key:
#   n = tokens in a stream      L = block_len (a multiple of the chunk size K)
#   b = blocks in a batch        N = blocks in a dataset

from __future__ import annotations

import glob as _glob
import hashlib
import itertools
import json
import logging
import os
import re
import struct
import sysconfig
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm

__all__ = [
    "EOS_CANDIDATES",
    "FORMATS",
    "BlockLoader",
    "DataConfig",
    "DataError",
    "Document",
    "PackedBlocks",
    "TextTokenizer",
    "TokenCache",
    "build_token_cache",
    "default_cache_dir",
    "detect_format",
    "encode_documents",
    "expand_paths",
    "prepare_data",
    "read_documents",
    "stdlib_source_files",
]

logger = logging.getLogger(__name__)

FORMATS = ("auto", "text", "jsonl", "wikitext", "python")
"""Valid values of the ``format`` option of :func:`read_documents`."""

EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")
"""Token strings tried, in order, to find the end-of-sequence token of a loaded tokenizer."""

_DEFAULT_EOS = "<|endoftext|>"
_CACHE_VERSION = 1
_NPY_HEADER_LEN = 128  # fixed .npy header size, so the header can be rewritten in place
_ENCODE_BATCH_CHARS = 1 << 20  # characters of text per encode_batch call
_ENCODE_BATCH_DOCS = 1024
# WikiText article heading: " = Title = " with exactly one '=' on each side.
# Subsection headings (" = = Sub = = ", " = = = Sub = = = ") do not match.
_WIKI_TITLE = re.compile(r"^ = (?!=)(.*?)(?<!=) = $")
_STDLIB_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
)
_STDLIB_VALID_PER_MILLE = 50  # ~5% of the stdlib files go to the validation split


class DataError(ValueError):
    """Bad data or data configuration: a missing file, malformed input or inconsistent sizes.

    The message names the file and line (``"pd.jsonl:17: no 'text' field (keys: ['title'])"``)
    or the configuration field at fault.
    """


@dataclass(frozen=True)
class Document:
    """One document of a corpus.

    Attributes:
        text: the document's text, exactly as read (see :func:`read_documents` per format).
        source: where it came from: the file, and the line (and article) it starts at for
            formats with several documents per file, e.g. ``"data/pd.jsonl:17"``.
    """

    text: str
    source: str


# --------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------


def _has_magic(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def expand_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Expands file names and glob patterns into a deterministic list of files.

    Each argument is either an existing file or a glob pattern (``*``, ``?``, ``[...]``; ``**``
    matches any depth); the matches of each pattern are sorted. Arguments keep their order and a
    file named twice (e.g. by overlapping patterns) is kept once, at its first position.

    Args:
        paths: one path or pattern, or a sequence of them. ``~`` is expanded.

    Returns:
        The files, in order.

    Raises:
        DataError: if a path does not exist, is a directory, or a pattern matches no file, or if
            no path is given.

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
    if not isinstance(paths, Sequence) or len(paths) == 0:
        raise DataError(f"paths: expected a path, a glob pattern or a list of them, got {paths!r}")
    out: list[Path] = []
    seen: set[Path] = set()
    for item in paths:
        if not isinstance(item, (str, os.PathLike)):
            raise DataError(f"paths: expected str or os.PathLike items, got {type(item).__name__}")
        text = os.path.expanduser(os.fspath(item))
        path = Path(text)
        if path.is_file():
            matches = [path]
        elif path.is_dir():
            raise DataError(
                f"{text}: is a directory; pass a glob pattern such as '{text}/**/*.txt'"
            )
        elif _has_magic(text):
            matches = sorted(Path(m) for m in _glob.glob(text, recursive=True))
            matches = [m for m in matches if m.is_file()]
            if not matches:
                raise DataError(f"{text}: the glob pattern matches no file")
        else:
            raise DataError(f"{text}: no such file")
        for m in matches:
            key = m.resolve()
            if key not in seen:
                seen.add(key)
                out.append(m)
    return out


def detect_format(path: str | os.PathLike) -> str:
    """Guesses the reader format of a file from its name and, for raw WikiText, its first line.

    ``.jsonl``/``.ndjson`` -> ``"jsonl"``; ``.raw`` -> ``"wikitext"``; ``.py`` -> ``"python"``;
    any other file whose first non-blank line is a top-level WikiText heading (``" = Title = "``,
    as in ``wiki.valid.tokens``) -> ``"wikitext"``; everything else -> ``"text"``.

    Args:
        path: the file.

    Returns:
        One of ``"text"``, ``"jsonl"``, ``"wikitext"``, ``"python"``.

    Example:
        >>> detect_format("corpus/train.jsonl"), detect_format("wiki.valid.raw")
        ('jsonl', 'wikitext')
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".raw":
        return "wikitext"
    if suffix == ".py":
        return "python"
    if path.is_file():
        with open(path, "rb") as f:
            for raw in itertools.islice(f, 1000):
                line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                if line.strip():
                    return "wikitext" if _WIKI_TITLE.match(line) else "text"
    return "text"


def _decode(data: bytes, path: Path, errors: str, first_line: int = 1) -> str:
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        line = first_line + data.count(b"\n", 0, e.start)
        raise DataError(
            f"{path}:{line}: not valid UTF-8 ({e.reason} at byte {e.start} of this "
            f"{'line' if first_line > 1 or line > 1 else 'file'}); pass errors='replace' to "
            "substitute U+FFFD for invalid bytes"
        ) from None


def _read_text(path: Path, split_paragraphs: bool, errors: str) -> Iterator[Document]:
    if not split_paragraphs:
        text = _decode(path.read_bytes(), path, errors)
        if text:
            yield Document(text, str(path))
        return
    block: list[str] = []
    start = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = _decode(raw, path, errors, first_line=lineno)
            if line.strip():
                if not block:
                    start = lineno
                block.append(line)
            elif block:
                yield Document(_strip_newline("".join(block)), f"{path}:{start}")
                block = []
    if block:
        yield Document(_strip_newline("".join(block)), f"{path}:{start}")


def _strip_newline(text: str) -> str:
    if text.endswith("\r\n"):
        return text[:-2]
    return text[:-1] if text.endswith("\n") else text


def _read_jsonl(path: Path, text_field: str) -> Iterator[Document]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                msg = f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})"
                raise DataError(msg) from None
            if lineno == 1:
                line = line.lstrip("\ufeff")
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise DataError(
                    f"{where}: expected a JSON object with a {text_field!r} field, "
                    f"got {type(record).__name__}"
                )
            if text_field not in record:
                raise DataError(f"{where}: no {text_field!r} field (keys: {sorted(record)})")
            text = record[text_field]
            if not isinstance(text, str):
                raise DataError(
                    f"{where}: the {text_field!r} field must be a string, got {type(text).__name__}"
                )
            yield Document(text, where)


def _read_wikitext(path: Path, errors: str) -> Iterator[Document]:
    lines: list[str] = []
    start = 1
    article = 0  # 0 = text before the first heading
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = _decode(raw, path, errors, first_line=lineno)
            if _WIKI_TITLE.match(line.rstrip("\r\n")):
                # A whitespace-only preamble before the first heading holds no document.
                if lines and (article > 0 or "".join(lines).strip()):
                    yield Document("".join(lines), f"{path}:{start} (article {article})")
                lines, start, article = [], lineno, article + 1
            lines.append(line)
    if lines and (article > 0 or "".join(lines).strip()):
        yield Document("".join(lines), f"{path}:{start} (article {article})")


def _read_python(path: Path) -> Iterator[Document]:
    # Source files are read as bytes and decoded as UTF-8 with invalid bytes replaced by U+FFFD
    # (PEP 3120 makes UTF-8 the default; files declaring another coding are rare outside tests).
    text = path.read_bytes().decode("utf-8", errors="replace")
    if text:
        yield Document(text, str(path))


def _check_reader_options(format: str, errors: str, text_field: str) -> None:
    if format not in FORMATS:
        raise DataError(f"format: expected one of {list(FORMATS)}, got {format!r}")
    if errors not in ("strict", "replace"):
        raise DataError(f"errors: expected 'strict' or 'replace', got {errors!r}")
    if not isinstance(text_field, str) or not text_field:
        raise DataError(f"text_field: expected a non-empty string, got {text_field!r}")


def read_documents(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    format: str = "auto",
    split_paragraphs: bool = False,
    text_field: str = "text",
    errors: str = "strict",
) -> Iterator[Document]:
    """Reads the documents of one or many files, streaming, in a deterministic order.

    Formats (``format="auto"`` picks one per file with :func:`detect_format`):

    - ``"text"``: the whole file is one document. With ``split_paragraphs=True`` every block of
      non-blank lines is a document instead (blank = whitespace only; the separating blank lines
      and the block's final line break are not part of it).
    - ``"jsonl"``: one JSON object per line, its ``text_field`` (a string) is one document; blank
      lines are skipped. This is the format of the CALM reference data.
    - ``"wikitext"``: raw WikiText; every top-level heading line ``" = Title = "`` (exactly one
      ``=`` each side) starts a document that runs to the next one, heading and subsections
      (``" = = Sub = = "``) included, text kept exactly. Non-blank text before the first heading is
      a document of its own.
    - ``"python"``: the whole file is one document, decoded as UTF-8 with invalid bytes replaced
      by U+FFFD.

    Text is decoded as UTF-8 (``errors="strict"`` raises on invalid bytes, ``"replace"``
    substitutes U+FFFD) and kept exactly: line endings are not normalised. An empty file holds no
    document; everything else is yielded whole.

    Args:
        paths: files and glob patterns (see :func:`expand_paths`).
        format: one of :data:`FORMATS`.
        split_paragraphs: for ``"text"`` files, one document per paragraph block.
        text_field: the JSONL field holding the text.
        errors: ``"strict"`` or ``"replace"``, for invalid UTF-8 in text, JSONL and WikiText.

    Yields:
        :class:`Document` objects, files in the order of :func:`expand_paths`.

    Raises:
        DataError: for a missing file or a pattern matching nothing, invalid UTF-8 (strict),
            invalid JSON or a JSONL line without a string text field (naming file and line), an
            unknown option, or a corpus without any document (raised when the iterator ends).

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / "a.jsonl").write_text('{"text": "one"}\\n\\n{"text": "two"}\\n')
        >>> _ = (d / "b.txt").write_text("first\\n\\nsecond\\n")
        >>> [(doc.text, Path(doc.source).name) for doc in read_documents(d / "a.jsonl")]
        [('one', 'a.jsonl:1'), ('two', 'a.jsonl:3')]
        >>> [doc.text for doc in read_documents([d / "b.txt"], split_paragraphs=True)]
        ['first', 'second']
    """
    _check_reader_options(format, errors, text_field)
    files = expand_paths(paths)
    count = 0
    for path in files:
        kind = detect_format(path) if format == "auto" else format
        if kind == "jsonl":
            docs = _read_jsonl(path, text_field)
        elif kind == "wikitext":
            docs = _read_wikitext(path, errors)
        elif kind == "python":
            docs = _read_python(path)
        else:
            docs = _read_text(path, split_paragraphs, errors)
        for doc in docs:
            count += 1
            yield doc
    if count == 0:
        names = ", ".join(str(p) for p in files[:5]) + (", ..." if len(files) > 5 else "")
        raise DataError(f"empty corpus: no document in {len(files)} file(s) ({names})")


def _limit_bytes(docs: Iterable[Document], max_bytes: int | None) -> Iterator[Document]:
    """Yields documents until their UTF-8 size reaches ``max_bytes``; the document that crosses
    the cap is cut at it (on a character boundary) and is the last one."""
    if max_bytes is None:
        yield from docs
        return
    left = max_bytes
    for doc in docs:
        size = len(doc.text.encode("utf-8"))
        if size <= left:
            yield doc
            left -= size
            if left == 0:
                return
            continue
        head = doc.text.encode("utf-8")[:left].decode("utf-8", errors="ignore")
        if head:
            yield Document(head, doc.source + f" (cut at max_bytes={max_bytes})")
        return


# --------------------------------------------------------------------------------------------
# Standard-library corpus
# --------------------------------------------------------------------------------------------


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def stdlib_source_files(
    *,
    max_bytes: int | None = None,
    split: str = "train",
    root: str | os.PathLike | None = None,
) -> list[Path]:
    """The Python standard library's own ``.py`` files: the embedded default corpus.

    Found under ``sysconfig.get_paths()["stdlib"]``, so every Python installation has it. Left
    out: ``site-packages``/``dist-packages`` (third-party code, different per machine),
    ``__pycache__`` and every test directory (``test``, ``tests``, ``idle_test``: about half of
    the files, with deliberately malformed encodings and generated data).

    The split is a stable hash of each file's path relative to the root: about 5% of the files
    (those with ``sha256(path) mod 1000 < 50``) are ``"valid"``, the rest ``"train"``. A file's
    split never depends on which other files exist, so it is the same across Python versions.

    Args:
        max_bytes: cap on the total file size: files are visited in the order of the same
            stable hash (a spread over all packages, not the alphabetically first ones) and a
            file is taken when it still fits under the cap. ``None`` takes all files.
        split: ``"train"`` or ``"valid"``.
        root: the library directory to scan instead of the standard library (for tests).

    Returns:
        The selected files, sorted by path.

    Raises:
        DataError: if ``split`` or ``max_bytes`` is invalid, or no file is found or fits.

    Example:
        >>> train, valid = stdlib_source_files(), stdlib_source_files(split="valid")
        >>> len(train) > 10 * len(valid) > 0, set(train).isdisjoint(valid)
        (True, True)
        >>> sum(p.stat().st_size for p in stdlib_source_files(max_bytes=100_000)) <= 100_000
        True
    """
    if split not in ("train", "valid"):
        raise DataError(f"split: expected 'train' or 'valid', got {split!r}")
    if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes <= 0):
        raise DataError(f"max_bytes: expected a positive int or None, got {max_bytes!r}")
    base = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    selected: list[tuple[int, str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_EXCLUDED_DIRS)
        for name in filenames:
            if not name.endswith(".py"):
                continue
            path = Path(dirpath) / name
            rel = path.relative_to(base).as_posix()
            h = _stable_hash(rel)
            in_valid = h % 1000 < _STDLIB_VALID_PER_MILLE
            if in_valid == (split == "valid"):
                selected.append((h, rel, path))
    if not selected:
        raise DataError(f"no Python source files found under {base} (split={split!r})")
    if max_bytes is not None:
        selected.sort()
        kept, total = [], 0
        for item in selected:
            size = item[2].stat().st_size
            if total + size <= max_bytes:
                kept.append(item)
                total += size
        if not kept:
            raise DataError(f"max_bytes={max_bytes}: smaller than every stdlib source file")
        selected = kept
    return [path for _, _, path in sorted(selected, key=lambda item: item[1])]


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


class TextTokenizer:
    """A text tokenizer (``tokenizers.Tokenizer``) with a known end-of-sequence token.

    Encoding adds no special tokens (no BOS): the data pipeline appends ``eos_id`` after every
    document itself. Special-token strings that occur in the text (e.g. a literal
    ``"<|endoftext|>"``) are encoded as ordinary text, so a document cannot forge a document
    boundary. ``pad_id`` equals ``eos_id``.

    Byte-level BPE tokenizers (those trained by :meth:`train_bpe`, GPT-2, Llama-3) round-trip
    every string exactly: ``decode(encode(s)) == s``.

    Args:
        tokenizer: the ``tokenizers.Tokenizer`` (copied, the argument is not modified).
        eos_token: the end-of-sequence token; ``None`` tries :data:`EOS_CANDIDATES` in order.

    Raises:
        DataError: if ``eos_token`` is not in the vocabulary, or none of the candidates is.

    Example:
        >>> tok = TextTokenizer.train_bpe(["the cat sat on the mat"] * 20, vocab_size=300)
        >>> ids = tok.encode("the cat ate a hat")
        >>> tok.decode(ids)
        'the cat ate a hat'
        >>> tok.eos_id == tok.pad_id == tok.backend.token_to_id("<|endoftext|>")
        True
    """

    def __init__(self, tokenizer: Tokenizer, *, eos_token: str | None = None) -> None:
        if not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"tokenizer: expected tokenizers.Tokenizer, got {type(tokenizer)}")
        json_str = tokenizer.to_str()
        self._tok = Tokenizer.from_str(json_str)
        if hasattr(self._tok, "encode_special_tokens"):
            self._tok.encode_special_tokens = True
        self._fingerprint = hashlib.sha256(json_str.encode("utf-8")).hexdigest()
        if eos_token is not None:
            if self._tok.token_to_id(eos_token) is None:
                raise DataError(f"eos_token: {eos_token!r} is not in the tokenizer's vocabulary")
        else:
            found = [t for t in EOS_CANDIDATES if self._tok.token_to_id(t) is not None]
            eos_token = found[0] if found else None
            if eos_token is None:
                raise DataError(
                    f"no end-of-sequence token found (tried {list(EOS_CANDIDATES)}); "
                    "pass eos_token= explicitly"
                )
        self.eos_token: str = eos_token
        self.eos_id: int = self._tok.token_to_id(eos_token)
        self.pad_id: int = self.eos_id

    @classmethod
    def train_bpe(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        *,
        min_frequency: int = 2,
        show_progress: bool = False,
    ) -> TextTokenizer:
        """Trains a byte-level BPE tokenizer (GPT-2 style) on texts.

        ByteLevel pre-tokenizer (GPT-2 split regex, no prefix space) and decoder; the 256 byte
        symbols are always in the vocabulary, so every string encodes and decodes exactly. The
        only special token is ``<|endoftext|>`` (id 0), used as EOS and padding.

        Args:
            texts: training texts (any iterable; consumed once).
            vocab_size: target vocabulary size including the byte alphabet and ``<|endoftext|>``,
                at least 257. Fewer tokens result if the texts support fewer merges.
            min_frequency: minimum count of a pair to be merged.
            show_progress: show the ``tokenizers`` progress bar.

        Returns:
            The trained tokenizer.

        Raises:
            DataError: if ``vocab_size < 257`` or ``min_frequency < 1``.

        Example:
            >>> tok = TextTokenizer.train_bpe(["aaaa bbbb"] * 10, vocab_size=260)
            >>> tok.vocab_size, tok.eos_token
            (260, '<|endoftext|>')
        """
        if not isinstance(vocab_size, int) or vocab_size < 257:
            raise DataError(
                f"vocab_size: expected an int >= 257 (256 bytes + EOS), got {vocab_size!r}"
            )
        if not isinstance(min_frequency, int) or min_frequency < 1:
            raise DataError(f"min_frequency: expected an int >= 1, got {min_frequency!r}")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[_DEFAULT_EOS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok, eos_token=_DEFAULT_EOS)

    @classmethod
    def load(cls, path: str | os.PathLike, *, eos_token: str | None = None) -> TextTokenizer:
        """Loads any ``tokenizer.json`` (ours, GPT-2, Llama-3, ...).

        Args:
            path: the ``tokenizer.json`` file.
            eos_token: the end-of-sequence token; ``None`` tries :data:`EOS_CANDIDATES`.

        Returns:
            The tokenizer.

        Raises:
            DataError: if the file is missing or not a valid tokenizer, or no EOS token is found.

        Example:
            >>> import tempfile
            >>> tok = TextTokenizer.train_bpe(["hello world"] * 5, vocab_size=270)
            >>> path = Path(tempfile.mkdtemp()) / "tokenizer.json"
            >>> tok.save(path)
            >>> TextTokenizer.load(path).encode("hello") == tok.encode("hello")
            True
        """
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
        """Writes a standard ``tokenizer.json`` (atomically: temporary file, then rename).

        Args:
            path: destination file; parent directories are created.
        """
        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            self._tok.save(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @property
    def backend(self) -> Tokenizer:
        """The wrapped ``tokenizers.Tokenizer``."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added/special tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def fingerprint(self) -> str:
        """The SHA-256 of the tokenizer's JSON, which identifies it in cache keys."""
        return self._fingerprint

    def encode(self, text: str) -> list[int]:
        """Token ids of one text (no special tokens added).

        Args:
            text: the text.

        Returns:
            The ids.
        """
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of many texts, encoded in parallel by the Rust backend.

        Args:
            texts: the texts.

        Returns:
            One list of ids per text.
        """
        fast = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [enc.ids for enc in fast(list(texts), add_special_tokens=False)]

    def decode(
        self, ids: Sequence[int] | np.ndarray | torch.Tensor, *, skip_special_tokens: bool = False
    ) -> str:
        """Text of a sequence of token ids.

        Args:
            ids: 1-D ids (list, NumPy array or tensor).
            skip_special_tokens: drop special tokens (EOS) instead of writing their text.

        Returns:
            The text.
        """
        return self._tok.decode(_as_id_list(ids), skip_special_tokens=skip_special_tokens)

    def decode_batch(
        self,
        batch: Sequence[Sequence[int]] | np.ndarray | torch.Tensor,
        *,
        skip_special_tokens: bool = False,
    ) -> list[str]:
        """Texts of a batch of id sequences (rows of a 2-D array/tensor or a list of lists).

        Args:
            batch: the id sequences.
            skip_special_tokens: drop special tokens (EOS) instead of writing their text.

        Returns:
            One text per row.
        """
        rows = [_as_id_list(row) for row in batch]
        return self._tok.decode_batch(rows, skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return f"TextTokenizer(vocab_size={self.vocab_size}, eos_token={self.eos_token!r})"


def _as_id_list(ids: Any) -> list[int]:
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    if isinstance(ids, np.ndarray):
        if ids.ndim != 1:
            raise ValueError(f"ids: expected a 1-D sequence, got shape {tuple(ids.shape)}")
        return ids.astype(np.int64).tolist()
    return [int(i) for i in ids]


# --------------------------------------------------------------------------------------------
# Token streams and the cache
# --------------------------------------------------------------------------------------------


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _encoded_batches(
    tokenizer: TextTokenizer, docs: Iterable[Document]
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields (tokens of a batch of documents, each followed by EOS; their lengths)."""
    dtype = _token_dtype(tokenizer.vocab_size)
    eos = [tokenizer.eos_id]
    texts: list[str] = []
    chars = 0

    def flush() -> tuple[np.ndarray, np.ndarray]:
        ids = tokenizer.encode_batch(texts)
        lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
        flat = itertools.chain.from_iterable(itertools.chain(x, eos) for x in ids)
        return np.fromiter(flat, dtype=dtype, count=int(lengths.sum())), lengths

    for doc in docs:
        texts.append(doc.text)
        chars += len(doc.text)
        if chars >= _ENCODE_BATCH_CHARS or len(texts) >= _ENCODE_BATCH_DOCS:
            yield flush()
            texts, chars = [], 0
    if texts:
        yield flush()


def encode_documents(
    tokenizer: TextTokenizer, docs: Iterable[Document | str]
) -> tuple[np.ndarray, np.ndarray]:
    """Tokenises documents in memory into one stream, an EOS after every document.

    Args:
        tokenizer: the tokenizer.
        docs: documents or plain strings.

    Returns:
        ``(tokens, doc_starts)``: tokens (n,) (uint16 for vocabularies up to 65536, else uint32)
        and the start offset of every document in it (num_docs,) int64.

    Example:
        >>> tok = TextTokenizer.train_bpe(["ab ab ab"] * 5, vocab_size=260)
        >>> tokens, starts = encode_documents(tok, ["ab", "ab ab"])
        >>> starts.tolist(), int(tokens[-1]) == tok.eos_id
        ([0, 2], True)
    """
    stream = (d if isinstance(d, Document) else Document(d, "<str>") for d in docs)
    token_parts, length_parts = [], []
    for tokens, lengths in _encoded_batches(tokenizer, stream):
        token_parts.append(tokens)
        length_parts.append(lengths)
    dtype = _token_dtype(tokenizer.vocab_size)
    tokens = np.concatenate(token_parts) if token_parts else np.zeros(0, dtype)
    lengths = np.concatenate(length_parts) if length_parts else np.zeros(0, np.int64)
    return tokens, _starts(lengths)


def _starts(lengths: np.ndarray) -> np.ndarray:
    """Start offsets (num_docs,) int64 of documents with the given lengths."""
    starts = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    return starts


@dataclass(frozen=True)
class TokenCache:
    """A tokenised corpus on disk (see :func:`build_token_cache`).

    Attributes:
        path: the token file (``tokens-<key>.npy``).
        tokens: the memory-mapped stream (n,), uint16 or uint32; every document ends with EOS.
        doc_starts: start offset of every document (num_docs,) int64.
        built: ``True`` if this call tokenised the corpus, ``False`` if it reused the cache.
        meta: the cache's metadata (files, tokenizer fingerprint, options, counts).
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
    """The shared token-cache directory: ``$CALM_CACHE``, else ``$XDG_CACHE_HOME/calm_models``,
    else ``~/.cache/calm_models``. Independent of the run directory so that runs share caches.

    Returns:
        The directory (not created).

    Example:
        >>> isinstance(default_cache_dir(), Path)
        True
    """
    if os.environ.get("CALM_CACHE"):
        return Path(os.environ["CALM_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "calm_models"


def _npy_header(dtype: np.dtype, n: int) -> bytes:
    descr = np.lib.format.dtype_to_descr(dtype)
    body = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': ({n},), }}"
    body = body.ljust(_NPY_HEADER_LEN - 11) + "\n"
    header = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(body)) + body.encode("latin1")
    assert len(header) == _NPY_HEADER_LEN
    return header


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _file_signature(path: Path) -> list:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


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
    """Tokenises a corpus once into a memory-mapped ``.npy`` and reuses it afterwards.

    Documents are read (:func:`read_documents`), tokenised in batches (``encode_batch``) and
    streamed to disk, each followed by ``tokenizer.eos_id``; the corpus is never held in memory
    as Python ints. The cache key is a hash of the files' resolved paths, sizes and mtimes, the
    tokenizer's JSON, the reader options and ``max_bytes``: an unchanged corpus is reused, a
    touched, resized, added or removed file gives a new key and a rebuild (old entries stay in
    the directory until deleted). Files are written to temporaries and renamed, so concurrent
    builders (e.g. several ranks) never see a partial cache.

    Files in ``cache_dir``: ``tokens-<key>.npy`` (n,), ``docs-<key>.npy`` (document starts,
    int64) and ``meta-<key>.json`` (written last; its presence marks a complete entry).

    Args:
        tokenizer: the tokenizer.
        paths: files and glob patterns.
        cache_dir: cache directory; ``None`` -> :func:`default_cache_dir`.
        format: reader format (see :func:`read_documents`).
        split_paragraphs: reader option for plain text.
        text_field: reader option for JSONL.
        errors: reader option for invalid UTF-8.
        max_bytes: cap on the UTF-8 bytes of text: documents are taken in order and the one that
            crosses the cap is cut at it and is the last (its source says so). ``None``: all.
        progress: show a tqdm bar; ``None`` shows it only when stderr is a terminal.

    Returns:
        The :class:`TokenCache`.

    Raises:
        DataError: for bad files, options or an empty corpus (see :func:`read_documents`).

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
    _check_reader_options(format, errors, text_field)
    if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes <= 0):
        raise DataError(f"max_bytes: expected a positive int or None, got {max_bytes!r}")
    files = expand_paths(paths)
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    options = {
        "format": format,
        "split_paragraphs": bool(split_paragraphs),
        "text_field": text_field,
        "errors": errors,
        "max_bytes": max_bytes,
    }
    key_data = {
        "version": _CACHE_VERSION,
        "files": [_file_signature(p) for p in files],
        "tokenizer": tokenizer.fingerprint,
        "eos_id": tokenizer.eos_id,
        "options": options,
    }
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True).encode("utf-8")).hexdigest()[:20]
    tokens_path = cache_dir / f"tokens-{key}.npy"
    docs_path = cache_dir / f"docs-{key}.npy"
    meta_path = cache_dir / f"meta-{key}.json"
    if meta_path.is_file() and tokens_path.is_file() and docs_path.is_file():
        meta = json.loads(meta_path.read_text())
        logger.info("reusing token cache %s (%d tokens)", tokens_path, meta["num_tokens"])
        return TokenCache(
            tokens_path,
            np.load(tokens_path, mmap_mode="r"),
            np.load(docs_path, mmap_mode="r"),
            built=False,
            meta=meta,
        )

    cache_dir.mkdir(parents=True, exist_ok=True)
    dtype = _token_dtype(tokenizer.vocab_size)
    docs = _limit_bytes(
        read_documents(
            files, format=format, split_paragraphs=split_paragraphs, text_field=text_field,
            errors=errors,
        ),
        max_bytes,
    )
    stats = {"num_tokens": 0, "num_documents": 0, "text_bytes": 0, "truncated": False}
    length_parts: list[np.ndarray] = []

    def counted(docs: Iterable[Document]) -> Iterator[Document]:
        for doc in docs:
            stats["text_bytes"] += len(doc.text.encode("utf-8"))
            stats["truncated"] |= doc.source.endswith(f"(cut at max_bytes={max_bytes})")
            yield doc

    start = time.perf_counter()

    def write_tokens(f) -> None:
        f.write(_npy_header(dtype, 0))
        bar = tqdm(
            desc=f"tokenising {len(files)} file(s)",
            unit="doc",
            disable=None if progress is None else not progress,
        )
        with bar:
            for tokens, lengths in _encoded_batches(tokenizer, counted(docs)):
                f.write(tokens.tobytes())
                length_parts.append(lengths)
                stats["num_tokens"] += len(tokens)
                stats["num_documents"] += len(lengths)
                bar.update(len(lengths))
                bar.set_postfix(tokens=stats["num_tokens"], refresh=False)
        f.seek(0)
        f.write(_npy_header(dtype, stats["num_tokens"]))

    _atomic_write(tokens_path, write_tokens)
    starts = _starts(np.concatenate(length_parts))
    _atomic_write(docs_path, lambda f: np.save(f, starts))
    seconds = time.perf_counter() - start
    meta = {
        **key_data,
        "key": key,
        "dtype": dtype.name,
        **stats,
        "seconds": round(seconds, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    _atomic_write(meta_path, lambda f: f.write(json.dumps(meta, indent=1).encode("utf-8")))
    logger.info(
        "tokenised %d documents (%d bytes) into %d tokens in %.1fs -> %s",
        stats["num_documents"], stats["text_bytes"], stats["num_tokens"], seconds, tokens_path,
    )
    return TokenCache(
        tokens_path, np.load(tokens_path, mmap_mode="r"), np.load(docs_path, mmap_mode="r"),
        built=True, meta=meta,
    )


# --------------------------------------------------------------------------------------------
# Blocks and batches
# --------------------------------------------------------------------------------------------


class PackedBlocks:
    """A token stream cut into fixed, non-overlapping blocks of ``block_len`` tokens.

    Block ``i`` holds ``tokens[i*L : (i+1)*L]``. Documents are packed back to back (separated by
    the EOS the token cache puts after each) and may span blocks. The final partial block is
    padded with ``pad_id`` to length ``L``; ``num_tokens`` counts the real tokens and
    ``num_padding`` the padding (``num_blocks * L == num_tokens + num_padding``, padding < L).
    The stream stays memory-mapped; only requested blocks are read.

    Args:
        tokens: the stream (n,) of non-negative ints, e.g. ``TokenCache.tokens``.
        block_len: tokens per block ``L``; a positive multiple of ``chunk_size``.
        chunk_size: the CALM chunk size ``K`` (tokens per latent vector).
        pad_id: padding id; ``None`` uses the stream's last token, which is EOS for every stream
            made by :func:`build_token_cache` or :func:`encode_documents`.

    Raises:
        DataError: if ``block_len`` is not a positive multiple of ``chunk_size`` or the stream is
            empty or not 1-D.

    Example:
        >>> tokens = np.arange(10, dtype=np.uint16)
        >>> blocks = PackedBlocks(tokens, block_len=4, chunk_size=2, pad_id=0)
        >>> len(blocks), blocks.num_tokens, blocks.num_padding
        (3, 10, 2)
        >>> blocks[2].tolist()
        [8, 9, 0, 0]
        >>> blocks.get_batch(torch.tensor([1, 0])).tolist()
        [[4, 5, 6, 7], [0, 1, 2, 3]]
    """

    def __init__(
        self,
        tokens: np.ndarray,
        block_len: int,
        chunk_size: int,
        *,
        pad_id: int | None = None,
    ) -> None:
        if not isinstance(chunk_size, int) or chunk_size <= 0:
            raise DataError(f"chunk_size: expected a positive int, got {chunk_size!r}")
        if not isinstance(block_len, int) or block_len <= 0 or block_len % chunk_size != 0:
            raise DataError(
                f"block_len: expected a positive multiple of chunk_size={chunk_size}, "
                f"got {block_len!r}"
            )
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.detach().cpu().numpy()
        if not isinstance(tokens, np.ndarray) or tokens.ndim != 1:
            raise DataError(f"tokens: expected a 1-D array, got {type(tokens).__name__}")
        if len(tokens) == 0:
            raise DataError("tokens: the token stream is empty")
        self.tokens = tokens
        self.block_len = block_len
        self.chunk_size = chunk_size
        self.pad_id = int(tokens[-1]) if pad_id is None else int(pad_id)
        self.num_tokens = len(tokens)
        self.num_blocks = -(-self.num_tokens // block_len)
        self.num_padding = self.num_blocks * block_len - self.num_tokens
        self._num_full = self.num_tokens // block_len
        self._full = tokens[: self._num_full * block_len].reshape(self._num_full, block_len)
        tail = np.full(block_len, self.pad_id, dtype=np.int64)
        rest = tokens[self._num_full * block_len :]
        tail[: len(rest)] = rest
        self._tail = tail  # the padded last block (only used when num_padding > 0)

    def __len__(self) -> int:
        return self.num_blocks

    def __getitem__(self, index: int) -> torch.Tensor:
        """Block ``index`` as a LongTensor (L,); negative indices count from the end."""
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"index: expected an int, got {type(index).__name__}")
        return self.get_batch(torch.tensor([int(index)]))[0]

    def _check_indices(self, indices: torch.Tensor | np.ndarray | Sequence[int]) -> np.ndarray:
        if isinstance(indices, torch.Tensor):
            if indices.dtype.is_floating_point or indices.dtype == torch.bool:
                raise TypeError(f"indices: expected an integer tensor, got {indices.dtype}")
            indices = indices.detach().cpu().numpy()
        idx = np.asarray(indices)
        if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise TypeError(f"indices: expected 1-D integers, got shape {idx.shape} {idx.dtype}")
        idx = idx.astype(np.int64)
        idx = np.where(idx < 0, idx + self.num_blocks, idx)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_blocks):
            raise IndexError(f"indices: block index out of range for {self.num_blocks} blocks")
        return idx

    def get_batch(self, indices: torch.Tensor | np.ndarray | Sequence[int]) -> torch.Tensor:
        """Gathers blocks into a batch.

        Args:
            indices: block indices (b,), any integer dtype; negative count from the end.

        Returns:
            LongTensor (b, L) on the CPU.

        Raises:
            IndexError: if an index is out of range.
            TypeError: if indices are not 1-D integers.
        """
        idx = self._check_indices(indices)
        full = idx < self._num_full  # (b,)
        out = np.empty((len(idx), self.block_len), dtype=np.int64)  # (b, L)
        out[full] = self._full[idx[full]]
        out[~full] = self._tail
        return torch.from_numpy(out)

    def token_mask(self, indices: torch.Tensor | np.ndarray | Sequence[int]) -> torch.Tensor:
        """Which positions of :meth:`get_batch` hold real tokens (``False`` on padding).

        Args:
            indices: block indices (b,).

        Returns:
            BoolTensor (b, L).
        """
        idx = torch.from_numpy(self._check_indices(indices))
        pos = idx[:, None] * self.block_len + torch.arange(self.block_len)  # (b, L)
        return pos < self.num_tokens

    def __repr__(self) -> str:
        return (
            f"PackedBlocks(num_blocks={self.num_blocks}, block_len={self.block_len}, "
            f"chunk_size={self.chunk_size}, num_tokens={self.num_tokens}, "
            f"num_padding={self.num_padding})"
        )


def _epoch_seed(seed: int, epoch: int) -> int:
    return _stable_hash(f"calm_models.BlockLoader:{seed}:{epoch}") >> 1  # < 2**63


class BlockLoader:
    """Infinite, deterministic, resumable and rank-sharded batches of blocks.

    Every epoch is a permutation of the block indices drawn from a ``torch.Generator`` seeded
    with a hash of ``(seed, epoch)`` (the identity when ``shuffle=False``). With ``G = B * W``
    (per-rank batch ``B``, world size ``W``), the global batch of step ``s`` of an epoch is
    ``perm[s*G : (s+1)*G]`` and rank ``r`` takes its rows ``[r*B : (r+1)*B]``: a ``W``-process
    run sees exactly the batches of a 1-process run with batch ``G``. An epoch has
    ``steps_per_epoch = N // G`` steps; the incomplete last global batch is skipped (a fresh
    permutation next epoch gives the skipped blocks their turn).

    Args:
        blocks: the dataset (:class:`PackedBlocks` or anything with ``__len__`` and
            ``get_batch(indices) -> (b, L)``).
        batch_size: per-rank batch size ``B``.
        seed: base seed of the permutations.
        rank: this process's rank ``r`` in ``[0, W)``.
        world_size: number of processes ``W``.
        shuffle: permute the blocks each epoch; ``False`` visits them in order.

    Raises:
        DataError: if the dataset has fewer blocks than one global batch.
        ValueError: for a non-positive batch size or world size or a rank outside ``[0, W)``.

    Example:
        >>> blocks = PackedBlocks(np.arange(40), block_len=4, chunk_size=2)
        >>> loader = BlockLoader(blocks, batch_size=3, seed=0)
        >>> batch = next(loader)
        >>> tuple(batch.shape), loader.steps_per_epoch
        ((3, 4), 3)
        >>> state = loader.state_dict()
        >>> expected = next(loader)
        >>> resumed = BlockLoader(blocks, batch_size=3, seed=0)
        >>> resumed.load_state_dict(state)
        >>> torch.equal(next(resumed), expected)
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
        if not isinstance(world_size, int) or world_size <= 0:
            raise ValueError(f"world_size: expected a positive int, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank: expected an int in [0, {world_size}), got {rank!r}")
        if not isinstance(seed, int):
            raise ValueError(f"seed: expected an int, got {seed!r}")
        self.blocks = blocks
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = bool(shuffle)
        self.global_batch_size = batch_size * world_size
        self.num_blocks = len(blocks)
        self.steps_per_epoch = self.num_blocks // self.global_batch_size
        if self.steps_per_epoch == 0:
            raise DataError(
                f"the dataset has {self.num_blocks} blocks, fewer than one global batch of "
                f"{self.global_batch_size} (batch_size={batch_size} x world_size={world_size}); "
                "use more data, a smaller batch or a shorter block_len"
            )
        self.epoch = 0
        self.step_in_epoch = 0
        self._perm_epoch: int | None = None
        self._perm = torch.empty(0, dtype=torch.long)

    def permutation(self, epoch: int) -> torch.Tensor:
        """The block order of an epoch: LongTensor (N,)."""
        if not self.shuffle:
            return torch.arange(self.num_blocks)
        g = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
        return torch.randperm(self.num_blocks, generator=g)

    def global_batch_indices(self, epoch: int, step: int) -> torch.Tensor:
        """Block indices of the global batch (all ranks) at a step of an epoch: LongTensor (G,)."""
        if not 0 <= step < self.steps_per_epoch:
            raise ValueError(f"step: expected an int in [0, {self.steps_per_epoch}), got {step!r}")
        if self._perm_epoch != epoch:
            self._perm, self._perm_epoch = self.permutation(epoch), epoch
        g = self.global_batch_size
        return self._perm[step * g : (step + 1) * g]

    def __iter__(self) -> BlockLoader:
        return self

    def __next__(self) -> torch.Tensor:
        """The next batch of this rank: LongTensor (B, L)."""
        if self.step_in_epoch >= self.steps_per_epoch:
            self.epoch += 1
            self.step_in_epoch = 0
        rows = self.global_batch_indices(self.epoch, self.step_in_epoch)
        mine = rows[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]  # (B,)
        self.step_in_epoch += 1
        return self.blocks.get_batch(mine)

    def state_dict(self) -> dict[str, Any]:
        """The position in the stream, for an exact resume.

        Returns:
            ``{"epoch", "step_in_epoch", "seed", "shuffle", "global_batch_size", "num_blocks"}``.
        """
        return {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "global_batch_size": self.global_batch_size,
            "num_blocks": self.num_blocks,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resumes at a saved position; the next batch is the one the saved loader would give.

        The per-rank split may differ (e.g. 1 rank x 8 resumed as 2 ranks x 4) as long as the
        global batch size, seed, shuffle and dataset size match.

        Args:
            state: a dict from :meth:`state_dict`.

        Raises:
            ValueError: if the state belongs to a different seed, dataset or global batch size.
        """
        for name in ("seed", "shuffle", "global_batch_size", "num_blocks"):
            if name in state and state[name] != getattr(self, name):
                raise ValueError(
                    f"state_dict: {name}={state[name]!r} does not match this loader's "
                    f"{name}={getattr(self, name)!r}"
                )
        epoch, step = int(state["epoch"]), int(state["step_in_epoch"])
        if epoch < 0 or not 0 <= step <= self.steps_per_epoch:
            raise ValueError(f"state_dict: invalid position epoch={epoch}, step_in_epoch={step}")
        self.epoch, self.step_in_epoch = epoch, step


# --------------------------------------------------------------------------------------------
# Configuration and assembly
# --------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Where the text comes from, how it is tokenised and cut into blocks.

    Attributes:
        train_files: training files or glob patterns; empty -> the standard library's train
            split (:func:`stdlib_source_files`).
        valid_files: validation files or patterns. Empty -> the standard library's valid split
            when ``train_files`` is empty too; otherwise the last ``valid_fraction`` of the
            training token stream (whole blocks, at least one) is held out. That tail comes from
            the last files, so prefer explicit ``valid_files`` when files differ in domain.
        tokenizer: path of an existing ``tokenizer.json`` (copied to ``run_dir``). ``None``:
            load ``run_dir/tokenizer.json`` if it exists, else train a byte-level BPE of
            ``vocab_size`` on the first ``tokenizer_train_bytes`` of training text and save it
            there.
        eos_token: EOS token of a loaded tokenizer; ``None`` detects it.
        vocab_size: BPE vocabulary size when training one (ignored for a given ``tokenizer``).
        block_len: tokens per training block, a multiple of the CALM chunk size.
        max_train_bytes: cap on the training text in UTF-8 bytes (``None``: all of it).
        max_valid_bytes: cap on the validation text (``None``: all of it).
        tokenizer_train_bytes: cap on the text used to train the BPE.
        valid_fraction: share of the training stream held out when no ``valid_files``.
        cache_dir: token-cache directory; ``None`` -> :func:`default_cache_dir`, shared by runs.
        format: reader format of the files, one of :data:`FORMATS`.
        split_paragraphs: plain text: one document per paragraph block instead of per file.
        text_field: JSONL field with the text.
        errors: ``"strict"`` or ``"replace"`` for invalid UTF-8.

    Example:
        >>> cfg = DataConfig(block_len=250)
        >>> cfg.validate(chunk_size=4)
        Traceback (most recent call last):
        ...
        calm_models.data.DataError: block_len: expected a positive multiple of chunk_size=4, got 250
    """

    train_files: list[str] = field(default_factory=list)
    valid_files: list[str] = field(default_factory=list)
    tokenizer: str | None = None
    eos_token: str | None = None
    vocab_size: int = 4096
    block_len: int = 256
    max_train_bytes: int | None = None
    max_valid_bytes: int | None = None
    tokenizer_train_bytes: int = 20_000_000
    valid_fraction: float = 0.02
    cache_dir: str | None = None
    format: str = "auto"
    split_paragraphs: bool = False
    text_field: str = "text"
    errors: str = "strict"

    def validate(self, chunk_size: int | None = None) -> None:
        """Checks every field.

        Args:
            chunk_size: the CALM chunk size ``K`` that ``block_len`` must be a multiple of;
                ``None`` (as the generic config validation calls it) checks only that
                ``block_len`` is positive. :func:`prepare_data` passes it.

        Raises:
            DataError: naming the first invalid field and what was expected.
        """
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
            raise DataError(f"chunk_size: expected a positive int, got {chunk_size!r}")
        for name in ("train_files", "valid_files"):
            value = getattr(self, name)
            if isinstance(value, (str, os.PathLike)) or not isinstance(value, (list, tuple)):
                raise DataError(f"{name}: expected a list of paths or patterns, got {value!r}")
            if not all(isinstance(v, (str, os.PathLike)) for v in value):
                raise DataError(f"{name}: expected a list of str, got {value!r}")
        for name in ("tokenizer", "eos_token", "cache_dir"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise DataError(f"{name}: expected a string or None, got {value!r}")
        if not isinstance(self.vocab_size, int) or self.vocab_size < 257:
            raise DataError(f"vocab_size: expected an int >= 257, got {self.vocab_size!r}")
        block_len = self.block_len
        if not isinstance(block_len, int) or block_len <= 0:
            raise DataError(f"block_len: expected a positive int, got {block_len!r}")
        if chunk_size is not None and block_len % chunk_size:
            raise DataError(
                f"block_len: expected a positive multiple of chunk_size={chunk_size}, "
                f"got {block_len!r}"
            )
        for name in ("max_train_bytes", "max_valid_bytes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise DataError(f"{name}: expected a positive int or None, got {value!r}")
        if not isinstance(self.tokenizer_train_bytes, int) or self.tokenizer_train_bytes <= 0:
            raise DataError(
                "tokenizer_train_bytes: expected a positive int, "
                f"got {self.tokenizer_train_bytes!r}"
            )
        if not isinstance(self.valid_fraction, (int, float)) or not 0 < self.valid_fraction < 1:
            raise DataError(
                f"valid_fraction: expected a number in (0, 1), got {self.valid_fraction!r}"
            )
        _check_reader_options(self.format, self.errors, self.text_field)

    def to_dict(self) -> dict[str, Any]:
        """The config as a plain dict (for saving next to a checkpoint)."""
        return asdict(self)


def prepare_data(
    cfg: DataConfig,
    run_dir: str | os.PathLike,
    *,
    chunk_size: int,
    progress: bool | None = None,
) -> tuple[TextTokenizer, PackedBlocks, PackedBlocks]:
    """Builds the tokenizer and the train/validation blocks of a run.

    Steps: validate ``cfg``; resolve the training source (``train_files`` or the standard
    library); load or train the tokenizer (kept as ``run_dir/tokenizer.json``); tokenise the
    training and validation text into the shared token cache (reused when unchanged); cut both
    into :class:`PackedBlocks` padded with EOS.

    In a multi-process run, call it on rank 0 first and on the other ranks after a barrier, so
    that the tokenizer is trained and the cache built once.

    Args:
        cfg: the data configuration.
        run_dir: the run directory (created if needed).
        chunk_size: the CALM chunk size ``K``.
        progress: show progress bars; ``None``: only on a terminal.

    Returns:
        ``(tokenizer, train_blocks, valid_blocks)``.

    Raises:
        DataError: for an invalid config, bad files, or a corpus too small to hold out a
            validation block.

    Example:
        >>> import tempfile
        >>> run_dir = Path(tempfile.mkdtemp())
        >>> cfg = DataConfig(vocab_size=300, block_len=64, max_train_bytes=30_000,
        ...                  max_valid_bytes=10_000, cache_dir=str(run_dir / "cache"))
        >>> tok, train, valid = prepare_data(cfg, run_dir, chunk_size=4, progress=False)
        >>> tok.vocab_size, train.block_len, (run_dir / "tokenizer.json").is_file()
        (300, 64, True)
    """
    cfg.validate(chunk_size)
    run_dir = Path(run_dir).expanduser()
    run_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    user_options = {
        "format": cfg.format,
        "split_paragraphs": cfg.split_paragraphs,
        "text_field": cfg.text_field,
        "errors": cfg.errors,
    }
    if cfg.train_files:
        train_paths = expand_paths(cfg.train_files)
        train_options = user_options
    else:
        train_paths = stdlib_source_files(split="train", max_bytes=cfg.max_train_bytes)
        train_options = {**user_options, "format": "python"}

    tokenizer = _run_tokenizer(cfg, run_dir, train_paths, train_options)
    train = build_token_cache(
        tokenizer, train_paths, cache_dir, max_bytes=cfg.max_train_bytes, progress=progress,
        **train_options,
    )
    train_tokens = train.tokens
    if cfg.valid_files:
        valid_tokens = build_token_cache(
            tokenizer, cfg.valid_files, cache_dir, max_bytes=cfg.max_valid_bytes,
            progress=progress, **user_options,
        ).tokens
    elif not cfg.train_files:
        valid_paths = stdlib_source_files(split="valid", max_bytes=cfg.max_valid_bytes)
        valid_tokens = build_token_cache(
            tokenizer, valid_paths, cache_dir, max_bytes=cfg.max_valid_bytes, progress=progress,
            **{**user_options, "format": "python"},
        ).tokens
    else:
        n = len(train_tokens)
        held = max(1, round(cfg.valid_fraction * n / cfg.block_len)) * cfg.block_len
        if n - held < cfg.block_len:
            raise DataError(
                f"train_files: {n} tokens are too few to hold out {held} validation tokens "
                f"(valid_fraction={cfg.valid_fraction}, block_len={cfg.block_len}) and keep a "
                "training block; add data or set valid_files"
            )
        train_tokens, valid_tokens = train_tokens[: n - held], train_tokens[n - held :]
        logger.info("held out the last %d of %d training tokens for validation", held, n)
    train_blocks = PackedBlocks(train_tokens, cfg.block_len, chunk_size, pad_id=tokenizer.eos_id)
    valid_blocks = PackedBlocks(valid_tokens, cfg.block_len, chunk_size, pad_id=tokenizer.eos_id)
    return tokenizer, train_blocks, valid_blocks


def _run_tokenizer(
    cfg: DataConfig, run_dir: Path, train_paths: list[Path], options: dict[str, Any]
) -> TextTokenizer:
    saved = run_dir / "tokenizer.json"
    if cfg.tokenizer is not None:
        tokenizer = TextTokenizer.load(cfg.tokenizer, eos_token=cfg.eos_token)
        tokenizer.save(saved)
        return tokenizer
    if saved.is_file():
        tokenizer = TextTokenizer.load(saved, eos_token=cfg.eos_token)
        if tokenizer.vocab_size > cfg.vocab_size:
            raise DataError(
                f"vocab_size: {saved} has {tokenizer.vocab_size} tokens but vocab_size="
                f"{cfg.vocab_size}; delete it to train a new tokenizer or fix vocab_size"
            )
        logger.info("loaded %r from %s", tokenizer, saved)
        return tokenizer
    budget = cfg.tokenizer_train_bytes
    if cfg.max_train_bytes is not None:
        budget = min(budget, cfg.max_train_bytes)
    texts = (d.text for d in _limit_bytes(read_documents(train_paths, **options), budget))
    start = time.perf_counter()
    tokenizer = TextTokenizer.train_bpe(texts, cfg.vocab_size)
    logger.info(
        "trained %r on up to %d bytes in %.1fs", tokenizer, budget, time.perf_counter() - start
    )
    tokenizer.save(saved)
    return tokenizer
