"""Export a bisup-quantized model to the checkpoint formats serving engines load.

    bisup.export(model, "out/", format="compressed-tensors", tokenizer=tok)

compressed-tensors (compressed_tensors.py): a Hugging Face model directory with a pack-quantized
`quantization_config`, served by vLLM (W4A4 with dynamic INT4 activations, W4A16 with Marlin) and
loaded by transformers with the `compressed-tensors` package (client.py runs it that way).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional, Union

import torch
from torch import nn

from bisup.exporters.compressed_tensors import DROPPABLE, FORMAT, ExportError, export_compressed_tensors, refusals

FORMATS = (FORMAT,)


def export(model: nn.Module, out_dir: Union[str, Path], format: str = FORMAT, tokenizer=None,
           dtype: Optional[torch.dtype] = None, drop: Iterable[str] = ()) -> Path:
    """Write the bisup-quantized `model` to out_dir in `format` (see the module docstring).

    dtype: floating-point tensors and weight scales (default: the model's embedding dtype);
    drop: what the export may leave out (DROPPABLE names it and its effect); anything else the
    format cannot carry raises ExportError with every reason."""
    if format not in FORMATS:
        raise ValueError(f"export: format={format!r}; expected one of {list(FORMATS)}")
    return export_compressed_tensors(model, out_dir, tokenizer, dtype, drop)


__all__ = ["export", "FORMATS", "DROPPABLE", "ExportError", "refusals"]
