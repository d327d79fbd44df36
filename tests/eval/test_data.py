"""Text sources (file, directory, JSONL, Hub, built-in, the shared corpora) and window formation."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from models import tiny_mamba

from gsq_hf.eval import DatasetNotFoundError, EvalInputError, decode_faithful_perplexity, load_text, make_windows
from gsq_hf.eval.data import _tokenize


# -- local sources ----------------------------------------------------------------------------------------
def test_text_file(tmp_path):
    (tmp_path / "a.txt").write_text("one two\nthree")
    (tmp_path / "b.raw").write_text("four")
    assert load_text(str(tmp_path / "a.txt")) == "one two\nthree"
    assert load_text(str(tmp_path / "b.raw")) == "four"


def test_directory_reads_the_files_of_the_split(tmp_path):
    (tmp_path / "wiki.test.raw").write_text("test text")
    (tmp_path / "wiki.valid.raw").write_text("valid text")
    (tmp_path / "notes.md").write_text("ignored: not .txt/.raw")
    assert load_text(str(tmp_path), "test") == "test text"
    assert load_text(str(tmp_path), "validation") == "valid text"  # valid / validation / dev are one split
    with pytest.raises(DatasetNotFoundError, match=r"no file for split 'train'.*split\(s\): test, valid"):
        load_text(str(tmp_path), "train")


def test_directory_without_split_names_is_one_collection(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    assert load_text(str(tmp_path), "test") == "first\n\nsecond"


def test_directory_without_text_files(tmp_path):
    (tmp_path / "data.csv").write_text("x")
    with pytest.raises(DatasetNotFoundError, match="no .txt or .raw file"):
        load_text(str(tmp_path))


def test_jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "first doc"}) + "\n\n" + json.dumps({"text": "second", "id": 2}) + "\n")
    assert load_text(str(path)) == "first doc\n\nsecond"
    path.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(EvalInputError, match=r'docs.jsonl:1 has no string "text" field'):
        load_text(str(path))
    path.write_text("{not json\n")
    with pytest.raises(EvalInputError, match=r"docs.jsonl:1 is not valid JSON"):
        load_text(str(path))


def test_missing_local_path_lists_what_is_accepted(tmp_path):
    for missing in (str(tmp_path / "nope"), "nope.txt", "./corpus.jsonl"):
        with pytest.raises(DatasetNotFoundError, match="does not exist; accepted: 'builtin'"):
            load_text(missing)


# -- Hub and built-in ---------------------------------------------------------------------------------------
def test_hub_dataset_goes_through_load_dataset(monkeypatch):
    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"title": ["a", "b"], "text": ["line one", "line two"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_text("wikitext:wikitext-2-raw-v1", "validation") == "line one\n\nline two"
    assert load_text("org/corpus", "test") == "line one\n\nline two"
    assert calls == [("wikitext", "wikitext-2-raw-v1", "validation"), ("org/corpus", None, "test")]


def test_unreachable_hub_dataset(offline_hub):
    with pytest.raises(DatasetNotFoundError, match=r"could not load Hub dataset 'wikitext:wikitext-2-raw-v1'"):
        load_text("wikitext:wikitext-2-raw-v1")


def test_builtin_text():
    pytest.importorskip("gsq_hf.eval.builtin", reason="gsq_hf/eval/builtin.py (built-in default) not written yet")
    assert load_text(None, "test") == load_text("builtin", "test")
    assert len(load_text("builtin", "test")) > 1000
    with pytest.raises(DatasetNotFoundError, match="built-in dataset has no split 'dev'"):
        load_text("builtin", "dev")


# -- windows ------------------------------------------------------------------------------------------------
def test_windows_are_non_overlapping_and_drop_the_tail(tokenizer, text):
    windows = make_windows(tokenizer, text, context=64)  # 600 tokens: 9 windows, 24 tokens dropped
    full = tokenizer.encode(text, add_special_tokens=False)
    assert windows.ids.shape == (9, 64) and windows.ids.dtype == torch.int64
    assert windows.ids.flatten().tolist() == full[: 9 * 64]
    assert windows.scored_tokens == 9 * 63
    assert windows.words.tolist() == [63] * 9  # one word per scored token
    limited = make_windows(tokenizer, text, context=64, max_tokens=200)
    assert torch.equal(limited.ids, windows.ids[:3])


@pytest.mark.parametrize(("text", "context", "max_tokens", "message"), [
    ("  \n ", 8, None, "text is empty"),
    ("w1 w2 w3", 8, None, "context 8 is longer than the text's 3 tokens"),
    ("w1 w2 w3 w4", 4, 3, r"longer than the text's 3 tokens \(after --max-tokens 3\)"),
    ("w1 w2 w3", 1, None, "context must be an integer >= 2"),
])
def test_window_errors(tokenizer, text, context, max_tokens, message):
    with pytest.raises(EvalInputError, match=message):
        make_windows(tokenizer, text, context, max_tokens)


# -- the public corpora in ../shared/data ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def neox(shared_data):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(shared_data / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"))


@pytest.mark.data
def test_wikitext_directory(shared_data, neox):
    text = load_text(str(shared_data / "wikitext-2-raw"), "test")
    assert text == (shared_data / "wikitext-2-raw" / "wiki.test.raw").read_text()
    windows = make_windows(neox, text, context=512, max_tokens=2048)
    assert windows.ids.shape == (4, 512)
    # the prefix tokenization behind max_tokens equals the start of the whole text's tokenization
    assert windows.ids.flatten().tolist() == neox.encode(text[:40_000], add_special_tokens=False)[:2048]
    assert neox.decode(windows.ids[0, :8]).startswith(" \n = Robert Boulter = \n")


@pytest.mark.data
def test_ptb_file(shared_data, neox):
    text = load_text(str(shared_data / "ptb" / "ptb.test.txt"))
    assert len(text.splitlines()) == 3761 and len(text.split()) == 78669  # SOURCES.md sanity values
    windows = make_windows(neox, text, context=256, max_tokens=1024)
    assert windows.ids.shape == (4, 256)
    assert windows.words.sum() > 0 and windows.bytes.sum() > windows.words.sum()


@pytest.mark.data
def test_lambada_jsonl(shared_data, neox):
    text = load_text(str(shared_data / "lambada" / "lambada_test.jsonl"))
    assert text.count("\n\n") >= 5152 and text.startswith("In my palm is a clear stone")
    assert make_windows(neox, text, context=128, max_tokens=512).ids.shape == (4, 128)


@pytest.mark.data
def test_decode_faithful_on_a_real_corpus(shared_data, neox):
    """End to end on WikiText with the real tokenizer (random weights: only the plumbing is checked)."""
    windows = make_windows(neox, load_text(str(shared_data / "wikitext-2-raw"), "test"), context=24, max_tokens=48)
    result = decode_faithful_perplexity(tiny_mamba(vocab_size=50280), windows, "gsq-gate", progress=False)
    assert result.tokens == 46 and result.words > 0 and result.bytes > result.words
    assert 1.0 < result.perplexity < 50280 * 2


def test_prefix_tokenization_grows_until_enough_tokens(tokenizer, text):
    assert _tokenize(tokenizer, text, 100) == tokenizer.encode(text, add_special_tokens=False)[:100]
    assert _tokenize(tokenizer, "w1 w2", 100) == tokenizer.encode("w1 w2", add_special_tokens=False)
