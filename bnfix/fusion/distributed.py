"""One process or many (``torchrun``): rank, device, sharding and the few collectives we need.

The training code is written once for ``world`` processes; a plain run is ``world == 1`` and
never touches ``torch.distributed``. Each rank sees an equal share of every epoch's samples
(``DistributedSampler``: the short shards are padded with repeated samples, so all ranks run
the same number of steps); per-sample results are gathered with their positions and a repeated
position counts once.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DistributedSampler, Sampler

from bnfix.errors import BnfixError

__all__ = ["Dist", "EpochBatches", "setup", "teardown"]


@dataclass(frozen=True)
class Dist:
    """This process's place in the run."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        """Only the main process writes files and prints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP around ``model`` when distributed; the model itself otherwise."""
        if not self.active:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (counts, loss sums)."""
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t)
        return t.tolist()

    def sum_tensor(self, tensor: Tensor) -> Tensor:
        """Element-wise sum over ranks of a tensor, on its own device (no host round trip on
        CUDA; gloo reduces CPU tensors)."""
        if not self.active:
            return tensor
        local = tensor.to(self._comm_device)
        dist.all_reduce(local)
        return local.to(tensor.device)

    def gather(self, tensor: Tensor) -> Tensor:
        """Concatenate equal-length 1-D tensors from all ranks, in rank order (on the CPU)."""
        if not self.active:
            return tensor.cpu()
        local = tensor.to(self._comm_device)
        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(parts, local)
        return torch.cat(parts).cpu()

    def gather_objects(self, obj: object) -> list[object]:
        if not self.active:
            return [obj]
        result: list[object] = [None] * self.world
        dist.all_gather_object(result, obj)
        return result

    def sync_buffers(self, model: nn.Module) -> None:
        """Rank 0's BatchNorm statistics everywhere, so that every rank evaluates one model.

        DDP broadcasts buffers at the start of each training forward, but after the last
        step of an epoch each rank holds the statistics of its own batches.
        """
        if self.active:
            for buffer in model.buffers():
                dist.broadcast(buffer.data, src=0)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def _resolve_device(name: str, local_rank: int) -> torch.device:
    cuda = torch.cuda.is_available()
    if name == "cuda" and not cuda:
        raise BnfixError("run.device = cuda: no CUDA device is available here; use cpu or auto")
    if name == "cpu" or not cuda:
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def setup(device: str) -> Dist:
    """Join the process group when started by ``torchrun`` (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = _resolve_device(device, local_rank)
    if world <= 1:
        return Dist(0, 1, resolved)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if resolved.type == "cuda" else "gloo",
            timeout=datetime.timedelta(minutes=30),
        )
    return Dist(rank, world, resolved)


def teardown(d: Dist) -> None:
    if d.active and dist.is_initialized():
        dist.destroy_process_group()


def rank_from_env() -> int:
    """This process's rank before any setup (for deciding who prints an early error)."""
    return int(os.environ.get("RANK", "0"))


# --------------------------------------------------------------------------------------------
# Epoch order


class _Positions(Sampler[int]):
    """Map a sampler over 0..n-1 to the split's feature positions."""

    def __init__(self, inner: Sampler[int], positions: np.ndarray) -> None:
        self.inner = inner
        self.positions = positions

    def __iter__(self) -> Iterator[int]:
        for i in self.inner:
            yield int(self.positions[i])

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]


class EpochBatch(list):
    """A training batch's positions that also say which (seed, epoch) drew them: what the
    dataset needs for per-epoch random choices (frames per segment) in any worker process."""

    def __init__(self, positions: list[int], seed: int, epoch: int) -> None:
        super().__init__(positions)
        self.seed, self.epoch = seed, epoch

    def __reduce__(self):  # to DataLoader workers: the list and both numbers
        return (EpochBatch, (list(self), self.seed, self.epoch))


class EpochBatches(Sampler[list[int]]):
    """This rank's batches of an epoch: an order that depends only on (seed, epoch).

    ``DistributedSampler`` draws the permutation from a generator seeded with
    ``seed + epoch``, so the data order of any epoch is reproduced by a resumed run without
    saving it. A trailing batch of one sample joins the previous batch: training-mode
    BatchNorm cannot normalise a single sample.
    """

    def __init__(
        self, positions: Tensor, batch_size: int, seed: int, d: Dist, shuffle: bool = True
    ) -> None:
        self.positions = positions.numpy()
        self.sampler = DistributedSampler(
            range(len(self.positions)),  # type: ignore[arg-type]
            num_replicas=d.world,
            rank=d.rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=False,
        )
        self.batch_size = batch_size

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def batches(self) -> list[list[int]]:
        inner = BatchSampler(
            _Positions(self.sampler, self.positions), self.batch_size, drop_last=False
        )
        batches = list(inner)
        if len(batches) > 1 and len(batches[-1]) == 1:
            batches[-2].extend(batches.pop())
        seed, epoch = self.sampler.seed, self.sampler.epoch
        return [EpochBatch(b, seed, epoch) for b in batches]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        return len(self.batches())

    @property
    def samples(self) -> int:
        """Samples this rank sees per epoch (padding included)."""
        return len(self.sampler)
