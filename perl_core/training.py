"""The supervised training loop shared by the reward model and the anchor (SFT).

One loop, top to bottom: AdamW, warmup then linear/cosine decay, gradient accumulation and
clipping, mixed precision by `train.precision` (perl_core.devices), validation every N steps
with early stopping, checkpoints every N steps (`perl_core.checkpoints`), a stop on a non-finite
loss that keeps the last good checkpoint. Metrics go to the callback it is handed.

Under `accelerate launch --num_processes N` (perl_core.parallel) each process takes its shard of
every batch and DistributedDataParallel averages the gradients; each shard's loss is weighted by
its share of the batch's loss denominator (rows, or response tokens for SFT), so one step of N
processes is the step one process takes on the whole batch. Only the main process reports,
evaluates for the record and writes checkpoints.
"""
from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import torch
from torch import nn

from perl_core import parallel
from perl_core.callbacks import MetricsCallback, null_callback
from perl_core.checkpoints import (latest_checkpoint, load_best_state, load_checkpoint, load_trainable_state,
                                   save_checkpoint, trainable_state)
from perl_core.config import BaseTrainConfig, TrainConfig
from perl_core.devices import autocast, grad_scaler
from perl_core.errors import NonFiniteError, UserError

LossFn = Callable[[nn.Module, Any], tuple[torch.Tensor, dict[str, float]]]
EvalFn = Callable[[nn.Module], dict[str, float]]


# ---------------------------------------------------------------- seeding, optimizer, schedule
def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def eval_subset(n_rows: int, n: Optional[int], seed: int) -> list[int]:
    """Indices, in order, of the validation rows an evaluation scores: a seeded sample of `n` of the
    `n_rows` (`*.eval_examples`), or all of them when `n` is None or not smaller."""
    if n is None or n_rows <= n:
        return list(range(n_rows))
    return sorted(random.Random(seed).sample(range(n_rows), n))


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, scaler, max_grad_norm: float,
                   step: int, checkpoint_dir: Optional[Path]) -> torch.Tensor:
    """Clip, step, schedule, zero: the end of every optimisation step (SFT, reward model, RL).
    Returns the gradient norm before clipping. `scheduler=None` leaves the learning rate where it is
    (RL's inner update passes over one batch: the schedule counts batches)."""
    if scaler:
        scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_grad_norm)
    if scaler is None:  # fp16: an overflowing step is the scaler's to skip (and lower its scale)
        require_finite(grad_norm, "gradient norm", step, checkpoint_dir)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def make_optimizer(model: nn.Module, cfg: BaseTrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError("the model has no trainable parameters (check tuning and lora.target_modules)")
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: BaseTrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = int(cfg.warmup_ratio * cfg.max_steps)
    total = cfg.max_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def require_finite(value: torch.Tensor | float, what: str, step: int, checkpoint_dir: Optional[Path]) -> None:
    v = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
    if not math.isfinite(v):
        kept = latest_checkpoint(checkpoint_dir) if checkpoint_dir else None
        where = f"the last good checkpoint is {kept}" if kept else "no checkpoint had been written yet"
        raise NonFiniteError(
            f"{what} became {v} at step {step}; the run stopped and {where}. "
            "Lower the learning rate or check the data, then continue with --resume."
        )


# ---------------------------------------------------------------- the result, progress, the DDP loss step
@dataclass
class TrainResult:
    step: int
    best_metric: Optional[float] = None
    best_step: Optional[int] = None
    stopped_early: bool = False
    last_eval: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def _progress(total: int, start: int, desc: str):
    if not sys.stderr.isatty():
        return None
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=True)
    bar.start()
    bar.add_task(desc, total=total, completed=start, info="")
    return bar


class LossStep(nn.Module):
    """`loss_fn(model, batch)` as a module, so that DistributedDataParallel sees the forward
    (loss functions reach inside the model, e.g. a reward model's body and head)."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


def shard_loss(step: nn.Module, batch: list, world: int) -> tuple[torch.Tensor, dict[str, float]]:
    """This process's loss on its shard of `batch`, scaled so that DDP's mean over the processes is the
    loss of the whole batch, and its metrics scaled alike (their sum over processes / N is the batch's).

    A loss function returns a mean over `metrics["loss_weight"]` (default: `batch_size`) units; the
    whole batch's loss is sum_r weight_r * loss_r / sum_r weight_r. A process whose shard is empty
    (a batch with fewer rows than processes) runs one row at weight 0: DDP needs every process's backward.
    """
    rows = parallel.shard(batch)
    loss, metrics = step(rows or list(batch[:1]))
    weight = float(metrics.get("loss_weight", metrics.get("batch_size", 1))) if rows else 0.0
    share = world * weight / float(parallel.sum_across(torch.tensor([weight]))[0])
    metrics = {k: float(v) * share for k, v in metrics.items()} | {"batch_size": len(rows)}
    return loss * share, metrics


# ---------------------------------------------------------------- resume and checkpoints (this loop and RL's)
def resume_from(checkpoint_dir: Optional[Path], resume: bool, model: nn.Module, optimizer: torch.optim.Optimizer,
                scheduler, scaler) -> tuple[int, dict, Optional[Path]]:
    """Where a run continues: (step, the checkpoint's extra state, its folder) with the trainable weights, the
    optimizer, the schedule and the loss scaler restored; (0, {}, None) for a fresh run or one with no checkpoint."""
    ckpt = latest_checkpoint(checkpoint_dir) if resume else None
    if ckpt is None:
        return 0, {}, None
    meta = load_checkpoint(ckpt, model, optimizer, scheduler)
    if scaler and meta["extra"].get("grad_scaler"):
        scaler.load_state_dict(meta["extra"]["grad_scaler"])
    return meta["step"], meta["extra"], ckpt


def checkpoint_due(checkpoint_dir: Optional[Path], step: int, every: int, last: bool) -> bool:
    return bool(checkpoint_dir) and (step % every == 0 or last)


def write_checkpoint(checkpoint_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                     scaler, extra: dict, best: Optional[dict[str, torch.Tensor]] = None) -> None:
    """The main process saves (`extra`, everything the rest of the run reads, plus the loss scaler's state);
    no process goes on, and none can resume from it, before it is whole."""
    if parallel.is_main():
        save_checkpoint(checkpoint_dir, step, model, optimizer, scheduler,
                        extra={**extra, "grad_scaler": scaler.state_dict() if scaler else None}, best=best)
    parallel.barrier()


# ---------------------------------------------------------------- the loop
@dataclass
class BestWeights:
    """Validation's bookkeeping: the best value of the metric so far, its step and weights, early stopping."""
    mode: str
    patience: Optional[int]
    value: Optional[float] = None
    step: Optional[int] = None
    state: Optional[dict[str, torch.Tensor]] = None
    patience_left: Optional[int] = None
    stopped: bool = False

    def observe(self, value: float, step: int, model: nn.Module) -> None:
        if self.value is None or (value > self.value if self.mode == "max" else value < self.value):
            self.value, self.step, self.state, self.patience_left = value, step, trainable_state(model), self.patience
        elif self.patience_left is not None:
            self.patience_left -= 1
            self.stopped = self.stopped or self.patience_left <= 0


def _batches_from(batches: Callable[[int], Iterable[Any]], micro: int) -> Iterator[Any]:
    """Every micro-batch after the first `micro`, epoch after epoch (each epoch's order fixed by its number)."""
    epoch, seen = 0, 0
    while True:
        epoch_batches = list(batches(epoch))
        if not epoch_batches:
            raise UserError("the training data yielded no batches (empty split after filtering?)")
        for batch in epoch_batches:
            if seen >= micro:
                yield batch
            seen += 1
        epoch += 1


def accumulate(model: nn.Module, ddp: Optional[nn.Module], stream: Iterator[Any], loss_fn: LossFn, cfg: TrainConfig,
               scaler, step: int, checkpoint_dir: Optional[Path]) -> tuple[dict[str, float], int]:
    """One optimizer step's gradients: `cfg.grad_accum` micro-batches forward and backward. Returns the step's
    metrics (means over the micro-batches, and over the processes) and the number of examples it saw."""
    device, world = next(model.parameters()).device, parallel.world_size()
    totals: dict[str, float] = {}
    n_examples = 0
    for micro in range(cfg.grad_accum):
        batch = next(stream)
        # gradients are all-reduced once per step, in the last micro-batch's backward
        with parallel.no_sync(ddp, sync=micro == cfg.grad_accum - 1):
            with autocast(cfg.precision, device):
                loss, metrics = loss_fn(model, batch) if ddp is None else shard_loss(ddp, batch, world)
            require_finite(loss, "training loss", step + 1, checkpoint_dir)
            scaled = loss / cfg.grad_accum
            (scaler.scale(scaled) if scaler else scaled).backward()
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + float(v) / cfg.grad_accum
        totals["loss"] = totals.get("loss", 0.0) + float(loss.detach()) / cfg.grad_accum
        n_examples += int(metrics.get("batch_size", 0))
    if ddp is not None:  # the whole batch's metrics: each process's are scaled by its share
        keys = sorted(totals)
        summed = parallel.sum_across(torch.tensor([totals[k] for k in keys] + [n_examples], dtype=torch.float64))
        totals = {k: float(v) / world for k, v in zip(keys, summed[:-1])}
        n_examples = int(summed[-1])
    totals.pop("batch_size", None)
    totals.pop("loss_weight", None)
    return totals, n_examples


def train_loop(
    model: nn.Module,
    batches: Callable[[int], Iterable[Any]],
    loss_fn: LossFn,
    cfg: TrainConfig,
    *,
    eval_fn: Optional[EvalFn] = None,
    eval_metric: Optional[str] = None,
    eval_mode: str = "max",
    callback: MetricsCallback = null_callback,
    checkpoint_dir: Optional[Path] = None,
    resume: bool = False,
    desc: str = "training",
) -> TrainResult:
    """Train `model` for `cfg.max_steps` optimizer steps.

    `batches(epoch)` yields the micro-batches of one epoch in an order that depends only on
    the epoch number (seeded), so a resumed run skips exactly the batches already consumed.
    `loss_fn(model, batch)` returns the loss and per-batch metrics. With `eval_fn`, the best
    weights by `eval_metric` are restored at the end. Under N processes, `batches` yields the global
    batches as sequences of rows (each process takes its shard) and only the main process calls
    `callback` and writes checkpoints.
    """
    device, main = next(model.parameters()).device, parallel.is_main()
    set_seed(cfg.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    scaler = grad_scaler(cfg.precision, device)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    step, extra, ckpt = resume_from(checkpoint_dir, resume, model, optimizer, scheduler, scaler)
    micro_done = extra.get("micro_done", step * cfg.grad_accum)
    best = BestWeights(eval_mode, cfg.early_stopping_patience, extra.get("best_metric"), extra.get("best_step"),
                       patience_left=extra.get("patience_left", cfg.early_stopping_patience),
                       stopped=extra.get("stopped_early", False))
    if best.step is not None and eval_fn:
        best.state = load_best_state(ckpt, best.step, model)
    last_eval = extra.get("last_eval", {})

    started = time.perf_counter()
    bar = _progress(cfg.max_steps, step, desc) if main else None
    model.train()
    stream = _batches_from(batches, micro_done)
    ddp = parallel.data_parallel(LossStep(model, loss_fn)) if parallel.world_size() > 1 else None
    try:
        while step < cfg.max_steps and not best.stopped:
            t0 = time.perf_counter()
            # 1. the step's gradients, micro-batch by micro-batch; 2. the optimizer step
            metrics, n_examples = accumulate(model, ddp, stream, loss_fn, cfg, scaler, step, checkpoint_dir)
            micro_done += cfg.grad_accum
            grad_norm = optimizer_step(model, optimizer, scheduler, scaler, cfg.max_grad_norm, step + 1, checkpoint_dir)
            step += 1
            seconds = time.perf_counter() - t0
            metrics.update(lr=scheduler.get_last_lr()[0], grad_norm=float(grad_norm), step_seconds=seconds)
            if n_examples:
                metrics["examples_per_second"] = n_examples / seconds
            if main:
                callback({f"train/{k}": v for k, v in metrics.items()}, step)
            if bar:
                bar.update(bar.task_ids[0], completed=step, info=f"loss {metrics['loss']:.4f}")

            # 3. validation: every process evaluates (its weights are the same); the main one's numbers decide
            if eval_fn and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                model.eval()
                with torch.no_grad(), autocast(cfg.precision, device):
                    last_eval = parallel.from_main(eval_fn(model))
                model.train()
                if main:
                    callback({f"eval/{k}": v for k, v in last_eval.items()}, step)
                if eval_metric:
                    best.observe(last_eval[eval_metric], step, model)

            # 4. a checkpoint: everything the rest of the run and its summary read, so a resume ends identically
            if checkpoint_due(checkpoint_dir, step, cfg.checkpoint_every, step == cfg.max_steps or best.stopped):
                write_checkpoint(checkpoint_dir, step, model, optimizer, scheduler, scaler,
                                 extra={"micro_done": micro_done, "best_metric": best.value, "best_step": best.step,
                                        "patience_left": best.patience_left, "stopped_early": best.stopped,
                                        "last_eval": last_eval},
                                 best=best.state if best.step not in (None, step) else None)
    finally:
        if bar:
            bar.stop()
    if best.state is not None:
        load_trainable_state(model, best.state)
    model.eval()
    return TrainResult(step=step, best_metric=best.value, best_step=best.step, stopped_early=best.stopped,
                       last_eval=last_eval, seconds=time.perf_counter() - started)
