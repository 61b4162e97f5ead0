"""The BiSup options of `bisup quantize` (--bisup, --bisup-*) and the BiSupConfig they make."""
from __future__ import annotations

import argparse

from bisup.config import BiSupConfig


def add_bisup_args(q: argparse.ArgumentParser) -> None:
    q.add_argument("--bisup", action="store_true",
                   help="BiSup vertical suppression: block-wise fine-tuning on top of --method")
    q.add_argument("--bisup-epochs", type=int, default=None, help="BiSup: passes over the calibration windows per layer")
    q.add_argument("--bisup-batch-size", type=int, default=None, help="BiSup: calibration windows per step")
    q.add_argument("--bisup-lr", type=float, default=None, help="BiSup: learning rate of clipping and smoothing")
    q.add_argument("--bisup-lowrank-lr", type=float, default=None, help="BiSup: learning rate of the low-rank factors")
    q.add_argument("--bisup-rank", type=int, default=None, help="BiSup: rank of the error compensation")
    q.add_argument("--bisup-val-windows", type=int, default=None, help="BiSup: calibration windows held out (validation loss)")
    q.add_argument("--bisup-clip-search", action=argparse.BooleanOptionalAction, default=None,
                   help="BiSup: start each weight group's learnable clip at its least-squared-error ratio "
                        "(default: on)")
    q.add_argument("--bisup-spaces", default="default",
                   help="BiSup: 'default' (BiSupConfig's), 'all', or a comma list of "
                        "weight_clip,act_clip,smooth,lowrank,rounding,head_rotation (the rest stay off)")
    q.add_argument("--bisup-loss", choices=BiSupConfig.LOSSES, default=None,
                   help="BiSup: block loss, over all tokens at once (mse) or per token (token)")
    q.add_argument("--bisup-rounding-init", choices=BiSupConfig.ROUNDING_INITS, default=None,
                   help="BiSup: where the learned rounding starts (RTN's or GPTQ's codes)")
    q.add_argument("--bisup-lr-schedule", choices=BiSupConfig.LR_SCHEDULES, default=None,
                   help="BiSup: learning rates constant, or decayed linearly to 0 over each block's steps")
    q.add_argument("--bisup-e2e-epochs", type=int, default=None,
                   help="BiSup: passes of end-to-end training of the weight scales and activation clips "
                        "(codes fixed) on the full-precision model's next-token distribution, after the "
                        "block-wise stage (0: none)")
    q.add_argument("--bisup-e2e-lr", type=float, default=None, help="BiSup: learning rate of the end-to-end stage")


def bisup_config_from_args(a):
    """The BiSupConfig of `bisup quantize --bisup ...` (None without --bisup)."""
    if not getattr(a, "bisup", False):
        return None
    defaults = BiSupConfig()
    if a.bisup_spaces == "default":
        spaces = tuple(name for name in BiSupConfig.SPACES if getattr(defaults, name))
    elif a.bisup_spaces == "all":
        spaces = BiSupConfig.SPACES
    else:
        spaces = tuple(s for s in a.bisup_spaces.split(",") if s)
    unknown = sorted(set(spaces) - set(BiSupConfig.SPACES))
    if unknown:
        raise ValueError(f"--bisup-spaces: unknown {unknown}; expected 'default', 'all' or a comma list of "
                         f"{list(BiSupConfig.SPACES)}")
    given = dict(epochs=a.bisup_epochs, batch_size=a.bisup_batch_size, lr=a.bisup_lr, lowrank_lr=a.bisup_lowrank_lr,
                 rank=a.bisup_rank, val_windows=a.bisup_val_windows,
                 weight_clip_search=a.bisup_clip_search, loss=a.bisup_loss, rounding_init=a.bisup_rounding_init,
                 lr_schedule=a.bisup_lr_schedule, e2e_epochs=a.bisup_e2e_epochs, e2e_lr=a.bisup_e2e_lr)
    return BiSupConfig(**{k: v for k, v in given.items() if v is not None},
                       **{name: name in spaces for name in BiSupConfig.SPACES})
