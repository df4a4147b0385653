"""Measuring generated images: FID with a from-scratch Inception network.

Frechet Inception Distance (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update
Rule Converge to a Local Nash Equilibrium"): fit a Gaussian to the 2,048-d pool3 features
of real and of generated images and measure

    FID = ||mu_r - mu_g||^2 + Tr(S_r) + Tr(S_g) - 2 Tr((S_r S_g)^(1/2)).

The features must come from *the* network everyone uses, or numbers are not comparable:
the TensorFlow Inception-v3 graph of 2015-12-05 (Szegedy et al. 2016, "Rethinking the
Inception Architecture for Computer Vision") as ported to PyTorch by pytorch-fid. It differs
from torchvision's Inception-v3 in three places, marked FID below: average pools in the
mixed blocks exclude padding from the mean, the last block pools with a max, and the
classifier has 1,008 classes. Batch norm uses eps = 0.001 throughout.

Generated digits are graded by a small CNN classifier trained on real digits
(`train_classifier`): the share of generated images it reads as the digit they were
generated for is the "digit accuracy" that the DLCV homework grades.
"""
import hashlib
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import nets
import parallel
import plots
import util
from util import UserError

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
FID_WEIGHTS_SHA256_PREFIX = "6726825d"  # the file name carries its SHA-256's first 8 digits


# ============================================================================ Inception
class BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm (eps 1e-3) -> ReLU: the unit every block is made of."""

    def __init__(self, c_in, c_out, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x):
    # FID: the TF graph averages over the valid pixels only at the borders
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block: 1x1 | 1x1->5x5 | 1x1->3x3->3x3 | avgpool->1x1."""

    def __init__(self, c_in, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, 1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, 1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool_3x3(x))], 1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17: 3x3/2 | 1x1->3x3->3x3/2 | maxpool/2."""

    def __init__(self, c_in):
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (1x7 then 7x1)."""

    def __init__(self, c_in, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x):
        double = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                      self.branch7x7dbl_4, self.branch7x7dbl_5):
            double = layer(double)
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            double,
            self.branch_pool(_avg_pool_3x3(x))], 1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8: 1x1->3x3/2 | 1x1->1x7->7x1->3x3/2 | maxpool/2."""

    def __init__(self, c_in):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        seven = self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x)))
        return torch.cat([
            self.branch3x3_2(self.branch3x3_1(x)),
            self.branch7x7x3_4(seven),
            F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """8x8 block whose 3x3 branches fan out into parallel 1x3 and 3x1 convolutions.

    FID: the first E block (Mixed_7b) average-pools without padding, the second
    (Mixed_7c) max-pools in its pool branch."""

    def __init__(self, c_in, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(c_in, 320, 1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x):
        single = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = (_avg_pool_3x3(x) if self.pool == "avg"
                  else F.max_pool2d(x, 3, stride=1, padding=1))
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(single), self.branch3x3_2b(single),
            self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double),
            self.branch_pool(pooled)], 1)


class FIDInception(nn.Module):
    """Inception-v3 as the FID standard uses it; state-dict keys equal pytorch-fid's file.

    forward(images in [0, 1], any size) -> (N, 2048) pool3 features. The images are
    resized to 299x299 (bilinear, align_corners=False) and scaled to [-1, 1] first.
    `blocks(x)` returns the four stages pytorch-fid exposes (64, 192, 768, 2048 channels)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)  # FID: the TF graph has 1,008 classes

    def blocks(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1                                                      # (N, 3, 299, 299)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        block0 = F.max_pool2d(x, 3, stride=2)                              # (N, 64, 73, 73)
        block1 = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(block0)), 3, stride=2)
        x = block1                                                         # (N, 192, 35, 35)
        for mixed in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a,
                      self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e):
            x = mixed(x)
        block2 = x                                                         # (N, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(block2)))            # (N, 2048, 8, 8)
        block3 = x.mean(dim=(2, 3))                                        # (N, 2048)
        return [block0, block1, block2, block3]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.blocks(images)[3]

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward(images))


def fid_weights(cache_dir=None) -> Path:
    """The pytorch-fid weights file in the cache (data.cache_folder): downloaded once,
    its SHA-256 prefix checked."""
    folder = data.cache_folder(cache_dir)
    if folder is None:
        raise UserError("FID needs the Inception weights, and --cache '' leaves no place to "
                        "keep them: pass --weights FILE (run.py fid) or a --cache folder")
    path = folder / Path(FID_WEIGHTS_URL).name
    if not path.exists():
        data.download_file([FID_WEIGHTS_URL], path, md5=None)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if not digest.startswith(FID_WEIGHTS_SHA256_PREFIX):
            path.unlink()
            raise UserError(f"the FID weights downloaded from {FID_WEIGHTS_URL} are corrupt "
                            f"(sha256 {digest[:8]}...): run again, or fetch the file by hand "
                            f"and save it as {path}")
    return path


def load_fid_inception(cache_dir=None, device="cpu", weights=None) -> FIDInception:
    """The FID network with the weights file `weights`, or the cached/downloaded one."""
    with parallel.main_first():  # under torchrun rank 0 downloads, the others then read
        path = Path(weights) if weights else fid_weights(cache_dir)
    if not path.is_file():
        raise UserError(f"FID weights {path} not found: give the pytorch-fid file "
                        f"{Path(FID_WEIGHTS_URL).name} (--weights FILE)")
    network = FIDInception()
    try:
        network.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as error:  # garbage, a foreign checkpoint, or another network's weights
        raise UserError(f"{path} is not the pytorch-fid Inception weights "
                        f"({type(error).__name__}): use {Path(FID_WEIGHTS_URL).name}") from None
    network.weights_file = path
    return for_inference(network, device)


def for_inference(network: FIDInception, device) -> FIDInception:
    """Evaluation mode, on the device, channels-last: the convolutions' fastest layout on
    CPUs and on tensor cores (1.5 times the speed of NCHW on the 2-core CPU)."""
    return network.eval().to(device, memory_format=torch.channels_last)


# ============================================================================ FID
@torch.inference_mode()
def inception_features(network: FIDInception, images: torch.Tensor, batch_size: int = 50,
                       device="cpu") -> np.ndarray:
    """(N, 3, H, W) images in [-1, 1] (the project's convention) -> (N, 2048) float64.
    Always float32: under bfloat16 autocast features (mean 0.19) moved by up to 0.1."""
    def features_of(start: int) -> torch.Tensor:                        # (batch, 2048)
        batch = images[start:start + batch_size].to(device, torch.float32)
        batch = ((batch + 1) / 2).contiguous(memory_format=torch.channels_last)
        return network(batch).double()
    # under torchrun the batches are split across the processes, gathered in order
    return torch.cat(parallel.in_order(features_of, range(0, len(images), batch_size),
                                       "inception features")).numpy()


def gaussian_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (divide by N - 1, as numpy.cov) of (N, D) features."""
    features = np.asarray(features, np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2)), in float64.

    S1 S2 is not symmetric, but it is similar to the symmetric PSD matrix
    A = S1^(1/2) S2 S1^(1/2), so Tr((S1 S2)^(1/2)) = sum_i sqrt(lambda_i(A)). Both square
    roots come from symmetric eigendecompositions, whose tiny negative eigenvalues (rank
    deficiency: fewer images than 2,048 features) are clipped to zero; no complex
    numbers, no ill-conditioned general matrix square root."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    eigenvalues, eigenvectors = np.linalg.eigh(sigma1)
    sqrt_sigma1 = (eigenvectors * np.sqrt(eigenvalues.clip(min=0))) @ eigenvectors.T
    middle = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    trace_sqrt = np.sqrt(np.linalg.eigvalsh((middle + middle.T) / 2).clip(min=0)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def image_statistics(images: torch.Tensor, network: FIDInception, batch_size: int = 50,
                     device="cpu") -> tuple[np.ndarray, np.ndarray]:
    """mu and sigma of the pool3 features of images in [-1, 1]."""
    if len(images) < 2:
        raise UserError(f"FID needs at least 2 images, got {len(images)}")
    return gaussian_statistics(inception_features(network, images, batch_size, device))


class FIDTracker:
    """FID while a model trains: at chosen steps, FID of `count` generated images against
    the held-out images, into the run's history (history["fid"], history["fid_step"]).

    The held-out side never changes, so its statistics are computed once and kept in the
    cache, keyed by the images' pixels and the weights file: a second run pays nothing
    for them. Each evaluation then costs `count` forward passes of Inception."""

    def __init__(self, real: "data.ImageSet", count: int, every: int, device,
                 cache_dir=None, weights=None):
        self.network = load_fid_inception(cache_dir, device, weights)
        self.count, self.every, self.device = count, every, device
        self.weights = weights_label(self.network.weights_file)
        self.real_mu, self.real_sigma, self.real_count = real_statistics(
            real, self.network, self.weights, cache_dir, device)
        self.seconds = 0.0  # spent on the generated side since this process started

    def due(self, step: int, last: int) -> bool:
        """Is an FID measurement due at this step (every `every` steps, and the last)?"""
        return step % self.every == 0 or step == last

    def score(self, fake: torch.Tensor) -> float:
        """FID of fake images in [-1, 1] against the held-out images."""
        start = time.perf_counter()
        fid = frechet_distance(*image_statistics(fake, self.network, device=self.device),
                               self.real_mu, self.real_sigma)
        self.seconds += time.perf_counter() - start
        return fid

    def add(self, history: dict, step: int, fake: torch.Tensor) -> float:
        """FID of `fake` (count images) into the history at `step`."""
        fid = self.score(fake)
        history.setdefault("fid", []).append(fid)
        history.setdefault("fid_step", []).append(step)
        return fid

    def draw(self, history: dict, path, title: str):
        plots.line_plot({f"FID, {self.count} samples": history["fid"]}, path,
                        title=f"{title}: FID against {self.real_count} held-out images",
                        xlabel="step", x=history["fid_step"])

    def results(self, history: dict) -> dict:
        """The final and the best FID of the curve, for results.json."""
        if not history.get("fid"):
            return {"fid": None, "fid_unavailable": "no FID evaluation was due"}
        best = int(np.argmin(history["fid"]))
        return {"fid": history["fid"][-1], "best_fid": history["fid"][best],
                "best_fid_step": history["fid_step"][best], "fid_images": self.count,
                "fid_real_images": self.real_count, "fid_weights": self.weights,
                "fid_seconds": self.seconds,
                "fid_curve": {"images": self.count, "step": history["fid_step"],
                              "fid": history["fid"]}}


def fid_tracker(real, count: int, every: int, device, cache_dir=None, weights=None):
    """(tracker, None), or (None, {"fid": None, "fid_unavailable": reason}) when there is
    nothing to measure against or the weights cannot be had (offline, no --weights): the
    run still trains and saves its results."""
    if not count or real is None:
        return None, {"fid": None, "fid_unavailable": "not asked for"}
    try:
        return FIDTracker(real, count, every, device, cache_dir, weights), None
    except UserError as error:
        if weights:  # a file the user named must work
            raise
        return None, {"fid": None, "fid_unavailable": str(error)}


def weights_label(path: Path) -> str:
    """'name (sha256 1234abcd)': which weights file produced a figure."""
    return f"{Path(path).name} (sha256 {hashlib.sha256(Path(path).read_bytes()).hexdigest()[:8]})"


def real_statistics(real: "data.ImageSet", network: FIDInception, weights: str, cache_dir,
                    device):
    """(mu, sigma, N) of the held-out images, from the cache when it has them (keyed by
    their pixels and shape, and by the weights file's label)."""
    key = hashlib.sha256(real.pixels.cpu().numpy().tobytes())
    key.update(f"{tuple(real.pixels.shape)} {weights}".encode())
    folder = data.cache_folder(cache_dir)
    path = folder / f"fid_real_{key.hexdigest()[:16]}.npz" if folder else None

    def cached():
        if path is None or not path.exists():
            return None
        try:
            stored = util.read_arrays(path, "it is computed again")
            return stored["mu"], stored["sigma"], int(stored["count"])
        except UserError as error:
            print(f"cache file {path} is damaged ({error}): deleting it", file=sys.stderr)
            path.unlink(missing_ok=True)
    # under torchrun rank 0 looks, and every process computes when it found nothing
    stored = parallel.from_main(cached)
    if stored is not None:
        return stored
    mu, sigma = image_statistics(real.images(), network, device=device)
    if path is not None:
        util.write_arrays({"mu": mu, "sigma": sigma, "count": len(real)}, path)
    return mu, sigma, len(real)


def load_statistics(path, network_factory, batch_size=50, device="cpu", image_size=None,
                    cache_dir=None) -> tuple[np.ndarray, np.ndarray, int | None]:
    """A PATH of `run.py fid`: a saved .npz of mu and sigma, or a folder of images.
    Returns mu, sigma and the side of the folder's images (None for an .npz)."""
    path = Path(path)
    if path.suffix == ".npz" and path.is_file():
        stored = util.read_arrays(path, "write it again with 'run.py fid --save-stats'")
        if "mu" not in stored or "sigma" not in stored:
            raise UserError(f"{path} holds no 'mu' and 'sigma': write it with "
                            "'run.py fid --save-stats FOLDER OUT.npz'")
        return stored["mu"], stored["sigma"], None
    if not path.is_dir():
        raise UserError(f"{path} is neither a folder of images nor a statistics .npz file")
    images = data.load(str(path), "train", image_size=image_size, cache_dir=cache_dir)
    return (*image_statistics(images.images(), network_factory(), batch_size, device),
            images.image_size)


# ============================================================================ digit classifier
@dataclass
class ClassifierSettings:
    """How the digit evaluator is trained (flags of `run.py classifier`)."""
    data: str = field(default="mnistm", metadata={"help": "digits to train on"})
    epochs: int = field(default=12, metadata={"help": "passes over the training set"})
    batch_size: int = field(default=128, metadata={
        "help": "images per step, the global batch: under torchrun each of N processes "
                "takes 1/N of it"})
    lr: float = field(default=2e-3, metadata={"help": "peak AdamW learning rate"})
    weight_decay: float = field(default=5e-4, metadata={"help": "AdamW weight decay"})
    shift: float = field(default=0.1, metadata={
        "help": "random translation, as a fraction of the image side (augmentation)"})
    resume: bool = field(default=False, metadata={"help": "continue from checkpoint.pt"})


def random_shift(images: torch.Tensor, fraction: float, generator=None) -> torch.Tensor:
    """Translate each image by up to +-fraction of its side (reflecting at the borders).

    affine_grid works in normalised coordinates [-1, 1], where a shift t moves the image
    by t / 2 of its side, hence the factor 2."""
    if fraction <= 0:
        return images
    count = len(images)
    shifts = (torch.rand(count, 2, generator=generator) * 2 - 1) * 2 * fraction
    theta = torch.zeros(count, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, :, 2] = shifts
    grid = F.affine_grid(theta.to(images.device), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, padding_mode="reflection", align_corners=False)


@torch.no_grad()
def predict(network: nn.Module, images: "data.ImageSet", batch_size: int = 500,
            device="cpu") -> torch.Tensor:
    """Predicted class of every image, in order."""
    network.eval()
    return torch.cat([network(batch.to(device)).argmax(dim=1).cpu()
                      for batch, _ in images.batches(batch_size, shuffle=False)])


def accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> tuple[float, int, int]:
    correct = int((predictions == labels.cpu()).sum())
    return correct / max(len(labels), 1), correct, len(labels)


def train_classifier(train: "data.ImageSet", test: "data.ImageSet",
                     settings: ClassifierSettings, out: Path, device, seed: int) -> dict:
    """Supervised training with AdamW, a one-cycle learning rate and label smoothing 0.1.

    Each epoch's data order, augmentation and dropout are seeded by (seed, epoch), so a
    run resumed from its checkpoint ends with the same weights as an uninterrupted one."""
    out = Path(out)
    util.seed_everything(seed)  # the initial weights
    network = parallel.share_batch_layers(nets.digit_classifier(classes=len(train.classes))
                                        .to(device))
    replica = parallel.replica(network)  # under torchrun: gradients averaged in backward
    optimizer = torch.optim.AdamW(network.parameters(), settings.lr,
                                  weight_decay=settings.weight_decay)
    steps_per_epoch = -(-len(train) // settings.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, settings.lr,
                                                   total_steps=settings.epochs * steps_per_epoch)
    train_on_device = train.to(device)
    epoch = {}  # this epoch's random stream and batches

    def step(index: int) -> dict:
        if index % steps_per_epoch == 0:
            epoch_seed = util.stream_seed(seed, index // steps_per_epoch)
            epoch["rng"] = torch.Generator().manual_seed(epoch_seed)
            torch.manual_seed(epoch_seed)  # dropout
            epoch["batches"] = train_on_device.batches(settings.batch_size,
                                                       generator=epoch["rng"])
        images, labels = next(epoch["batches"])
        network.train()
        images = random_shift(images, settings.shift, epoch["rng"])
        images, labels = parallel.rows(images), parallel.rows(labels)  # this process's share
        loss = F.cross_entropy(replica(images), labels, label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        return {"train_loss": loss}

    def evaluate(history: dict):
        history.setdefault("test_accuracy", []).append(
            accuracy(predict(network, test, device=device), test.labels)[0])

    def draw(history: dict):
        plots.line_plot({"train loss": history["train_loss"]}, out / "loss.png",
                        title="digit classifier: training loss", xlabel="epoch")
        plots.line_plot({"test accuracy": history["test_accuracy"]}, out / "accuracy.png",
                        title="digit classifier: test accuracy", xlabel="epoch")

    util.train_loop(step, settings.epochs * steps_per_epoch, steps_per_epoch, out,
                    "classifier", settings, seed, device, desc="classifier",
                    parts={"network": network, "optimizer": optimizer, "schedule": schedule},
                    record={"classes": train.classes}, evaluate=evaluate, draw=draw)
    _, correct, total = accuracy(predict(network, test, device=device), test.labels)
    results = {"data": settings.data, "test_accuracy": correct / total, "correct": correct,
               "total": total, "epochs": settings.epochs, "seed": seed}
    util.write_json(results, out / "results.json")
    return results


def load_classifier(path, device="cpu") -> nn.Module:
    state = util.checkpoint_of(path, device, "classifier")
    network = nets.digit_classifier(classes=len(state["classes"]))
    network.load_state_dict(state["network"])
    return network.to(device).eval()


def label_from_name(name: str) -> int:
    """The homework's naming of generated digits: DIGIT_*.png, digit and underscore first."""
    if not (name[:1].isdigit() and name[1:2] == "_"):
        raise UserError(f"file '{name}' is not named by its digit: name each image "
                        "DIGIT_*.png, e.g. 3_042.png for a 3")
    return int(name[0])


# ============================================================================ face rate
# The course's second GAN metric: the share of generated images in which a face detector
# finds a face. The detector is that of Dalal & Triggs (CVPR 2005, "Histograms of
# Oriented Gradients for Human Detection"), written out at the size of these faces:
# 1. gradients by the centred differences [-1, 0, 1]; of a colour image, at each pixel
#    the channel with the largest gradient magnitude;
# 2. each pixel votes its magnitude into 9 orientation bins over 0..180 degrees (the sign
#    of a gradient says little: dark hair on light skin or light on dark), split linearly
#    between the two nearest bin centres. The paper also splits each vote between the
#    neighbouring cells and weights blocks by a Gaussian; these small images do without;
# 3. votes summed over cells of 4x4 pixels (the paper's 8x8 at half its window size);
# 4. blocks of 2x2 cells, overlapping by one cell, each normalised by L2-Hys: divided by
#    its L2 norm, clipped at 0.2, divided again (one of the paper's best schemes): local
#    contrast no longer matters, only the shape of the edges;
# 5. a linear SVM on the 7x7 blocks of a 32x32 window, trained on face windows and
#    non-face windows, then retrained twice, each time with the non-face windows it
#    scored highest added (hard negatives; the paper retrains once);
# 6. a sliding window (one cell apart) over a small pyramid of the image (three scales,
#    where the paper uses many, 1.05 apart, and merges overlapping detections: a face
#    rate needs only yes or no): a face is found where any window scores above a
#    threshold. The SVM's own threshold, 0, let through one MNIST-M digit in ten; the
#    threshold is set instead on images kept out of the SVM's training, so that 2% of
#    those non-faces pass.
# Everything here runs on the CPU: a face rate of 1000 images takes seconds.
HOG_CELL, HOG_BINS, HOG_WINDOW = 4, 9, 32
HOG_FEATURES = 4 * HOG_BINS * (HOG_WINDOW // HOG_CELL - 1) ** 2  # 36 x 7 x 7 blocks = 1764
IMAGE_SIDE = 64         # every image is brought to 64x64 first (faces, digits, GAN samples)
PYRAMID = (32, 40, 48)  # then to these sides: a face of 100%, 80% or 67% of the image
DETECTOR_DATA = {"faces": "celeba", "non_faces": "mnistm"}


def gradients(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C, H, W) -> magnitude and unsigned orientation in [0, pi), each (N, H, W);
    the image border is repeated, so border pixels get one-sided differences."""
    padded = F.pad(images, (1, 1, 1, 1), mode="replicate")
    gx = padded[..., 1:-1, 2:] - padded[..., 1:-1, :-2]        # I(y, x + 1) - I(y, x - 1)
    gy = padded[..., 2:, 1:-1] - padded[..., :-2, 1:-1]        # I(y + 1, x) - I(y - 1, x)
    magnitude = torch.hypot(gx, gy)
    strongest = magnitude.argmax(dim=1, keepdim=True)          # the channel with most edge
    gx, gy, magnitude = (t.gather(1, strongest).squeeze(1) for t in (gx, gy, magnitude))
    return magnitude, torch.atan2(gy, gx) % math.pi


def cell_histograms(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, 9, H / 4, W / 4): per cell, the magnitudes voted by orientation.
    Bin k is centred at (k + 1/2) 20 degrees; a pixel at angle a gives its magnitude to
    the two centres around a, in proportion to how near it is (0 and 180 are neighbours)."""
    magnitude, angle = gradients(images)
    position = angle / (math.pi / HOG_BINS) - 0.5             # in bin widths from centre 0
    lower = position.floor()
    upper_share = (position - lower)[:, None]                  # (N, 1, H, W)
    lower = lower.long()[:, None] % HOG_BINS
    votes = torch.zeros(magnitude.shape[0], HOG_BINS, *magnitude.shape[1:],
                        device=images.device)
    votes.scatter_add_(1, lower, magnitude[:, None] * (1 - upper_share))
    votes.scatter_add_(1, (lower + 1) % HOG_BINS, magnitude[:, None] * upper_share)
    return F.avg_pool2d(votes, HOG_CELL) * HOG_CELL ** 2      # sums over each cell


def block_features(histograms: torch.Tensor, eps: float = 1e-2) -> torch.Tensor:
    """(N, 9, Cy, Cx) cells -> (N, 36, Cy - 1, Cx - 1) L2-Hys normalised 2x2 blocks:
    v / sqrt(||v||^2 + eps^2), clipped at 0.2, then normalised the same way again.
    eps only matters in flat regions: a cell of an edge holds sums of tens (pixels in
    [-1, 1], differences up to 2, 16 pixels)."""
    h = histograms
    blocks = torch.cat([h[..., :-1, :-1], h[..., :-1, 1:], h[..., 1:, :-1], h[..., 1:, 1:]],
                       dim=1)
    for clip in (0.2, None):
        blocks = blocks / (blocks.pow(2).sum(dim=1, keepdim=True) + eps ** 2).sqrt()
        if clip:
            blocks = blocks.clamp(max=clip)
    return blocks


def window_features(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) with sides of at least 32 -> (N, L, 1764): the HOG features of every
    32x32 window, one cell (4 pixels) apart; a 32x32 image has one window."""
    blocks = block_features(cell_histograms(images))
    span = HOG_WINDOW // HOG_CELL - 1                          # 7 blocks a window side
    return F.unfold(blocks, span).transpose(1, 2)              # (N, L, 36 * 7 * 7)


def resized(images: torch.Tensor, side: int) -> torch.Tensor:
    return F.interpolate(images, size=(side, side), mode="bilinear", antialias=True,
                         align_corners=False)


def pyramid_features(images: torch.Tensor) -> torch.Tensor:
    """(N, C, S, S) -> (N, 1 + 9 + 25, 1764): every window of the 32, 40 and 48 pixel
    versions of each image (brought to 64x64 first, whatever its size)."""
    images = resized(images, IMAGE_SIDE)
    return torch.cat([window_features(resized(images, side)) for side in PYRAMID], dim=1)


class FaceDetector(nn.Module):
    """A linear SVM on HOG windows, slid over a pyramid of each image."""

    def __init__(self):
        super().__init__()
        self.svm = nn.Linear(HOG_FEATURES, 1)
        self.register_buffer("threshold", torch.zeros(()))

    @torch.no_grad()
    def scores(self, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        """(N,): the best window's score of each image in [-1, 1]."""
        return torch.cat([self.svm(pyramid_features(images[i:i + batch_size])).amax(dim=1)
                          .squeeze(1) for i in range(0, len(images), batch_size)])

    def detect(self, images: torch.Tensor) -> torch.Tensor:
        """(N,) bool: is a face found anywhere in the image?"""
        return self.scores(images) > self.threshold


def fit_svm(svm: nn.Linear, features: torch.Tensor, is_face: torch.Tensor,
            penalty: float = 1e-4, iterations: int = 300):
    """Soft-margin linear SVM: min_w,b  mean over faces + mean over non-faces of
    max(0, 1 - y (w.x + b))^2  +  penalty ||w||^2,  y = +1 face, -1 non-face. The squared
    hinge is smooth, so L-BFGS solves it on the full set; each class counts the same,
    however many windows it has. (penalty and iterations: a light ridge on 1764
    features, and enough L-BFGS steps to converge on some 30,000 windows.)"""
    y = is_face.float() * 2 - 1
    optimizer = torch.optim.LBFGS(svm.parameters(), max_iter=iterations,
                                  line_search_fn="strong_wolfe")

    def objective():
        optimizer.zero_grad()
        hinge = F.relu(1 - y * svm(features).squeeze(1)).pow(2)
        loss = (hinge[is_face].mean() + hinge[~is_face].mean()
                + penalty * svm.weight.pow(2).sum())
        loss.backward()
        return loss
    optimizer.step(objective)


def face_windows(faces: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Positive examples: each face three times, as squares of 88%, 94% and 100% of its
    side (for each size one random place, the same for all faces: faces are aligned),
    mirrored half the time, resized to the 32x32 window."""
    side, crops = faces.shape[-1], []
    for crop in (int(side * 0.88), int(side * 0.94), side):
        top, left = torch.randint(0, side - crop + 1, (2,), generator=generator).tolist()
        crops.append(resized(faces[..., top:top + crop, left:left + crop], HOG_WINDOW))
    windows = torch.cat(crops)
    mirrored = torch.rand(len(windows), generator=generator) < 0.5
    windows[mirrored] = windows[mirrored].flip(-1)
    return windows


def scrambled(faces: torch.Tensor, generator: torch.Generator, tiles: int = 4) -> torch.Tensor:
    """Non-faces with a face's colours and textures: each face cut into tiles x tiles
    squares put back in a random order (one order per image)."""
    count, channels, side, _ = faces.shape
    t = side // tiles
    squares = faces.reshape(count, channels, tiles, t, tiles, t).permute(0, 2, 4, 1, 3, 5)
    squares = squares.reshape(count, tiles * tiles, channels, t, t)
    order = torch.rand(count, tiles * tiles, generator=generator).argsort(dim=1)
    squares = squares[torch.arange(count)[:, None], order]
    squares = squares.reshape(count, tiles, tiles, channels, t, t).permute(0, 3, 1, 4, 2, 5)
    return squares.reshape(count, channels, side, side)


def non_face_images(faces: torch.Tensor, backgrounds: torch.Tensor,
                    generator: torch.Generator) -> torch.Tensor:
    """Whole 64x64 images without a face: the backgrounds (e.g. MNIST-M digits, whose
    backgrounds are natural-image patches) and the faces scrambled."""
    return torch.cat([resized(backgrounds, IMAGE_SIDE),
                      scrambled(resized(faces, IMAGE_SIDE), generator)])


def hardest_windows(detector: FaceDetector, images: torch.Tensor, per_image: int = 5,
                    batch_size: int = 250) -> torch.Tensor:
    """The features of the per_image highest-scoring windows of each image without a
    face: (N * per_image, 1764)."""
    chosen = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            features = pyramid_features(images[i:i + batch_size])           # (n, 35, 1764)
            top = detector.svm(features).squeeze(-1).topk(per_image, dim=1).indices
            chosen.append(features[torch.arange(len(top))[:, None], top].flatten(0, 1))
    return torch.cat(chosen)


def train_face_detector(faces: torch.Tensor, backgrounds: torch.Tensor, seed: int,
                        false_alarms: float = 0.02, rounds: int = 3) -> FaceDetector:
    """faces (N, 3, S, S) and face-free backgrounds in [-1, 1], at least 10 of each, on
    the CPU -> a trained detector: an SVM on jittered face windows against whole
    non-face images at window size, retrained rounds - 1 times with the 5 highest-scoring
    windows of each non-face image added; then the threshold that lets through
    `false_alarms` of the non-faces made from the last tenth of each set, which the SVM
    never saw."""
    if min(len(faces), len(backgrounds)) < 10:
        raise UserError(f"the face detector needs at least 10 faces and 10 backgrounds, got "
                        f"{len(faces)} and {len(backgrounds)}")
    generator = torch.Generator().manual_seed(seed)  # jitter, mirroring, scrambling
    torch.manual_seed(seed)                          # the SVM's initial weights
    calibration_faces, calibration_backgrounds = len(faces) // 10, len(backgrounds) // 10
    calibration = non_face_images(faces[len(faces) - calibration_faces:],
                                  backgrounds[len(backgrounds) - calibration_backgrounds:],
                                  generator)
    faces = faces[:len(faces) - calibration_faces]
    backgrounds = backgrounds[:len(backgrounds) - calibration_backgrounds]
    detector = FaceDetector()
    positives = window_features(face_windows(faces, generator)).squeeze(1)
    non_faces = non_face_images(faces, backgrounds, generator)
    negatives = window_features(resized(non_faces, HOG_WINDOW)).squeeze(1)
    for round_ in range(rounds):
        if round_:  # the windows of non-faces that the last SVM scored highest
            negatives = torch.cat([negatives, hardest_windows(detector, non_faces)])
        features = torch.cat([positives, negatives])
        fit_svm(detector.svm, features, torch.arange(len(features)) < len(positives))
    detector.threshold.fill_(detector.scores(calibration).quantile(1 - false_alarms).item())
    return detector


def face_rates(detector: FaceDetector, faces: torch.Tensor, backgrounds: torch.Tensor,
               seed: int) -> dict:
    """The detector's held-out check: share of faces found, and of non-faces (the
    backgrounds, and the faces scrambled) wrongly called faces."""
    scrambled_faces = scrambled(resized(faces, IMAGE_SIDE), torch.Generator().manual_seed(seed))
    return {"faces_detected": detector.detect(faces).float().mean().item(),
            "backgrounds_detected": detector.detect(backgrounds).float().mean().item(),
            "scrambled_detected": detector.detect(scrambled_faces).float().mean().item()}


def save_face_detector(detector: FaceDetector, rates: dict, path) -> Path:
    return util.save_checkpoint({"command": "facerate", "settings": {}, "detector":
                                 detector.state_dict(), "held_out": rates}, path)


def load_face_detector(path, device="cpu") -> FaceDetector:
    state = util.checkpoint_of(path, device, "facerate")
    detector = FaceDetector()
    detector.load_state_dict(state["detector"])
    return detector.to(device).eval()
