"""Building blocks and architectures shared by the models, and a torchsummary-style table.

Architectures:
- The digit CNN of domain adaptation (Ganin et al. 2016's MNIST network as common
  PyTorch re-implementations of DANN build it, wider and with batch norm): a feature
  extractor (two 5x5 convolutions, batch norm, max pools -> 800 features), a label
  classifier (800 -> 100 -> 100 -> 10) and a domain classifier (800 -> 100 -> 1), with
  gradient reversal (`grad_reverse`) between the features and the domain classifier.
- GTA's conditional generator (embedding, label, noise -> 28x28 image) and its
  discriminator with a real/fake head and a class head (Sankaranarayanan et al. 2018);
  `Standardise`, each image to zero mean and unit variance (self-ensembling's input).
- A digit classifier (two VGG-style stages of 3x3 convolutions with batch norm, then a
  dropout MLP) for 28x28 RGB digits: the evaluator that grades generated digits.
- DCGAN generator / discriminator (Radford, Metz & Chintala 2016, "Unsupervised
  Representation Learning with Deep Convolutional Generative Adversarial Networks"):
  z (100) -> 4x4x512 -> 8x8x256 -> 16x16x128 -> 32x32x64 -> 64x64x3 by 4x4 transposed
  convolutions of stride 2, batch norm + ReLU, Tanh out; the discriminator mirrors it with
  strided convolutions and LeakyReLU(0.2). No biases (batch norm makes them redundant).
  The GAN variants choose the discriminator's normalisation (batch, spectral or none)
  and its dropout.

`summary(model, input_size)` prints what torchsummary prints: every leaf layer with its
output shape and parameter count, then totals and memory estimates.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# ============================================================================ gradient reversal
class GradientReversal(torch.autograd.Function):
    """Identity on the way forward, -lambda times the gradient on the way back
    (Ganin & Lempitsky 2015): the features *maximise* the domain loss that the domain
    classifier minimises, in one backward pass."""

    @staticmethod
    def forward(ctx, x, lambd):
        ctx.lambd = lambd
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output):
        return -ctx.lambd * grad_output, None  # no gradient for lambda


def grad_reverse(x: torch.Tensor, lambd: float = 1.0) -> torch.Tensor:
    return GradientReversal.apply(x, lambd)


# ============================================================================ batch mean
class BatchMean(nn.Module):
    """x.mean(0), the mean over the batch, as a layer: a loss that is not linear in a mean
    over the batch (self-ensembling's class balance) needs the mean of the whole batch,
    which a mean of per-process losses would not give. As a layer, it is shared across
    processes the way batch norm's statistics are (parallel.SharedBatchMean)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=0)


# ============================================================================ weight averaging
@torch.no_grad()
def update_ema(average: nn.Module, model: nn.Module, step: int, decay: float):
    """theta_avg <- d theta_avg + (1 - d) theta, an exponential moving average of the
    weights (Polyak averaging), with d = min(decay, (1 + t) / (10 + t)) at step t so that
    the average forgets the random initial weights quickly. Buffers (batch-norm
    statistics) are copied; they fit the last weights, not the average, so the callers
    recompute them (recompute_batch_norm) before the average is evaluated or saved.
    Averaged weights are steadier than the last ones, which matters most for
    adversarial games (Yazici et al. 2019, "The Unusual Effectiveness of Averaging in
    GAN Training")."""
    d = ema_decay(step, decay)
    for averaged, current in zip(average.parameters(), model.parameters()):
        averaged.lerp_(current, 1 - d)
    for averaged, current in zip(average.buffers(), model.buffers()):
        averaged.copy_(current)


def ema_decay(step: int, decay: float) -> float:
    """The average's decay at step t, d = min(decay, (1 + t) / (10 + t)): it averages about
    the last 1 / (1 - d) steps, 1.1 at t = 0, 34 at t = 300, and 1 / (1 - decay) once the
    warm-up is over (1,000 for 0.999 after about 9,000 steps)."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def recompute_batch_norm(model: nn.Module, batches) -> nn.Module:
    """Set every batch-norm layer's running mean and variance to their averages over
    `batches` (model inputs), computed with the model's present weights and no dropout.

    The statistics that update_ema copies belong to the last weights and do not fit
    their average; stochastic weight averaging recomputes them in one pass over training
    data (Izmailov et al. 2018, "Averaging Weights Leads to Wider Optima and Better
    Generalization"). Momentum None makes the running statistics the plain mean over the
    batches. Dropout stays off, so the layers are normalised with the statistics of the
    activations they will see at test time. Returns the model in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [norm.momentum for norm in norms]
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    for batch in batches:  # under torchrun: this process's rows, and batch norm shares
        model(batch)       # the statistics of the processes (parallel.SharedBatchNorm)
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    return model.eval()


# ============================================================================ spectral norm
class SpectralNorm:
    """W_SN = W / sigma(W), sigma estimated by power iteration (Miyato et al. 2018,
    "Spectral Normalization for Generative Adversarial Networks").

    With W as a matrix (out_features, everything else) and a persistent unit vector u:
        v <- W^T u / ||W^T u||,   u <- W v / ||W v||,   sigma = u^T W v.
    One iteration per training step suffices because W changes little between steps, so
    u keeps converging to the top left singular vector across steps. A discriminator
    whose every layer has sigma = 1 is 1-Lipschitz, which keeps its gradients useful.

    Runs as a forward pre-hook: before each forward, module.weight becomes W / sigma;
    u and v move only in training mode. The trainable tensor is module.weight_orig."""

    def __init__(self, n_power_iterations: int, dim: int, eps: float = 1e-12):
        self.n_power_iterations, self.dim, self.eps = n_power_iterations, dim, eps

    def matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """(out, in, kh, kw) -> (out, in * kh * kw); `dim` is the output axis (1 for a
        transposed convolution, whose weight is (in, out, kh, kw))."""
        if self.dim != 0:
            weight = weight.movedim(self.dim, 0)
        return weight.flatten(1)

    def __call__(self, module: nn.Module, _inputs) -> None:
        weight = module.weight_orig
        matrix = self.matrix(weight)
        u, v = module.weight_u, module.weight_v
        if module.training:
            with torch.no_grad():  # the power iteration is not differentiated through
                for _ in range(self.n_power_iterations):
                    v.copy_(F.normalize(matrix.t() @ u, dim=0, eps=self.eps))
                    u.copy_(F.normalize(matrix @ v, dim=0, eps=self.eps))
            u, v = u.clone(), v.clone()  # later in-place updates must not touch this graph
        sigma = torch.dot(u, matrix @ v)  # u^T W v, differentiable in W
        module.weight = weight / sigma


def spectral_norm(module: nn.Module, n_power_iterations: int = 1,
                  eps: float = 1e-12) -> nn.Module:
    """Spectrally normalise module.weight, with the contract of
    torch.nn.utils.spectral_norm: parameter `weight_orig`, buffers `weight_u`, `weight_v`."""
    transposed = isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d,
                                     nn.ConvTranspose3d))
    hook = SpectralNorm(n_power_iterations, dim=1 if transposed else 0, eps=eps)
    weight = module.weight
    rows, columns = hook.matrix(weight).shape
    with torch.no_grad():
        u = F.normalize(torch.randn(rows).to(weight), dim=0, eps=eps)
        v = F.normalize(torch.randn(columns).to(weight), dim=0, eps=eps)
    del module.weight
    module.register_parameter("weight_orig", weight)
    module.weight = weight.data  # a plain tensor until the first forward replaces it
    module.register_buffer("weight_u", u)
    module.register_buffer("weight_v", v)
    module.register_forward_pre_hook(hook)
    return module


# ============================================================================ digits
def digit_classifier(classes: int = 10, width: int = 32) -> nn.Sequential:
    """image (B, 3, 28, 28) in [-1, 1] -> class logits (B, classes)."""
    def stage(c_in, c_out):
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                nn.ReLU(True), nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out), nn.ReLU(True), nn.MaxPool2d(2)]
    return nn.Sequential(
        *stage(3, width),                                     # (B, 32, 14, 14)
        *stage(width, 2 * width),                             # (B, 64, 7, 7)
        nn.Flatten(), nn.Dropout(0.3),
        nn.Linear(2 * width * 7 * 7, 256), nn.ReLU(True), nn.Dropout(0.3),
        nn.Linear(256, classes))


class Standardise(nn.Module):
    """Each image to zero mean and unit variance over its pixels and channels: a domain's
    overall brightness and contrast are gone before the first layer."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        mean = images.mean(dim=(1, 2, 3), keepdim=True)
        std = images.std(dim=(1, 2, 3), keepdim=True)
        return (images - mean) / (std + 1e-5)


def digit_features(channels: int = 3) -> nn.Sequential:
    """image (B, 3, 28, 28) -> features (B, 800), the DANN paper's MNIST extractor as
    common PyTorch re-implementations build it (64 and 50 maps with batch norm and
    dropout, where the paper draws 32 and 48 maps)."""
    return nn.Sequential(
        nn.Conv2d(channels, 64, 5), nn.BatchNorm2d(64), nn.MaxPool2d(2), nn.ReLU(True),
        nn.Conv2d(64, 50, 5), nn.BatchNorm2d(50), nn.Dropout2d(0.5), nn.MaxPool2d(2),
        nn.ReLU(True),                                        # (B, 50, 4, 4)
        nn.Flatten())                                         # (B, 800)


def label_classifier(features: int = 800, classes: int = 10) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(features, 100), nn.BatchNorm1d(100), nn.ReLU(True), nn.Dropout(0.5),
        nn.Linear(100, 100), nn.BatchNorm1d(100), nn.ReLU(True),
        nn.Linear(100, classes))


def domain_classifier(features: int = 800, hidden: int = 100, layers: int = 1,
                      batch_norm: bool = True) -> nn.Sequential:
    """features -> one logit, "this came from the source". DANN uses one hidden layer of
    100; ADDA's discriminator has two of 500 and no batch norm (it also judges batches of
    target features alone, whose batch statistics would give the domain away)."""
    sizes = [features] + [hidden] * layers
    body = [module for c_in, c_out in zip(sizes, sizes[1:])
            for module in (nn.Linear(c_in, c_out),
                           *([nn.BatchNorm1d(c_out)] if batch_norm else []), nn.ReLU(True))]
    return nn.Sequential(*body, nn.Linear(sizes[-1], 1))


def gta_generator(embedding: int = 800, classes: int = 10, noise: int = 100,
                  width: int = 64) -> nn.Sequential:
    """GTA's conditional generator: [F(x), one-hot label of K + 1, z] (B, E + K + 1 + Z,
    1, 1) -> image (B, 3, 28, 28) in [-1, 1]. The (K+1)-th label stands for "unknown",
    the label every target image gets. DCGAN-style transposed convolutions; the first two
    grow 1x1 to 3x3 to 7x7 (the authors' 32x32 net doubles from 2x2 instead). Shapes are
    for width 64, the authors' width."""
    return nn.Sequential(
        nn.ConvTranspose2d(embedding + classes + 1 + noise, 4 * width, 3, 1, 0, bias=False),
        nn.BatchNorm2d(4 * width), nn.ReLU(True),                       # (B, 256, 3, 3)
        nn.ConvTranspose2d(4 * width, 2 * width, 3, 2, 0, bias=False),
        nn.BatchNorm2d(2 * width), nn.ReLU(True),                       # (B, 128, 7, 7)
        nn.ConvTranspose2d(2 * width, width, 4, 2, 1, bias=False),
        nn.BatchNorm2d(width), nn.ReLU(True),                           # (B, 64, 14, 14)
        nn.ConvTranspose2d(width, 3, 4, 2, 1, bias=False), nn.Tanh())   # (B, 3, 28, 28)


class GTADiscriminator(nn.Module):
    """GTA's discriminator: one convolutional trunk, two heads. image (B, 3, 28, 28) ->
    (data logit (B,): "a real source image", class logits (B, K)). The trunk is the
    authors' digit discriminator: 3x3 convolutions, batch norm, LeakyReLU(0.2), max pools.
    Shapes are for width 64."""

    def __init__(self, classes: int = 10, width: int = 64):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(3, width, 3, 1, 1), nn.BatchNorm2d(width), nn.LeakyReLU(0.2, True),
            nn.MaxPool2d(2),                                                 # (B, 64, 14, 14)
            nn.Conv2d(width, 2 * width, 3, 1, 1), nn.BatchNorm2d(2 * width),
            nn.LeakyReLU(0.2, True), nn.MaxPool2d(2),                        # (B, 128, 7, 7)
            nn.Conv2d(2 * width, 4 * width, 3, 1, 1), nn.BatchNorm2d(4 * width),
            nn.LeakyReLU(0.2, True), nn.MaxPool2d(2),                        # (B, 256, 3, 3)
            nn.Conv2d(4 * width, 2 * width, 3, 1, 1), nn.BatchNorm2d(2 * width),
            nn.LeakyReLU(0.2, True), nn.MaxPool2d(3), nn.Flatten())          # (B, 128)
        self.data = nn.Linear(2 * width, 1)
        self.classes = nn.Linear(2 * width, classes)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.trunk(images)
        return self.data(features).squeeze(1), self.classes(features)


# ============================================================================ DCGAN
def dcgan_generator(latent_dim: int = 100, width: int = 64, channels: int = 3,
                    image_size: int = 64) -> nn.Sequential:
    """z (B, latent_dim, 1, 1) -> image (B, channels, S, S) in [-1, 1], S = 64 or 32.

    The first transposed convolution (stride 1, no padding) turns the 1x1 z into 4x4; each
    later one (4x4, stride 2, padding 1) doubles the side and halves the channels. No batch
    norm on the output layer (DCGAN paper). The 32x32 net is the 64x64 one without its
    widest stage. Shapes are for width 64 and 3 channels."""
    if image_size == 64:
        return nn.Sequential(
            nn.ConvTranspose2d(latent_dim, 8 * width, 4, 1, 0, bias=False),  # (B, 512, 4, 4)
            nn.BatchNorm2d(8 * width),                                       # (B, 512, 4, 4)
            nn.ReLU(True),                                                   # (B, 512, 4, 4)
            nn.ConvTranspose2d(8 * width, 4 * width, 4, 2, 1, bias=False),   # (B, 256, 8, 8)
            nn.BatchNorm2d(4 * width),                                       # (B, 256, 8, 8)
            nn.ReLU(True),                                                   # (B, 256, 8, 8)
            nn.ConvTranspose2d(4 * width, 2 * width, 4, 2, 1, bias=False),   # (B, 128, 16, 16)
            nn.BatchNorm2d(2 * width),                                       # (B, 128, 16, 16)
            nn.ReLU(True),                                                   # (B, 128, 16, 16)
            nn.ConvTranspose2d(2 * width, width, 4, 2, 1, bias=False),       # (B, 64, 32, 32)
            nn.BatchNorm2d(width),                                           # (B, 64, 32, 32)
            nn.ReLU(True),                                                   # (B, 64, 32, 32)
            nn.ConvTranspose2d(width, channels, 4, 2, 1, bias=False),        # (B, 3, 64, 64)
            nn.Tanh())                                                       # (B, 3, 64, 64)
    if image_size == 32:
        return nn.Sequential(
            nn.ConvTranspose2d(latent_dim, 4 * width, 4, 1, 0, bias=False),  # (B, 256, 4, 4)
            nn.BatchNorm2d(4 * width),                                       # (B, 256, 4, 4)
            nn.ReLU(True),                                                   # (B, 256, 4, 4)
            nn.ConvTranspose2d(4 * width, 2 * width, 4, 2, 1, bias=False),   # (B, 128, 8, 8)
            nn.BatchNorm2d(2 * width),                                       # (B, 128, 8, 8)
            nn.ReLU(True),                                                   # (B, 128, 8, 8)
            nn.ConvTranspose2d(2 * width, width, 4, 2, 1, bias=False),       # (B, 64, 16, 16)
            nn.BatchNorm2d(width),                                           # (B, 64, 16, 16)
            nn.ReLU(True),                                                   # (B, 64, 16, 16)
            nn.ConvTranspose2d(width, channels, 4, 2, 1, bias=False),        # (B, 3, 32, 32)
            nn.Tanh())                                                       # (B, 3, 32, 32)
    raise ValueError(f"the DCGAN nets make 32x32 or 64x64 images, not {image_size}")


def dcgan_discriminator(width: int = 64, channels: int = 3, image_size: int = 64,
                        outputs: int = 1, norm: str = "batch",
                        dropout: float = 0.0) -> nn.Sequential:
    """image (B, channels, S, S) -> logits (B, outputs, 1, 1), S = 64 or 32.

    Each 4x4 convolution of stride 2 (padding 1) halves the side and doubles the channels;
    the last (stride 1, no padding) turns 4x4 into 1x1. LeakyReLU(0.2) throughout, no batch
    norm on the input layer (DCGAN paper). It ends in logits, not a sigmoid: the loss
    applies the sigmoid inside `binary_cross_entropy_with_logits`, which is stable where a
    separate sigmoid saturates. outputs = 2 gives ACGAN's two heads on one body
    (real/fake, attribute). Shapes are for width 64.

    norm: "batch" (DCGAN's: variants a, b, ACGAN and hacks), "spectral" (an option of b
    and ACGAN, --d-norm spectral: spectral norm on every convolution and no batch norm)
    or "none" (the WGAN-GP critic: its gradient penalty is per sample, and batch norm
    would make each score depend on the whole batch). Without batch norm the convolutions have biases; batch
    norm would cancel them, so variant a has none. dropout > 0 (hacks) adds
    Dropout(dropout) after each LeakyReLU; at 0 no layer is added, so the state_dict
    keys stay those of the nets without it."""
    if norm not in ("batch", "spectral", "none"):
        raise ValueError(f"norm is batch, spectral or none, not {norm}")

    def conv(c_in, c_out, stride, padding):
        layer = nn.Conv2d(c_in, c_out, 4, stride, padding, bias=norm != "batch")
        return spectral_norm(layer) if norm == "spectral" else layer

    def batch_norm(c):  # not with spectral norm or in the critic: nothing takes its place
        return [nn.BatchNorm2d(c)] if norm == "batch" else []

    def drop():
        return [nn.Dropout(dropout)] if dropout > 0 else []

    if image_size == 64:
        return nn.Sequential(
            conv(channels, width, 2, 1),                     # (B, 64, 32, 32)
            nn.LeakyReLU(0.2, True),                         # (B, 64, 32, 32)
            *drop(),                                         # (B, 64, 32, 32)
            conv(width, 2 * width, 2, 1),                    # (B, 128, 16, 16)
            *batch_norm(2 * width),                          # (B, 128, 16, 16)
            nn.LeakyReLU(0.2, True),                         # (B, 128, 16, 16)
            *drop(),                                         # (B, 128, 16, 16)
            conv(2 * width, 4 * width, 2, 1),                # (B, 256, 8, 8)
            *batch_norm(4 * width),                          # (B, 256, 8, 8)
            nn.LeakyReLU(0.2, True),                         # (B, 256, 8, 8)
            *drop(),                                         # (B, 256, 8, 8)
            conv(4 * width, 8 * width, 2, 1),                # (B, 512, 4, 4)
            *batch_norm(8 * width),                          # (B, 512, 4, 4)
            nn.LeakyReLU(0.2, True),                         # (B, 512, 4, 4)
            *drop(),                                         # (B, 512, 4, 4)
            conv(8 * width, outputs, 1, 0))                  # (B, outputs, 1, 1)
    if image_size == 32:
        return nn.Sequential(
            conv(channels, width, 2, 1),                     # (B, 64, 16, 16)
            nn.LeakyReLU(0.2, True),                         # (B, 64, 16, 16)
            *drop(),                                         # (B, 64, 16, 16)
            conv(width, 2 * width, 2, 1),                    # (B, 128, 8, 8)
            *batch_norm(2 * width),                          # (B, 128, 8, 8)
            nn.LeakyReLU(0.2, True),                         # (B, 128, 8, 8)
            *drop(),                                         # (B, 128, 8, 8)
            conv(2 * width, 4 * width, 2, 1),                # (B, 256, 4, 4)
            *batch_norm(4 * width),                          # (B, 256, 4, 4)
            nn.LeakyReLU(0.2, True),                         # (B, 256, 4, 4)
            *drop(),                                         # (B, 256, 4, 4)
            conv(4 * width, outputs, 1, 0))                  # (B, outputs, 1, 1)
    raise ValueError(f"the DCGAN nets take 32x32 or 64x64 images, not {image_size}")


def dcgan_init_(module: nn.Module) -> nn.Module:
    """DCGAN paper: all weights from N(0, 0.02); batch-norm scale from N(1, 0.02), shift 0."""
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(layer.weight, 0.0, 0.02)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.normal_(layer.weight, 1.0, 0.02)
            nn.init.zeros_(layer.bias)
    return module


# ============================================================================ U-Net (DDPM)
def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer sinusoids of the timestep (Vaswani et al. 2017; as in Ho et al. 2020):
    [sin(t w_k), cos(t w_k)], w_k = 10000^(-k / (dim/2)), k = 0 .. dim/2 - 1. (B,) -> (B, dim)."""
    half = dim // 2
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * frequencies[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class ResidualBlock(nn.Module):
    """GroupNorm, SiLU, 3x3 conv, plus the (time + class) embedding, twice; skip path."""

    def __init__(self, c_in: int, c_out: int, embedding_dim: int, dropout: float = 0.1):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.embedding = nn.Linear(embedding_dim, c_out)
        self.norm2, self.conv2 = nn.GroupNorm(8, c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, embedding):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.embedding(F.silu(embedding))[:, :, None, None]  # per-channel shift
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Single-head self-attention over the H*W positions, residual (as in DDPM at 16x16)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.GroupNorm(8, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x, _embedding=None):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).chunk(3, dim=2)  # (B, HW, C)
        attended = F.scaled_dot_product_attention(q, k, v)   # softmax(q k^T / sqrt(C)) v
        return x + self.out(attended.transpose(1, 2).reshape(b, c, h, w))


class UNet(nn.Module):
    """eps_theta(x_t, t, c): a U-Net (Ronneberger et al. 2015) as DDPM uses it.

    28x28 -> 14x14 -> 7x7 and back, `blocks` residual blocks per level, self-attention at
    7x7, skip connections by concatenation. The timestep enters as a sinusoidal embedding
    through an MLP; the class as a learned embedding added to it. Class index `classes`
    is the "no class" token of classifier-free guidance."""

    def __init__(self, channels: int = 3, width: int = 64, multipliers=(1, 2, 2),
                 classes: int = 10, blocks: int = 1, dropout: float = 0.1):
        super().__init__()
        embedding_dim = 4 * width
        self.width = width
        self.time_mlp = nn.Sequential(nn.Linear(width, embedding_dim), nn.SiLU(),
                                      nn.Linear(embedding_dim, embedding_dim))
        self.class_embedding = nn.Embedding(classes + 1, embedding_dim)
        self.stem = nn.Conv2d(channels, width, 3, padding=1)
        widths = [width * m for m in multipliers]
        self.down, self.up = nn.ModuleList(), nn.ModuleList()
        skips, c = [width], width
        for level, c_out in enumerate(widths):
            for _ in range(blocks):
                self.down.append(ResidualBlock(c, c_out, embedding_dim, dropout))
                c = c_out
                skips.append(c)
            if level < len(widths) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))  # halves the side
                skips.append(c)
        self.middle = nn.ModuleList([ResidualBlock(c, c, embedding_dim, dropout),
                                     SelfAttention(c),
                                     ResidualBlock(c, c, embedding_dim, dropout)])
        for level, c_out in reversed(list(enumerate(widths))):
            for _ in range(blocks + 1):
                self.up.append(ResidualBlock(c + skips.pop(), c_out, embedding_dim, dropout))
                c = c_out
            if level > 0:
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
        self.head = nn.Sequential(nn.GroupNorm(8, c), nn.SiLU(), nn.Conv2d(c, channels, 3,
                                                                           padding=1))

    def forward(self, x, t, labels):
        """x (B, C, H, W), t (B,) timesteps, labels (B,) in 0..classes -> eps (B, C, H, W)."""
        embedding = self.time_mlp(timestep_embedding(t, self.width)) \
            + self.class_embedding(labels)
        h = self.stem(x)
        skips = [h]
        for layer in self.down:
            h = layer(h, embedding) if isinstance(layer, ResidualBlock) else layer(h)
            skips.append(h)
        for layer in self.middle:
            h = layer(h, embedding)
        for layer in self.up:
            if isinstance(layer, ResidualBlock):
                h = layer(torch.cat([h, skips.pop()], dim=1), embedding)
            else:
                h = layer(h)
        return self.head(h)


# ============================================================================ summary
def summary(model: nn.Module, input_size: tuple, device="cpu", extra_inputs=(),
            forward=None) -> str:
    """torchsummary's table for one input of shape input_size (without the batch axis).

    extra_inputs: the forward's further arguments, each without the batch axis (the
    U-Net's timestep and class, torch.tensor(0) each); they are repeated over the batch.
    forward: what to call instead of model, e.g. vae.encode; the table then holds the
    layers that it runs."""
    rows, hooks = [], []
    leaves = [m for m in model.modules() if not list(m.children())]

    def record(layer, _inputs, output):
        shape = list(output.shape) if torch.is_tensor(output) else list(output[0].shape)
        params = sum(p.numel() for p in layer.parameters(recurse=False))
        trainable = sum(p.numel() for p in layer.parameters(recurse=False) if p.requires_grad)
        rows.append((f"{type(layer).__name__}-{len(rows) + 1}", [-1] + shape[1:],
                     params, trainable))

    hooks = [leaf.register_forward_hook(record) for leaf in leaves]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            inputs = [torch.zeros(2, *input_size, device=device)]
            inputs += [value.to(device).expand(2, *value.shape) for value in extra_inputs]
            (forward or model)(*inputs)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)

    total = sum(r[2] for r in rows)
    trainable = sum(r[3] for r in rows)
    megabytes = 4 / 2**20  # float32 bytes -> MB
    input_mb = abs(torch.tensor(input_size).prod().item()) * megabytes
    activations_mb = 2 * sum(abs(torch.tensor(r[1]).prod().item()) for r in rows) * megabytes
    params_mb = total * megabytes
    rule, double = "-" * 64, "=" * 64
    lines = [rule, f"{'Layer (type)':>20}  {'Output Shape':>25} {'Param #':>15}", double]
    lines += [f"{name:>20}  {str(shape):>25} {params:>15,}" for name, shape, params, _ in rows]
    lines += [double, f"Total params: {total:,}", f"Trainable params: {trainable:,}",
              f"Non-trainable params: {total - trainable:,}", rule,
              f"Input size (MB): {input_mb:.2f}",
              f"Forward/backward pass size (MB): {activations_mb:.2f}",
              f"Params size (MB): {params_mb:.2f}",
              f"Estimated Total Size (MB): {input_mb + activations_mb + params_mb:.2f}", rule]
    return "\n".join(lines)
