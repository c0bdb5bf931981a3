"""Data-parallel training under `accelerate launch --num_processes N`.

accelerate's `PartialState` sets up the process group (gloo on CPUs, nccl on GPUs) and tells a
process its rank; torch's `DistributedDataParallel` averages the gradients. Every process
takes its share of each batch from the same seeded order (rows `rank, rank + N, ...`), so the N
shards together are the batch a single process would take, and only the main process writes
(checkpoints, artifacts, manifests, tracking, printing) while the others wait at a barrier.

A plain run is one process: every function here is then the identity or a no-op, and the
training code takes exactly the path it takes without this module.
"""
from __future__ import annotations

import contextlib
from typing import Any, Sequence

import torch
from torch import nn

from perl_core.errors import UserError


def _state():
    from perl_core.devices import process_state

    return process_state()


def world_size() -> int:
    """How many processes train together (1 for a plain run)."""
    return _state().num_processes


def rank() -> int:
    return _state().process_index


def is_main() -> bool:
    """Whether this process writes (always true for a plain run)."""
    return _state().is_main_process


def barrier() -> None:
    """Every process waits here until all have arrived (a no-op for one process)."""
    _state().wait_for_everyone()


def main_first():
    """A context the main process runs first and the others after it (builds a shared folder once)."""
    return _state().main_process_first()


def per_process(batch_size: int, setting: str) -> int:
    """Rows each process takes of a global batch of `batch_size`; the setting must split evenly."""
    n = world_size()
    if batch_size % n:
        raise UserError(f"{setting}={batch_size} is the global batch and must be divisible by the {n} processes "
                        f"of this launch (each takes batch_size / {n} rows): use a multiple of {n}, or another "
                        "--num_processes")
    return batch_size // n


def shard(rows: Sequence[Any]) -> list:
    """This process's rows of a global batch: rows rank, rank + N, ... of the seeded order."""
    n = world_size()
    return list(rows) if n == 1 else list(rows[rank()::n])


def data_parallel(module: nn.Module) -> nn.Module:
    """`module` wrapped in DistributedDataParallel on accelerate's process group; itself for one process.

    DDP starts every process from the main process's weights and averages the gradients of each
    backward pass (all-reduce over buckets, overlapped with the backward)."""
    state = _state()
    if state.num_processes == 1:
        return module
    if not torch.distributed.is_initialized():
        raise UserError(f"this launch has {state.num_processes} processes but no torch process group "
                        f"(accelerate distributed type {state.distributed_type}); data-parallel training supports "
                        "`accelerate launch --num_processes N` on GPUs or with --cpu (not DeepSpeed, FSDP or XLA)")
    from torch.nn.parallel import DistributedDataParallel

    device = state.device
    # no buffer broadcast before each forward: the buffers (rotary tables) are loaded alike and never
    # trained, and forwards without a backward (scoring, a micro-batched no-grad pass) need no collective
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                   forward_sync_buffers=False)


def no_sync(module: nn.Module, sync: bool):
    """Accumulate gradients locally (no all-reduce) unless `sync`: all but the last micro-batch of a step."""
    if sync or not hasattr(module, "no_sync"):
        return contextlib.nullcontext()
    return module.no_sync()


def sum_across(values: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of `values` over all processes (float64 for exact counts and weights)."""
    if world_size() == 1:
        return values
    from accelerate.utils import reduce

    return reduce(values.to(_state().device, torch.float64), reduction="sum").cpu()


def gather(values: torch.Tensor) -> torch.Tensor:
    """`values` of every process concatenated in rank order (on the CPU); `values` itself for one process."""
    if world_size() == 1:
        return values
    from accelerate.utils import gather as accelerate_gather

    return accelerate_gather(values.detach().to(_state().device)).cpu()


def from_main(obj: Any) -> Any:
    """The main process's `obj` on every process (one decision everywhere, e.g. early stopping)."""
    if world_size() == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([obj], from_process=0)[0]
