"""bisup checkpoints: save_quantized / load_quantized; the layout lives in format.py alone."""
from bisup.checkpoint.format import CONFIG_FILE, FORMAT_VERSION, TENSOR_FILE, FormatError  # noqa: F401
from bisup.checkpoint.load import load_quantized  # noqa: F401
from bisup.checkpoint.save import save_quantized  # noqa: F401
