"""Quantization methods: one module each, registered by the `METHOD` record it defines
(bisup.methods.common.Method: name, apply, whether it calibrates, its own options).

Adding a method: write bisup/methods/<name>.py with `METHOD = Method(...)` and add its module
name to METHOD_MODULES."""
from __future__ import annotations

import importlib
from typing import Dict

from bisup.methods.common import Method

METHOD_MODULES = ("rtn", "gptq", "atom", "quarot")
_registry: Dict[str, Method] = {}


def registry() -> Dict[str, Method]:
    """name -> Method for every method module (imported on first use)."""
    if not _registry:
        for module_name in METHOD_MODULES:
            method = importlib.import_module(f"bisup.methods.{module_name}").METHOD
            _registry[method.name] = method
    return _registry


def get_method(name: str) -> Method:
    """The Method registered under `name`; ValueError naming the known ones otherwise."""
    methods = registry()
    if name not in methods:
        raise ValueError(f"unknown method {name!r}; expected one of {list(methods)}")
    return methods[name]
