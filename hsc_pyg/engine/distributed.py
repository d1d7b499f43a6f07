"""Several processes (GPUs, nodes) with ``torch.distributed``: joining the job, splitting work, gathering results.

``torchrun`` starts one process per GPU and gives each the ``env://`` variables (``MASTER_ADDR``, ``MASTER_PORT``,
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); :func:`process_group` joins that job (``nccl`` on GPU, ``gloo`` on CPU) and
pins the process to GPU ``LOCAL_RANK``. Without ``torchrun`` every helper here is the single-process identity, so the
library code calls them unconditionally.

Training (:mod:`hsc_pyg.engine.train`) wraps the model in ``DistributedDataParallel`` (which averages the ranks'
gradients and broadcasts the BatchNorm running statistics from rank 0 at every forward) and draws the data order with
:class:`DistributedBatchSampler`. The hinge loss's negatives are either each rank's own batch (the default; each rank
computes the original ``[B, B]`` loss of its ``B`` captions) or, with ``gather_negatives``, every rank's batch
(:class:`GatheredNegatives`). Evaluation (:mod:`hsc_pyg.engine.scoring`) splits the image rows of the score matrix
with :func:`shard_rows` and collects them on rank 0 with :func:`gather_rows`.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Sampler

from ..config import SCORE_CHUNK_MB
from ..nn.model import HSCModel, ImageEncoding, TrainingScores
from . import blocking
from .device import resolve_device

#: Bound of the rank-0 receive buffer of one :func:`gather_rows` call, in MiB.
GATHER_CHUNK_MB = 256


# --------------------------------------------------------------------------- the job
def launched_by_torchrun() -> bool:
    """True when the ``env://`` variables of a job of several processes are set (by ``torchrun`` or the like)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0: the process that writes checkpoints, logs and reports."""
    return get_rank() == 0


def local_device(device: torch.device) -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` when ``device`` is a GPU and the process belongs to a torchrun job,
    else ``device``."""
    if device.type == "cuda" and launched_by_torchrun():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[torch.device]:
    """Join the torchrun job for the body of the ``with``; yields this process's device (see :func:`local_device`).

    Backend ``nccl`` when the device is a GPU, ``gloo`` on the CPU. Does nothing but yield ``device`` outside torchrun
    or when the caller has already initialised the default process group (which it then keeps).
    """
    if not launched_by_torchrun() or dist.is_initialized():
        yield local_device(device) if dist.is_initialized() else device
        return
    device = local_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    try:
        yield device
    finally:
        dist.destroy_process_group()


def torchrun_job(device: str) -> contextlib.AbstractContextManager:
    """What the command lines enter: under torchrun :func:`process_group` for the ``--device`` named (``auto``,
    ``cpu``, ``cuda``); otherwise nothing."""
    if not launched_by_torchrun():
        return contextlib.nullcontext()

    return process_group(resolve_device(device))


def _comm_device() -> torch.device:
    """Where the tensors of a collective must live: the current GPU for nccl, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (a small picklable value: metrics, a flag)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_over_ranks(value: float) -> float:
    """The mean of ``value`` over the ranks (every rank gets it)."""
    if not is_distributed():
        return value
    total = torch.tensor([value], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(total)
    return float(total.item()) / get_world_size()


def broadcast_buffers(module: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) into every rank's ``module``, as
    ``DistributedDataParallel`` does at the start of each forward: after a training step each rank holds the
    statistics of its own batch, and evaluation and checkpoints must see one model."""
    if not is_distributed():
        return
    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=0)


# --------------------------------------------------------------------------- evaluation: rows of the score matrix
def shard_rows(num_rows: int, multiple: int = 1, rank: int | None = None, world: int | None = None) -> range:
    """The rows ``[0, num_rows)`` of ``rank`` (default: this process's) when split into ``world`` contiguous
    shards whose boundaries are multiples of ``multiple``; the last shards may be shorter or empty.

    Evaluation passes its image block size as ``multiple``, so every block a rank scores is a block the single
    process scores: the same inputs through the same operations, hence the same numbers.
    """
    rank = get_rank() if rank is None else rank
    world = get_world_size() if world is None else world
    per_rank = math.ceil(math.ceil(num_rows / world) / multiple) * multiple
    start = min(rank * per_rank, num_rows)
    return range(start, min(start + per_rank, num_rows))


def gather_rows(part: np.ndarray, num_rows: int, multiple: int = 1) -> np.ndarray | None:
    """Assemble a ``[num_rows, M]`` float32 matrix on rank 0 from each rank's ``part`` (its :func:`shard_rows` rows).

    Returns the matrix on rank 0 and None on the other ranks (``part`` itself without torch.distributed). Sent in
    column slices so that rank 0 receives at most ``GATHER_CHUNK_MB`` MiB per call (through the GPU under nccl).
    """
    if not is_distributed():
        return part
    world, device = get_world_size(), _comm_device()
    shards = [shard_rows(num_rows, multiple, r, world) for r in range(world)]
    if part.shape[0] != len(shards[get_rank()]):
        raise ValueError(f"rank {get_rank()} holds {part.shape[0]} rows but its shard has {len(shards[get_rank()])}")
    longest, width = max(len(s) for s in shards), part.shape[1]
    out = np.empty((num_rows, width), dtype=np.float32) if is_main() else None
    step = max(1, (GATHER_CHUNK_MB << 20) // (4 * world * max(longest, 1)))
    for c0 in range(0, width, step):
        send = torch.zeros(longest, min(step, width - c0), dtype=torch.float32)
        send[:part.shape[0]] = torch.from_numpy(np.ascontiguousarray(part[:, c0:c0 + step], dtype=np.float32))
        send = send.to(device)
        received = [torch.empty_like(send) for _ in range(world)] if is_main() else None
        dist.gather(send, received, dst=0)
        if out is not None:
            for shard, block in zip(shards, received):
                out[shard.start:shard.stop, c0:c0 + send.size(1)] = block[:len(shard)].cpu().numpy()
    return out


# --------------------------------------------------------------------------- training: the data order
class DistributedBatchSampler(Sampler[list[int]]):
    """This rank's batches of one epoch. All ranks draw the same permutation of the ``num_items`` items; global step
    ``t`` takes its next ``batch_size * world`` items and rank ``r`` the ``r``-th ``batch_size`` of them; the last
    incomplete global batch is dropped. With one process: the permutation cut into ``batch_size`` batches.

    Like ``torch.utils.data.DistributedSampler`` (one seeded order per epoch, disjoint shares, :meth:`set_epoch` before
    each epoch), except that the order comes from a generator the caller owns (training keeps its state in the
    checkpoint) and :meth:`set_epoch` takes ``start``, the number of the epoch's items already taken by all ranks
    together. Position counted in items, not in per-rank batches, makes a checkpoint independent of the number of
    processes: a run resumed with another world size takes the items that remain, in the same order.
    """

    def __init__(self, num_items: int, batch_size: int, rank: int | None = None, world: int | None = None) -> None:
        self.num_items, self.batch_size = num_items, batch_size
        self.rank = get_rank() if rank is None else rank
        self.world = get_world_size() if world is None else world
        self.order: Tensor | None = None
        self.start = 0

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world

    def set_epoch(self, generator: torch.Generator, start: int = 0) -> None:
        """Draw the epoch's permutation from ``generator`` (advancing it); skip its first ``start`` items."""
        self.order, self.start = torch.randperm(self.num_items, generator=generator), start

    def steps_per_epoch(self, start: int = 0) -> int:
        """Global steps in an epoch (from item ``start``)."""
        return (self.num_items - start) // self.global_batch

    def __len__(self) -> int:
        return self.steps_per_epoch(self.start)

    def __iter__(self) -> Iterator[list[int]]:
        if self.order is None:
            raise RuntimeError("call set_epoch before iterating a DistributedBatchSampler")
        first = self.start + self.rank * self.batch_size
        for step in range(len(self)):
            begin = first + step * self.global_batch
            yield self.order[begin:begin + self.batch_size].tolist()


# --------------------------------------------------------------------------- training: the model and its negatives
def wrap_model(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` in ``DistributedDataParallel`` when there are several processes (rank 0's weights and buffers are
    copied to the others here, its buffers again at every forward), else ``module``."""
    if not is_distributed():
        return module
    return nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


class _AllGather(torch.autograd.Function):
    """Every rank's ``tensor`` (same shape on all), stacked ``[W, ...]``. Backward: each part's gradient summed over
    the ranks (an all-reduce, which every backend has), the owner keeping its own part's sum."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        parts = [torch.empty_like(tensor) for _ in range(get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[get_rank()]


def all_gather_with_grad(tensor: Tensor) -> list[Tensor]:
    """Every rank's ``tensor`` (their first dimensions may differ), in rank order; the local one is ``tensor`` itself.

    Gradients flow back to the owner of each part: every rank's gradient for a part is summed and handed to its owner.
    """
    if not is_distributed():
        return [tensor]
    size = torch.tensor([tensor.size(0)], device=tensor.device)
    sizes = [torch.empty_like(size) for _ in range(get_world_size())]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    padding = [0, 0] * (tensor.dim() - 1) + [0, max(sizes) - tensor.size(0)]
    stacked = _AllGather.apply(nn.functional.pad(tensor, padding))
    parts = [part[:n] for part, n in zip(stacked.unbind(0), sizes)]
    parts[get_rank()] = tensor
    return parts


class GatheredNegatives(nn.Module):
    """Training forward whose negatives are the images and captions of every rank: a
    :class:`~hsc_pyg.data.graphs.PairBatch` of ``B`` captions per rank -> scores ``[W*B, W*B]`` of the global batch
    (the ranks' batches concatenated in rank order; row ``b`` = global caption ``b``'s image, column ``c`` = global
    caption ``c``), the same matrix on every rank.

    How: each rank encodes its own images and captions; the image encodings are gathered (with gradient); each rank
    scores every image of the global batch against its own captions -- the global matrix's columns it owns, so the
    matrix is computed once over all ranks, ``W`` times a rank's ``[B, B]`` work each -- and the columns are gathered
    (with gradient). Every caption's SAF gate BatchNorm thus takes its statistics over all the images of the global
    batch, as one process scoring the global batch would (an image that two ranks both hold counts twice).

    Gradient: each rank computes the loss ``L`` of the whole matrix; the gathers' backward sums every rank's
    gradient onto the owner of each part, so the ranks' gradients add up to ``W * dL/dθ`` and the average that
    ``DistributedDataParallel`` takes is ``dL/dθ``: the step of one process training on the global batch, except that
    the encoders' BatchNorms (VisualSA, the relational blocks) normalise over each rank's own images.

    The first stage's cosines are those of the global batch too: every rank's first-stage vectors are gathered (with
    gradient) and each rank computes the whole ``[W*B, W*B]`` cosine matrix.
    """

    def __init__(self, model: HSCModel, chunk_mb: float = SCORE_CHUNK_MB) -> None:
        super().__init__()
        self.model = model
        self.chunk_mb = chunk_mb

    def forward(self, pairs) -> TrainingScores:
        images = self.model.encode_images(pairs.images)
        captions = self.model.encode_captions(pairs.captions)
        regions, glo = all_gather_with_grad(images.regions), all_gather_with_grad(images.glo)
        all_images = ImageEncoding(torch.cat(regions), torch.cat(glo))
        columns = blocking.score(self.model, all_images, captions, self.chunk_mb)  # [images of all ranks, B]
        scores = torch.cat(all_gather_with_grad(columns), 1)                     # [images of all ranks, W*B]
        offsets = np.cumsum([0] + [len(r) for r in regions[:-1]])
        img_index = torch.cat([index + int(offset)
                               for index, offset in zip(all_gather_with_grad(pairs.img_index), offsets)])
        stage = self.model.first_stage
        img_vectors = torch.cat(all_gather_with_grad(stage.image_vectors(images.glo)))      # [images of all ranks, k]
        cap_vectors = torch.cat(all_gather_with_grad(stage.caption_vectors(captions.glo)))  # [W*B, k]
        return TrainingScores(scores[img_index], img_vectors[img_index] @ cap_vectors.T, stage.scale())
