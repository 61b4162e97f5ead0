"""BiSup's training of one decoder block (methods/bisup.py builds the block and exports it): the block
loss against the full-precision targets, the optimizers, the loop."""
from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from bisup.config import BiSupConfig


def _out(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def relative_error(out: torch.Tensor, target: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """BiSup's block loss (BiSupConfig.loss) of outputs [..., hidden] against the full-precision targets:
    "mse": sum |out - target|^2 / sum |target|^2 over every token; "token": the mean over tokens of
    |out_t - target_t|^2 / |target_t|^2."""
    err = (out - target).square()
    if kind == "mse":
        return err.mean() / target.square().mean().clamp(min=1e-12)
    return (err.sum(-1) / target.square().sum(-1).clamp(min=1e-12)).mean()


def block_loss(layer: nn.Module, hidden, kwargs, targets, chunks, kind: str = "mse") -> float:
    """Mean relative_error of the layer's outputs over the given chunks (no gradients)."""
    with torch.no_grad():
        vals = [relative_error(_out(layer(hidden[c], **kwargs[c])), targets[c], kind).item() for c in chunks]
    return sum(vals) / max(len(vals), 1)


class SignSGD(torch.optim.Optimizer):
    """p -= lr * sign(grad) (AutoRound's optimizer for rounding offsets): no state. Uses up the gradient."""

    def __init__(self, params, lr: float):
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.sub_(p.grad.sign_(), alpha=group["lr"])


def _optimizers(groups: List[dict], bc: BiSupConfig) -> List[torch.optim.Optimizer]:
    """AdamW over the groups; SignSGD over the rounding offsets when bc.rounding_optimizer says so."""
    sign = [g for g in groups if bc.rounding_optimizer == "signsgd" and g.get("name") == "rounding"]
    adam = [g for g in groups if not any(g is s for s in sign)]
    opts = [torch.optim.AdamW(adam, weight_decay=bc.weight_decay)] if adam else []
    return opts + [SignSGD(g["params"], g["lr"]) for g in sign]


def run_epochs(step: Callable[[int], float], chunks: List[int], epochs: int, seed: int, desc: str,
               progress: bool, name: str = "loss") -> Tuple[float, float]:
    """`epochs` passes over `chunks`, each in a seeded random order (the same on every device); step(c)
    trains on chunk c and returns its loss. Returns the first and the last epoch's mean loss."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    first = last = float("nan")
    bar = tqdm(total=epochs * len(chunks), desc=desc, disable=not progress, leave=False)
    try:
        for epoch in range(epochs):
            order = [chunks[i] for i in torch.randperm(len(chunks), generator=gen, device="cpu").tolist()]
            total = 0.0
            for c in order:
                value = step(c)
                total += value
                bar.update(1)
                bar.set_postfix({name: f"{value:.4g}"})
            last = total / len(order)
            if epoch == 0:
                first = last
    finally:
        bar.close()
    return first, last


def train_block(block, inputs, bc: BiSupConfig, train_chunks: List[int], seed: int,
                desc: str, progress: bool) -> Dict[str, float]:
    """AdamW (and SignSGD, see _optimizers) over the block's parameters; returns the first/last epoch's
    mean training loss."""
    groups = block.param_groups(bc)
    log = {"loss_first_epoch": float("nan"), "loss_last_epoch": float("nan")}
    if not groups or bc.epochs == 0 or not train_chunks:
        return log
    opts = _optimizers(groups, bc)
    n_steps = bc.epochs * len(train_chunks)
    # "linear": step i runs at (1 - i / n_steps) of each group's lr, the last at 1 / n_steps of it
    decay = (lambda i: 1.0 - i / n_steps) if bc.lr_schedule == "linear" else (lambda i: 1.0)
    schedules = [torch.optim.lr_scheduler.LambdaLR(opt, decay) for opt in opts]

    def step(c: int) -> float:
        out = _out(block.layer(inputs.hidden[c], **inputs.kwargs[c]))
        mse = relative_error(out, inputs.targets[c], bc.loss)
        loss = mse + bc.smooth_penalty * block.penalty(bc) if bc.smooth_penalty > 0 else mse
        loss.backward()
        for opt, schedule in zip(opts, schedules):
            opt.step()
            opt.zero_grad(set_to_none=True)  # now, not before the next backward: no stale gradients
            schedule.step()
        return mse.item()

    with torch.enable_grad():
        first, last = run_epochs(step, train_chunks, bc.epochs, seed, desc, progress)
    return {"loss_first_epoch": first, "loss_last_epoch": last}
