"""A convolutional variational autoencoder on 64x64 faces (Kingma & Welling 2014,
"Auto-Encoding Variational Bayes").

The encoder gives q(z | x) = N(mu(x), diag sigma^2(x)), the decoder a face x^(z), the prior
is p(z) = N(0, I). Training maximises the evidence lower bound
    log p(x) >= E_q[log p(x | z)] - KL(q(z | x) || p(z)),
which, with a Gaussian decoder, is (up to constants and scale) minimising
    L = ||x - x^(z)||^2 + lambda * KL,   KL = 1/2 sum_j (mu_j^2 + sigma_j^2 - log sigma_j^2 - 1).
Both terms are summed over one image (pixels; latent dimensions) and averaged over the
batch, so lambda = 1 is the negative ELBO of a decoder with variance 1/2.

Sampling z inside the loss is made differentiable by the reparameterisation
z = mu + sigma * eps, eps ~ N(0, I): the randomness moves into eps and the gradient flows
to mu and log sigma^2.

What lambda trades off: a small lambda lets q(z | x)
be narrow and far from the prior, so reconstructions are sharp but random samples from
N(0, I) land where the decoder was never trained and look broken; a large lambda pulls
every q(z | x) onto the prior, samples look like faces but reconstructions blur towards an
average face, and latent dimensions switch off (posterior collapse). KL warm-up (lambda
growing from 0 over the first epochs) lets the decoder learn to use z before the KL
term pushes back.
"""
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

import data
import metrics
import nets
import parallel
import reports
import training
from util import UserError


# Named settings (run.py --preset NAME): the configurations RESULTS.md measured or
# expects. cpu: 26-43 s an epoch on 8,000 faces, 2 cores; gpu: 30 epochs of the full
# CelebA in batches of 128, the FID of 10,000 samples every 10 epochs (measured on the
# CPU on 8,000 faces with 1,000 samples: RESULTS.md).
PRESETS = {"cpu": {"epochs": 3},
           "gpu": {"epochs": 30, "batch_size": 128, "fid_images": 10000, "fid_every": 10}}


@dataclass
class VAESettings:
    """Flags of `run.py vae`."""
    data: str = field(default="celeba", metadata={"help": "celeba or a folder of faces"})
    latent_dim: int = field(default=512, metadata={"help": "size of z"})
    kl_weight: float = field(default=1.0, metadata={
        "help": "lambda in ||x - x^||^2 (summed over the pixels) + lambda KL"})
    warmup_epochs: int = field(default=0, metadata={
        "help": "epochs over which lambda grows linearly from 0 (KL warm-up)"})
    epochs: int = field(default=20, metadata={"help": "passes over the training faces"})
    batch_size: int = field(default=64, metadata={"help": "images per step"})
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate"})
    attribute: str = field(default="Male", metadata={"help": "colours the t-SNE of latents"})
    tsne_points: int = field(default=2000, metadata={"help": "test faces in the t-SNE (0: none)"})
    fid_images: int = field(default=1000, metadata={
        "help": "samples (and test reconstructions) for the FID against every test face "
                "(0: no FID)"})
    fid_every: int = field(default=5, metadata={
        "help": "epochs between FID evaluations (0: every epoch; always after the last)"})
    limit: int = field(default=0, metadata={"help": "use only the first N training faces"})
    resume: bool = field(default=False, metadata={"help": "continue from checkpoint.pt"})


# ============================================================================ the network
class VAE(nn.Module):
    """64x64 faces <-> a latent of `latent_dim`: the encoder gives mu(x) and log sigma^2(x)
    of q(z | x), the decoder the face x^(z), each layer written out as the course prints
    it. Encoder: strided 4x4 convolutions halve the side four times, 3 -> 32 -> 64 -> 128
    -> 256 channels, with batch norm and LeakyReLU(0.2); two linear maps to mu and
    log sigma^2. Decoder: the mirror image, a linear map to 256x4x4, transposed
    convolutions that double the side, Tanh into the images' [-1, 1]."""

    def __init__(self, latent_dim: int = 512):
        super().__init__()
        self.encoder = nn.Sequential(                                          # (B, 3, 64, 64)
            nn.Conv2d(3, 32, 4, 2, 1, bias=False), nn.BatchNorm2d(32), nn.LeakyReLU(0.2, True),
            nn.Conv2d(32, 64, 4, 2, 1, bias=False), nn.BatchNorm2d(64), nn.LeakyReLU(0.2, True),
            nn.Conv2d(64, 128, 4, 2, 1, bias=False), nn.BatchNorm2d(128),
            nn.LeakyReLU(0.2, True),                                           # (B, 128, 8, 8)
            nn.Conv2d(128, 256, 4, 2, 1, bias=False), nn.BatchNorm2d(256),
            nn.LeakyReLU(0.2, True),                                           # (B, 256, 4, 4)
            nn.Flatten())                                                      # (B, 4096)
        self.to_mu, self.to_logvar = nn.Linear(4096, latent_dim), nn.Linear(4096, latent_dim)
        self.from_latent = nn.Linear(latent_dim, 4096)
        self.decoder = nn.Sequential(                                          # (B, 256, 4, 4)
            nn.ConvTranspose2d(256, 128, 4, 2, 1, bias=False), nn.BatchNorm2d(128),
            nn.LeakyReLU(0.2, True),                                           # (B, 128, 8, 8)
            nn.ConvTranspose2d(128, 64, 4, 2, 1, bias=False), nn.BatchNorm2d(64),
            nn.LeakyReLU(0.2, True),                                           # (B, 64, 16, 16)
            nn.ConvTranspose2d(64, 32, 4, 2, 1, bias=False), nn.BatchNorm2d(32),
            nn.LeakyReLU(0.2, True),                                           # (B, 32, 32, 32)
            nn.ConvTranspose2d(32, 3, 4, 2, 1), nn.Tanh())                     # (B, 3, 64, 64)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, log sigma^2) of q(z | x), each (B, latent_dim)."""
        features = self.encoder(x)
        return self.to_mu(features), self.to_logvar(features)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """x^(z): (B, latent_dim) -> (B, 3, 64, 64)."""
        return self.decoder(self.from_latent(z).view(len(z), 256, 4, 4))


# ============================================================================ the loss
def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) summed over latent dimensions: (B, d) -> (B,)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1).sum(dim=1)


def reparameterise(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """z = mu + sigma * eps, sigma = exp(logvar / 2), with eps ~ N(0, I) drawn by the
    caller: z is a differentiable function of mu and logvar, the randomness is outside."""
    return mu + (0.5 * logvar).exp() * eps.to(mu.device)


def losses(model: VAE, x: torch.Tensor, eps: torch.Tensor) -> dict:
    """Per-image squared error and KL, averaged over the batch; also the MSE per colour
    value (the mean over pixels and channels, F.mse_loss's).
    eps (B, d): the standard normal noise of the reparameterisation."""
    mu, logvar = model.encode(x)                                   # q(z | x), (B, d) each
    reconstruction = model.decode(reparameterise(mu, logvar, eps))   # x^(z), z ~ q(z | x)
    squared_error = (reconstruction - x).pow(2).flatten(1).sum(dim=1)      # ||x - x^||^2, (B,)
    return {"reconstruction": squared_error.mean(), "kl": kl_divergence(mu, logvar).mean(),
            "mse": squared_error.mean() / x[0].numel()}


def kl_weight_at(settings: VAESettings, epoch: int, fraction: float) -> float:
    """lambda, grown linearly over the warm-up epochs (fraction: progress in the epoch)."""
    if settings.warmup_epochs <= 0:
        return settings.kl_weight
    return settings.kl_weight * min(1.0, (epoch + fraction) / settings.warmup_epochs)


# ============================================================================ training
def train(faces: data.ImageSet, test: data.ImageSet, settings: VAESettings, out: Path,
          device, seed: int, cache_dir=None, weights=None) -> dict:
    """Adam on L = ||x - x^||^2 + lambda KL; test MSE and KL, curves and a checkpoint after
    every epoch, the samples' FID every fid_every epochs; then the pictures, the
    reconstructions' FID and results.json."""
    training.seed_weights(seed)
    model = VAE(settings.latent_dim).to(device)
    parallel.distribute(model)  # under torchrun: gradients averaged in backward
    optimizer = torch.optim.Adam(model.parameters(), settings.lr)
    faces, test = faces.to(device), test.to(device)
    steps_per_epoch = len(faces) // settings.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"{len(faces)} faces is fewer than one batch of {settings.batch_size}:"
                        " lower --batch-size")
    steps = settings.epochs * steps_per_epoch
    fid = metrics.fid_tracker(test, settings.fid_images,
                              metrics.fid_period(settings.fid_every, 1) * steps_per_epoch,
                              device, cache_dir, weights)
    # with --resume, the model and the optimiser come back from the checkpoint here
    run = training.Run(out, "vae", settings, seed, device,
                       state={"model": model, "optimizer": optimizer}, steps=steps,
                       every=steps_per_epoch, desc="VAE",
                       may_change=("epochs", "tsne_points", "attribute", "fid_every"))
    # the training streams (training.py): each epoch's order of the faces; eps
    data_order, noise = run.random("data"), run.random("noise")
    for step in run:
        epoch, position = divmod(step, steps_per_epoch)
        if position == 0:  # a new epoch (checkpoints end epochs: a resume starts one)
            order = data_order.permutation(len(faces))          # each face once an epoch
        batch = order[position * settings.batch_size:(position + 1) * settings.batch_size]
        images = faces.images(parallel.rows(batch))  # under torchrun: this process's share
        eps = noise.randn(len(images), settings.latent_dim)               # eps ~ N(0, I)
        model.train()  # the evaluation at the last checkpoint left it in eval mode
        terms = losses(model, images, eps)
        lambda_ = kl_weight_at(settings, epoch, position / steps_per_epoch)
        loss = terms["reconstruction"] + lambda_ * terms["kl"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        run.log({"train_mse": terms["mse"], "train_kl": terms["kl"]})
        if run.at_checkpoint:  # the end of an epoch
            for name, value in evaluate_test(model, test, seed, settings.latent_dim).items():
                run.history.setdefault(f"test_{name}", []).append(value)
            if fid.due(step + 1, steps):
                fid.measure(run.history, step + 1, lambda z: decode(model, z),
                            prior_samples(settings.fid_images, settings.latent_dim, seed, "fid"))
            run.save_checkpoint()  # after the FID: best.pt is the lowest FID's
            reports.vae_epoch_pictures(out, settings, run.history, fid,
                                       prior_grid(model, settings, seed))
    fid_results = fid.results(run.history)
    if fid:  # also the FID of the reconstructions (from the mean code) of the first
        # fid_images test faces, against all the test faces
        first = test.subset(torch.arange(min(settings.fid_images, len(test))))
        fid_results.update(fid.score(reconstructions(model, first), prefix="reconstruction_"))
    return reports.vae_results(out, settings, run, fid_results,
                               **pictures(model, test, settings, seed))


@torch.no_grad()
def evaluate_test(model: VAE, test: data.ImageSet, seed: int, latent_dim: int,
                  batch_size: int = 500) -> dict:
    """Test MSE per colour value and per-image KL (z sampled with eps of the fixed "test"
    stream), in eval mode."""
    model.eval()
    noise = training.fixed_random(seed, "test")
    totals = {"mse": 0.0, "kl": 0.0}
    for images, _ in test.batches(batch_size):
        eps = noise.randn(len(images), latent_dim)
        terms = losses(model, images, eps)
        totals["mse"] += terms["mse"].item() * len(images)
        totals["kl"] += terms["kl"].item() * len(images)
    return {name: total / len(test) for name, total in totals.items()}


# ============================================================================ sampling
def prior_samples(count: int, latent_dim: int, seed: int, stream: str,
                  batch_size: int = 500):
    """count z ~ N(0, I) of a fixed stream ("grid", "fid"), in batches, on the CPU."""
    return training.fixed_random(seed, stream).randn(count, latent_dim).split(batch_size)


def prior_grid(model: VAE, settings: VAESettings, seed: int) -> torch.Tensor:
    """The 32 samples of the grids, decoded from the fixed z of the "grid" stream: the
    same z at every epoch, so the grids show the decoder learning. (32, 3, H, W), CPU."""
    return torch.cat([decode(model, z) for z in
                      prior_samples(32, settings.latent_dim, seed, "grid")]).cpu()


@torch.no_grad()
def decode(model: VAE, z: torch.Tensor) -> torch.Tensor:
    """x^(z) in eval mode (batch norm with running statistics: each image depends on its
    own z alone); z goes to the model's device."""
    model.eval()
    return model.decode(z.to(next(model.parameters()).device))


@torch.no_grad()
def reconstructions(model: VAE, faces: data.ImageSet, batch_size: int = 500):
    """Decoded mean codes mu(x) of the faces, on the CPU, in eval mode."""
    model.eval()
    return torch.cat([model.decode(model.encode(images)[0]).cpu()
                      for images, _ in faces.batches(batch_size)])


@torch.no_grad()
def interpolation(model: VAE, first: torch.Tensor, second: torch.Tensor,
                  count: int = 10) -> torch.Tensor:
    """Decode (1 - a) mu(x_1) + a mu(x_2) for a from 0 to 1: (count, 3, 64, 64)."""
    model.eval()
    mu = model.encode(torch.stack([first, second]))[0]
    amounts = torch.linspace(0, 1, count, device=mu.device)[:, None]
    return model.decode((1 - amounts) * mu[0] + amounts * mu[1])


@torch.no_grad()
def latent_codes(model: VAE, faces: data.ImageSet, batch_size: int = 500):
    """mu(x) (N, latent) of the faces, on the CPU, in eval mode."""
    model.eval()
    return torch.cat([model.encode(images)[0].cpu()
                      for images, _ in faces.batches(batch_size)])


def pictures(model: VAE, test: data.ImageSet, settings: VAESettings, seed: int) -> dict:
    """What the VAE shows after training (its samples are the last epoch's grid): the
    first ten test faces and their reconstructions, an interpolation between the first
    two faces, and the mean codes of the first tsne_points test faces with their labels."""
    first_ten = test.subset(torch.arange(min(10, len(test))))
    faces = first_ten.images()
    chosen = test.subset(torch.arange(min(settings.tsne_points, len(test))))
    return {"faces": faces.cpu(), "rebuilt": reconstructions(model, first_ten),
            "interpolation": interpolation(model, faces[0], faces[1]).cpu(),
            "latents": (latent_codes(model, chosen), chosen.labels)
            if settings.tsne_points and test.labels is not None else None}


def summary(settings: VAESettings) -> str:
    """The encoder's and the decoder's layer tables, as `run.py summary vae` prints them."""
    model = VAE(settings.latent_dim)
    return "\n".join(["vae: encoder", nets.summary(model, (3, 64, 64), forward=model.encode),
                      "vae: decoder", nets.summary(model, (settings.latent_dim,),
                                                   forward=model.decode)])
