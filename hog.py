"""The face rate, the course's second GAN metric: the share of generated images in which a
face detector finds a face. The detector is that of Dalal & Triggs (CVPR 2005,
"Histograms of Oriented Gradients for Human Detection"), written out at the size of
these faces:
1. gradients by the centred differences [-1, 0, 1]; of a colour image, at each pixel
   the channel with the largest gradient magnitude;
2. each pixel votes its magnitude into 9 orientation bins over 0..180 degrees (the sign
   of a gradient says little: dark hair on light skin or light on dark), split linearly
   between the two nearest bin centres. The paper also splits each vote between the
   neighbouring cells and weights blocks by a Gaussian; these small images do without;
3. votes summed over cells of 4x4 pixels (the paper's 8x8 at half its window size);
4. blocks of 2x2 cells, overlapping by one cell, each normalised by L2-Hys: divided by
   its L2 norm, clipped at 0.2, divided again (one of the paper's best schemes): local
   contrast no longer matters, only the shape of the edges;
5. a linear SVM on the 7x7 blocks of a 32x32 window, trained on face windows and
   non-face windows, then retrained twice, each time with the non-face windows it
   scored highest added (hard negatives; the paper retrains once);
6. a sliding window (one cell apart) over a small pyramid of the image (three scales,
   where the paper uses many, 1.05 apart, and merges overlapping detections: a face
   rate needs only yes or no): a face is found where any window scores above a
   threshold. The SVM's own threshold, 0, let through one MNIST-M digit in ten; the
   threshold is set instead on images kept out of the SVM's training, so that 2% of
   those non-faces pass.
Everything here runs on the CPU: a face rate of 1000 images takes seconds.
"""
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import util
from util import UserError

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
    state = util.checkpoint_of(path, device, "facerate", "--detector")
    detector = FaceDetector()
    detector.load_state_dict(state["detector"])
    return detector.to(device).eval()
