"""The supervised training loop shared by the reward model and the anchor (SFT), and the
checkpoint format every long run uses (RL included).

One loop, top to bottom: AdamW, warmup then linear/cosine decay, gradient accumulation and
clipping, mixed precision by `train.precision` (perl_core.devices), validation every N steps
with early stopping, checkpoints every N steps, a stop on a non-finite loss that keeps the last
good checkpoint. Metrics go to the callback it is handed.

Checkpoints are folders ``step-000123/`` holding safetensors (trainable weights, optimizer
tensors) and JSON (step, scheduler, RNG, optimizer hyper-parameters): nothing is pickled.
"""
from __future__ import annotations

import json
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from perl_core.callbacks import MetricsCallback, null_callback
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


# ---------------------------------------------------------------- checkpoints
def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise UserError(f"checkpoint does not fit this model: unknown parameters {missing[:3]}")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))


def _optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_files(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _rng_state() -> dict:
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }


def _set_rng_state(rng: dict, torch_states: dict[str, torch.Tensor]) -> None:
    py = rng["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = rng["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch_states["torch"])
    if "cuda" in torch_states and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch_states["cuda"])


def save_checkpoint(checkpoint_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler, extra: Optional[dict] = None, keep: int = 2) -> Path:
    """Write `checkpoint_dir/step-XXXXXX/` atomically (a temp folder renamed into place), keep the last `keep`."""
    checkpoint_dir = Path(checkpoint_dir)
    final = checkpoint_dir / f"step-{step:06d}"
    tmp = checkpoint_dir / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    opt_tensors, opt_meta = _optimizer_to_files(optimizer)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    rng_tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng_tensors["cuda"] = torch.cuda.get_rng_state()
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    meta = {"step": step, "optimizer": opt_meta, "scheduler": scheduler.state_dict() if scheduler else None,
            "rng": _rng_state(), "extra": extra or {}}
    (tmp / "state.json").write_text(json.dumps(meta))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(checkpoint_dir.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(checkpoint_dir: Optional[Path]) -> Optional[Path]:
    if checkpoint_dir is None or not Path(checkpoint_dir).exists():
        return None
    done = sorted(p for p in Path(checkpoint_dir).glob("step-*") if (p / "state.json").exists())
    return done[-1] if done else None


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and RNG from `path`; returns the JSON state (step, extra)."""
    path = Path(path)
    meta = json.loads((path / "state.json").read_text())
    load_trainable_state(model, load_file(str(path / "trainable.safetensors")))
    _optimizer_from_files(optimizer, load_file(str(path / "optimizer.safetensors")), meta["optimizer"])
    if scheduler is not None and meta["scheduler"] is not None:
        scheduler.load_state_dict(meta["scheduler"])
    _set_rng_state(meta["rng"], load_file(str(path / "rng.safetensors")))
    return meta


# ---------------------------------------------------------------- the loop
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
    weights by `eval_metric` are restored at the end.
    """
    device = next(model.parameters()).device
    set_seed(cfg.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    scaler = grad_scaler(cfg.precision, device)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg)

    step, micro_done, extra = 0, 0, {}
    if resume:
        ckpt = latest_checkpoint(checkpoint_dir)
        if ckpt is not None:
            meta = load_checkpoint(ckpt, model, optimizer, scheduler)
            step, extra = meta["step"], meta["extra"]
            micro_done = extra.get("micro_done", step * cfg.grad_accum)
            if scaler and extra.get("grad_scaler"):
                scaler.load_state_dict(extra["grad_scaler"])
    best = extra.get("best_metric")
    best_step = extra.get("best_step")
    patience_left = extra.get("patience_left", cfg.early_stopping_patience)
    best_state = trainable_state(model) if (best is not None and eval_fn) else None
    result = TrainResult(step=step, best_metric=best, best_step=best_step)
    if step >= cfg.max_steps:
        return result

    def _batches_from(micro: int) -> Iterator[Any]:
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

    started = time.perf_counter()
    bar = _progress(cfg.max_steps, step, desc)
    model.train()
    stream = _batches_from(micro_done)
    try:
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            totals: dict[str, float] = {}
            n_examples = 0
            for _ in range(cfg.grad_accum):
                batch = next(stream)
                with autocast(cfg.precision, device):
                    loss, metrics = loss_fn(model, batch)
                require_finite(loss, "training loss", step + 1, checkpoint_dir)
                scaled = loss / cfg.grad_accum
                (scaler.scale(scaled) if scaler else scaled).backward()
                micro_done += 1
                for k, v in metrics.items():
                    totals[k] = totals.get(k, 0.0) + float(v) / cfg.grad_accum
                totals["loss"] = totals.get("loss", 0.0) + float(loss.detach()) / cfg.grad_accum
                n_examples += int(metrics.get("batch_size", 0))
            if scaler:
                scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                       cfg.max_grad_norm)
            if scaler is None:  # fp16: an overflowing step is the scaler's to skip (and lower its scale)
                require_finite(grad_norm, "gradient norm", step + 1, checkpoint_dir)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            seconds = time.perf_counter() - t0
            totals.pop("batch_size", None)
            totals.update(lr=scheduler.get_last_lr()[0], grad_norm=float(grad_norm), step_seconds=seconds)
            if n_examples:
                totals["examples_per_second"] = n_examples / seconds
            callback({f"train/{k}": v for k, v in totals.items()}, step)
            if bar:
                bar.update(bar.task_ids[0], completed=step, info=f"loss {totals['loss']:.4f}")

            if eval_fn and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                model.eval()
                with torch.no_grad(), autocast(cfg.precision, device):
                    result.last_eval = eval_fn(model)
                model.train()
                callback({f"eval/{k}": v for k, v in result.last_eval.items()}, step)
                if eval_metric:
                    value = result.last_eval[eval_metric]
                    better = best is None or (value > best if eval_mode == "max" else value < best)
                    if better:
                        best, best_step, best_state = value, step, trainable_state(model)
                        patience_left = cfg.early_stopping_patience
                    elif patience_left is not None:
                        patience_left -= 1
                        if patience_left <= 0:
                            result.stopped_early = True
            if checkpoint_dir and (step % cfg.checkpoint_every == 0 or step == cfg.max_steps or result.stopped_early):
                save_checkpoint(checkpoint_dir, step, model, optimizer, scheduler,
                                extra={"micro_done": micro_done, "best_metric": best, "best_step": best_step,
                                       "patience_left": patience_left,
                                       "grad_scaler": scaler.state_dict() if scaler else None})
            if result.stopped_early:
                break
    finally:
        if bar:
            bar.stop()
    if best_state is not None:
        load_trainable_state(model, best_state)
    model.eval()
    result.step, result.best_metric, result.best_step = step, best, best_step
    result.seconds = time.perf_counter() - started
    return result
