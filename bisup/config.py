"""QuantConfig: every knob of a quantization run, validated on construction, JSON round-trippable."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional

from bisup.quant.formats import ACT_CONVENTIONS, BISUP_ACTS, OFF_BITS

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


def _check_float(owner: str, name: str, value: Any, lo: float, hi: float, lo_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        v = float(value)
        ok = (v > lo if lo_open else v >= lo) and v <= hi
    if not ok:
        bracket = "(" if lo_open else "["
        raise ValueError(f"{owner}.{name}={value!r}: expected a float in {bracket}{lo:g}, {hi:g}]")


@dataclass
class BiSupConfig:
    """BiSup's vertical error suppression: block-wise quantization-aware fine-tuning of a few
    parameter spaces on top of a base method (bisup/methods/bisup.py). Each space is switchable.

    Defaults: chosen on validation windows of the calibration split (bench/bisup_grid.py); see
    bisup/methods/bisup.py for the record.
    """

    # parameter spaces
    weight_clip: bool = True  # learnable per-group upper/lower weight clipping (sigmoid-bounded, LWC)
    act_clip: bool = True  # learnable activation clip ratio per linear input (a scalar per linear)
    # learnable per-channel smoothing scales (norm->qkv, norm->gate/up, v->o, up->down). Off by default:
    # with the other spaces and the per-token loss it does not lower the calib-val ppl (26.28 with it,
    # 26.21 without: bench/results/bisup_spaces.md) and costs training time
    smooth: bool = False
    lowrank: bool = True  # rank-r error compensation, merged into the weight before quantization
    rounding: bool = True  # learned rounding offsets in [-0.5, 0.5] per weight (AutoRound style); codes
    #                        then come from it, not from the base's GPTQ
    # learnable orthogonal per-head rotations (Cayley): values (merged into v_proj / o_proj and the
    # recorded value basis: free at inference) and, where the KV spec rotates keys (QuaRot), the
    # per-layer Q/K rotation the attention already applies online (same cost as its Hadamard).
    # On: calib-val ppl 24.97 with it (rotation_lr 1e-4) vs 26.21 without (bench/results/bisup_spaces.md)
    head_rotation: bool = True
    rank: int = 8
    # training
    epochs: int = 4  # passes over the training windows, per decoder layer
    batch_size: int = 2  # calibration windows per step
    lr: float = 1e-2  # clip and smoothing parameters (AdamW)
    lowrank_lr: float = 1e-4  # the low-rank factors' own learning rate
    rounding_lr: float = 1e-2  # the rounding offsets' learning rate
    rotation_lr: float = 1e-4  # the head rotations' generators (AdamW; 1e-3: 30.02, a large drift from the start)
    # where the learned rounding offsets start: "rtn" (0: round to nearest) or "gptq" (GPTQ's codes on
    # the block's own input Hessians, the weight pre-clamped to the learned clip's start: each offset
    # is clamp(q_gptq - w / s, -0.5, 0.5), so a GPTQ code more than one step from RTN's is not reached)
    rounding_init: str = "rtn"
    # the block loss: "mse" = sum of squared errors / sum of squared targets over all tokens (on a
    # trained model a few attention-sink tokens hold most of that energy: SmolLM2's token 0 holds
    # 75-99% of layers 11-27's output energy, so the loss is theirs); "token" = the mean over tokens
    # of each token's relative squared error (every token counts as much as in the perplexity).
    # Default "token": calib-val ppl 26.28 vs 28.09 with "mse" (bench/results/bisup_spaces.md)
    loss: str = "token"
    # "signsgd": offsets -= rounding_lr * sign(grad) (AutoRound's optimizer): no AdamW moments, 8 bytes
    # per weight less during training; not evaluated for accuracy, so not the default
    rounding_optimizer: str = "adamw"
    # every learning rate over the block's training steps: "constant", or "linear" decay to 0 at the
    # last step (AutoRound's schedule: the rounding offsets settle instead of flipping to the end)
    lr_schedule: str = "constant"
    weight_decay: float = 0.0
    lowrank_scale: float = 1.0  # stabilising scale of the branch: delta = lowrank_scale * A @ B
    lowrank_init: float = 0.0  # the branch starts at lowrank_init * (rank-r SVD of the quantization error)
    smooth_alpha: float = 0.5  # SmoothQuant migration strength of the initial scales (0: scales of 1)
    smooth_penalty: float = 1.0  # weight of the soft penalty keeping log-scales within smooth_range
    smooth_range: float = 2.0  # |log s| allowed without penalty (natural log)
    weight_clip_init: float = 1.0  # initial weight clip factors (sigmoid-bounded; a learnable clip starts <= 0.99)
    # start each group's learnable clip at its least-squared-error ratio (mse_clip, at most the start
    # ratio min(w_clip, weight_clip_init, 0.99)) instead of that one ratio; needs weight_clip on.
    # (QuantConfig.w_clip_search is the base method's own search; BiSup's learned clip replaces it.)
    # Default on: calib-val ppl 28.14 vs 29.60 off (bench/results/bisup_clip_search.md).
    weight_clip_search: bool = True
    val_windows: int = 0  # trailing calibration windows held out of training (validation loss only)
    # after the block-wise training: passes of end-to-end training of every quantized linear's weight
    # scales and activation clip (codes fixed) on the full-precision model's next-token distribution
    # (bisup/methods/bisup_e2e.py); 0: none. Default 2: calib-val ppl 24.26 vs 26.43 without (16 tail
    # windows, bench/results/bisup_validation.md); it runs the whole model where it lives (skipped, with
    # a warning, when the layers live off the compute device: methods/bisup.py)
    e2e_epochs: int = 2
    e2e_lr: float = 5e-3  # AdamW on the log of each scale / clip ratio

    SPACES = ("weight_clip", "act_clip", "smooth", "lowrank", "rounding", "head_rotation")
    LOSSES = ("mse", "token")
    ROUNDING_INITS = ("rtn", "gptq")
    LR_SCHEDULES = ("constant", "linear")
    # besides the spaces, what QuantConfig.label() names where it differs from today's default
    LABELLED = ("loss", "rounding_init", "lr_schedule", "epochs", "batch_size", "rank", "lr", "rounding_lr",
                "lowrank_lr", "rotation_lr", "weight_clip_search", "e2e_epochs", "e2e_lr")
    OWNER = {"rank": "lowrank", "lowrank_lr": "lowrank", "rounding_lr": "rounding", "rounding_init": "rounding",
             "rotation_lr": "head_rotation", "weight_clip_search": "weight_clip", "e2e_lr": "e2e_epochs"}  # a setting only its space reads
    WRITTEN_BEFORE = {"weight_clip_search": False, "head_rotation": False, "loss": "mse",
                      "rounding_init": "rtn", "lr_schedule": "constant", "e2e_epochs": 0}  # fields added later, with the value older configs meant

    def __post_init__(self) -> None:
        own = "BiSupConfig"
        for name in self.SPACES + ("weight_clip_search",):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{own}.{name}={getattr(self, name)!r}: expected True or False")
        for name, minimum in (("rank", 1), ("epochs", 0), ("batch_size", 1), ("val_windows", 0), ("e2e_epochs", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"{own}.{name}={value!r}: expected an int >= {minimum}")
        for name in ("lr", "lowrank_lr", "rounding_lr", "rotation_lr", "e2e_lr"):
            _check_float(own, name, getattr(self, name), 0.0, 10.0)
        if self.rounding_init not in self.ROUNDING_INITS:
            raise ValueError(f"{own}.rounding_init={self.rounding_init!r}: expected one of {list(self.ROUNDING_INITS)}")
        if self.lr_schedule not in self.LR_SCHEDULES:
            raise ValueError(f"{own}.lr_schedule={self.lr_schedule!r}: expected one of {list(self.LR_SCHEDULES)}")
        if self.loss not in self.LOSSES:
            raise ValueError(f"{own}.loss={self.loss!r}: expected one of {list(self.LOSSES)}")
        if self.rounding_optimizer not in ("adamw", "signsgd"):
            raise ValueError(f"{own}.rounding_optimizer={self.rounding_optimizer!r}: expected one of ['adamw', 'signsgd']")
        _check_float(own, "weight_decay", self.weight_decay, 0.0, 10.0)
        _check_float(own, "lowrank_scale", self.lowrank_scale, 0.0, 100.0, lo_open=True)
        _check_float(own, "lowrank_init", self.lowrank_init, 0.0, 1.0)
        _check_float(own, "smooth_alpha", self.smooth_alpha, 0.0, 1.0)
        _check_float(own, "smooth_penalty", self.smooth_penalty, 0.0, 1e6)
        _check_float(own, "smooth_range", self.smooth_range, 0.0, 20.0)
        _check_float(own, "weight_clip_init", self.weight_clip_init, 0.0, 1.0, lo_open=True)

    @property
    def trains_anything(self) -> bool:
        return self.epochs > 0 and any(getattr(self, name) for name in self.SPACES)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "BiSupConfig":
        if not isinstance(data, dict):
            raise ValueError(f"BiSupConfig.from_dict: expected a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"BiSupConfig.from_dict: unknown fields {unknown}; known fields: {sorted(known)}")
        # a config written before a field existed ran with its behaviour of then, not today's default
        return cls(**{**cls.WRITTEN_BEFORE, **data})


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
    # per group, the clip ratio in w_clip * [1.0, 0.975, ..., 0.5] with the least squared weight
    # error (RTN and GPTQ weights; bisup.quant.quantizer.mse_clip); off: every group uses w_clip
    w_clip_search: bool = False
    a_clip: float = 1.0
    kv_clip: float = 1.0
    # how activations are quantized (formats.ACT_CONVENTIONS): "bisup" (bisup's kernels) or
    # "compressed-tensors" (what vLLM computes when serving an export: calibrate and BiSup-train with
    # the engine's own quantizer; symmetric, a_clip 1, no Atom outliers, fake mode only)
    a_convention: str = BISUP_ACTS
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
    # BiSup vertical suppression on top of `method` (None: the base method alone)
    bisup: Optional[BiSupConfig] = None

    def __post_init__(self) -> None:
        for name in ("w_bits", "a_bits", "kv_bits"):
            _check_bits(name, getattr(self, name))
        for name in ("w_group_size", "a_group_size", "kv_group_size"):
            _check_group(name, getattr(self, name))
        for name in ("w_clip", "a_clip", "kv_clip"):
            _check_clip(name, getattr(self, name))
        for name in ("w_sym", "a_sym", "kv_sym", "w_clip_search", "gptq_act_order", "gptq", "online_hadamard", "rotate_kv"):
            _check_bool(name, getattr(self, name))
        _check_choice("method", self.method, _method_names())
        _check_choice("a_convention", self.a_convention, ACT_CONVENTIONS)
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
        if isinstance(self.bisup, dict):
            self.bisup = BiSupConfig.from_dict(self.bisup)
        if self.bisup is not None and not isinstance(self.bisup, BiSupConfig):
            raise ValueError(f"QuantConfig.bisup={self.bisup!r}: expected None, a BiSupConfig or its dict")
        if self.a_convention != BISUP_ACTS and self.quantizes_activations:
            self._check_engine_activations()

    def _check_engine_activations(self) -> None:
        """What an engine's activation quantizer (a_convention) cannot be asked for."""
        wrong = []
        if not self.a_sym:
            wrong.append("a_sym=False (the engine's activations are symmetric)")
        if self.a_clip != 1.0:
            wrong.append(f"a_clip={self.a_clip} (the engine does not clip activations: use 1.0)")
        if self.bisup is not None and self.bisup.act_clip:
            wrong.append("bisup.act_clip=True (a learned activation clip: the engine has none; set act_clip=False)")
        if self.method == "atom" and self.atom_outliers != 0:
            wrong.append("method='atom' with outlier channels (INT8 outlier channels have no compressed-tensors "
                         "form; atom_outliers=0, or another method)")
        if wrong:
            raise ValueError(f"QuantConfig.a_convention={self.a_convention!r}: " + "; ".join(wrong))

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

    @property
    def weight_rounding(self) -> str:
        """What makes the weight codes: "learned" (BiSup's rounding space; it replaces GPTQ), "gptq",
        "rtn", or "none" (weights in floating point)."""
        from bisup.methods import get_method  # the methods import this module: look them up at call time

        if not self.quantizes_weights:
            return "none"
        if self.bisup is not None and self.bisup.rounding:
            return "learned"
        return "gptq" if get_method(self.method).bisup_base.gptq(self) else "rtn"

    def label(self) -> str:
        """A row label made from what this config runs, e.g. "QuaRot+GPTQ W4A4 g64 KV4" or
        "QuaRot + BiSup (learned rounding) W4A4 g64 KV4"."""
        names = {"rtn": "RTN", "gptq": "GPTQ", "atom": "Atom", "quarot": "QuaRot"}
        rounding = self.weight_rounding
        # GPTQ is the gptq method's only step: with learned rounding nothing of it runs
        out = "" if self.method == "gptq" and rounding == "learned" else names.get(self.method, self.method)
        if self.method in ("atom", "quarot") and rounding in ("gptq", "rtn"):
            out += "+" + names[rounding]
        if self.bisup is not None:
            on = [name for name in BiSupConfig.SPACES if getattr(self.bisup, name)]
            spaces = "" if on == [n for n in BiSupConfig.SPACES if getattr(BiSupConfig(), n)] else \
                f"[{', '.join(on) or 'nothing'}]"
            out += (" + " if out else "") + f"BiSup{spaces}" + (" (learned rounding)" if rounding == "learned" and not spaces else "")
        group = lambda g: "per-channel" if g == -1 else f"g{g}"  # noqa: E731
        out += f" W{self.w_bits}A{self.a_bits}" if self.quantizes_activations else f" W{self.w_bits}A16"
        out += f" {group(self.w_group_size)}"
        if self.quantizes_activations and self.a_group_size != self.w_group_size:
            out += f"/a {group(self.a_group_size)}"
        if self.quantizes_kv:
            out += f" KV{self.kv_bits}" + (f" (FP16 prompt {self.prompt_len})" if self.prompt_len else "")
        notes = []
        if self.bisup is not None:  # BiSup settings that change what trains, where they differ from today's
            today = BiSupConfig()
            owner_on = lambda name: name not in BiSupConfig.OWNER or getattr(self.bisup, BiSupConfig.OWNER[name])  # noqa: E731
            notes += [f"BiSup {name}={getattr(self.bisup, name)}" for name in BiSupConfig.LABELLED
                      if getattr(self.bisup, name) != getattr(today, name) and owner_on(name)]
        if self.method == "quarot" and self.rotation_seed:
            notes.append(f"rotation seed {self.rotation_seed}")
        if self.quantizes_activations and self.a_convention != BISUP_ACTS:
            notes.append(f"{self.a_convention} activations")
        if self.quantizes_activations and self.a_clip != 1.0:
            notes.append(f"a_clip {self.a_clip:g}")
        return out + (f" ({', '.join(notes)})" if notes else "")

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "QuantConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"QuantConfig.from_dict: unknown fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)  # a nested "bisup" dict becomes a BiSupConfig in __post_init__

    def replace(self, **changes: Any) -> "QuantConfig":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)
