"""Tests of calm_models.data: readers, tokenizer, token cache, blocks, loader, config."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from calm_models.data import (
    BlockLoader,
    DataConfig,
    DataError,
    Document,
    PackedBlocks,
    TextTokenizer,
    build_token_cache,
    detect_format,
    encode_documents,
    expand_paths,
    prepare_data,
    read_documents,
    stdlib_source_files,
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.\n",
    "def f(x):\n    return x * 2  # double\n",
    "Émile a mangé 3 crêpes — très bon ! 日本語のテキスト 🙂\n",
    "  leading and trailing spaces  \n\n\ttabs\r\nwindows line\n",
]


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    return TextTokenizer.train_bpe(CORPUS * 20, vocab_size=320)


def _write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))
    return path


def _docs(*args, **kwargs) -> list[Document]:
    return list(read_documents(*args, **kwargs))


# ---------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------


def test_plain_text_whole_file_and_paragraphs(tmp_path):
    text = "first para\nline two\n\n  \nsecond para\r\n\n\nthird\n"
    f = _write(tmp_path / "a.txt", text)
    (doc,) = _docs(f)
    assert doc == Document(text, str(f))  # exactly as read, CRLF kept
    paras = _docs(f, split_paragraphs=True)
    assert [d.text for d in paras] == ["first para\nline two", "second para", "third"]
    assert [d.source for d in paras] == [f"{f}:1", f"{f}:5", f"{f}:8"]
    # A file without a trailing newline keeps its last character.
    g = _write(tmp_path / "b.txt", "x\n\ny")
    assert [d.text for d in _docs(g, split_paragraphs=True)] == ["x", "y"]


def test_jsonl_reader(tmp_path):
    lines = [json.dumps({"text": "alpha", "source": "s1"}), "", "   ", json.dumps({"text": ""})]
    lines.append(json.dumps({"text": "ünïcode\nwith newline", "id": 3}))
    f = _write(tmp_path / "c.jsonl", "\n".join(lines) + "\n")
    docs = _docs(f)
    assert [d.text for d in docs] == ["alpha", "", "ünïcode\nwith newline"]
    assert [d.source for d in docs] == [f"{f}:1", f"{f}:4", f"{f}:5"]
    g = _write(tmp_path / "d.jsonl", json.dumps({"body": "x"}) + "\n")
    assert [d.text for d in _docs(g, text_field="body")] == ["x"]


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"text": "unterminated', "invalid JSON"),
        ('{"title": "no text", "id": 1}', "no 'text' field (keys: ['id', 'title'])"),
        ('{"text": 17}', "the 'text' field must be a string, got int"),
        ('["text"]', "expected a JSON object"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, bad_line, message):
    good = json.dumps({"text": "fine"})
    f = _write(tmp_path / "pd.jsonl", "\n".join([good, "", good, bad_line, good]) + "\n")
    with pytest.raises(DataError) as info:
        _docs(f)
    assert f"pd.jsonl:4: {message}" in str(info.value)


WIKI = (
    " \n"
    " = Alpha = \n"
    " \n"
    " Alpha text , with @-@ tokens . \n"
    " \n"
    " = = History = = \n"
    " \n"
    " More alpha . \n"
    " \n"
    " = = = Deeper = = = \n"
    " Deep . \n"
    " \n"
    " = Beta = \n"
    " \n"
    " Beta text = not a heading = here . \n"
    " \n"
)


def test_wikitext_articles_with_subsections(tmp_path):
    f = _write(tmp_path / "wiki.raw", WIKI)
    docs = _docs(f)
    assert len(docs) == 2
    assert docs[0].text.startswith(" = Alpha = \n") and " = = History = = \n" in docs[0].text
    assert " = = = Deeper = = = \n" in docs[0].text and "Beta" not in docs[0].text
    assert docs[1].text.startswith(" = Beta = \n")
    assert docs[0].source == f"{f}:2 (article 1)" and docs[1].source == f"{f}:13 (article 2)"
    # Nothing lost: the articles concatenate to the file minus its whitespace-only preamble.
    assert "".join(d.text for d in docs) == WIKI[2:]
    # Detected by content for other names (e.g. wiki.valid.tokens); text preamble is kept.
    g = _write(tmp_path / "wiki.valid.tokens", WIKI)
    assert detect_format(g) == "wikitext" and len(_docs(g)) == 2
    h = _write(tmp_path / "pre.raw", "intro line\n" + WIKI)
    docs = _docs(h)
    assert len(docs) == 3 and docs[0].text == "intro line\n \n"
    assert "".join(d.text for d in docs) == "intro line\n" + WIKI


def test_python_reader_replaces_invalid_utf8(tmp_path):
    f = tmp_path / "m.py"
    f.write_bytes(b"x = 1\ny = '\xff'\n")
    (doc,) = _docs(f)
    assert doc.text == "x = 1\ny = '\ufffd'\n"
    assert detect_format(f) == "python"


def test_invalid_utf8_in_text_is_an_error_unless_replaced(tmp_path):
    f = tmp_path / "bad.txt"
    f.write_bytes(b"ok\nok\nbad \xff byte\n")
    with pytest.raises(DataError, match=r"bad.txt:3: not valid UTF-8"):
        _docs(f)
    assert _docs(f, errors="replace")[0].text == "ok\nok\nbad \ufffd byte\n"
    with pytest.raises(DataError, match=r"bad.txt:3: not valid UTF-8"):
        _docs(f, split_paragraphs=True)


def test_globs_are_sorted_deduplicated_and_mixed_formats(tmp_path):
    sub = tmp_path / "sub"
    sub.mkdir()
    _write(tmp_path / "b.txt", "bee")
    _write(tmp_path / "a.txt", "ay")
    _write(sub / "c.txt", "sea")
    _write(tmp_path / "d.jsonl", '{"text": "dee"}\n')
    files = expand_paths([str(tmp_path / "**" / "*.txt"), tmp_path / "a.txt"])
    assert [p.name for p in files] == ["a.txt", "b.txt", "c.txt"]
    docs = _docs([str(tmp_path / "*.txt"), str(tmp_path / "d.jsonl")])
    assert [d.text for d in docs] == ["ay", "bee", "dee"]
    assert _docs(str(tmp_path / "*.txt")) == _docs(str(tmp_path / "*.txt"))


def test_missing_files_and_empty_corpus(tmp_path):
    with pytest.raises(DataError, match="nope.txt: no such file"):
        _docs(tmp_path / "nope.txt")
    with pytest.raises(DataError, match="matches no file"):
        _docs(str(tmp_path / "*.jsonl"))
    with pytest.raises(DataError, match="is a directory"):
        _docs(tmp_path)
    with pytest.raises(DataError, match="paths"):
        _docs([])
    _write(tmp_path / "empty.txt", "")
    _write(tmp_path / "blank.jsonl", "\n\n")
    with pytest.raises(DataError, match="empty corpus"):
        _docs([tmp_path / "empty.txt", tmp_path / "blank.jsonl"])
    with pytest.raises(DataError, match="format: expected one of"):
        _docs(tmp_path / "empty.txt", format="csv")


def test_real_files(shared_data):
    pd = _docs(shared_data / "pd_english_train.jsonl")
    assert len(pd) == 78 and sum(len(d.text) for d in pd) > 7_000_000
    assert pd[0].text.startswith("[Emma by Jane Austen 1816]")
    wiki = _docs(shared_data / "wikitext103_valid.raw")
    assert len(wiki) == 60
    assert all(d.text.startswith(" = ") and not d.text.startswith(" = = ") for d in wiki)
    raw = (shared_data / "wikitext103_valid.raw").read_text(encoding="utf-8")
    assert "".join(d.text for d in wiki) == raw[raw.index(" = ") :]
    stories = _docs(shared_data / "tinystories_val.txt")
    assert len(stories) == 1
    paras = _docs(shared_data / "tinystories_val.txt", split_paragraphs=True)
    assert 4000 < len(paras) < 5000 and all(p.text.strip() for p in paras)


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def test_train_save_load_round_trip(tokenizer, tmp_path):
    assert tokenizer.vocab_size == 320 and tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.eos_id == tokenizer.pad_id == 0
    path = tmp_path / "tok" / "tokenizer.json"
    tokenizer.save(path)
    assert json.loads(path.read_text())["model"]["type"] == "BPE"
    loaded = TextTokenizer.load(path)
    assert loaded.fingerprint == tokenizer.fingerprint
    assert loaded.encode_batch(CORPUS) == tokenizer.encode_batch(CORPUS)
    assert [tokenizer.encode(t) for t in CORPUS] == tokenizer.encode_batch(CORPUS)
    # Merges learned: common text is shorter than its bytes.
    assert len(tokenizer.encode(CORPUS[0])) < 0.7 * len(CORPUS[0].encode("utf-8"))


@given(st.text(max_size=200))
def test_byte_level_round_trip_is_exact(tokenizer, text):
    ids = tokenizer.encode(text)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text


def test_round_trip_of_special_strings_and_batches(tokenizer):
    texts = CORPUS + ["", " ", "\n\n\n", "a<|endoftext|>b", "\x00\u2028\ufeff\U0010ffff"]
    ids = tokenizer.encode_batch(texts)
    assert tokenizer.decode_batch(ids) == texts
    # A literal special-token string in the text is ordinary text: it cannot forge an EOS.
    assert tokenizer.eos_id not in tokenizer.encode("a<|endoftext|>b")
    padded = torch.tensor([ids[0] + [tokenizer.eos_id]])
    assert tokenizer.decode_batch(padded) == [texts[0] + "<|endoftext|>"]
    assert tokenizer.decode(padded[0], skip_special_tokens=True) == texts[0]


def _gpt2_style_tokenizer(eos: str | None) -> Tokenizer:
    """A tiny tokenizer.json as GPT-2 / Llama-3 ship it: byte-level BPE + a special token."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab["he"] = len(vocab)
    vocab["hel"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("h", "e"), ("he", "l")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if eos is not None:
        tok.add_special_tokens([eos])
    return tok


@pytest.mark.parametrize("eos", ["<|endoftext|>", "<|end_of_text|>", "</s>"])
def test_load_foreign_tokenizer_detects_eos(tmp_path, eos):
    path = tmp_path / "tokenizer.json"
    _gpt2_style_tokenizer(eos).save(str(path))
    tok = TextTokenizer.load(path)
    assert tok.eos_token == eos and tok.eos_id == 258 and tok.vocab_size == 259
    assert tok.encode("hello") == [257, *(tok.backend.token_to_id(c) for c in "lo")]
    assert tok.decode(tok.encode("héllo wörld\n")) == "héllo wörld\n"


def test_load_errors(tmp_path):
    path = tmp_path / "tokenizer.json"
    _gpt2_style_tokenizer(None).save(str(path))
    with pytest.raises(DataError, match="no end-of-sequence token found"):
        TextTokenizer.load(path)
    assert TextTokenizer.load(path, eos_token="hel").eos_id == 257
    with pytest.raises(DataError, match="eos_token: '<eos>' is not in"):
        TextTokenizer.load(path, eos_token="<eos>")
    with pytest.raises(DataError, match="no such tokenizer file"):
        TextTokenizer.load(tmp_path / "missing.json")
    _write(tmp_path / "junk.json", "{not json")
    with pytest.raises(DataError, match="not a valid tokenizer.json"):
        TextTokenizer.load(tmp_path / "junk.json")
    with pytest.raises(DataError, match="vocab_size"):
        TextTokenizer.train_bpe(["x"], vocab_size=100)


# ---------------------------------------------------------------------------------------------
# Token cache
# ---------------------------------------------------------------------------------------------


def test_cache_matches_in_memory_encoding_and_is_reused(tokenizer, tmp_path):
    a = _write(tmp_path / "a.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in CORPUS))
    b = _write(tmp_path / "b.txt", "plain file text\n")
    cache_dir = tmp_path / "cache"
    first = build_token_cache(tokenizer, [a, b], cache_dir, progress=False)
    assert first.built and first.tokens.dtype == np.uint16
    expected, starts = encode_documents(tokenizer, CORPUS + ["plain file text\n"])
    np.testing.assert_array_equal(first.tokens, expected)
    np.testing.assert_array_equal(first.doc_starts, starts)
    assert first.num_documents == 5 and first.tokens[-1] == tokenizer.eos_id
    assert (first.tokens == tokenizer.eos_id).sum() == 5  # exactly one EOS per document
    assert tokenizer.decode(first.tokens[starts[2] : starts[3] - 1]) == CORPUS[2]
    mtime = first.path.stat().st_mtime_ns

    second = build_token_cache(tokenizer, [a, b], cache_dir, progress=False)
    assert not second.built and second.path == first.path
    assert second.path.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(second.tokens, expected)

    # Changing a source (size and mtime) gives a new key and a rebuild.
    _write(b, "plain file text, edited\n")
    os.utime(b, ns=(mtime + 10**9, mtime + 10**9))
    third = build_token_cache(tokenizer, [a, b], cache_dir, progress=False)
    assert third.built and third.path != first.path
    assert tokenizer.decode(third.tokens[third.doc_starts[-1] : -1]) == "plain file text, edited\n"
    # Different reader options are a different cache entry too.
    fourth = build_token_cache(tokenizer, [a, b], cache_dir, progress=False, max_bytes=10)
    assert fourth.built and fourth.meta["truncated"]
    assert tokenizer.decode(fourth.tokens) == CORPUS[0][:10] + "<|endoftext|>"
    assert not any(p.name.endswith(".tmp") for p in cache_dir.iterdir())


def test_max_bytes_cuts_on_a_character_boundary(tokenizer, tmp_path):
    f = _write(tmp_path / "u.txt", "ab日本")  # 2 + 3 + 3 bytes
    cache = build_token_cache(tokenizer, f, tmp_path / "c", progress=False, max_bytes=6)
    assert tokenizer.decode(cache.tokens, skip_special_tokens=True) == "ab日"


# ---------------------------------------------------------------------------------------------
# Blocks and loader
# ---------------------------------------------------------------------------------------------


@given(n=st.integers(1, 300), chunk=st.integers(1, 8), mult=st.integers(1, 6))
def test_packed_blocks_lose_and_duplicate_nothing(n, chunk, mult):
    block_len = chunk * mult
    tokens = np.random.default_rng(n).integers(1, 60000, size=n).astype(np.uint16)
    blocks = PackedBlocks(tokens, block_len, chunk, pad_id=0)
    assert len(blocks) == -(-n // block_len)
    assert blocks.num_tokens == n and 0 <= blocks.num_padding < block_len
    assert len(blocks) * block_len == n + blocks.num_padding
    everything = blocks.get_batch(torch.arange(len(blocks)))
    assert everything.dtype == torch.long and everything.shape == (len(blocks), block_len)
    flat = everything.reshape(-1)
    assert torch.equal(flat[:n], torch.from_numpy(tokens.astype(np.int64)))
    assert (flat[n:] == 0).all()
    mask = blocks.batch(torch.arange(len(blocks))).mask.reshape(-1)
    assert mask[:n].all() and not mask[n:].any()
    perm = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(n))
    assert torch.equal(blocks.get_batch(perm), everything[perm])
    assert torch.equal(blocks[-1], everything[-1]) and torch.equal(blocks[0], everything[0])


def test_packed_blocks_default_pad_is_stream_eos_and_errors(tokenizer):
    tokens, _ = encode_documents(tokenizer, ["abc", "de"])
    blocks = PackedBlocks(tokens, 4 * len(tokens), 4)
    assert blocks.pad_id == tokenizer.eos_id and blocks.num_padding == 3 * len(tokens)
    with pytest.raises(DataError, match="block_len: expected a positive multiple of chunk_size=4"):
        PackedBlocks(tokens, 10, 4)
    with pytest.raises(DataError, match="block_len"):
        PackedBlocks(tokens, 0, 4)
    with pytest.raises(DataError, match="empty"):
        PackedBlocks(np.zeros(0, np.uint16), 4, 4)
    with pytest.raises(IndexError):
        blocks.get_batch(torch.tensor([1]))
    with pytest.raises(TypeError):
        blocks.get_batch(torch.tensor([0.0]))


def _blocks(num_blocks: int = 23, block_len: int = 4) -> PackedBlocks:
    return PackedBlocks(np.arange(num_blocks * block_len), block_len, 2)


def _row_ids(batch: torch.Tensor) -> torch.Tensor:
    return batch[:, 0] // 4  # block index of each row of _blocks()


def test_loader_is_deterministic_and_covers_each_epoch_without_repeats():
    blocks = _blocks()
    a, b = BlockLoader(blocks, 5, seed=3), BlockLoader(blocks, 5, seed=3)
    assert a.steps_per_epoch == 4
    rows_a = [_row_ids(next(a).tokens) for _ in range(12)]
    rows_b = [_row_ids(next(b).tokens) for _ in range(12)]
    assert all(torch.equal(x, y) for x, y in zip(rows_a, rows_b, strict=True))
    for epoch in range(3):
        seen = torch.cat(rows_a[4 * epoch : 4 * epoch + 4])
        assert len(seen.unique()) == 20  # 4 full steps; the 3 leftover blocks are skipped
    assert not torch.equal(torch.cat(rows_a[:4]), torch.cat(rows_a[4:8]))  # reshuffled
    other = BlockLoader(blocks, 5, seed=4)
    other_rows = torch.cat([_row_ids(next(other).tokens) for _ in range(4)])
    assert not torch.equal(other_rows, torch.cat(rows_a[:4]))
    ordered = BlockLoader(blocks, 5, seed=0, shuffle=False)
    assert torch.equal(torch.cat([_row_ids(next(ordered).tokens) for _ in range(4)]), torch.arange(20))
    assert a.epoch == 2 and a.offset == 20


def test_loader_sharding_matches_a_single_process():
    blocks = _blocks(37)
    single = BlockLoader(blocks, 6, seed=11)
    ranks = [BlockLoader(blocks, 3, seed=11, rank=r, world_size=2) for r in range(2)]
    assert single.steps_per_epoch == ranks[0].steps_per_epoch == 6
    for _ in range(15):  # crosses two epoch boundaries
        assert torch.equal(torch.cat([next(r).tokens for r in ranks]), next(single).tokens)


def test_loader_resumes_exactly():
    blocks = _blocks()
    reference = BlockLoader(blocks, 4, seed=7)
    batches = [next(reference).tokens for _ in range(13)]
    for cut in (0, 3, 5, 10):  # 5 is exactly the end of epoch 0
        loader = BlockLoader(blocks, 4, seed=7)
        for _ in range(cut):
            next(loader)
        state = json.loads(json.dumps(loader.state_dict()))  # survives serialisation
        resumed = BlockLoader(blocks, 4, seed=7)
        resumed.load_state_dict(state)
        assert all(torch.equal(next(resumed).tokens, batches[i]) for i in range(cut, 13))
    # A 2-rank run may resume a 1-rank run with the same global batch.
    loader = BlockLoader(blocks, 4, seed=7)
    for _ in range(3):
        next(loader)
    halves = [BlockLoader(blocks, 2, seed=7, rank=r, world_size=2) for r in range(2)]
    for h in halves:
        h.load_state_dict(loader.state_dict())
    assert torch.equal(torch.cat([next(h).tokens for h in halves]), batches[3])
    # Another global batch size resumes at the same block of the same epoch.
    smaller = BlockLoader(blocks, 2, seed=7)
    smaller.load_state_dict(loader.state_dict())
    assert torch.equal(torch.cat([next(smaller).tokens, next(smaller).tokens]), batches[3])
    with pytest.raises(ValueError, match="seed"):
        BlockLoader(blocks, 4, seed=8).load_state_dict(loader.state_dict())
    with pytest.raises(ValueError, match="num_blocks"):
        BlockLoader(_blocks(30), 4, seed=7).load_state_dict(loader.state_dict())


def test_loader_errors():
    with pytest.raises(DataError, match="fewer than one global batch of 24"):
        BlockLoader(_blocks(), 12, seed=0, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        BlockLoader(_blocks(), 2, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        BlockLoader(_blocks(), 0, seed=0)


# ---------------------------------------------------------------------------------------------
# Standard-library corpus, config and prepare_data
# ---------------------------------------------------------------------------------------------


def test_stdlib_corpus_is_nonempty_split_and_capped():
    train, valid = stdlib_source_files(), stdlib_source_files(split="valid")
    assert len(train) > 100 and len(valid) > 5 and set(train).isdisjoint(valid)
    assert 0.02 < len(valid) / (len(train) + len(valid)) < 0.09
    assert train == sorted(train) and train == stdlib_source_files()
    banned = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
    assert not any(banned & set(p.parts) for p in train + valid)
    capped = stdlib_source_files(max_bytes=200_000)
    assert 150_000 < sum(p.stat().st_size for p in capped) <= 200_000
    assert set(capped) <= set(train)
    assert len({p.parent for p in capped}) > 3  # spread over packages, not the first in order
    with pytest.raises(DataError, match="split"):
        stdlib_source_files(split="test")


def test_stdlib_split_with_fake_root(tmp_path):
    for rel in ["a.py", "pkg/b.py", "pkg/tests/t.py", "test/x.py", "site-packages/s.py", "n.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        _write(tmp_path / rel, "x = 1\n")
    for i in range(60):
        _write(tmp_path / f"m{i}.py", "y = 2\n")
    train = stdlib_source_files(root=tmp_path)
    valid = stdlib_source_files(root=tmp_path, split="valid")
    names = {p.relative_to(tmp_path).as_posix() for p in train + valid}
    assert names == {"a.py", "pkg/b.py"} | {f"m{i}.py" for i in range(60)}
    assert len(valid) >= 1 and set(train).isdisjoint(valid)


def test_config_validation_names_fields():
    DataConfig()
    cases = [
        (dict(block_len=0), "block_len"),
        (dict(train_files="a.txt"), "train_files"),
        (dict(vocab_size=10), "vocab_size"),
        (dict(max_train_bytes=0), "max_train_bytes"),
        (dict(valid_fraction=1.5), "valid_fraction"),
        (dict(format="xml"), "format"),
        (dict(errors="ignore"), "errors"),
    ]
    for kwargs, name in cases:
        with pytest.raises(ValueError, match=name):
            DataConfig(**kwargs)
    with pytest.raises(DataError, match="block_len: expected a positive multiple of chunk_size=4"):
        prepare_data(DataConfig(block_len=250), "unused", chunk_size=4)


def test_prepare_data_with_files_and_holdout(tmp_path):
    texts = [f"Document {i}: " + " ".join(CORPUS[i % 4].split()) * 3 for i in range(40)]
    data = _write(tmp_path / "train.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in texts))
    cfg = DataConfig(train_files=[str(data)], vocab_size=300, block_len=32, cache_dir=str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    tok, train, valid = prepare_data(cfg, run_dir, chunk_size=4, progress=False)
    assert (run_dir / "tokenizer.json").is_file() and tok.vocab_size <= 300
    assert train.block_len == valid.block_len == 32 and len(valid) >= 1
    stream, _ = encode_documents(tok, texts)
    assert train.num_tokens + valid.num_tokens == len(stream)
    assert valid.num_padding == 0 and valid.num_tokens % 32 == 0
    train_all = train.get_batch(torch.arange(len(train))).reshape(-1)[: train.num_tokens]
    both = torch.cat([train_all, valid.get_batch(torch.arange(len(valid))).reshape(-1)])
    assert torch.equal(both, torch.from_numpy(stream.astype(np.int64)))
    # Second run: the saved tokenizer and the cache are reused.
    cache_files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    tok2, train2, _ = prepare_data(cfg, run_dir, chunk_size=4, progress=False)
    assert tok2.fingerprint == tok.fingerprint
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == cache_files
    assert torch.equal(train2[0], train[0])
    # An explicit tokenizer and validation file.
    valid_file = _write(tmp_path / "valid.txt", "held out text\n")
    cfg2 = DataConfig(
        train_files=[str(data)],
        valid_files=[str(valid_file)],
        block_len=8,
        tokenizer=str(run_dir / "tokenizer.json"),
        cache_dir=str(tmp_path / "cache"),
    )
    tok3, _, valid3 = prepare_data(cfg2, tmp_path / "run2", chunk_size=4, progress=False)
    assert tok3.fingerprint == tok.fingerprint
    assert valid3.num_tokens == len(tok3.encode("held out text\n")) + 1
    valid_text = tok3.decode(valid3.get_batch(torch.arange(len(valid3))).reshape(-1))
    assert valid_text.startswith("held out text\n<|endoftext|>")


def test_prepare_data_default_stdlib_corpus(tmp_path):
    cfg = DataConfig(
        vocab_size=300, block_len=64, max_train_bytes=40_000, max_valid_bytes=20_000, cache_dir=str(tmp_path / "cache")
    )
    tok, train, valid = prepare_data(cfg, tmp_path, chunk_size=4, progress=False)
    assert tok.vocab_size == 300 and len(train) > 50 and len(valid) > 10
    text = tok.decode(train[0])
    assert "def " in text or "import " in text or '"""' in text
    with pytest.raises(DataError, match="vocab_size"):
        prepare_data(
            DataConfig(vocab_size=260, max_train_bytes=40_000, cache_dir=cfg.cache_dir),
            tmp_path,
            chunk_size=4,
            progress=False,
        )
