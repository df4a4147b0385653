"""Class-conditional denoising diffusion (DDPM) on 28x28 colour digits, with
classifier-free guidance and DDIM sampling.

Forward process (Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models"):
noise is added in T small Gaussian steps with variances beta_1 .. beta_T,
    q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I),
which composes in closed form, with alpha_t = 1 - beta_t and alpha_bar_t = prod_{s<=t} alpha_s:
    q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I),
    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps,  eps ~ N(0, I).

Training: a network eps_theta(x_t, t, c) predicts the noise of x_t given the digit's
class c; the loss is
    E_{x_0, c, t ~ U{1..T}, eps} lambda_t mean_pixels (eps - eps_theta(x_t, t, c))^2,
with lambda_t = 1 (Ho et al.'s "simple" loss) or Min-SNR-gamma (Hang et al. 2023, "Efficient
Diffusion Training via Min-SNR Weighting Strategy"): lambda_t = min(SNR_t, gamma) / SNR_t,
SNR_t = alpha_bar_t / (1 - alpha_bar_t), gamma = 5. Why divide by SNR_t: the x^_0 that the
predicted noise eps^ implies errs by x_0 - x^_0 = (eps^ - eps) / sqrt(SNR_t), so the noise loss
is SNR_t times the x_0 loss; Min-SNR caps that factor at gamma,
    min(SNR_t, gamma) (x_0 - x^_0)^2 = min(SNR_t, gamma) / SNR_t (eps - eps^)^2.
The nearly clean timesteps (SNR_t > gamma: t <= 130 of T = 1000 on the linear schedule
with gamma = 5) only polish details; lowering their weight leaves more of a short training
budget to the noisy ones, where the digit's shape and class are decided.

Reverse process: given x_t and the predicted x^_0 = (x_t - sqrt(1 - alpha_bar_t) eps^) /
sqrt(alpha_bar_t), clipped to the data range [-1, 1], step to
x_{t-1} ~ q(x_{t-1} | x_t, x^_0) = N(mu~_t, beta~_t I),
    mu~_t = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) x^_0
            + sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) x_t,
    beta~_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t
sigma_t^2 = beta~_t (Ho et al. also try sigma_t^2 = beta_t). DDPM ancestral sampling
takes all T steps.

DDIM (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models") reuses the same
network on S << T timesteps tau_1 < ... < tau_S; from t = tau_i to t' = tau_{i-1}
(t' = 0 last, alpha_bar_0 = 1), with z ~ N(0, I):
    x_t' = sqrt(alpha_bar_t') x^_0 + sqrt(1 - alpha_bar_t' - sigma^2) eps^ + sigma z,
    sigma = eta sqrt((1 - alpha_bar_t') / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_t').
eta = 0 is deterministic; with S = T, eta = 1 is ancestral sampling with beta~_t. Here x^_0
is clipped as above and eps^ recomputed from the clipped x^_0 (eps^ = (x_t -
sqrt(alpha_bar_t) x^_0) / sqrt(1 - alpha_bar_t)), so that both describe the same x_t; the
paper's equation 12 uses the network's eps^ and no clipping.

Classifier-free guidance (Ho & Salimans 2022): in training the class is replaced by a
"no class" token with probability drop_class (0.1), so one network learns eps(x, t, c)
and eps(x, t); sampling uses
    eps~ = (1 + w) eps(x, t, c) - w eps(x, t),   w >= 0 the guidance strength
(the eps^ of the samplers above).

Schedules: `linear` (beta from 1e-4 to 0.02, Ho et al.) or `cosine` (Nichol & Dhariwal
2021, "Improved DDPM": alpha_bar_t = f(t) / f(0), f(t) = cos^2(((t / T + s) / (1 + s)) pi / 2),
s = 0.008, beta_t = min(1 - alpha_bar_t / alpha_bar_{t-1}, 0.999)).
"""
import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

import classifier
import data
import metrics
import nets
import parallel
import reports
import training
import util
from parallel import Random
from util import UserError

CLASSES = 10
IMAGE_SHAPE = (3, 28, 28)
MIN_SNR_GAMMA = 5.0  # Hang et al.'s gamma
WARM_UP_STEPS = 500  # the lr rises linearly over these first steps


# ============================================================================ settings
# Named settings (run.py --preset NAME): the configurations RESULTS.md measured.
# cpu: about 40 minutes of training on 2 cores. Min-SNR weighting, a cosine decay of a
# higher lr and no dropout make the short run learn the digits' shapes sooner, and a
# stronger guidance (w = 6) makes more of its digits legible; the FID curve measures 100
# digits at each checkpoint, the final FID all 1000 course digits. gpu: an estimated 30
# minutes on one GPU under bfloat16 autocast, the default U-Net (width 64) for 60,000
# steps of 128 digits with the same learning-rate schedule and Min-SNR loss weights,
# dropout 0.1 and a slower average (not yet measured: RESULTS.md gives the figures it is
# expected to reach).
PRESETS = {"cpu": {"width": 32, "batch_size": 64, "steps": 4000, "lr": 1e-3,
                   "lr_schedule": "cosine", "loss_weight": "min-snr", "dropout": 0.0,
                   "ema_decay": 0.995, "sample_every": 1000, "guidance": 6.0,
                   "fid_images": 100},
           "gpu": {"width": 64, "batch_size": 128, "steps": 60000, "lr": 2e-4,
                   "lr_schedule": "cosine", "loss_weight": "min-snr", "dropout": 0.1,
                   "ema_decay": 0.9995, "sample_every": 10000, "guidance": 2.0,
                   "fid_images": 1000}}


@dataclass
class DDPMSettings:
    """Flags of `run.py ddpm`."""
    data: str = field(default="mnistm", metadata={"help": "labelled digits to learn"})
    timesteps: int = field(default=1000, metadata={"help": "T"})
    schedule: str = field(default="linear", metadata={"help": "linear or cosine",
                                                       "choices": ("linear", "cosine")})
    width: int = field(default=64, metadata={"help": "U-Net base channels"})
    steps: int = field(default=30000, metadata={"help": "training steps"})
    batch_size: int = field(default=128, metadata={"help": "images per step"})
    lr: float = field(default=2e-4, metadata={
        "help": f"Adam learning rate (a linear warm-up over {WARM_UP_STEPS} steps)"})
    lr_schedule: str = field(default="constant", metadata={
        "help": "constant, or cosine (the warm-up times a cosine that falls from 1 at step 0 "
                "to 0 at --steps)",
        "choices": ("constant", "cosine")})
    loss_weight: str = field(default="uniform", metadata={
        "help": f"per-timestep weight of the loss: uniform, or min-snr (min(SNR, "
                f"{MIN_SNR_GAMMA:g}) / SNR)",
        "choices": ("uniform", "min-snr")})
    dropout: float = field(default=0.1, metadata={"help": "dropout in the U-Net's blocks"})
    drop_class: float = field(default=0.1, metadata={"help": "P(class -> none) in training"})
    guidance: float = field(default=2.0, metadata={"help": "classifier-free guidance w"})
    ema_decay: float = field(default=0.999, metadata={"help": "EMA of the weights"})
    sampler: str = field(default="ddim", metadata={"help": "ddim or ddpm",
                                                   "choices": ("ddim", "ddpm")})
    sampling_steps: int = field(default=50, metadata={"help": "DDIM steps S"})
    eta: float = field(default=0.0, metadata={"help": "DDIM eta (0: deterministic)"})
    amp: str = field(default="auto", metadata={
        "help": "bfloat16 autocast: auto (on a CUDA GPU only; a CPU without native "
                "bfloat16, such as an AVX2 one, runs it about 10 times slower), on, off",
        "choices": ("auto", "on", "off")})
    sample_every: int = field(default=1000, metadata={"help": "steps between grids/checkpoints"})
    classifier: str = field(default="", metadata={
        "help": "digit-classifier checkpoint that grades the 1000 images (default: "
                "OUT/classifier/checkpoint.pt, made by 'run.py classifier')"})
    fid_images: int = field(default=1000, metadata={
        "help": "digits (all classes in turn) for the FID and KID against the test split "
                "and the digit accuracy at each --fid-every step, and the final 1000 "
                "digits' FID (0: no FID)"})
    fid_every: int = field(default=0, metadata={
        "help": "steps between FIDs, a multiple of --sample-every (0: at every checkpoint)"})
    resume: bool = field(default=False, metadata={"help": "continue from checkpoint.pt"})


# ============================================================================ schedule
class NoiseSchedule:
    """Every per-timestep constant, as float64 tensors of length T: index i is t = i + 1."""

    def __init__(self, T: int = 1000, kind: str = "linear"):
        if kind == "linear":
            betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
        elif kind == "cosine":
            steps = torch.arange(T + 1, dtype=torch.float64)                 # t = 0 .. T
            s = 0.008  # the offset that keeps beta_1 from being too small
            f = torch.cos((steps / T + s) / (1 + s) * math.pi / 2) ** 2
            alpha_bar = f / f[0]
            betas = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
        else:
            raise UserError(f"unknown noise schedule '{kind}': use linear or cosine")
        self.T = T
        self.betas = betas
        self.alphas = 1 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)            # alpha_bar_t
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64),
                                              self.alphas_cumprod[:-1]])  # alpha_bar_{t-1}
        self.snr = self.alphas_cumprod / (1 - self.alphas_cumprod)          # SNR_t
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1 - self.alphas_cumprod).sqrt()
        # q(x_{t-1} | x_t, x_0) = N(coef_x0 x_0 + coef_xt x_t, posterior_variance)
        self.posterior_variance = betas * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)
        self.posterior_mean_coef_x0 = (betas * self.alphas_cumprod_prev.sqrt()
                                       / (1 - self.alphas_cumprod))
        self.posterior_mean_coef_xt = ((1 - self.alphas_cumprod_prev) * self.alphas.sqrt()
                                       / (1 - self.alphas_cumprod))
        # Min-SNR-gamma's loss weights min(SNR_t, gamma) / SNR_t = min(gamma / SNR_t, 1)
        self.min_snr_weights = (MIN_SNR_GAMMA / self.snr).clamp(max=1)
        self.moved = {}  # (table, dtype, device) -> the table there (at)

    def at(self, values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """values[t - 1] for a batch of timesteps t (B,), shaped (B, 1, 1, 1) like x. Each
        table is cast (before the move: some devices, such as Apple's MPS, hold no
        float64) and moved to x's device once, then kept: a copy from the CPU at every
        call would make a GPU wait."""
        key = (id(values), like.dtype, like.device)
        if key not in self.moved or self.moved[key][0] is not values:
            self.moved[key] = values, values.to(like.dtype).to(like.device)
        return self.moved[key][1][t - 1].view(-1, *[1] * (like.dim() - 1))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps."""
        return (self.at(self.sqrt_alphas_cumprod, t, x0) * x0
                + self.at(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise)

    def predict_x0(self, x_t, t, eps) -> torch.Tensor:
        """Invert q_sample: x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)."""
        return ((x_t - self.at(self.sqrt_one_minus_alphas_cumprod, t, x_t) * eps)
                / self.at(self.sqrt_alphas_cumprod, t, x_t))

    def predict_eps(self, x_t, t, x0) -> torch.Tensor:
        """Invert q_sample for the noise:
        eps = (x_t - sqrt(alpha_bar_t) x_0) / sqrt(1 - alpha_bar_t)."""
        return ((x_t - self.at(self.sqrt_alphas_cumprod, t, x_t) * x0)
                / self.at(self.sqrt_one_minus_alphas_cumprod, t, x_t))

    def posterior(self, x0, x_t, t) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of q(x_{t-1} | x_t, x_0)."""
        mean = (self.at(self.posterior_mean_coef_x0, t, x_t) * x0
                + self.at(self.posterior_mean_coef_xt, t, x_t) * x_t)
        return mean, self.at(self.posterior_variance, t, x_t)


# ============================================================================ model
def autocast(device, amp: str):
    """bfloat16 autocast where amp_enabled says so (elsewhere a no-op context)."""
    device_type = torch.device(device).type
    return torch.autocast(device_type if device_type in ("cpu", "cuda") else "cpu",
                          dtype=torch.bfloat16, enabled=amp_enabled(device_type, amp))


def amp_enabled(device_type: str, amp: str) -> bool:
    """On a CUDA GPU unless amp is "off"; on the CPU only if amp is "on"; never elsewhere."""
    return device_type == "cuda" and amp != "off" or device_type == "cpu" and amp == "on"


class Diffusion(torch.nn.Module):
    """eps_theta (a U-Net), its EMA copy for sampling, and the schedule."""

    def __init__(self, settings: DDPMSettings):
        super().__init__()
        self.network = nets.UNet(width=settings.width, classes=CLASSES,
                                 dropout=settings.dropout)
        self.ema = copy.deepcopy(self.network).requires_grad_(False)
        self.schedule = NoiseSchedule(settings.timesteps, settings.schedule)
        self.settings = settings

    def loss(self, x0: torch.Tensor, labels: torch.Tensor, rng: Random) -> torch.Tensor:
        """lambda_t mean_pixels (eps - eps_theta(x_t, t, c))^2, t ~ U{1..T}, c dropped with
        probability drop_class; averaged over the batch."""
        count = len(x0)
        t = rng.randint(1, self.schedule.T + 1, (count,))                  # t ~ U{1..T}
        noise = rng.randn(*x0.shape)                                        # eps ~ N(0, I)
        # classifier-free guidance: with probability drop_class, c becomes "no class"
        dropped = rng.rand(count) < self.settings.drop_class
        labels = torch.where(dropped, torch.full_like(labels, CLASSES), labels)
        with autocast(x0.device, self.settings.amp):
            # eps_theta(x_t, t, c), x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps
            eps_theta = self.network(self.schedule.q_sample(x0, t, noise), t, labels)
        # the target is the noise, not x_0; (B,) mean squared errors, weighted by lambda_t
        per_image_mse = (eps_theta.float() - noise).pow(2).flatten(1).mean(dim=1)
        return (self.loss_weights(t) * per_image_mse).mean()

    def loss_weights(self, t: torch.Tensor) -> torch.Tensor:
        """lambda_t (B,): 1, or Min-SNR-gamma's
        min(SNR_t, gamma) / SNR_t = min(gamma / SNR_t, 1)."""
        if self.settings.loss_weight == "uniform":
            return torch.ones(len(t), device=t.device)
        if self.settings.loss_weight == "min-snr":
            return self.schedule.at(self.schedule.min_snr_weights, t,
                                    torch.empty(len(t), device=t.device))
        raise UserError(f"unknown --loss-weight '{self.settings.loss_weight}': "
                        "use uniform or min-snr")

    def update_ema(self, step: int):
        nets.update_ema(self.ema, self.network, step, self.settings.ema_decay)

    @torch.no_grad()
    def guided_eps(self, x_t, t, labels, w: float) -> torch.Tensor:
        """eps~ = (1 + w) eps(x, t, c) - w eps(x, t): both in one batch of 2B, from the EMA
        network in eval mode (no dropout: eps~ is a function of x_t, t and c alone, so DDIM
        with eta = 0 draws nothing but x_T)."""
        unconditional = torch.full_like(labels, CLASSES)   # the "no class" token
        self.ema.eval()
        with autocast(x_t.device, self.settings.amp):
            eps_both = self.ema(torch.cat([x_t, x_t]), torch.cat([t, t]),
                                torch.cat([labels, unconditional])  # first half c, then none
                                ).float()                           # (2B, 3, H, W)
        eps_conditional, eps_unconditional = eps_both.chunk(2)
        return guide(eps_conditional, eps_unconditional, w)


def guide(eps_conditional, eps_unconditional, w: float) -> torch.Tensor:
    """Classifier-free guidance: (1 + w) eps_c - w eps_u."""
    return (1 + w) * eps_conditional - w * eps_unconditional


# ============================================================================ samplers
@torch.no_grad()
def sample_ddpm(model: Diffusion, labels: torch.Tensor, w: float, noise: Random,
                keep_at=(),
                on_step=lambda: None) -> tuple[torch.Tensor, dict]:
    """Ancestral sampling, t = T .. 1: x_{t-1} = mu~(x_0(x_t, eps~), x_t) + sqrt(beta~_t) z.
    The predicted x_0 is clipped to [-1, 1] (the data range). Returns x_0 and
    {t: x_t} for the timesteps in keep_at (for the reverse-process strip); on_step() is
    called after each network evaluation (progress display). noise: x_T's and z's
    stream, drawn on the CPU so that every device gets the same numbers."""
    device, schedule = labels.device, model.schedule
    x = noise.randn(len(labels), *IMAGE_SHAPE)                           # x_T ~ N(0, I)
    kept = {schedule.T: x.clone()} if schedule.T in keep_at else {}
    for timestep in range(schedule.T, 0, -1):
        t = torch.full((len(labels),), timestep, device=device)
        eps = model.guided_eps(x, t, labels, w)                          # eps~(x_t, t, c)
        x0 = predict_clipped_x0(schedule, x, t, eps)
        # q(x_{t-1} | x_t, x_0) = N(mu~_t, beta~_t I)
        mean, variance = schedule.posterior(x0, x, t)
        # x_{t-1} = mu~_t + sqrt(beta~_t) z, z ~ N(0, I). At t = 1, beta~_1 = 0: no z is
        # drawn, which also keeps the random stream the same as DDIM's with eta = 1
        z = noise.randn(*x.shape) if timestep > 1 else 0.0
        x = mean + variance.sqrt() * z
        on_step()
        if timestep - 1 in keep_at:
            kept[timestep - 1] = x.clone()
    return x, kept


def predict_clipped_x0(schedule: NoiseSchedule, x_t, t, eps) -> torch.Tensor:
    """x^_0 = (x_t - sqrt(1 - alpha_bar_t) eps~) / sqrt(alpha_bar_t), clipped to the data's
    range [-1, 1]."""
    return schedule.predict_x0(x_t, t, eps).clamp(-1, 1)


def ddim_timesteps(T: int, steps: int) -> list[int]:
    """At most S timesteps from T down to 1, evenly spaced (rounded, repeats dropped);
    S = 1 is T alone."""
    if steps == 1:
        return [T]
    return sorted({round(t) for t in torch.linspace(1, T, steps).tolist()}, reverse=True)


def sampler_steps(settings: DDPMSettings) -> int:
    """Network evaluations (each on a batch of 2B) for one batch of images."""
    if settings.sampler == "ddpm":
        return settings.timesteps
    return len(ddim_timesteps(settings.timesteps, settings.sampling_steps))


@torch.no_grad()
def sample_ddim(model: Diffusion, labels: torch.Tensor, w: float, noise: Random,
                steps: int = 50, eta: float = 0.0, keep_at=(),
                on_step=lambda: None) -> tuple[torch.Tensor, dict]:
    """DDIM on S timesteps; eta = 0 gives a deterministic map from x_T to x_0."""
    device, schedule = labels.device, model.schedule
    x = noise.randn(len(labels), *IMAGE_SHAPE)                           # x_T ~ N(0, I)
    timesteps = ddim_timesteps(schedule.T, steps)                        # tau_S > ... > tau_1
    kept = {}
    for index, timestep in enumerate(timesteps):
        if timestep in keep_at:
            kept[timestep] = x.clone()
        t = torch.full((len(labels),), timestep, device=device)
        x0 = predict_clipped_x0(schedule, x, t, model.guided_eps(x, t, labels, w))
        eps = schedule.predict_eps(x, t, x0)  # the noise of the clipped x^_0: same x_t
        next_timestep = timesteps[index + 1] if index + 1 < len(timesteps) else 0  # t' = 0 last
        alpha_bar = float(schedule.alphas_cumprod[timestep - 1])
        alpha_bar_next = (float(schedule.alphas_cumprod[next_timestep - 1]) if next_timestep
                          else 1.0)                                      # alpha_bar_0 = 1
        # sigma = eta sqrt((1 - alpha_bar_t') / (1 - alpha_bar_t))
        #             sqrt(1 - alpha_bar_t / alpha_bar_t')
        sigma = eta * math.sqrt((1 - alpha_bar_next) / (1 - alpha_bar)
                                * (1 - alpha_bar / alpha_bar_next))
        z = noise.randn(*x.shape) if sigma > 0 else 0.0
        # x_t' = sqrt(alpha_bar_t') x^_0 + sqrt(1 - alpha_bar_t' - sigma^2) eps^ + sigma z
        x = (math.sqrt(alpha_bar_next) * x0
             + math.sqrt(max(1 - alpha_bar_next - sigma ** 2, 0.0)) * eps + sigma * z)
        on_step()
    if 0 in keep_at:
        kept[0] = x.clone()
    return x, kept


def sample(model: Diffusion, settings: DDPMSettings, labels: torch.Tensor, seed: int,
           stream: str, keep_at=(), on_step=lambda: None) -> tuple[torch.Tensor, dict]:
    """Images of the given labels by settings.sampler (x_T and z from the fixed stream
    `stream` of seed), and the x_t kept at keep_at; the labels go to the model's device."""
    device = next(model.parameters()).device
    labels, noise = labels.to(device), training.fixed_random(seed, stream, device)
    if settings.sampler == "ddpm":
        return sample_ddpm(model, labels, settings.guidance, noise, keep_at, on_step)
    if settings.sampler == "ddim":
        return sample_ddim(model, labels, settings.guidance, noise,
                           settings.sampling_steps, settings.eta, keep_at, on_step)
    raise UserError(f"unknown --sampler '{settings.sampler}': use ddim or ddpm")


def label_batches(labels: torch.Tensor, stream: str, batch_size: int = 500) -> list:
    """Sampling in batches: (labels, stream) of each, the batch that starts at image i
    drawing from the fixed stream "{stream} {i}", so an image's noise depends on its
    place in the list, not on how the batches are shared among processes."""
    return [(labels[i:i + batch_size], f"{stream} {i}")
            for i in range(0, len(labels), batch_size)]


def reverse_process(model: Diffusion, settings: DDPMSettings, seed: int, frames: int = 20):
    """The pictures' images: 100 samples, ten of each digit (row d: digit d), and x_t of
    the first sample of each digit at frames + 1 evenly spaced timesteps from T to 0 (for
    DDIM, the visited timesteps nearest to them): (images (100, 3, 28, 28), timesteps,
    chain (frames + 1, 10, 3, 28, 28))."""
    labels = torch.arange(CLASSES).repeat_interleave(10)
    T = settings.timesteps
    keep_at = [round(T * k / frames) for k in range(frames, -1, -1)]     # T .. 0
    if settings.sampler == "ddim":  # DDIM visits only its own timesteps: take the nearest
        visited = ddim_timesteps(T, settings.sampling_steps) + [0]
        keep_at = [min(visited, key=lambda s: abs(s - k)) for k in keep_at]
    images, kept = sample(model, settings, labels, seed, "reverse process",
                          keep_at=set(keep_at))
    return images.cpu(), keep_at, torch.stack([kept[k][::10].clamp(-1, 1).cpu()
                                               for k in keep_at])


def course_digits(model: Diffusion, settings: DDPMSettings, seed: int, folder: Path,
                  per_digit: int = 100) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The homework's deliverable: per_digit images of each digit in folder, named
    0_001.png .. 9_100.png, timed: (images, labels, seconds)."""
    names, labels = reports.course_names(per_digit)
    images, seconds = reports.save_course_digits(
        lambda batch, on_step: sample(model, settings, batch[0], seed, batch[1],
                                      on_step=on_step)[0],
        label_batches(labels, "course digits"), sampler_steps(settings), folder, names,
        desc=f"{settings.sampler} sampling")
    return images, labels, seconds


# ============================================================================ training
def learning_rate(settings: DDPMSettings, index: int) -> float:
    """The lr of step k = index: lr min(1, (k + 1) / WARM_UP_STEPS), a linear warm-up, times 1
    (constant) or times (1 + cos(pi k / steps)) / 2 (cosine, from 1 at k = 0 to 0 at
    k = steps; its peak, at the warm-up's end, is 0.96 lr for 4,000 steps)."""
    warm_up = min(1.0, (index + 1) / WARM_UP_STEPS)
    if settings.lr_schedule == "constant":
        return settings.lr * warm_up
    if settings.lr_schedule == "cosine":
        return settings.lr * warm_up * (1 + math.cos(math.pi * index / settings.steps)) / 2
    raise UserError(f"unknown --lr-schedule '{settings.lr_schedule}': use constant or cosine")


def resumable_changes(settings: DDPMSettings) -> tuple[str, ...]:
    """The settings a --resume may change: sampling, and the length of the run, unless a
    cosine lr depends on it (a new --steps would make the lr jump back up)."""
    length = ("steps",) if settings.lr_schedule == "constant" else ()
    return length + ("sample_every", "fid_every", "classifier", "sampler", "sampling_steps",
                     "eta", "guidance")


def train(digits: data.ImageSet, real_test: data.ImageSet | None, settings: DDPMSettings,
          out: Path, device, seed: int, cache_dir=None, weights=None) -> dict:
    """Adam at learning_rate(settings, step) on the loss, an EMA of the weights for
    sampling; every sample_every steps a checkpoint, the grid, the reverse process and
    the loss curve, every fid_every steps the FID, KID and digit accuracy of fid_images
    digits; then the 1000 images, their grades and results.json."""
    if digits.labels is None:
        raise UserError(f"{settings.data} has no labels: the conditional DDPM needs them")
    training.seed_weights(seed)
    model = Diffusion(settings).to(device)
    parallel.distribute(model)  # under torchrun: the U-Net's gradients averaged in backward
    optimizer = torch.optim.Adam(model.network.parameters(), settings.lr)
    digits = digits.to(device)
    fid = metrics.fid_tracker(real_test, settings.fid_images,
                              metrics.fid_period(settings.fid_every, settings.sample_every),
                              device, cache_dir, weights)
    # with --resume, every part of `state` comes back from the checkpoint here
    run = training.Run(out, "ddpm", settings, seed, device,
                       state={"model": model, "optimizer": optimizer},
                       steps=settings.steps, every=settings.sample_every, desc="DDPM",
                       may_change=resumable_changes(settings))
    # the training streams (training.py): which digits; t, eps and the dropped labels
    # (dropout draws from torch's own)
    data_order, noise = run.random("data"), run.random("noise")
    for step in run:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(settings, step)
        indices = data_order.indices(len(digits), settings.batch_size)  # this process's share
        model.network.train()  # dropout on
        loss = model.loss(digits.images(indices), digits.labels[indices], noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.update_ema(step)
        run.log({"loss": loss})
        if run.at_checkpoint:  # every sample_every steps, and after the last
            if fid.due(step + 1, settings.steps):
                # FID digits: classes 0..9 in turn, from a stream apart from the 1000's;
                # the classifier grades them too
                labels = torch.arange(settings.fid_images) % CLASSES
                images = fid.measure(run.history, step + 1, lambda batch: sample(
                    model, settings, batch[0], seed, batch[1])[0], label_batches(labels, "fid"))
                metrics.record(run.history, {"digit_accuracy": classifier.grade(
                    images, labels, settings.classifier, device)["digit_accuracy"]})
            run.save_checkpoint()  # after the FID: best.pt is the lowest FID's
            reports.ddpm_pictures(out, settings, run.history, fid, sampler_steps(settings),
                                  *reverse_process(model, settings, seed))
    images, labels, seconds = course_digits(model, settings, seed, Path(out) / "images")
    grades = classifier.grade(images, labels, settings.classifier, device)  # digit accuracy
    return reports.ddpm_results(out, settings, run, fid, images, grades, seconds,
                                sampler_steps(settings))


def load(path, device) -> tuple[Diffusion, DDPMSettings]:
    return util.load_trained(path, device, DDPMSettings, Diffusion, "model", "ddpm")


def summary(settings: DDPMSettings) -> str:
    """The U-Net's layer table, as `run.py summary ddpm` prints it (for t = 1, c = 0)."""
    unet = nets.UNet(width=settings.width, classes=CLASSES)
    return "ddpm: U-Net eps_theta(x_t, t, c)\n" + nets.summary(
        unet, IMAGE_SHAPE, extra_inputs=(torch.tensor(1), torch.tensor(0)))
