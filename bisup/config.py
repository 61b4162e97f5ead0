"""QuantConfig: every knob of a quantization run, validated on construction, JSON round-trippable."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional

from bisup.quant.formats import OFF_BITS

MODES = ("fake", "real")


def _method_names():
    from bisup.methods import registry  # the methods import this module: look them up at call time

    return tuple(registry())


def _check_bits(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not (2 <= value <= 8 or value == OFF_BITS):
        raise ValueError(f"QuantConfig.{name}={value!r}: expected an int in [2, 8], or {OFF_BITS} (off)")


def _check_group(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not (value == -1 or value > 0):
        raise ValueError(f"QuantConfig.{name}={value!r}: expected a positive int, or -1 (one group per row/token)")


def _check_clip(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (0.0 < float(value) <= 1.0):
        raise ValueError(f"QuantConfig.{name}={value!r}: expected a float in (0, 1]")


def _check_choice(name: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"QuantConfig.{name}={value!r}: expected one of {list(allowed)}")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"QuantConfig.{name}={value!r}: expected an int >= {minimum}")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"QuantConfig.{name}={value!r}: expected True or False")


@dataclass
class QuantConfig:
    """What to quantize and how. Bits of 16 switch a tensor kind off; group size -1 = per row/token."""

    # bit widths and groups (weights per output row along K, activations per token, KV per head)
    w_bits: int = 4
    a_bits: int = 4
    kv_bits: int = 16
    w_group_size: int = 64
    a_group_size: int = 64
    kv_group_size: int = -1
    w_sym: bool = True
    a_sym: bool = True
    kv_sym: bool = False
    w_clip: float = 1.0
    a_clip: float = 1.0
    kv_clip: float = 1.0
    # method and execution
    method: str = "rtn"
    mode: str = "fake"
    # GPTQ (method="gptq", or weights of atom/quarot when gptq=True)
    gptq_damp: float = 0.01
    gptq_act_order: bool = True
    gptq_block_size: int = 128
    gptq: bool = False
    # Atom: outlier input channels kept at higher precision (None: scaled to the model width)
    atom_outliers: Optional[int] = None
    atom_outlier_bits: int = 8
    # QuaRot
    rotation_seed: int = 0
    online_hadamard: bool = True
    rotate_kv: bool = True
    # KV cache: tokens of the system prompt kept in FP16
    prompt_len: int = 0
    # calibration
    n_calib: int = 32
    calib_seq_len: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("w_bits", "a_bits", "kv_bits"):
            _check_bits(name, getattr(self, name))
        for name in ("w_group_size", "a_group_size", "kv_group_size"):
            _check_group(name, getattr(self, name))
        for name in ("w_clip", "a_clip", "kv_clip"):
            _check_clip(name, getattr(self, name))
        for name in ("w_sym", "a_sym", "kv_sym", "gptq_act_order", "gptq", "online_hadamard", "rotate_kv"):
            _check_bool(name, getattr(self, name))
        _check_choice("method", self.method, _method_names())
        _check_choice("mode", self.mode, MODES)
        if not isinstance(self.gptq_damp, (int, float)) or isinstance(self.gptq_damp, bool) or self.gptq_damp < 0:
            raise ValueError(f"QuantConfig.gptq_damp={self.gptq_damp!r}: expected a float >= 0")
        _check_int("gptq_block_size", self.gptq_block_size, 1)
        if self.atom_outliers is not None:
            _check_int("atom_outliers", self.atom_outliers, 0)
        _check_bits("atom_outlier_bits", self.atom_outlier_bits)
        _check_int("rotation_seed", self.rotation_seed, 0)
        _check_int("prompt_len", self.prompt_len, 0)
        _check_int("n_calib", self.n_calib, 1)
        _check_int("calib_seq_len", self.calib_seq_len, 1)
        _check_int("seed", self.seed, 0)

    # ------------------------------------------------------------------ derived values
    def outlier_count(self, hidden_size: int) -> int:
        """Atom's outlier channel count: atom_outliers, or round(hidden/32) to a multiple of 8 (128 at 4096)."""
        if self.atom_outliers is not None:
            return self.atom_outliers
        return max(8, int(round(hidden_size / 32 / 8)) * 8)

    @property
    def quantizes_weights(self) -> bool:
        return self.w_bits < OFF_BITS

    @property
    def quantizes_activations(self) -> bool:
        return self.a_bits < OFF_BITS

    @property
    def quantizes_kv(self) -> bool:
        return self.kv_bits < OFF_BITS

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "QuantConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"QuantConfig.from_dict: unknown fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    def replace(self, **changes: Any) -> "QuantConfig":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)
