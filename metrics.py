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

FID's estimate from N images is biased: it exceeds the FID of the two distributions by
about k / N (the mean's noise adds Tr(S_g) / N to ||mu_r - mu_g||^2 on average, and the
square root of a noisy covariance is smaller on average), k depending on the model, so
FIDs of 500 and of 10,000 samples do not compare. Two figures that do:

KID, Kernel Inception Distance (Binkowski et al. 2018, "Demystifying MMD GANs"): the
squared maximum mean discrepancy between the two feature distributions under the cubic
polynomial kernel k(x, y) = (x . y / d + 1)^3, estimated without bias from m real
features x_i and n generated y_j:

    MMD^2_u = 1/(m(m-1)) sum_{i != j} k(x_i, x_j) + 1/(n(n-1)) sum_{i != j} k(y_i, y_j)
              - 2/(mn) sum_{i, j} k(x_i, y_j).

Leaving out the diagonal i = j makes each term's expectation the kernel's mean over two
independent draws, so the estimate's mean is the true MMD^2 at any sample size (it can
be below 0). The paper's protocol, with its reference code's defaults: the mean and the
standard deviation of MMD^2_u over 100 subsets of m = min(1000, n) images from each side.

FID_inf (Chong & Forsyth 2020, "Effectively Unbiased FID and Inception Score and where to
find them"): FID_N = FID_inf + k / N + O(1/N^2), so FIDs of subsets of several sizes N lie
on a line in 1/N whose intercept, at 1/N = 0, is the FID of infinitely many images.

(The course's other two measures of generated images have modules of their own: the
digit accuracy, classifier.py, and the face rate, hog.py.)
"""
import hashlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import parallel
import util
from util import UserError

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
FID_WEIGHTS_SHA256_PREFIX = "6726825d"  # the file name carries its SHA-256's first 8 digits
KID_SUBSETS = 100        # Binkowski et al.'s code's defaults: MMD^2_u of 100 subsets,
KID_SUBSET_SIZE = 1000   # each of min(1000, n) images from each side
KID_SEED = 0             # the subsets' draws: the same at every checkpoint, like with like
KID_KERNEL_ENTRIES = 50_000_000  # all kernels at once up to 7,071 images in all (400 MB
                                 # of float64, twice that while they are computed)
FID_INF_POINTS = 15      # Chong & Forsyth's count of subset sizes N; theirs run from
FID_INF_SMALLEST = 4     # 5,000 to 50,000, ours from a quarter of the images to all of them
# the history's series measured with the FID, at the steps in history["fid_step"]
AT_FID_STEPS = ("fid", "kid", "kid_std", "digit_accuracy", "D(training x)", "D(held-out x)")


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
        batch = util.to_device(images[start:start + batch_size].float(), device)
        batch = ((batch + 1) / 2).contiguous(memory_format=torch.channels_last)
        return network(batch).cpu().double()  # float64 on the CPU: MPS holds none
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


@dataclass
class Statistics:
    """What FID and KID need of one side: the features' mean and covariance, the number of
    images, and the (count, 2048) pool3 features themselves in float32 (exactly what the
    float32 network gave; None for a statistics file written before KID)."""
    mu: np.ndarray
    sigma: np.ndarray
    count: int | None
    features: np.ndarray | None


def statistics_of(features: np.ndarray) -> Statistics:
    return Statistics(*gaussian_statistics(features), len(features),
                      np.asarray(features, np.float32))


def image_statistics(images: torch.Tensor, network: FIDInception, batch_size: int = 50,
                     device="cpu") -> Statistics:
    """The Statistics of the pool3 features of images in [-1, 1]."""
    if len(images) < 2:
        raise UserError(f"FID needs at least 2 images, got {len(images)}")
    return statistics_of(inception_features(network, images, batch_size, device))


# ============================================================================ KID, FID_inf
def polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """k(x, y) = (x . y / d + 1)^3 for every pair of rows: (m, d), (n, d) -> (m, n)."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """MMD^2_u of the module docstring for samples x (m, d) and y (n, d)."""
    return mmd2_of_kernels(polynomial_kernel(x, x), polynomial_kernel(y, y),
                           polynomial_kernel(x, y))


def mmd2_of_kernels(k_xx: torch.Tensor, k_yy: torch.Tensor, k_xy: torch.Tensor):
    """MMD^2_u from the kernel matrices (m, m), (n, n), (m, n): the kernel's mean within
    each sample without its diagonal (k(x_i, x_i) is no draw of two independent points),
    minus twice the mean between the samples."""
    m, n = len(k_xx), len(k_yy)
    return ((k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
            + (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1)) - 2 * k_xy.mean())


def kid(real_features, fake_features, generator: torch.Generator,
        subsets: int = KID_SUBSETS, subset_size: int = KID_SUBSET_SIZE,
        kernel_entries: int = KID_KERNEL_ENTRIES) -> tuple[float, float]:
    """KID: the mean and the standard deviation (divided by the count, as torch-fidelity)
    of MMD^2_u over `subsets` subsets of m = min(subset_size, both counts) images from each
    side, each drawn without replacement by `generator`. Where a side has m images, every
    subset holds all of them. In float64. The kernels of all pairs are computed once when
    (real count + generated count)^2 is at most kernel_entries, else each subset's (the
    same figure)."""
    real = torch.as_tensor(np.asarray(real_features)).double()
    fake = torch.as_tensor(np.asarray(fake_features)).double()
    m = min(subset_size, len(real), len(fake))
    if m < 2:
        raise UserError(f"KID needs at least 2 images a side, got {len(real)} and {len(fake)}")
    if (len(real) + len(fake)) ** 2 <= kernel_entries:
        # every pair's kernel once (2,000 real and 1,000 generated images: 7 million
        # entries, against 300 million for 100 subsets of 1,000 a side); each subset's
        # MMD^2_u then reads its rows and columns
        k_rr, k_ff = polynomial_kernel(real, real), polynomial_kernel(fake, fake)
        k_rf = polynomial_kernel(real, fake)

        def mmd2(r, f):
            return mmd2_of_kernels(k_rr[r][:, r], k_ff[f][:, f], k_rf[r][:, f])
    else:  # too many images for all their kernels in memory: each subset's own
        def mmd2(r, f):
            return mmd2_unbiased(real[r], fake[f])

    def subset(count):  # m indices without replacement
        return torch.randperm(count, generator=generator)[:m]
    estimates = torch.stack([mmd2(subset(len(real)), subset(len(fake)))
                             for _ in range(subsets)])
    return float(estimates.mean()), float(estimates.std(unbiased=False))


def fid_infinity_counts(count: int, points: int = FID_INF_POINTS) -> list[int]:
    """The subset sizes N of FID_inf: `points` values evenly spaced in 1/N (so that the
    line's points spread evenly along its x axis; Chong & Forsyth space them evenly in N)
    from count / FID_INF_SMALLEST to all `count` images; fewer when rounding makes some
    equal."""
    smallest = max(2, count // FID_INF_SMALLEST)  # a covariance needs 2 images
    return sorted({round(1 / inverse) for inverse in np.linspace(1 / smallest, 1 / count,
                                                                 points)})


def intercept_in_inverse_count(counts, fids) -> float:
    """The least-squares line FID_N = FID_inf + k / N through the points (1/N, FID_N),
    evaluated at 1/N = 0."""
    inverse = 1 / np.asarray(counts, np.float64)
    design = np.stack([np.ones_like(inverse), inverse], axis=1)        # (points, 2)
    (fid_inf, _slope), *_ = np.linalg.lstsq(design, np.asarray(fids, np.float64), rcond=None)
    return float(fid_inf)


def fid_infinity(fake_features, real_mu, real_sigma, generator: torch.Generator,
                 points: int = FID_INF_POINTS) -> float:
    """FID_inf (Chong & Forsyth 2020): the FID against the real statistics of one random
    subset (drawn by `generator`) of the generated features at each size N of
    fid_infinity_counts, extrapolated along the line in 1/N to infinitely many images.
    Below 2,048 images (the features' dimension) the covariances are singular and the
    O(1/N^2) term is no longer small: there the intercept is a guide, not their figure."""
    features = np.asarray(fake_features, np.float64)
    counts = fid_infinity_counts(len(features), points)
    if len(counts) < 2:
        raise UserError(f"FID_inf fits a line to FIDs of several subset sizes: {len(features)} "
                        "images give one; give at least 3")
    fids = [frechet_distance(*gaussian_statistics(
                features[torch.randperm(len(features), generator=generator)[:count].numpy()]),
                real_mu, real_sigma) for count in counts]
    return intercept_in_inverse_count(counts, fids)


# ============================================================================ while training
class FIDTracker:
    """FID and KID while a model trains: at chosen steps, FID and KID of `count` generated
    images against the held-out images, into the run's history (history["fid"],
    history["kid"] and history["kid_std"] at the steps history["fid_step"]).

    The held-out side never changes, so its statistics and features are computed once and
    kept in the cache, keyed by the images' pixels and the weights file: a second run pays
    nothing for them. Each evaluation then costs `count` forward passes of Inception; KID
    reuses their features. KID's subsets are drawn by a generator seeded with kid_seed
    afresh at each evaluation: the same subsets at every step, and after a resume."""

    def __init__(self, real: "data.ImageSet", count: int, every: int, device,
                 cache_dir=None, weights=None, kid_seed: int = KID_SEED):
        self.network = load_fid_inception(cache_dir, device, weights)
        self.count, self.every, self.device, self.kid_seed = count, every, device, kid_seed
        self.weights = weights_label(self.network.weights_file)
        self.real = real_statistics(real, self.network, self.weights, cache_dir, device)
        self.seconds = 0.0  # spent on the generated side since this process started

    def due(self, step: int, last: int) -> bool:
        """Is an FID measurement due at this step (every `every` steps, and the last)?"""
        return step % self.every == 0 or step == last

    def score(self, fake: torch.Tensor, prefix: str = "") -> dict:
        """FID and KID of fake images in [-1, 1] against the held-out images, and how many
        fakes: {prefix}fid, {prefix}kid, {prefix}kid_std, {prefix}images."""
        start = time.perf_counter()
        fake_statistics = image_statistics(fake, self.network, device=self.device)
        fid = frechet_distance(fake_statistics.mu, fake_statistics.sigma, self.real.mu,
                               self.real.sigma)
        kid_mean, kid_std = kid(self.real.features, fake_statistics.features,
                                torch.Generator().manual_seed(self.kid_seed))
        self.seconds += time.perf_counter() - start
        return {f"{prefix}fid": fid, f"{prefix}kid": kid_mean, f"{prefix}kid_std": kid_std,
                f"{prefix}images": len(fake)}

    def measure(self, history: dict, step: int, sample, batches) -> torch.Tensor:
        """FID and KID of the images sample(batch) makes of each batch (`count` in all),
        into the history at `step`; returns the images. Under torchrun the batches are
        split across the processes and the images gathered in order (parallel.in_order)."""
        images = torch.cat(parallel.in_order(sample, batches))
        scores = self.score(images)
        history.setdefault("fid_step", []).append(step)
        record(history, {name: scores[name] for name in ("fid", "kid", "kid_std")})
        return images

    def results(self, history: dict) -> dict:
        """The final and the best FID of the curve, the final KID, the image counts and the
        curves, for results.json."""
        if not history.get("fid"):
            return {"fid": None, "fid_unavailable": "no FID evaluation was due"}
        best = int(np.argmin(history["fid"]))
        return {"fid": history["fid"][-1], "best_fid": history["fid"][best],
                "best_fid_step": history["fid_step"][best], "kid": history["kid"][-1],
                "kid_std": history["kid_std"][-1], "fid_images": self.count,
                "fid_real_images": self.real.count, "fid_weights": self.weights,
                "fid_seconds": self.seconds,
                "fid_curve": {"images": self.count, "real_images": self.real.count,
                              "step": history["fid_step"], "fid": history["fid"],
                              "kid": history["kid"], "kid_std": history["kid_std"]}}


def record(history: dict, numbers: dict):
    """Append numbers measured at the FID step just added to history["fid_step"]. A run
    resumed from a checkpoint written before a series existed (KID) has no value of it at
    the earlier steps, nor a series measured only at some: None there (null in
    results.json, a gap in the curve)."""
    for name, value in numbers.items():
        series = history.setdefault(name, [])
        series.extend([None] * (len(history["fid_step"]) - 1 - len(series)))
        series.append(value)


class NoFID:
    """The tracker of a run that measures no FID, and why: never due; its results say so."""

    def __init__(self, reason: str):
        self.reason = reason

    def __bool__(self) -> bool:
        return False

    def due(self, step: int, last: int) -> bool:
        return False

    def results(self, history: dict) -> dict:
        return {"fid": None, "fid_unavailable": self.reason}


def fid_period(fid_every: int, sample_every: int) -> int:
    """Steps between FIDs: fid_every, a multiple of the checkpoints' sample_every (0: at
    every checkpoint), since the FID is measured at checkpoints."""
    period = fid_every or sample_every
    if period % sample_every:
        raise UserError(f"--fid-every {period} is no multiple of --sample-every "
                        f"{sample_every}: the FID is measured at checkpoints")
    return period


def fid_tracker(real, count: int, every: int, device, cache_dir=None, weights=None,
                kid_seed: int = KID_SEED):
    """A FIDTracker, or a NoFID that says why there is none: nothing to measure against,
    or the weights cannot be had (offline, no --weights); the run still trains and saves
    its results."""
    if not count or real is None:
        return NoFID("not asked for")
    try:
        return FIDTracker(real, count, every, device, cache_dir, weights, kid_seed)
    except UserError as error:
        if weights:  # a file the user named must work
            raise
        return NoFID(str(error))


def weights_label(path: Path) -> str:
    """'name (sha256 1234abcd)': which weights file produced a figure."""
    return f"{Path(path).name} (sha256 {hashlib.sha256(Path(path).read_bytes()).hexdigest()[:8]})"


def real_statistics(real: "data.ImageSet", network: FIDInception, weights: str, cache_dir,
                    device) -> Statistics:
    """The Statistics of the held-out images, features included, from the cache when it
    has them (keyed by their pixels and shape, and by the weights file's label)."""
    key = hashlib.sha256(real.pixels.cpu().numpy().tobytes())
    key.update(f"{tuple(real.pixels.shape)} {weights}".encode())
    folder = data.cache_folder(cache_dir)
    path = folder / f"fid_real_{key.hexdigest()[:16]}.npz" if folder else None

    def cached():
        if path is None or not path.exists():
            return None
        try:
            stored = stored_statistics(util.read_arrays(path, "it is computed again"), path,
                                       "it is computed again")
            if stored.features is None:
                raise UserError("it holds no features, as written before KID")
            if stored.count != len(real):
                raise UserError(f"it holds {stored.count} images' statistics, not {len(real)}")
            return stored
        except UserError as error:
            print(f"cache file {path} is damaged ({error}): deleting it", file=sys.stderr)
            path.unlink(missing_ok=True)
    # under torchrun rank 0 looks, and every process computes when it found nothing
    stored = parallel.from_main(cached)
    if stored is not None:
        return stored
    statistics = image_statistics(real.images(), network, device=device)
    if path is not None:
        util.write_arrays(statistics_arrays(statistics), path)
    return statistics


def statistics_arrays(statistics: Statistics) -> dict:
    """The arrays of a statistics file (the cache's, `run.py fid --save-stats`'s): mu and
    sigma in float64, the count, the features in float32 (8 KB an image)."""
    return {"mu": statistics.mu, "sigma": statistics.sigma, "count": statistics.count,
            "features": statistics.features}


def checked_statistics(mu, sigma, path, remedy: str) -> tuple[np.ndarray, np.ndarray]:
    """mu (D,) and sigma (D, D) as float64, or one line that says what is wrong with the
    statistics file `path`: an FID computed from them would mean nothing."""
    for name, array in (("mu", mu), ("sigma", sigma)):
        if array.dtype.kind not in "fiu":
            raise UserError(f"{path}: '{name}' holds {array.dtype} values, not numbers: "
                            f"{remedy}")
        if not np.isfinite(array).all():
            raise UserError(f"{path}: '{name}' holds NaN or infinite values: the statistics "
                            f"are damaged; {remedy}")
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise UserError(f"{path}: 'mu' of shape {mu.shape} and 'sigma' of shape "
                        f"{sigma.shape} are not a mean (D,) and a covariance (D, D): {remedy}")
    return mu.astype(np.float64), sigma.astype(np.float64)


def stored_statistics(stored: dict, path, remedy: str) -> Statistics:
    """The Statistics of a statistics file's arrays, each checked: mu and sigma; the
    features and the count when the file holds them (files written before KID do not)."""
    if "mu" not in stored or "sigma" not in stored:
        raise UserError(f"{path} holds no 'mu' and 'sigma': {remedy}")
    mu, sigma = checked_statistics(stored["mu"], stored["sigma"], path, remedy)
    features = stored.get("features")
    if features is not None and not (features.dtype.kind == "f" and features.ndim == 2
                                     and features.shape[1] == len(mu) and len(features) >= 2
                                     and np.isfinite(features).all()):
        raise UserError(f"{path}: 'features' of shape {features.shape} ({features.dtype}) are "
                        f"not finite features of at least 2 images, {len(mu)} each: {remedy}")
    count = stored.get("count")
    if count is not None:
        if (count.ndim != 0 or count.dtype.kind not in "iu"
                or features is not None and int(count) != len(features)):
            raise UserError(f"{path}: 'count' {count} is not the number of images the "
                            f"features are of: {remedy}")
        count = int(count)
    elif features is not None:
        count = len(features)
    return Statistics(mu, sigma, count, None if features is None
                      else features.astype(np.float32))


def load_statistics(path, network_factory, batch_size=50, device="cpu", image_size=None,
                    cache_dir=None) -> tuple[Statistics, int | None]:
    """A PATH of `run.py fid`: a saved .npz of statistics, or a folder of images.
    Returns its Statistics and the side of the folder's images (None for an .npz)."""
    path = Path(path)
    if path.suffix == ".npz" and path.is_file():
        remedy = "write it again with 'run.py fid --save-stats FOLDER OUT.npz'"
        return stored_statistics(util.read_arrays(path, remedy), path, remedy), None
    if not path.is_dir():
        raise UserError(f"{path} is neither a folder of images nor a statistics .npz file")
    images = data.load(str(path), "train", image_size=image_size, cache_dir=cache_dir)
    return (image_statistics(images.images(), network_factory(), batch_size, device),
            images.image_size)
