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

Under torchrun (parallel.py) each process trains on its share of the global batch: every
per-image random number is drawn for the whole batch and cut to the process's rows
(parallel.draw, parallel.rows), so N processes train the same weights as one.
"""
from dataclasses import dataclass, field
from pathlib import Path

import torch

import data
import metrics
import nets
import parallel
import plots
import tsne
import util
from util import UserError


# Named settings (run.py --preset NAME): the configurations RESULTS.md measured.
PRESETS = {"cpu": {"epochs": 3}}  # 26-43 s an epoch on 8,000 faces, 2 cores


@dataclass
class VAESettings:
    """Flags of `run.py vae`."""
    data: str = field(default="celeba", metadata={"help": "celeba or a folder of faces"})
    latent_dim: int = field(default=512, metadata={"help": "size of z"})
    kl_weight: float = field(default=1.0, metadata={"help": "lambda in MSE + lambda KL"})
    warmup_epochs: int = field(default=0, metadata={
        "help": "epochs over which lambda grows linearly from 0 (KL warm-up)"})
    epochs: int = field(default=20, metadata={"help": "passes over the training faces"})
    batch_size: int = field(default=64, metadata={
        "help": "images per step, the global batch: under torchrun each of N processes "
                "takes 1/N of it"})
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate"})
    attribute: str = field(default="Male", metadata={"help": "colours the t-SNE of latents"})
    tsne_points: int = field(default=2000, metadata={"help": "test faces in the t-SNE (0: none)"})
    fid_images: int = field(default=1000, metadata={
        "help": "samples (and test reconstructions) for the FID against every test face "
                "(0: no FID)"})
    fid_every: int = field(default=5, metadata={
        "help": "epochs between FID evaluations (and always after the last)"})
    limit: int = field(default=0, metadata={"help": "use only the first N training faces"})
    resume: bool = field(default=False, metadata={"help": "continue from checkpoint.pt"})


# ============================================================================ the loss
def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) summed over latent dimensions: (B, d) -> (B,)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1).sum(dim=1)


def reparameterise(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """z = mu + sigma * eps, sigma = exp(logvar / 2), with eps ~ N(0, I) drawn by the
    caller: z is a differentiable function of mu and logvar, the randomness is outside."""
    return mu + (0.5 * logvar).exp() * eps.to(mu.device)


def losses(model: nets.VAE, x: torch.Tensor, eps: torch.Tensor) -> dict:
    """Per-image squared error and KL, averaged over the batch; also the per-pixel MSE.
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
    every epoch, the samples' FID every fid_every epochs (util.train_loop runs the loop);
    then the pictures, the reconstructions' FID and results.json."""
    out = Path(out)
    util.seed_everything(seed)
    model = parallel.share_batch_layers(nets.VAE(settings.latent_dim).to(device))
    replicas = parallel.data_parallel(model)  # encoder, decoder, ...: replicas under torchrun
    optimizer = torch.optim.Adam(model.parameters(), settings.lr)
    faces, test = faces.to(device), test.to(device)
    steps_per_epoch = len(faces) // settings.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"{len(faces)} faces is fewer than one batch of {settings.batch_size}:"
                        " lower --batch-size")
    fid, fid_results = metrics.fid_tracker(test, settings.fid_images,
                                           settings.fid_every * steps_per_epoch, device,
                                           cache_dir, weights)
    epoch = {}  # this epoch's random stream (data order, eps) and its batches

    def step(index: int) -> dict:
        number, position = divmod(index, steps_per_epoch)
        if position == 0:  # each epoch seeded by (seed, epoch): a resume repeats it exactly
            epoch["rng"] = torch.Generator().manual_seed(util.stream_seed(seed, number))
            epoch["batches"] = faces.batches(settings.batch_size, generator=epoch["rng"],
                                             drop_last=True)
        images, _ = next(epoch["batches"])
        images = parallel.rows(images)  # under torchrun: this process's share of the batch
        eps = parallel.draw(torch.randn, (len(images), settings.latent_dim), epoch["rng"])
        model.train()
        terms = losses(replicas, images, eps)
        loss = terms["reconstruction"] + kl_weight_at(settings, number,
                                                      position / steps_per_epoch) * terms["kl"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"train_mse": terms["mse"], "train_kl": terms["kl"]}

    def evaluate(history: dict):
        for name, value in evaluate_test(model, test, seed, settings.latent_dim).items():
            history.setdefault(f"test_{name}", []).append(value)
        if fid and fid.due(history["step"][-1], settings.epochs * steps_per_epoch):
            fid.add(history, history["step"][-1], samples(model, settings.fid_images,
                                                          settings.latent_dim, seed + 1))

    def draw(history: dict):
        save_curves(history, out, settings)
        if fid and history.get("fid"):
            fid.draw(history, out / "fid.png", f"VAE, lambda = {settings.kl_weight:g}")

    log = util.train_loop(
        step, settings.epochs * steps_per_epoch, steps_per_epoch, out, "vae", settings, seed,
        device, parts={"model": model, "optimizer": optimizer}, desc="VAE",
        may_change=("epochs", "tsne_points", "attribute", "fid_every"), evaluate=evaluate,
        draw=draw)
    if fid:  # also the FID of the reconstructions (from the mean code) of the first
        # fid_images test faces, against all the test faces
        first = test.subset(torch.arange(min(settings.fid_images, len(test))))
        fid_results = {**fid.results(log.history),
                       "reconstruction_fid": fid.score(reconstructions(model, first))}
    return finish(model, test, log.history, settings, out, seed, log.seconds, fid_results)


@torch.no_grad()
def samples(model: nets.VAE, count: int, latent_dim: int, seed: int,
            batch_size: int = 500) -> torch.Tensor:
    """count decoded z ~ N(0, I) from a fixed seed, on the CPU."""
    model.eval()
    z = torch.randn(count, latent_dim, generator=torch.Generator().manual_seed(seed))
    device = next(model.parameters()).device
    return torch.cat([model.decode(z[i:i + batch_size].to(device)).cpu()
                      for i in range(0, count, batch_size)])


@torch.no_grad()
def reconstructions(model: nets.VAE, faces: data.ImageSet, batch_size: int = 500):
    """Decoded mean codes mu(x) of the faces, on the CPU."""
    model.eval()
    return torch.cat([model.decode(model.encode(images)[0]).cpu()
                      for images, _ in faces.batches(batch_size, shuffle=False)])


@torch.no_grad()
def evaluate_test(model: nets.VAE, test: data.ImageSet, seed: int, latent_dim: int,
                  batch_size: int = 500) -> dict:
    """Test per-pixel MSE and per-image KL (z sampled, from a fixed seed)."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    totals = {"mse": 0.0, "kl": 0.0}
    for images, _ in test.batches(batch_size, shuffle=False):
        eps = torch.randn(len(images), latent_dim, generator=generator)
        terms = losses(model, images, eps)
        totals["mse"] += terms["mse"].item() * len(images)
        totals["kl"] += terms["kl"].item() * len(images)
    return {name: total / len(test) for name, total in totals.items()}


def save_curves(history: dict, out: Path, settings: VAESettings):
    title = f"VAE, lambda = {settings.kl_weight:g}"
    plots.line_plot({"train": history["train_mse"], "test": history["test_mse"]},
                    out / "mse.png", title=f"{title}: reconstruction MSE per pixel",
                    xlabel="epoch")
    plots.line_plot({"train": history["train_kl"], "test": history["test_kl"]},
                    out / "kl.png", title=f"{title}: KL(q(z|x) || N(0, I)) per image",
                    xlabel="epoch")


# ============================================================================ pictures
@torch.no_grad()
def finish(model: nets.VAE, test: data.ImageSet, history: dict, settings: VAESettings,
           out: Path, seed: int, seconds: float, fid_results: dict) -> dict:
    """Reconstructions, samples, interpolation, t-SNE of latents, results.json."""
    first_ten = test.subset(torch.arange(min(10, len(test))))
    faces, rebuilt = first_ten.images(), reconstructions(model, first_ten)
    mse = (rebuilt - faces.cpu()).pow(2).mean().item()
    data.save_grid(torch.cat([faces.cpu(), rebuilt]), out / "reconstructions.png",
                   nrow=len(faces))
    plots.label_grid(out / "reconstructions.png", faces.shape[-1],
                     rows=["test face", "reconstruction"],
                     title=f"VAE, lambda = {settings.kl_weight:g}: reconstructions from "
                           f"the mean code, MSE {mse:.4f}")
    data.save_grid(samples(model, 32, settings.latent_dim, seed), out / "samples.png")
    save_interpolation(model, faces[0], faces[1], out / "interpolation.png")
    if settings.tsne_points and test.labels is not None and parallel.is_main():
        save_latent_tsne(model, test, settings, out / "tsne.png", seed)
    results = {"kl_weight": settings.kl_weight, "epochs": len(history["test_mse"]),
               "test_mse": history["test_mse"][-1], "test_kl": history["test_kl"][-1],
               "train_seconds": seconds, "seconds_per_epoch": seconds / max(
                   len(history["test_mse"]), 1), "reconstruction_mse_10_faces": mse,
               "seed": seed, **fid_results}
    util.write_json(results, out / "results.json")
    return results


def save_interpolation(model: nets.VAE, first: torch.Tensor, second: torch.Tensor, path,
                       count: int = 10):
    """Decode (1 - a) mu(x_1) + a mu(x_2) for a from 0 to 1: one strip."""
    mu = model.encode(torch.stack([first, second]))[0]
    amounts = torch.linspace(0, 1, count, device=mu.device)[:, None]
    data.save_grid(model.decode((1 - amounts) * mu[0] + amounts * mu[1]).cpu(), path,
                   nrow=count)


def save_latent_tsne(model: nets.VAE, test: data.ImageSet, settings: VAESettings, path,
                     seed: int):
    chosen = test.subset(torch.arange(min(settings.tsne_points, len(test))))
    model.eval()  # running statistics: rank 0 alone runs this, no batch to share
    codes = torch.cat([model.encode(images)[0].cpu()
                       for images, _ in chosen.batches(500, shuffle=False)]).double().numpy()
    points = tsne.tsne(tsne.pca(codes, min(50, codes.shape[1])), seed=seed)
    plots.scatter_plot(points, chosen.labels.cpu().numpy(), path,
                       title=f"t-SNE of test latents (mu), by {settings.attribute}",
                       names=[f"not {settings.attribute}", settings.attribute])
