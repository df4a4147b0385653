"""Data-parallel training over several processes, with PyTorch's own engine:
torch.distributed for the process group and DistributedDataParallel (DDP) for gradients.

    torchrun --nproc_per_node 2 run.py gan --variant b      # 2 processes, one machine
    python run.py gan --variant b                           # 1 process, as always

torchrun starts N copies of run.py and tells each its rank r (0 .. N-1) through the
environment. Every process holds the whole model and the whole data set; a training
step then runs in each process on its own share of the global batch, and DDP averages
the gradients before the optimiser steps, so every replica takes the same step.

What makes a run with N processes *the same run* as with 1 (`--batch-size` is the global
batch either way):
- Random numbers. Every process keeps the same random streams as a 1-process run and
  draws every per-image quantity (batch indices, z, timesteps, noise, augmentations,
  dropout masks) for the whole global batch, then keeps its own rows (`rows`, `draw`,
  `SharedDropout`). Process r of N takes rows r*B/N .. (r+1)*B/N - 1, so the N shares
  together are exactly the batch a single process would have drawn.
- Gradients. Each process's loss is the mean over its B/N rows; DDP averages the N
  gradients, (1/N) sum_r grad mean_r = grad of the mean over all B rows.
- Batch norm. A batch-norm layer normalises with the mean and variance of its batch; per
  process that would be a batch of B/N, and a figure would change with N. Every
  batch-norm layer therefore becomes a `SharedBatchNorm` (`share_batch_layers`), which
  adds up the per-channel sums of all processes before it normalises: the statistics of
  the global batch, exactly those of 1 process. It matters for each model that has batch
  norm: the DCGAN discriminator (variant a, hacks) normalises the real and the fake
  batch separately, the generator's statistics define its samples, the UDA feature
  extractor normalises source and target batches separately (DANN depends on it), and the
  VAE's encoder and decoder. The cost is one small all-reduce (3 numbers a channel) per
  layer and forward pass. torch's nn.SyncBatchNorm does the same on GPUs, but refuses
  CPU tensors, and these runs must test on CPUs.
- Spectral norm's vector u, weight averages (EMA), running statistics: they follow from
  the weights and the batches by the same arithmetic in every process, so they stay
  identical without being sent (DDP also broadcasts buffers from rank 0 at every forward).
- Gradient reversal is an autograd function inside the graph: DDP sees only the
  gradients it produces, so it needs no change.
- Two players (GAN's G and D, ADDA's F_t and D) are wrapped separately, one DDP each:
  each optimiser steps on its own player's averaged gradients.

Only rank 0 prints progress and writes files (checkpoints, pictures, results.json); the
others compute the same numbers and write nothing. Sampling and evaluation (the DDPM's
1000 images, --generate, FID features, t-SNE embeddings) split their batches across the
processes (`in_order`) and gather the results in the original order.
"""
import contextlib
import datetime
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import util

# A process that waits longer than this for the others (one died, or hangs) stops with
# an error instead of waiting for ever; a FID or t-SNE on rank 0 stays well below it.
TIMEOUT_SECONDS = int(os.environ.get("DLCV_DIST_TIMEOUT", "1800"))


# ============================================================================ the group
def launched() -> bool:
    """Started by torchrun (or by hand with RANK, WORLD_SIZE and MASTER_ADDR set)?"""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start(device_name: str) -> torch.device:
    """Join the process group when launched by torchrun, and pick this process's device:
    GPU number LOCAL_RANK with NCCL, else the CPU with gloo. Without torchrun: the
    device --device names, no group."""
    if not launched():
        return util.choose_device(device_name)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1))
    device = util.choose_device(device_name)
    if device.type == "cuda":  # every process checks them all, so rank 0 says it too
        if per_machine > torch.cuda.device_count():
            raise util.UserError(f"torchrun started {per_machine} processes on a machine "
                                 f"with {torch.cuda.device_count()} GPUs: give "
                                 "--nproc_per_node at most the number of GPUs")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise util.UserError(f"--device {device.type} has no distributed backend: use "
                             "cuda or cpu under torchrun")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_available() or not dist.is_backend_available(backend):
        raise util.UserError(f"this torch build has no '{backend}' backend for "
                             "torch.distributed: run without torchrun, or install a torch "
                             "that has it")
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=TIMEOUT_SECONDS),
                            device_id=device if device.type == "cuda" else None)
    if rank() != 0:  # one voice: rank 0 prints (run.py: and says the errors)
        sys.stdout = open(os.devnull, "w")
    return device


def lost(error: Exception) -> bool:
    """Is this the error a process meets when another one of the run died or hung? gloo
    raises a plain RuntimeError ("Connection reset by peer", "Timed out"), NCCL a
    DistBackendError."""
    text = str(error)
    return dist.is_initialized() and (isinstance(error, dist.DistError) or any(
        sign in text for sign in ("gloo", "NCCL", "Connection reset", "Connection closed",
                                  "Timed out", "timed out")))


def failure(error: Exception) -> str:
    """The first line of a torch.distributed error, for run.py's one-line message."""
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return first.split("] ", 1)[-1].split(". ")[0][:160]  # without gloo's source location


def stop():
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    """This process's number; before the group is joined, the one torchrun gave it."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def check_batch(batch_size: int):
    """The global batch must split into equal shares, or the gradient average would weigh
    the rows of a smaller share more."""
    if batch_size % world():
        raise util.UserError(f"--batch-size {batch_size} does not split over {world()} "
                             f"processes: use a multiple of {world()}")


# ============================================================================ random rows
def rows(global_rows: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """This process's rows of a tensor drawn for the whole global batch (along dim)."""
    if world() == 1:
        return global_rows
    return global_rows.tensor_split(world(), dim=dim)[rank()]


def draw(sampler, shape, generator: torch.Generator, device=None, dim: int = 0
         ) -> torch.Tensor:
    """sampler(shape, generator=generator) for this process's shape[dim] images, drawn the
    way a single process draws it: the global batch's numbers (shape[dim] * N along dim),
    of which this process keeps its own. With one process: exactly sampler(shape).
    sampler: torch.rand, torch.randn, or functools.partial(torch.randint, low, high)."""
    global_shape = list(shape)
    global_shape[dim] *= world()
    drawn = rows(sampler(tuple(global_shape), generator=generator), dim)
    return drawn if device is None else drawn.to(device)


# ============================================================================ the replicas
def data_parallel(model: nn.Module) -> nn.Module:
    """A view of `model` for the training step, in which each child module with trainable
    weights (a player: GAN's G and D, the U-Net, F, C and D of UDA) is a replica: the same
    weights, gradients averaged across processes in backward. `model` itself keeps its
    state_dict keys, so checkpoints read the same with 1 or N processes. One process:
    `model` itself."""
    if world() == 1:
        return model
    view = nn.Module.__new__(type(model))
    view.__dict__ = {**model.__dict__, "_modules": dict(model._modules)}
    for name, child in model.named_children():
        if any(parameter.requires_grad for parameter in child.parameters()):
            view._modules[name] = replica(child)
    return view


def replica(module: nn.Module) -> nn.Module:
    """module in DistributedDataParallel (one process: module itself). Call the replica in
    the training step; keep using module for checkpoints, sampling and evaluation."""
    if world() == 1:
        return module
    return nn.parallel.DistributedDataParallel(module)


class SumOverProcesses(torch.autograd.Function):
    """y = sum_r x_r, the same in every process. The run's loss is sum_r L_r, and every
    L_r depends on y, so dL/dx_r = sum_r' dL_r'/dy: backward sums the gradients over the
    processes too."""

    @staticmethod
    def forward(ctx, x):
        total = x.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        # the same sum, and differentiable again: WGAN-GP's penalty takes a gradient of
        # a gradient (create_graph=True) through the shared batch-norm statistics
        return SumOverProcesses.apply(grad_output)


class SharedBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm over the global batch: in training, the per-channel count, sum and sum
    of squares of every process are added up (SumOverProcesses, so each process's gradient
    also flows through the statistics the others share), then

        mean = sum x / n,   var = sum x^2 / n - mean^2,   y = (x - mean) / sqrt(var + eps) g + b,

    with n the images (times pixels) of all processes, and the running statistics moved
    toward mean and the unbiased var * n / (n - 1), as nn.BatchNorm does. In eval mode
    each process normalises with the running statistics, as nn.BatchNorm does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and world() > 1):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]                                   # all but channels
        count = x.new_full((x.shape[1],), x.numel() / x.shape[1])            # (C,)
        totals = SumOverProcesses.apply(torch.stack(
            [count, x.sum(dims), (x * x).sum(dims)]))                     # (3, C), summed
        n, mean = totals[0], totals[1] / totals[0]
        var = totals[2] / n - mean * mean
        if self.track_running_stats:
            self.num_batches_tracked += 1
            momentum = self.momentum if self.momentum is not None else \
                1 / float(self.num_batches_tracked)
            with torch.no_grad():
                self.running_mean.lerp_(mean, momentum)
                self.running_var.lerp_(var * n / (n - 1), momentum)
        shape = (1, -1) + (1,) * (x.dim() - 2)                           # (1, C, 1, 1)
        return ((x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
                * self.weight.view(shape) + self.bias.view(shape))

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected a batch of at least 2 dimensions, got {x.dim()}")


class SharedDropout(nn.modules.dropout._DropoutNd):
    """Dropout (whole_channels: Dropout2d, one draw per channel) whose mask is drawn for
    the global batch from torch's default stream, which every process seeds alike, and
    cut to this process's rows: mask m ~ Bernoulli(1 - p), y = x m / (1 - p), the very
    mask a single process draws (on the CPU, where F.dropout draws it the same way)."""
    whole_channels = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.p > 0 and world() > 1):
            dropout = F.dropout2d if self.whole_channels else F.dropout
            return dropout(x, self.p, self.training)
        shape = list(x.shape[:2]) + [1] * (x.dim() - 2) if self.whole_channels else list(x.shape)
        shape[0] *= world()                                   # the global batch's mask
        keep = rows(torch.empty(shape, device=x.device).bernoulli_(1 - self.p))
        return x * keep / (1 - self.p)


def share_batch_layers(model: nn.Module) -> nn.Module:
    """The layers that look across the batch, made to look across the global batch: batch
    norm becomes SharedBatchNorm, dropout SharedDropout, in place (the class of each is
    switched: the same object, parameters, buffers and names, so optimisers already built
    and checkpoints do not change). One process: model unchanged."""
    if world() == 1:
        return model
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
            module.__class__ = SharedBatchNorm
        elif isinstance(module, (nn.Dropout, nn.Dropout2d)):
            whole_channels = isinstance(module, nn.Dropout2d)
            module.__class__ = SharedDropout
            module.whole_channels = whole_channels
    return model


# ============================================================================ gathering
def average(numbers: dict) -> dict:
    """The mean over processes of each number a step returned (each a mean over its own
    rows), so the logged loss is that of the global batch."""
    if world() == 1:
        return numbers
    names = list(numbers)
    values = torch.tensor([float(numbers[name]) for name in names], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        values = values.cuda()
    dist.all_reduce(values)
    return {name: value / world() for name, value in zip(names, values.tolist())}


def in_order(function, items, desc: str = "") -> list:
    """[function(item) for item in items] on the CPU, the items split across processes
    (process r takes items r, r + N, ...) and the results gathered back in the items'
    order on every process. desc: a progress line over this process's items."""
    items = list(items)
    mine = items[rank()::world()]
    results = [_to_cpu(function(item)) for item in (util.Progress(mine, desc) if desc
                                                     else mine)]
    if world() == 1:
        return results
    gathered = [None] * world()
    dist.all_gather_object(gathered, results)
    return [gathered[i % world()][i // world()] for i in range(len(items))]


def _to_cpu(value):
    return value.cpu() if isinstance(value, torch.Tensor) else value


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (a download, a cache entry), the others after it."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def barrier():
    if world() > 1:
        dist.barrier()
