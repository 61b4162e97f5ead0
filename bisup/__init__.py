"""bisup: W4A4 / W3A3 LLM quantization with bidirectional error suppression.

Public API grows here; kernels are reached through `bisup.ops`, semantics in `bisup.reference`.
"""
import torch  # noqa: F401  (must be imported before the extension)

from bisup import eval, ops, reference  # noqa: F401  (eval: bisup.eval.perplexity)
from bisup._ext import has_cuda_kernels  # noqa: F401
from bisup.checkpoint import load_quantized, save_quantized  # noqa: F401
from bisup.quantize import quantize_model  # noqa: F401
from bisup.config import BiSupConfig, QuantConfig  # noqa: F401
from bisup.generation import generate  # noqa: F401
from bisup.nn.real_kv import make_cache  # noqa: F401
from bisup.exporters import export  # noqa: F401

__version__ = "0.1.0"
