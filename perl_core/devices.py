"""Where a stage computes, in which precision, and whether it recomputes activations.

* Device: accelerate's `PartialState` decides. Under `accelerate launch` each process gets the
  GPU of its local rank; a plain run gets the GPU when there is one, else the CPU
  (`ACCELERATE_USE_CPU=1` or `accelerate launch --cpu` forces the CPU). Every stage places its
  models with :func:`run_device`, and the same state tells a process its rank.
* Precision (`*.train.precision`; `auto` follows `accelerate launch --mixed_precision bf16|fp16`):
  fp32 weights, forwards under `torch.autocast`: what
  accelerate's `mixed_precision` does. It is plain autocast rather than
  `Accelerator(mixed_precision=...)` because accelerate fixes one mixed precision per process
  and refuses a second one, while one pipeline process trains the anchor, the reward model and
  the policy, each with its own setting.
* Gradient checkpointing (`*.train.gradient_checkpointing`): each decoder layer's activations
  are recomputed in the backward pass instead of kept.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
from torch import nn

from perl_core.errors import UserError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def process_state():
    """accelerate's `PartialState` of this process: its device, rank and process group (perl_core.parallel).

    `ACCELERATE_USE_CPU=1` (what `accelerate launch --cpu` sets) keeps every process on the CPU, with
    gloo between the processes of a launch."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def run_device() -> torch.device:
    """The device this process computes on (see the module docstring)."""
    return process_state().device


def autocast_dtype(precision: str, device: torch.device, setting: str = "train.precision") -> Optional[torch.dtype]:
    """The autocast dtype of `precision` on `device`; None runs in fp32.

    `auto` is bf16 on CUDA GPUs that support it, fp16 on older ones, and fp32 elsewhere (bf16
    autocast on a CPU is correct but usually slower than fp32). `bf16` runs on the CPU too.
    `fp16` needs CUDA: its loss scaling guards against fp16's narrow range, which CPUs do not need.
    Under `accelerate launch --mixed_precision bf16|fp16` (the `ACCELERATE_MIXED_PRECISION` it sets),
    `auto` is that precision; an explicit setting wins over the launch flag.
    """
    if precision not in PRECISIONS:
        raise UserError(f"{setting}={precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "").lower()
    if precision == "auto" and launched in ("bf16", "fp16"):  # accelerate launch --mixed_precision bf16|fp16
        return autocast_dtype(launched, device, f"{setting} (auto, from accelerate launch --mixed_precision)")
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "fp16" and device.type != "cuda":
        raise UserError(f"{setting}='fp16' needs a CUDA GPU; this run is on {device.type}: use 'bf16' (mixed "
                        "precision on this device) or 'fp32'")
    if not torch.amp.is_autocast_available(device.type):
        raise UserError(f"{setting}={precision!r}: torch has no autocast on {device.type}; use 'fp32'")
    return torch.bfloat16 if precision == "bf16" else torch.float16


def autocast(precision: str, device: torch.device, setting: str = "train.precision"):
    """The context the forwards of a `precision` run go under (a no-op for fp32)."""
    dtype = autocast_dtype(precision, device, setting)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device) -> Optional[torch.amp.GradScaler]:
    """A loss scaler for fp16 (small gradients would underflow to zero); bf16 and fp32 need none."""
    if autocast_dtype(precision, device) != torch.float16:
        return None
    return torch.amp.GradScaler(device.type)


def enable_gradient_checkpointing(model: nn.Module, lora: bool) -> None:
    """Recompute each decoder layer in the backward pass instead of keeping its activations.

    Only training forwards recompute: in eval mode (evaluation, and `generate`, which
    `generation.sample_responses` runs in eval mode) the layers run plainly and keep the KV cache.
    """
    # non-reentrant checkpointing: the variant torch recommends; it also passes gradients to
    # LoRA weights when the layer's input (a frozen embedding's output) does not require grad
    kwargs = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers' newer name
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if lora:
        # frozen embeddings hand the first checkpointed layer an input without grad; models whose
        # own code checkpoints reentrantly would then drop the adapters' gradients
        model.enable_input_require_grads()

