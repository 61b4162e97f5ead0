"""Quantization methods. Each module exposes apply(model, adapter, config, calib_batches, progress=True)."""
import importlib
from types import ModuleType

from bisup.config import METHODS


def get_method(name: str) -> ModuleType:
    """The module implementing method `name` (rtn, gptq, atom, quarot)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {list(METHODS)}")
    try:
        return importlib.import_module(f"bisup.methods.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"bisup.methods.{name}":
            raise
        raise NotImplementedError(f"method {name!r} is not available in this build (bisup/methods/{name}.py missing)") from err
