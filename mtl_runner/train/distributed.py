"""Data-parallel training across processes (``trainer.strategy=ddp`` under torchrun).

The aim is that N ranks train exactly the model one process would train on the combined
batch, whatever the balancer and surgery do. ``torch.nn.parallel.DistributedDataParallel``
averages the summed gradient, which is right only for ``surgery=none``: surgery acts on
the per-task gradients, and projecting each rank's rows before averaging is a different
(and rank-count dependent) method. So the engine averages the per-task rows of the
shared parameters (the Jacobian) and the heads' gradients first, and the balancer and
the surgery then see the global Jacobian on every rank; all ranks compute the same
direction (same rows, same seeded generator) and stay in lockstep without a broadcast.

How one step stays equal to single-process training:

- every rank draws the same batch order (same seed) and keeps its contiguous slice of
  each batch (:meth:`DataParallel.shard`);
- a task loss is a mean over examples, so the global loss is ``sum_r n_r L_r / N``; each
  rank scales its loss by ``R n_r / N`` (its *share*), after which a plain mean over ranks
  of losses, per-task rows or gradients is the global quantity, also for a smaller last
  batch;
- the balancer and surgery see the mean over ranks of the (detached) losses;
- evaluation shards each batch too and sums the losses and the metric accumulators'
  statistics (confusion counts, error sums) over ranks.

Batch-norm statistics are per rank unless ``trainer.sync_batchnorm=true`` (SyncBatchNorm):
without it a model with batch norm does not match single-process training.
Communication runs after the backward rather than overlapped with it as in
DistributedDataParallel: correctness for every surgery comes first.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mtl_runner.errors import ConfigError

#: Environment variables torchrun sets for each rank.
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DataParallel:
    """This process's place in the group, and the collectives the trainer needs. Its
    ``mean_`` and ``mean_grads_`` are what the gradient engine averages through
    (:class:`mtl_runner.optim.reduction.CrossRankReduction`)."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes logs, checkpoints and results."""
        return self.rank == 0

    # ------------------------------------------------------------- collectives
    def mean(self, tensor: Tensor) -> Tensor:
        """The mean over ranks (a new tensor; autograd does not pass through)."""
        out = tensor.detach().clone()
        dist.all_reduce(out)
        return out.div_(self.world_size)

    def sum_(self, tensors: Iterable[Tensor]) -> None:
        """Sum tensors over ranks, in place, with one collective per dtype."""
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for group in by_dtype.values():
            flat = torch.cat([t.reshape(-1) for t in group])
            dist.all_reduce(flat)
            torch._foreach_copy_(group, [chunk.view_as(t) for chunk, t in zip(flat.split([t.numel() for t in group]), group)])

    def mean_(self, tensors: Iterable[Tensor]) -> None:
        """Average tensors over ranks, in place."""
        tensors = list(tensors)
        self.sum_(tensors)
        if tensors:
            torch._foreach_div_(tensors, float(self.world_size))

    def mean_grads_(self, params: Iterable[Tensor]) -> None:
        self.mean_([p.grad for p in params if p.grad is not None])

    @staticmethod
    def statistics(accumulators: Iterable[Any]) -> list[Tensor]:
        """The tensors a metric accumulator holds. Every accumulator of
        :mod:`mtl_runner.tasks` keeps additive statistics (confusion counts, error sums,
        histograms), so their sum over ranks is the statistic of the whole split. One that
        holds batches back (a task's own metrics) takes them in first (``settle``)."""
        accumulators = list(accumulators)
        for acc in accumulators:
            settle = getattr(acc, "settle", None)
            if settle is not None:
                settle()
        return [value for acc in accumulators for value in vars(acc).values() if isinstance(value, Tensor)]

    def broadcast_module_(self, module: nn.Module) -> None:
        """Start every rank from rank 0's parameters and buffers."""
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)

    def barrier(self) -> None:
        dist.barrier()

    # ------------------------------------------------------------------- data
    def shard(self, batch: Any, num_tasks: int) -> tuple[Any, Tensor]:
        """This rank's contiguous slice of a batch, and its per-task loss share
        ``R n_r / N`` (see the module docstring). Multi-input batches (dicts task ->
        tensor) are sliced per task."""
        inputs, targets = batch
        local_targets = {name: self._slice(t) for name, t in targets.items()}
        if isinstance(inputs, dict):
            local_inputs: Any = {name: self._slice(t) for name, t in inputs.items()}
        else:
            local_inputs = self._slice(inputs)
        counts = [(len(local_targets[name]), len(targets[name])) for name in targets]
        share = torch.tensor([self.world_size * n / max(1, total) for n, total in counts[:num_tasks]])
        return (local_inputs, local_targets), share

    def _slice(self, tensor: Tensor) -> Tensor:
        return torch.tensor_split(tensor, self.world_size)[self.rank]

    def check_batches(self, num_examples: int, batch_size: int, eval_batch_size: int) -> None:
        """Refuse batch sizes that leave a rank without examples (its loss would be an
        empty mean)."""
        last = num_examples % batch_size
        smallest = min(batch_size, last) if last else batch_size
        if smallest < self.world_size:
            raise ValueError(
                f"trainer.batch_size={batch_size} with {num_examples} training examples gives a batch of "
                f"{smallest} for {self.world_size} ranks: every rank needs at least one example per batch"
            )
        if eval_batch_size < self.world_size:
            raise ValueError(f"trainer.eval_batch_size={eval_batch_size} must be >= the number of ranks ({self.world_size})")


def from_env() -> DataParallel | None:
    """The process group torchrun set up for this process (None outside a group)."""
    if not dist.is_available() or not dist.is_initialized():
        return None
    return DataParallel(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def init_process_group(device: str) -> DataParallel:
    """Join torchrun's group (NCCL for CUDA devices, gloo on CPUs); one line if this
    process was not started by torchrun."""
    missing = [name for name in TORCHRUN_ENV if name not in os.environ]
    if missing:
        raise ConfigError(
            f"trainer.strategy=ddp runs under torchrun ({', '.join(missing)} not set): "
            "torchrun --nproc_per_node=N -m mtl_runner trainer.strategy=ddp ..."
        )
    local_rank = int(os.environ["LOCAL_RANK"])
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    context = from_env()
    assert context is not None
    return context


def close_process_group() -> None:
    """Leave torchrun's group after a run that every rank finished. All ranks meet first: a
    rank that tears gloo down while another still reads from it aborts that one ("terminate
    called without an active exception"), which turns a finished run into a failed job."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def device_for(context: DataParallel, device: torch.device) -> torch.device:
    """One GPU per rank: ``cuda`` means this rank's local GPU."""
    if device.type == "cuda":
        return torch.device("cuda", context.local_rank)
    return device


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Batch norm over the combined batch of all ranks (running statistics included)."""
    if device.type == "cpu":
        raise ConfigError("trainer.sync_batchnorm=true needs GPUs (PyTorch's SyncBatchNorm has no CPU kernel); on CPUs use a backbone without batch norm (backbone=mlp)")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def broadcast_run_dir(context: DataParallel, run_dir: str) -> str:
    """Rank 0's run directory, so that every rank's Hydra points at the same one."""
    holder = [run_dir]
    dist.broadcast_object_list(holder, src=0)
    return str(holder[0])
