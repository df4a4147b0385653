"""GANs on 64x64 faces: DCGAN (variant a), an improved GAN (variant b), ACGAN, WGAN-GP and
DCGAN with the well-known tricks (hacks).

A generator G maps noise z ~ N(0, I) to an image; a discriminator D scores images. They
play (Goodfellow et al. 2014, "Generative Adversarial Nets")
    min_G max_D  E_x[log sigmoid(D(x))] + E_z[log(1 - sigmoid(D(G(z))))],
and G is trained on the non-saturating loss -log sigmoid(D(G(z))), whose gradient does not
vanish while D wins easily at the start.

Variant a, DCGAN (Radford et al. 2016): the architecture of nets.py with batch norm, the
loss above (binary cross-entropy on logits), Adam lr 2e-4, beta1 0.5, batch 128.

Variant b keeps DCGAN's networks and changes how they are trained, each for a reason:
- the hinge loss (Lim & Ye 2017; used by SNGAN, BigGAN)
      L_D = E[relu(1 - D(x))] + E[relu(1 + D(G(z)))],   L_G = -E[D(G(z))]:
  an image D already scores past the margin gives it no gradient, so it learns only
  from those it gets wrong or nearly wrong (it still memorises a small training set in
  long runs: see `memorisation`);
- Adam at twice DCGAN's rate, 4e-4 for both players: on the budgets this project
  measures (1,000 to 2,000 steps) how fast G learns is what limits the FID, and the
  average below absorbs the larger steps' jitter;
- an exponential moving average of G's weights for sampling (Karras et al. 2018;
  Yazici et al. 2019): it averages out the oscillation of the adversarial game. Its
  batch-norm statistics are recomputed for the averaged weights whenever it is saved
  (BigGAN's "standing statistics", Brock et al. 2019);
- two options for long runs, off by default: `--d-norm spectral`, spectral normalisation
  of every D layer instead of batch norm (Miyato et al. 2018), which makes D 1-Lipschitz
  so its gradients stay informative; and `--augment translation,color,cutout`,
  differentiable augmentation of every image D sees, real and fake, in both steps (Zhao
  et al. 2020, "DiffAugment"), which keeps D from memorising a small training set. On
  8,000 faces both cost G more than they gave it, in short runs and in long ones (the
  augmented D stops memorising, yet G learns from its harder, blurrier signal more
  slowly), so they are options, not the default.
RESULTS.md holds what this project has measured, against variant a too.

ACGAN (Odena et al. 2017, "Conditional Image Synthesis with Auxiliary Classifier GANs"):
G gets z and a binary attribute c (default Smiling); D has a second output that
predicts c. Both players also minimise the attribute's cross-entropy, on real images
(D) and on generated ones (D and G), so G learns to draw the attribute it is given.
It uses variant b's training.

WGAN-GP (Gulrajani et al. 2017, "Improved Training of Wasserstein GANs"): D is a critic
whose score is no probability. By the Kantorovich-Rubinstein duality the Wasserstein
distance between the real and generated distributions is
    W(P_r, P_g) = max over 1-Lipschitz D of  E_x[D(x)] - E_x~[D(x~)],   x~ = G(z),
and instead of clipping the critic's weights (Arjovsky et al. 2017, WGAN) its gradient
norm is pushed toward 1 on lines between real and generated images:
    L_D = E[D(x~)] - E[D(x)] + lambda E[(||grad_xhat D(xhat)||_2 - 1)^2],
    xhat = eps x + (1 - eps) x~,  eps ~ U[0, 1] per sample,  lambda = 10,
    L_G = -E[D(G(z))].
The penalty is per sample, so the critic has no batch norm (with it, a sample's score
would depend on its batch). Algorithm 1: n_critic = 5 critic steps, each on its own real
batch and z, per G step; Adam lr 1e-4, betas (0, 0.9) for both. The curve to watch is
the critic's estimate E[D(x)] - E[D(x~)] of W, which the paper finds to follow sample
quality.

Variant hacks: variant a (its networks, BCE, Adam 2e-4, beta1 0.5) with the well-known
tricks for D, each a setting:
- one-sided label smoothing (Salimans et al. 2016, "Improved Techniques for Training
  GANs"): D's target for real images is 0.9, not 1, which keeps D from growing
  over-confident; fakes stay 0, because a fake target beta > 0 would make D's optimum
  (0.9 p_data + beta p_model) / (p_data + p_model), and samples where there is no data
  would get no push toward it;
- noisy labels: real targets drawn from U[0.9 - 0.1, 0.9] (Chintala et al. 2016, "How to
  train a GAN", github.com/soumith/ganhacks);
- flipped labels: 5% of D's targets swapped, a real given a fake's 0, a fake a real's
  target (same source);
- instance noise (Sonderby et al. 2017, "Amortised MAP Inference for Image
  Super-resolution"; Arjovsky & Bottou 2017): x + sigma_t n, n ~ N(0, I), on every image
  D sees, with sigma_t = sigma_0 (1 - t / T) falling linearly to 0. The noise makes the
  real and generated distributions overlap, so D cannot separate them perfectly and its
  gradient stays informative while they are far apart;
- dropout 0.3 in D after each LeakyReLU (ganhacks).
D's loss is the BCE against these targets t, -t log sigmoid(l) - (1 - t) log(1 - sigmoid(l));
G keeps the non-saturating loss with target 1.
"""
import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import metrics
import nets
import parallel
import reports
import training
import util
from parallel import Random
from util import UserError

VARIANTS = ("a", "b", "acgan", "wgan-gp", "hacks")


# Named settings (run.py --preset NAME): the configurations RESULTS.md measured or
# expects. cpu: about 25 min a variant on 2 cores, FID of 500 samples 4 times (under 15%
# of it); gpu: 20,000 steps of 128 faces (16 epochs of the full CelebA) and the usual FID
# of 10,000 samples every 2,000 steps, an estimated 30 minutes on one GPU (not measured).
PRESETS = {"cpu": {"batch_size": 64, "steps": 1000, "sample_every": 250, "fid_images": 500},
           "gpu": {"sample_every": 2000, "fid_images": 10000}}


@dataclass
class GANSettings:
    """Flags of `run.py gan`. Variant b and ACGAN use the improved recipe."""
    variant: str = field(default="b", metadata={
        "help": "a (DCGAN), b (improved), acgan, wgan-gp or hacks (DCGAN with tricks)",
        "choices": VARIANTS})
    data: str = field(default="celeba", metadata={"help": "celeba or a folder of faces"})
    image_size: int = field(default=64, metadata={"help": "64, or 32 for quick study"})
    steps: int = field(default=20000, metadata={"help": "generator steps"})
    batch_size: int = field(default=128, metadata={"help": "images per step"})
    latent_dim: int = field(default=100, metadata={"help": "size of z"})
    attribute: str = field(default="Smiling", metadata={"help": "ACGAN's CelebA attribute"})
    ema_decay: float = field(default=0.999, metadata={"help": "generator EMA (b, acgan)"})
    augment: str = field(default="", metadata={
        "help": "DiffAugment policy for b and acgan, e.g. translation,color,cutout "
                "(for long runs on few faces; default none)"})
    d_norm: str = field(default="batch", metadata={
        "help": "D's normalisation in b and acgan: batch (DCGAN's) or spectral (Miyato et "
                "al. 2018, for long runs)", "choices": ("batch", "spectral")})
    n_critic: int = field(default=5, metadata={
        "help": "wgan-gp: critic steps per generator step (Gulrajani et al. 2017, Alg. 1)"})
    gp_weight: float = field(default=10.0, metadata={
        "help": "wgan-gp: lambda, the weight of the gradient penalty (Gulrajani et al. 2017)"})
    real_label: float = field(default=0.9, metadata={
        "help": "hacks: D's target for real images, one-sided label smoothing (Salimans et "
                "al. 2016, 'Improved Techniques for Training GANs'); fakes stay 0"})
    label_noise: float = field(default=0.1, metadata={
        "help": "hacks: real targets drawn from U[real-label - label-noise, real-label] "
                "(noisy labels, ganhacks: Chintala et al. 2016)"})
    label_flip: float = field(default=0.05, metadata={
        "help": "hacks: share of D's targets swapped between real and fake (ganhacks)"})
    instance_noise: float = field(default=0.1, metadata={
        "help": "hacks: std of the Gaussian noise on every image D sees at step 0, falling "
                "linearly to 0 (Sonderby et al. 2017; Arjovsky & Bottou 2017)"})
    dropout: float = field(default=0.3, metadata={
        "help": "hacks: dropout rate in D after each LeakyReLU (ganhacks)"})
    sample_every: int = field(default=500, metadata={
        "help": "steps between sample grids, curves and checkpoints"})
    fid_images: int = field(default=1000, metadata={
        "help": "generated images for the FID and KID against every held-out face, at each "
                "--fid-every step (0: no FID; 10000 on a GPU: --preset gpu)"})
    fid_every: int = field(default=0, metadata={
        "help": "steps between FIDs, a multiple of --sample-every (0: at every checkpoint); "
                "long runs checkpoint more often than they measure"})
    limit: int = field(default=0, metadata={"help": "use only the first N training faces"})
    resume: bool = field(default=False, metadata={"help": "continue from checkpoint.pt"})

    @property
    def improved(self) -> bool:
        return self.variant in ("b", "acgan")


# ============================================================================ losses
def discriminator_loss(real_logits, fake_logits, hinge: bool, targets=None) -> torch.Tensor:
    """hinge: E[relu(1 - D(x))] + E[relu(1 + D(G(z)))]; else BCE with targets 1 and 0,
    -log sigmoid(D(x)) - log(1 - sigmoid(D(G(z)))) = softplus(-D(x)) + softplus(D(G(z))).
    targets (hacks): (real targets (B,), fake targets (B,)) in place of 1 and 0, each image
    t's BCE -t log sigmoid(D) - (1 - t) log(1 - sigmoid(D))."""
    if hinge:
        return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    real_targets, fake_targets = targets if targets is not None else (
        torch.ones_like(real_logits), torch.zeros_like(fake_logits))
    return (F.binary_cross_entropy_with_logits(real_logits, real_targets)
            + F.binary_cross_entropy_with_logits(fake_logits, fake_targets))


def generator_loss(fake_logits, hinge: bool) -> torch.Tensor:
    """hinge: -E[D(G(z))]; else the non-saturating -log sigmoid(D(G(z)))."""
    return -fake_logits.mean() if hinge else F.softplus(-fake_logits).mean()


def attribute_loss(outputs: torch.Tensor, attributes: torch.Tensor) -> torch.Tensor:
    """ACGAN: BCE of D's attribute logit (its second output) against c."""
    return F.binary_cross_entropy_with_logits(outputs[:, 1], attributes.float())


def gradient_penalty(critic, real, fake, noise: Random) -> torch.Tensor:
    """WGAN-GP's E[(||grad_xhat D(xhat)||_2 - 1)^2], xhat = eps x + (1 - eps) x~, one
    eps ~ U[0, 1] per sample: the critic's 1-Lipschitz constraint, asked softly on lines
    between real and generated samples. create_graph=True makes the gradient itself
    differentiable, so the penalty's gradient reaches the critic's weights."""
    eps = noise.rand(len(real), *(1,) * (real.dim() - 1))                   # (B, 1, 1, 1)
    x_hat = (eps * real + (1 - eps) * fake).detach().requires_grad_(True)
    # a sample's score depends on that sample alone (no batch norm), so the gradient of
    # the sum holds each sample's own gradient grad_xhat D(xhat)
    gradients, = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    norms = gradients.flatten(1).norm(dim=1)                                  # (B,)
    return ((norms - 1) ** 2).mean()


def discriminator_targets(count: int, settings: GANSettings, noise: Random
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """hacks: D's targets for `count` real and `count` fake images, each (count,).
    Real: t ~ U[real_label - label_noise, real_label] (one-sided smoothing, noisy labels);
    fake: 0; then each target swapped with probability label_flip, a real getting a fake's
    0 and a fake a real's target."""
    real_drawn = settings.real_label - settings.label_noise * noise.rand(count)
    fake_drawn = settings.real_label - settings.label_noise * noise.rand(count)
    real_flipped = noise.rand(count) < settings.label_flip
    fake_flipped = noise.rand(count) < settings.label_flip
    return (torch.where(real_flipped, 0.0, real_drawn),
            torch.where(fake_flipped, fake_drawn, 0.0))


def instance_noise_std(step: int, settings: GANSettings) -> float:
    """hacks: sigma_t = sigma_0 (1 - t / T), from --instance-noise at step 0 to 0 at the
    end of training; 0 in the other variants."""
    if settings.variant != "hacks":
        return 0.0
    return settings.instance_noise * (1 - step / settings.steps)


# ============================================================================ DiffAugment
def diff_augment(images: torch.Tensor, policy: str, rng: Random) -> torch.Tensor:
    """Zhao et al. 2020: the same random, differentiable transforms for real and fake
    images, so D sees augmented data and G's gradient passes through the transform."""
    for name in filter(None, policy.split(",")):
        if name not in AUGMENTATIONS:
            raise UserError(f"unknown augmentation '{name}': use {', '.join(AUGMENTATIONS)}")
        images = AUGMENTATIONS[name](images, rng)
    return images


def _color(x, rng: Random):
    """Random brightness (+-0.5), saturation (x0..2) and contrast (x0.5..1.5)."""
    count = len(x)
    x = x + (rng.rand(count, 1, 1, 1) - 0.5)
    gray = x.mean(dim=1, keepdim=True)
    x = (x - gray) * (rng.rand(count, 1, 1, 1) * 2) + gray
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (rng.rand(count, 1, 1, 1) + 0.5) + mean


def _translation(x, rng: Random, ratio: float = 0.125):
    """Shift by up to 1/8 of the side, whole pixels, zeros (mid-gray) shifted in."""
    count, _, size, _ = x.shape
    limit = int(size * ratio + 0.5)
    shifts = rng.randint(-limit, limit + 1, (count, 2))
    rows = torch.arange(size, device=x.device)
    source_y = rows.view(1, size, 1) - shifts[:, 0].view(-1, 1, 1)      # (B, S, 1)
    source_x = rows.view(1, 1, size) - shifts[:, 1].view(-1, 1, 1)      # (B, 1, S)
    inside = ((source_y >= 0) & (source_y < size) & (source_x >= 0) & (source_x < size))
    flat = (source_y.clamp(0, size - 1) * size + source_x.clamp(0, size - 1))  # (B, S, S)
    gathered = x.flatten(2).gather(2, flat.flatten(1).unsqueeze(1).expand(-1, x.shape[1], -1))
    return gathered.view_as(x) * inside.unsqueeze(1)


def _cutout(x, rng: Random, ratio: float = 0.5):
    """Zero a random square of `ratio` times the side, `cut` pixels (DiffAugment's: 16 at
    32x32), rows and columns c - cut // 2 to c - cut // 2 + cut - 1 around a random centre
    c (the square may hang over the border)."""
    count, _, size, _ = x.shape
    cut = int(size * ratio + 0.5)
    centres = rng.randint(0, size + 1 - cut % 2, (count, 2))
    rows = torch.arange(size, device=x.device)
    into_y = rows.view(1, size) - (centres[:, :1] - cut // 2)  # row - the square's first
    into_x = rows.view(1, size) - (centres[:, 1:] - cut // 2)                 # (B, S)
    off_y, off_x = (into_y < 0) | (into_y >= cut), (into_x < 0) | (into_x >= cut)
    keep = off_y.unsqueeze(2) | off_x.unsqueeze(1)                         # (B, S, S)
    return x * keep.unsqueeze(1)


AUGMENTATIONS = {"color": _color, "translation": _translation, "cutout": _cutout}


# ============================================================================ networks
class GAN(nn.Module):
    """G, D (WGAN-GP: the critic) and (improved variants) the EMA copy of G for sampling."""

    def __init__(self, settings: GANSettings):
        super().__init__()
        self.conditional = settings.variant == "acgan"  # G gets c, D also predicts it
        self.attribute_channels = 2 if self.conditional else 0  # one-hot c appended to z
        self.generator = nets.dcgan_init_(nets.dcgan_generator(
            settings.latent_dim + self.attribute_channels, image_size=settings.image_size))
        if settings.improved:
            norm = settings.d_norm  # batch norm, or spectral norm
        elif settings.variant == "wgan-gp":
            norm = "none"  # the penalty is per image: no batch statistics in the critic
        else:
            norm = "batch"
        self.discriminator = nets.dcgan_init_(nets.dcgan_discriminator(
            image_size=settings.image_size, outputs=2 if self.conditional else 1, norm=norm,
            dropout=settings.dropout if settings.variant == "hacks" else 0.0))
        self.ema = copy.deepcopy(self.generator).requires_grad_(False) if settings.improved \
            else None

    def generator_input(self, z: torch.Tensor, attributes: torch.Tensor | None):
        """(B, latent) and c (B,) -> (B, latent [+ 2], 1, 1)."""
        if self.conditional:
            z = torch.cat([z, F.one_hot(attributes, 2).to(z)], dim=1)
        return z[:, :, None, None]

    @torch.no_grad()
    def sample(self, z, attributes=None) -> torch.Tensor:
        """Images from the generator used for results, the EMA copy when there is one, in
        eval mode: batch norm with its running statistics, so a sample depends on its own
        z alone, not on the rest of its batch. z and attributes go to G's device."""
        generator = self.ema if self.ema is not None else self.generator
        generator.eval()
        device = next(generator.parameters()).device
        return generator(self.generator_input(z.to(device), None if attributes is None
                                              else attributes.to(device)))

    def update_ema(self, step: int, decay: float):
        if self.ema is not None:
            nets.update_ema(self.ema, self.generator, step, decay)

    def refresh_ema_statistics(self, settings: GANSettings, seed: int, count: int = 1024,
                               batch_size: int = 64):
        """Batch-norm statistics that fit the averaged G, from `count` fixed z and
        attributes of the "statistics" stream (nets.recompute_batch_norm; under torchrun
        each process takes its rows of each batch): update_ema copies those of the last
        G, which gave the averaged G's faces a red cast (RESULTS.md)."""
        if self.ema is None:
            return
        device = next(self.ema.parameters()).device
        nets.recompute_batch_norm(self.ema, [
            parallel.rows(self.generator_input(z.to(device), None if attributes is None
                                               else attributes.to(device)))
            for z, attributes in noise_batches(settings, count, seed, "statistics",
                                               batch_size)])


# ============================================================================ one step
def train_step(gan: GAN, optimizers: dict, real: torch.Tensor, real_attributes,
               settings: GANSettings, noise: Random, augmentation: Random,
               noise_std: float = 0.0) -> dict:
    """One D step and one G step on a batch of real images (a, b, acgan, hacks); returns
    the numbers to plot. noise: the stream of z, c and hacks' targets and instance noise;
    augmentation: DiffAugment's; noise_std: hacks' instance noise sigma_t at this step."""
    count = len(real)
    z = noise.randn(count, settings.latent_dim)                          # z ~ N(0, I)
    fake_attributes = noise.randint(0, 2, (count,)) if gan.conditional else None
    fake = gan.generator(gan.generator_input(z, fake_attributes))
    hinge = settings.improved

    def as_d_sees(images):  # DiffAugment (b, acgan), instance noise (hacks), or as they are
        if settings.improved:
            return diff_augment(images, settings.augment, augmentation)
        if settings.variant == "hacks":  # x + sigma_t n, n ~ N(0, I)
            return images + noise_std * noise.randn(*images.shape)
        return images

    # (1) D: maximise D(x) and minimise D(G(z)); fake.detach() keeps this step out of G
    real_out = gan.discriminator(as_d_sees(real)).flatten(1)             # (B, 1 or 2)
    fake_out = gan.discriminator(as_d_sees(fake.detach())).flatten(1)
    # hacks: smoothed, noisy, sometimes swapped targets in place of 1 and 0
    targets = discriminator_targets(count, settings, noise) if settings.variant == "hacks" \
        else None
    d_loss = discriminator_loss(real_out[:, 0], fake_out[:, 0], hinge, targets=targets)
    if gan.conditional:  # ACGAN: D learns the attribute of real and generated faces
        d_loss = d_loss + attribute_loss(real_out, real_attributes) \
            + attribute_loss(fake_out, fake_attributes)
    optimizers["discriminator"].zero_grad(set_to_none=True)
    d_loss.backward()
    optimizers["discriminator"].step()

    # (2) G: the same fakes, scored by the updated D; only G's optimizer steps
    fake_out_for_g = gan.discriminator(as_d_sees(fake)).flatten(1)
    g_loss = generator_loss(fake_out_for_g[:, 0], hinge)
    if gan.conditional:  # ... and G must draw the attribute it was asked for
        g_loss = g_loss + attribute_loss(fake_out_for_g, fake_attributes)
    optimizers["generator"].zero_grad(set_to_none=True)
    g_loss.backward()
    optimizers["generator"].step()
    return {"loss_d": d_loss, "loss_g": g_loss,
            "D(x)": torch.sigmoid(real_out[:, 0]).mean(),
            "D(G(z))": torch.sigmoid(fake_out[:, 0]).mean()}


def wgan_gp_step(gan: GAN, optimizers: dict, real_batch, settings: GANSettings,
                 noise: Random) -> dict:
    """Gulrajani et al. 2017, Algorithm 1: n_critic critic steps, each on its own real
    batch (real_batch() -> images) and z, then one G step; returns the last critic step's
    numbers and G's loss."""
    for _ in range(settings.n_critic):
        real = real_batch()
        z = noise.randn(len(real), settings.latent_dim)
        with torch.no_grad():  # G is fixed while the critic learns
            fake = gan.generator(gan.generator_input(z, None))              # x~ (B, 3, S, S)
        real_scores = gan.discriminator(real).flatten()                      # D(x) (B,)
        fake_scores = gan.discriminator(fake).flatten()                      # D(x~) (B,)
        wasserstein = real_scores.mean() - fake_scores.mean()  # E[D(x)] - E[D(x~)]
        penalty = gradient_penalty(gan.discriminator, real, fake, noise)
        # L_D = E[D(x~)] - E[D(x)] + lambda E[(||grad_xhat D(xhat)||_2 - 1)^2]
        d_loss = -wasserstein + settings.gp_weight * penalty
        optimizers["discriminator"].zero_grad(set_to_none=True)
        d_loss.backward()
        optimizers["discriminator"].step()

    # G step on its own z: L_G = -E[D(G(z))]; only G's optimizer steps
    z = noise.randn(len(real), settings.latent_dim)
    g_loss = -gan.discriminator(gan.generator(gan.generator_input(z, None))).mean()
    optimizers["generator"].zero_grad(set_to_none=True)
    g_loss.backward()
    optimizers["generator"].step()
    return {"loss_d": d_loss, "loss_g": g_loss, "wasserstein": wasserstein,
            "penalty": penalty}


# Adam per variant: G's lr, D's lr, betas. DCGAN (a, hacks): 2e-4 for both, beta1 0.5;
# improved (b, acgan): twice that; WGAN-GP: Algorithm 1's 1e-4, betas (0, 0.9).
ADAM = {"a": (2e-4, 2e-4, (0.5, 0.999)), "hacks": (2e-4, 2e-4, (0.5, 0.999)),
        "b": (4e-4, 4e-4, (0.5, 0.999)), "acgan": (4e-4, 4e-4, (0.5, 0.999)),
        "wgan-gp": (1e-4, 1e-4, (0.0, 0.9))}


def build_optimizers(gan: GAN, settings: GANSettings) -> dict:
    lr_g, lr_d, betas = ADAM[settings.variant]
    return {"generator": torch.optim.Adam(gan.generator.parameters(), lr_g, betas=betas),
            "discriminator": torch.optim.Adam(gan.discriminator.parameters(), lr_d,
                                              betas=betas)}


def real_batch(faces: data.ImageSet, settings: GANSettings, data_order: Random):
    """batch_size faces drawn with replacement, and (ACGAN) their attributes."""
    batch = data_order.indices(len(faces), settings.batch_size)  # the global batch's share
    return faces.images(batch), (faces.labels[batch] if settings.variant == "acgan" else None)


# ============================================================================ training
def train(faces: data.ImageSet, held_out: data.ImageSet | None, settings: GANSettings,
          out: Path, device, seed: int, cache_dir=None, weights=None) -> dict:
    """Alternate D and G steps for settings.steps steps; every sample_every steps a
    checkpoint and the pictures, every fid_every steps first the FID and KID of fixed
    samples and D's memorisation scores (best.pt: the lowest FID's checkpoint); then
    results.json. weights: the FID Inception weights file (default: the cache's)."""
    if settings.variant not in VARIANTS:
        raise UserError(f"unknown --variant '{settings.variant}': use {', '.join(VARIANTS)}")
    if settings.variant == "acgan" and faces.labels is None:
        raise UserError(f"ACGAN needs the attribute '{settings.attribute}' as labels: "
                        "use CelebA (with its list_attr_celeba.txt)")
    training.seed_weights(seed)
    gan = GAN(settings).to(device)
    parallel.distribute(gan)  # under torchrun: G's and D's gradients averaged in backward
    optimizers = build_optimizers(gan, settings)
    faces = faces.to(device)
    fid = metrics.fid_tracker(held_out, settings.fid_images,
                              metrics.fid_period(settings.fid_every, settings.sample_every),
                              device, cache_dir, weights)
    # with --resume, every part of `state` comes back from the checkpoint here
    run = training.Run(out, "gan", settings, seed, device, state={
        "gan": gan, "generator_optimizer": optimizers["generator"],
        "discriminator_optimizer": optimizers["discriminator"]}, steps=settings.steps,
        every=settings.sample_every, may_change=("steps", "sample_every", "fid_every"),
        desc=f"GAN {settings.variant}")
    # the training streams (training.py; dropout draws from torch's own)
    data_order = run.random("data")        # which faces
    noise = run.random("noise")            # z, c, hacks' targets and noise, WGAN-GP's eps
    augmentation = run.random("augment")   # DiffAugment's transforms
    for step in run:
        gan.train()  # sampling at the last checkpoint left G in eval mode (no average)
        if settings.variant == "wgan-gp":  # n_critic real batches, fetched as it needs them
            numbers = wgan_gp_step(gan, optimizers,
                                   lambda: real_batch(faces, settings, data_order)[0],
                                   settings, noise)
        else:
            real, real_attributes = real_batch(faces, settings, data_order)
            numbers = train_step(gan, optimizers, real, real_attributes, settings, noise,
                                 augmentation, noise_std=instance_noise_std(step, settings))
        gan.update_ema(step, settings.ema_decay)
        run.log(numbers)
        if run.at_checkpoint:  # every sample_every steps, and after the last
            # standing statistics for the average, from z of their own fixed stream
            gan.refresh_ema_statistics(settings, seed)
            if fid.due(step + 1, settings.steps):
                # the FID of the same z every time (like with like); then D's scores of
                # real faces, read against D(x) = 0, its boundary (a critic has none)
                fid.measure(run.history, step + 1, lambda batch: gan.sample(*batch),
                            noise_batches(settings, settings.fid_images, seed, "fid"))
                if settings.variant != "wgan-gp":
                    metrics.record(run.history, memorisation(gan, faces, held_out, settings))
            run.save_checkpoint()  # after the FID: best.pt is the lowest FID's
            reports.gan_pictures(out, settings, run.history, fid,
                                 *pictures(gan, settings, seed, step))
    return reports.gan_results(out, settings, run, fid)


@torch.no_grad()
def memorisation(gan: GAN, faces: data.ImageSet, held_out: data.ImageSet,
                 settings: GANSettings, count: int = 1000) -> dict:
    """Is D learning its training faces by heart? sigmoid(D(x)) averaged over the first
    `count` training faces and over as many held-out faces, which D never sees. While D
    generalises the two agree; when it overfits they part ways, the held-out faces
    sliding toward "fake", and FID soon stops improving (Karras et al. 2020, "Training
    Generative Adversarial Networks with Limited Data", Fig. 1). D is scored as it trains
    (batch norm with each batch's statistics, batches of batch_size), without
    augmentation or dropout, each side by its own copy of D: the running statistics and
    spectral norm's vectors, which a forward pass in training mode updates, stay as
    training left them, and both sides meet the same D. The sigmoid squashes the scores of
    the hinge D (b, acgan) as those of BCE's: 0.5 is D(x) = 0, the boundary of both losses
    (WGAN-GP's critic has no boundary: its score moves by any constant)."""
    count = min(count, len(faces), len(held_out))

    def mean_score(images: data.ImageSet) -> float:
        discriminator = copy.deepcopy(gan.discriminator).train()
        for layer in discriminator.modules():
            if isinstance(layer, nn.Dropout):  # hacks: no mask, so no draw from its stream
                layer.eval()
        device = next(discriminator.parameters()).device
        scores = [discriminator(images.images(slice(i, min(i + settings.batch_size, count)))
                                .to(device)).flatten(1)[:, 0]         # D's real/fake score
                  for i in range(0, count, settings.batch_size)]
        return torch.sigmoid(torch.cat(scores)).mean().item()

    return {"D(training x)": mean_score(faces), "D(held-out x)": mean_score(held_out)}


# ============================================================================ sampling
def fixed_noise(settings: GANSettings, count: int, seed: int, stream: str = "grid"):
    """The same z (and attributes) every time, from the fixed stream `stream` (the grid's,
    the pairs', FID's, the statistics'): grids from different steps compare."""
    z = training.fixed_random(seed, stream).randn(count, settings.latent_dim)
    attributes = torch.arange(count) % 2 if settings.variant == "acgan" else None
    return z, attributes


def noise_batches(settings: GANSettings, count: int, seed: int, stream: str,
                  batch_size: int = 250):
    """fixed_noise(settings, count, seed, stream) in batches: (z, attributes) on the CPU."""
    z, attributes = fixed_noise(settings, count, seed, stream)
    for i in range(0, count, batch_size):
        yield z[i:i + batch_size], (None if attributes is None
                                    else attributes[i:i + batch_size])


def pictures(gan: GAN, settings: GANSettings, seed: int, step: int):
    """What the pictures of step `step` show: 32 samples of fixed z (attributes 0 and 1 in
    turn); for ACGAN also 10 z, each drawn without and then with the attribute (else
    None); about how many steps the average of G holds (None: no average)."""
    samples = gan.sample(*fixed_noise(settings, 32, seed))
    averaged_steps = (1 / (1 - nets.ema_decay(step, settings.ema_decay))
                      if gan.ema is not None else None)
    if settings.variant != "acgan":
        return samples, None, averaged_steps
    z, _ = fixed_noise(settings, 10, seed, "pairs")
    pairs = gan.sample(z.repeat(2, 1), torch.arange(2).repeat_interleave(10))
    return samples, pairs, averaged_steps


def load(path, device) -> tuple[GAN, GANSettings]:
    return util.load_trained(path, device, GANSettings, GAN, "gan", "gan")


def summary(settings: GANSettings) -> str:
    """The layer tables of G and D (nets.summary), as `run.py summary gan` prints them."""
    model, side = GAN(settings), settings.image_size
    title = f"gan variant {settings.variant}"
    return "\n".join([
        f"{title}: generator", nets.summary(model.generator, (settings.latent_dim
                                                              + model.attribute_channels, 1, 1)),
        f"{title}: discriminator", nets.summary(model.discriminator, (3, side, side))])
