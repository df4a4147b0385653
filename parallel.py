"""Data-parallel training over several processes, with PyTorch's own engine,
torch.distributed: the process group, and all-reduces for gradients and statistics.

    torchrun --nproc_per_node 2 run.py gan --variant b      # 2 processes, one machine
    python run.py gan --variant b                           # 1 process, as always

torchrun starts N copies of run.py and tells each its rank r (0 .. N-1) through the
environment. Every process holds the whole model and the whole data set; a training
step then runs in each process on its own share of the global batch, and the gradients
are averaged before the optimiser steps, so every process takes the same step.

What makes a run with N processes the same run as with 1, up to rounding (`--batch-size`
is the global batch either way, and it must split into N equal shares):
- Random numbers. Every process keeps the same random streams as a 1-process run and
  draws every per-image quantity (batch indices, z, timesteps, noise, augmentations,
  dropout masks) for the whole global batch, then keeps its own rows (`Random`, `rows`,
  `GlobalMask`). Process r of N takes rows r*B/N .. (r+1)*B/N - 1, so the N shares
  together are exactly the batch a single process would have drawn. A training loop
  takes its streams from its run (`noise = run.random("noise")`, training.py) and its
  steps draw from them as they would from torch (`noise.randn(count, latent_dim)`), for
  their own `count` images. (On GPUs, dropout masks and the order of floating-point
  sums differ: the same run in distribution.)
- Gradients. Each process's loss is the mean over its B/N rows; `distribute` makes
  every weight average its N gradients as backward produces them, (1/N) sum_r grad
  mean_r = grad of the mean over all B rows (DistributedDataParallel's rule, done by a
  hook on each weight instead of a wrapper, so the model keeps one name).
- Batch norm. A batch-norm layer normalises with the mean and variance of its batch; per
  process that would be a batch of B/N, and a figure would change with N. Every
  batch-norm layer therefore becomes a `SharedBatchNorm` (`share_batch_layers`), which
  adds up the per-channel sums of all processes before it normalises: the statistics of
  the global batch, those of 1 process. It matters for each model that has batch norm:
  the DCGAN discriminator (every variant but wgan-gp, unless --d-norm spectral)
  normalises the real and the fake batch separately, the generator's statistics define its samples, the UDA feature extractor
  normalises source and target batches separately (DANN depends on it), and the VAE's
  encoder and decoder. The cost is two small all-reduces (a few numbers a channel) per
  layer in each forward pass and two in backward. torch's nn.SyncBatchNorm does the same
  on GPUs, but refuses CPU tensors, and these runs must test on CPUs.
- Spectral norm's vector u, weight averages (EMA), running statistics: they follow from
  the weights and the batches by the same arithmetic in every process, so they stay
  identical on their own (as do the initial weights, seeded alike in every process).
- Gradient reversal is an autograd function inside the graph: the weights see only the
  gradients it produces, so it needs no change.
- Two players (GAN's G and D, ADDA's F_t and D; GTA's F, C, G and D): each weight
  averages its own gradient, so each optimiser steps on its own player's averaged
  gradients. (In the GAN's G step, D's gradients are averaged too and then thrown away:
  simple, a little communication lost. GTA's G and F steps send each loss only to its
  own players, `backward(inputs=...)`, so D's weights exchange nothing there.)
- A loss of a mean over the batch (self-ensembling's class balance) takes the mean over
  the global batch: its nets.BatchMean layer becomes a `SharedBatchMean`, whose mean a
  mean of the processes' losses would not equal.

The method files name torchrun only in their loops: `distribute` where the model is
built, and `rows` where a loop takes its share of a batch of data (the VAE's and UDA's
epochs); their steps, losses and samplers are written as for one process
(self-ensembling's class balance takes a nets.BatchMean layer). The run around the loop
(training.py) logs the means over the processes.

Only rank 0 prints progress and writes files (checkpoints, pictures, results.json); the
others compute the same numbers and write nothing, and a file rank 0 wrote is read by the
others only after a collective (a barrier) has passed. Sampling and feature extraction
(the DDPM's 1000 images, --generate, FID's Inception features, UDA's t-SNE features)
split their batches across the processes (`in_order`) and gather the results in the
original order; the t-SNE itself runs on rank 0. Several machines need --out and the
cache on a shared file system.

This module imports util (errors, device choice); util does not import it: rank 0 is
the process util.main_process() names from torchrun's RANK.
"""
import contextlib
import datetime
import functools
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn

import nets
import util

def timeout() -> datetime.timedelta:
    """How long a process waits for the others (one died, or hangs) before it stops with an
    error instead of waiting for ever (gloo: one line from run.py; NCCL's watchdog ends
    the process itself): DLCV_DIST_TIMEOUT seconds, default 1800, well above rank 0's
    t-SNE and pictures. Read when a torchrun starts, so a bad value troubles no other
    command."""
    text = os.environ.get("DLCV_DIST_TIMEOUT", "1800")
    if not (text.strip().isdigit() and int(text) > 0):
        raise util.UserError(f"DLCV_DIST_TIMEOUT={text}: give a whole number of seconds "
                             "above 0, or unset it (default 1800)")
    return datetime.timedelta(seconds=int(text))


# ============================================================================ the group
def launched() -> bool:
    """Started by torchrun (or by hand with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT
    set)?"""
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
    dist.init_process_group(backend, timeout=timeout(),
                            device_id=device if device.type == "cuda" else None)
    if rank() != 0:  # one voice: rank 0 prints (run.py: and says the errors)
        sys.stdout = util.silent()
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


def check_batch(batch_size: int):
    """The global batch must split into equal shares, or the gradient average would weigh
    the rows of a smaller share more."""
    if batch_size % world():
        raise util.UserError(f"--batch-size {batch_size} does not split over {world()} "
                             f"processes: use a multiple of {world()}")


# ============================================================================ random rows
def rows(global_rows: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """This process's rows of a tensor drawn for the whole global batch (along dim). The
    shares must be equal: DDP gives each process's mean the same weight."""
    if world() == 1:
        return global_rows
    if global_rows.shape[dim] % world():
        raise util.UserError(
            f"a batch of {global_rows.shape[dim]} images does not split into {world()} "
            "equal shares: pick a --batch-size (and for the classifier a last batch of an "
            "epoch) that divides by the number of processes, or run one process")
    return global_rows.tensor_split(world(), dim=dim)[rank()]


class Random:
    """Random numbers drawn as one process draws them, from one named stream of a run
    (training.py says which streams there are and where their seeds come from).

    rng.rand(count, ...), rng.randn(count, ...) and rng.randint(low, high, (count, ...))
    read like torch's functions, for `count` images. A training stream (per_process)
    draws the numbers of the whole global batch (count * N rows) from one torch.Generator
    on the CPU, so every process and device draws the same numbers, and keeps this
    process's rows (`rows`), moved to `device`; with one process: exactly torch's draws.
    A fixed stream (per_process=False: the grid's z, FID's samples) draws `count` rows in
    every process, since evaluation shares out its batches itself (`in_order`).
    rng.indices(population, batch_size): a global batch of indices drawn with
    replacement, this process's share; rng.permutation(count): an epoch's order, the
    same in every process. A checkpoint holds the generator's state."""

    def __init__(self, seed: int, device="cpu", per_process: bool = True):
        self.generator = torch.Generator().manual_seed(seed)
        self.device, self.per_process = torch.device(device), per_process

    def _draw(self, sampler, shape) -> torch.Tensor:
        if not self.per_process:
            return util.to_device(sampler(shape, generator=self.generator), self.device)
        global_shape = (shape[0] * world(), *shape[1:])
        return util.to_device(rows(sampler(global_shape, generator=self.generator)),
                              self.device)

    def rand(self, *shape) -> torch.Tensor:
        return self._draw(torch.rand, shape)

    def randn(self, *shape) -> torch.Tensor:
        return self._draw(torch.randn, shape)

    def randint(self, low: int, high: int, shape) -> torch.Tensor:
        return self._draw(functools.partial(torch.randint, low, high), shape)

    def indices(self, population: int, global_batch_size: int) -> torch.Tensor:
        """This process's share of global_batch_size indices into `population` images,
        drawn with replacement (unlike the draws above, the count is the global batch's)."""
        return util.to_device(rows(torch.randint(population, (global_batch_size,),
                                                 generator=self.generator)), self.device)

    def permutation(self, count: int) -> torch.Tensor:
        """0 .. count - 1 in random order, the whole of it in every process (an epoch's
        order; each process then takes its rows of every batch)."""
        return util.to_device(torch.randperm(count, generator=self.generator), self.device)

    def state_dict(self) -> torch.Tensor:
        return self.generator.get_state()

    def load_state_dict(self, state: torch.Tensor):
        self.generator.set_state(state.cpu())  # a checkpoint loaded onto a GPU moved it


# ============================================================================ the gradients
def distribute(model: nn.Module) -> nn.Module:
    """`model` made ready for training over the processes, in place, where it is built
    (returned for `model = parallel.distribute(Model())`):
    - its batch-wise layers look across the global batch (`share_batch_layers`), so
      copies made afterwards (weight averages) share them too;
    - each trainable weight averages its gradient over the processes as soon as backward
      has accumulated it, g <- (1/N) sum_r g_r (`average_gradient`), as DDP does; every
      optimiser then takes the same step in every process.
    The loop and the steps call `model` itself: there is no second name for it, and its
    state_dict keys are those of one process. One process: `model` unchanged."""
    share_batch_layers(model)
    if world() > 1:
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.register_post_accumulate_grad_hook(average_gradient)
    return model


def average_gradient(parameter: torch.Tensor):
    """After backward has added a gradient into parameter.grad: the mean over the
    processes. A second backward before the optimiser steps (retain_graph) adds to an
    average already equal in every process, a, so the mean of a + g_r is a + mean g_r,
    still the gradient of the mean loss. A loss that does not reach a weight (a backward
    with `inputs=` naming other players) leaves it alone, with no exchange."""
    dist.all_reduce(parameter.grad)
    parameter.grad.div_(world())


class SumOverProcesses(torch.autograd.Function):
    """y = sum_r x_r, the same tensor in every process r.

    Backward: the run's objective is the mean over processes of their losses L_r, and
    each L_r depends on x_r directly and through y (dy/dx_r = I), so y's contribution to
    the gradient of x_r is sum_r' dL_r'/dy: the gradients summed over the processes
    too. Each process thus gets N times the gradient of the mean through y; DDP's
    averaging of the weights' gradients divides by N again."""

    @staticmethod
    def forward(ctx, x):
        total = x.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        # the same sum, and differentiable again (for a gradient of a gradient)
        return SumOverProcesses.apply(grad_output)


class SharedBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm over the global batch. In training, with n the images (times pixels)
    of all processes, two sums over the processes (SumOverProcesses, so each process's
    gradient also flows through the statistics the others share):

        mean = sum x / n,   var = sum (x - mean)^2 / n,   y = (x - mean) / sqrt(var + eps) g + b,

    and the running statistics move toward mean and the unbiased var n / (n - 1), as
    nn.BatchNorm does. Two passes, not sum x^2 / n - mean^2, which loses the variance to
    rounding when the mean is large against the spread. The same statistics as one
    process's, up to rounding; in eval mode, the running statistics, as nn.BatchNorm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and world() > 1):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]                                   # all but channels
        shape = (1, -1) + (1,) * (x.dim() - 2)                           # (1, C, 1, 1)
        count = x.new_full((x.shape[1],), x.numel() / x.shape[1])            # (C,)
        n, total = SumOverProcesses.apply(torch.stack([count, x.sum(dims)]))  # (C,) each
        mean = total / n
        centred = x - mean.view(shape)
        var = SumOverProcesses.apply(centred.pow(2).sum(dims)) / n
        if self.track_running_stats:
            self.num_batches_tracked += 1
            momentum = self.momentum if self.momentum is not None else \
                1 / float(self.num_batches_tracked)          # None: a cumulative average
            with torch.no_grad():
                self.running_mean.lerp_(mean, momentum)
                self.running_var.lerp_(var * n / (n - 1), momentum)
        return centred * torch.rsqrt(var.view(shape) + self.eps) * self.weight.view(shape) \
            + self.bias.view(shape)


class SharedBatchMean(nets.BatchMean):
    """The mean over the global batch, the same in every process: sum_r sum_rows x / n,
    the sums over processes by SumOverProcesses (so the gradient flows to every
    process's rows)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if world() == 1:
            return super().forward(x)
        return SumOverProcesses.apply(x.sum(dim=0)) / (len(x) * world())


class SharedBatchNorm1d(SharedBatchNorm, nn.BatchNorm1d):
    pass


class SharedBatchNorm2d(SharedBatchNorm, nn.BatchNorm2d):
    pass


class GlobalMask:
    """Dropout (mixed into nn.Dropout and nn.Dropout2d) whose mask is drawn for the global
    batch from torch's default stream, which every process seeds alike, and cut to this
    process's rows: m ~ Bernoulli(1 - p), y = x m / (1 - p), on the CPU the very mask a
    single process draws (CUDA's fused dropout draws its masks otherwise). So no process
    may draw from the default stream alone (rank 0's pictures use generators of their own)."""

    def mask_shape(self, x: torch.Tensor) -> list[int]:
        return list(x.shape)                                  # one draw per value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.p > 0 and world() > 1):
            return super().forward(x)
        shape = self.mask_shape(x)
        shape[0] *= world()                                   # the global batch's mask
        keep = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(1 - self.p)
        return x * rows(keep).div_(1 - self.p)               # as F.dropout: mask / (1 - p)


class SharedDropout(GlobalMask, nn.Dropout):
    pass


class SharedDropout2d(GlobalMask, nn.Dropout2d):
    def mask_shape(self, x: torch.Tensor) -> list[int]:
        return list(x.shape[:2]) + [1] * (x.dim() - 2)      # one draw per channel, (B, C, 1, 1)


# nn's layer -> the same layer over the global batch (a subclass: isinstance still holds)
SHARED_LAYERS = {nn.BatchNorm1d: SharedBatchNorm1d, nn.BatchNorm2d: SharedBatchNorm2d,
                 nn.Dropout: SharedDropout, nn.Dropout2d: SharedDropout2d,
                 nets.BatchMean: SharedBatchMean}


def share_batch_layers(model: nn.Module) -> nn.Module:
    """The layers that look across the batch, made to look across the global batch: batch
    norm shares its statistics, dropout draws the global mask, a batch mean is the
    global batch's. In place: the class of
    each is switched to its subclass in SHARED_LAYERS (the same object, parameters,
    buffers and names, so optimisers already built and checkpoints do not change). One
    process: model unchanged."""
    if world() == 1:
        return model
    for module in model.modules():
        if type(module) in SHARED_LAYERS:
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.affine:
                raise ValueError("SharedBatchNorm needs affine batch norm")
            module.__class__ = SHARED_LAYERS[type(module)]
    return model


# ============================================================================ gathering
def average(numbers: dict) -> dict:
    """The mean over processes of each list of numbers the steps returned ({name: [one a
    step]}, each a mean over the process's own rows), so the logged losses are those of
    the global batch."""
    if world() == 1:
        return numbers
    names = list(numbers)
    values = torch.tensor([numbers[name] for name in names], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        values = values.cuda()
    dist.all_reduce(values)
    return {name: (row / world()).tolist() for name, row in zip(names, values.cpu())}


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
    """Rank 0 runs the block first (a download, a cache entry), the others after it, when
    its files exist. The block must hold no collective. If it fails on rank 0, the others
    still go on and meet the same failure themselves."""
    if not util.main_process():
        barrier()
    try:
        yield
    finally:
        if util.main_process():
            barrier()


def from_main(function):
    """function() on rank 0, its result sent to every process (one answer for all: a
    cache that rank 0 found, or None)."""
    if world() == 1:
        return function()
    answer = [function() if util.main_process() else None]
    dist.broadcast_object_list(answer, src=0)
    return answer[0]


def barrier():
    if world() > 1:
        dist.barrier()
