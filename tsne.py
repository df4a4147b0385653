"""t-SNE in NumPy: exact for small sets, FFT-accelerated interpolation for large ones.

t-SNE (van der Maaten & Hinton 2008, "Visualizing Data using t-SNE") places points y_i in
2-D so that the Student-t similarities of the map match Gaussian similarities in the data:

    p_j|i = exp(-beta_i ||x_i - x_j||^2) / sum_k exp(-beta_i ||x_i - x_k||^2),
        beta_i chosen so that the perplexity 2^H(P_i) equals the requested one;
    p_ij  = (p_j|i + p_i|j) / 2N;
    q_ij  = (1 + ||y_i - y_j||^2)^-1 / Z,   Z = sum_{k != l} (1 + ||y_k - y_l||^2)^-1;
    C = KL(P || Q),   dC/dy_i = 4 sum_j (p_ij - q_ij) (1 + ||y_i - y_j||^2)^-1 (y_i - y_j).

Optimisation as in the paper and scikit-learn: PCA initialisation scaled to std 1e-4,
early exaggeration (P x 12) for 250 iterations with momentum 0.5, then momentum 0.8, per
coordinate gains (+0.2 when the gradient changes sign, x0.8 otherwise, at least 0.01),
learning rate `auto` = max(N / 12 / 4, 50), 1,000 iterations in all.

For large N the O(N^2) sums are replaced (Linderman et al. 2019, "Fast interpolation-based
t-SNE for improved visualization of single-cell RNA-seq data", FIt-SNE):
- P is kept only on the 3 * perplexity nearest neighbours of each point (sparse);
- the repulsion sums sum_j K(y_i - y_j) c_j, for the kernels K1 = (1 + r^2)^-1 and
  K2 = (1 + r^2)^-2, are computed by spreading the charges c_j onto a regular grid with
  cubic Lagrange weights, convolving with the kernel by FFT, and interpolating back.
  Cost per iteration O(N + G log G) for G grid nodes, instead of O(N^2).
"""
from concurrent.futures import ThreadPoolExecutor

import numpy as np

EARLY_EXAGGERATION, EXAGGERATION_ITERATIONS = 12.0, 250
EXACT_UP_TO = 750    # measured crossover on 2 CPU cores: exact is faster below, FFT above
GRID_SPACING = 0.6   # map units between nodes: kernels vary on a scale of 1 (see RESULTS.md)
MACHINE_EPSILON = np.finfo(np.float64).eps


# ============================================================================ affinities
def squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """||a_i - b_j||^2 for all pairs, (len(a), len(b)), clipped at 0 against round-off."""
    return np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T, 0)


def conditional_probabilities(distances: np.ndarray, perplexity: float, tol: float = 1e-5,
                              max_steps: int = 200) -> np.ndarray:
    """Rows p_j|i for squared distances (N, M) to each point's candidates (self excluded).

    Bisection on the precision beta_i, all rows at once: the entropy
    H_i = log sum_j e_ij + beta_i sum_j d_ij e_ij / sum_j e_ij, e_ij = exp(-beta_i d_ij),
    falls as beta_i grows; stop when |H_i - log(perplexity)| < tol for every row."""
    distances = distances - distances.min(axis=1, keepdims=True)  # H is shift-invariant
    target = np.log(perplexity)
    beta = np.ones(len(distances))
    low, high = np.full_like(beta, -np.inf), np.full_like(beta, np.inf)
    for _ in range(max_steps):
        weights = np.exp(-distances * beta[:, None])
        total = np.maximum(weights.sum(axis=1), MACHINE_EPSILON)
        entropy = np.log(total) + beta * (distances * weights).sum(axis=1) / total
        too_flat = entropy > target  # beta too small
        if np.all(np.abs(entropy - target) < tol):
            break
        low = np.where(too_flat, beta, low)
        high = np.where(too_flat, high, beta)
        beta = np.where(too_flat, np.where(np.isinf(high), beta * 2, (beta + high) / 2),
                        np.where(np.isinf(low), beta / 2, (beta + low) / 2))
    return weights / total[:, None]


def exact_affinities(X: np.ndarray, perplexity: float) -> np.ndarray:
    """Dense symmetric P (N, N), zero diagonal, summing to 1."""
    n = len(X)
    distances = squared_distances(X, X)
    off_diagonal = ~np.eye(n, dtype=bool)
    conditional = np.zeros((n, n))
    conditional[off_diagonal] = conditional_probabilities(
        distances[off_diagonal].reshape(n, n - 1), perplexity).ravel()
    joint = conditional + conditional.T
    return joint / np.maximum(joint.sum(), MACHINE_EPSILON)


def nearest_neighbours(X: np.ndarray, k: int, chunk: int = 2048):
    """Indices and squared distances of each row's k nearest other rows, by exact search
    in chunks of rows (memory chunk x N)."""
    indices, distances = [], []
    for start in range(0, len(X), chunk):
        block = squared_distances(X[start:start + chunk], X)
        block[np.arange(len(block)), np.arange(start, start + len(block))] = np.inf
        nearest = np.argpartition(block, k, axis=1)[:, :k]
        nearest_d = np.take_along_axis(block, nearest, axis=1)
        order = np.argsort(nearest_d, axis=1)
        indices.append(np.take_along_axis(nearest, order, axis=1))
        distances.append(np.take_along_axis(nearest_d, order, axis=1))
    return np.concatenate(indices), np.concatenate(distances)


def sparse_affinities(X: np.ndarray, perplexity: float):
    """Symmetric P on the k = 3 * perplexity nearest neighbours, as (rows, cols, values)."""
    n = len(X)
    k = min(n - 1, int(3 * perplexity + 1))
    neighbours, distances = nearest_neighbours(X, k)
    conditional = conditional_probabilities(distances, perplexity)
    rows = np.repeat(np.arange(n), k)
    # p_ij = p_j|i + p_i|j: add the transpose by merging (i, j) and (j, i) entries
    keys = np.concatenate([rows * n + neighbours.ravel(), neighbours.ravel() * n + rows])
    unique_keys, where = np.unique(keys, return_inverse=True)
    values = np.bincount(where, weights=np.concatenate([conditional.ravel()] * 2))
    return unique_keys // n, unique_keys % n, values / np.maximum(values.sum(), MACHINE_EPSILON)


# ============================================================================ gradients
def exact_gradient(Y: np.ndarray, P: np.ndarray, exaggeration: float = 1.0,
                   with_kl: bool = True):
    """dC/dY and KL(P || Q) with dense P (multiplied by `exaggeration`), O(N^2)."""
    kernel = 1.0 / (1.0 + squared_distances(Y, Y))       # (1 + ||y_i - y_j||^2)^-1, (N, N)
    np.fill_diagonal(kernel, 0.0)
    Q = np.maximum(kernel / kernel.sum(), MACHINE_EPSILON)   # q_ij = K_ij / sum_{k != l} K_kl
    weights = (exaggeration * P - Q) * kernel
    # dC/dy_i = 4 sum_j (p_ij - q_ij) K_ij (y_i - y_j)  (van der Maaten & Hinton 2008, eq. 5)
    gradient = 4.0 * (weights.sum(axis=1)[:, None] * Y - weights @ Y)
    # KL(P || Q) = sum_ij p_ij log(p_ij / q_ij)
    kl = float(np.sum(P * np.log(np.maximum(P, MACHINE_EPSILON) / Q))) if with_kl else np.nan
    return gradient, kl


def _lagrange_weights(fraction: np.ndarray) -> np.ndarray:
    """Cubic Lagrange weights of the nodes -1, 0, 1, 2 around fraction in [0, 1): (N, 4)."""
    f = fraction[:, None]
    return np.concatenate([-f * (f - 1) * (f - 2) / 6, (f + 1) * (f - 1) * (f - 2) / 2,
                           -(f + 1) * f * (f - 2) / 2, (f + 1) * f * (f - 1) / 6], axis=1)


def _fft_friendly(length: int) -> int:
    """Smallest length' >= length whose only prime factors are 2, 3 and 5 (fast FFTs)."""
    while True:
        rest = length
        for prime in (2, 3, 5):
            while rest % prime == 0:
                rest //= prime
        if rest == 1:
            return length
        length += 1


class Grid:
    """Interpolation grid around the current map, with cubic spreading/gathering."""

    def __init__(self, Y: np.ndarray, spacing: float = GRID_SPACING, min_nodes: int = 16,
                 max_nodes: int = 2000):
        low, high = Y.min(axis=0), Y.max(axis=0)
        extent = max((high - low).max(), 1e-12)
        # fine enough for a tiny map, coarser rather than huge for a sprawling one
        self.spacing = max(min(spacing, extent / min_nodes), extent / max_nodes)
        # two spare nodes below, three above: the cubic stencil reaches -1 .. +2
        self.origin = low - 2 * self.spacing
        self.shape = tuple(_fft_friendly(int(np.ceil(extent / self.spacing)) + 6)
                           for extent in high - low)
        position = (Y - self.origin) / self.spacing
        cell = np.floor(position).astype(np.int64)
        wx, wy = (_lagrange_weights(position[:, d] - cell[:, d]) for d in (0, 1))
        offsets = np.arange(-1, 3)
        ix = cell[:, 0:1] + offsets                                   # (N, 4)
        iy = cell[:, 1:2] + offsets
        self.nodes = (ix[:, :, None] * self.shape[1] + iy[:, None, :]).reshape(len(Y), 16)
        self.weights = (wx[:, :, None] * wy[:, None, :]).reshape(len(Y), 16)

    def kernel_spectrum(self, kernel) -> np.ndarray:
        """FFT of kernel(offset) on the circulant grid of node offsets, twice the size."""
        sx, sy = (np.fft.fftfreq(2 * n, d=1.0 / (2 * n)) * self.spacing for n in self.shape)
        return np.fft.rfft2(kernel(sx[:, None] ** 2 + sy[None, :] ** 2))

    def self_interaction(self, kernel) -> np.ndarray:
        """What a point's own charge contributes to its interpolated sum: w^T M w with
        M_ab = kernel(|node_a - node_b|^2) over its 16 stencil nodes. Subtracting this
        rather than the exact kernel(0) keeps Z unbiased when N is small."""
        offsets = np.arange(-1, 3)
        ax, ay = np.repeat(offsets, 4), np.tile(offsets, 4)          # the 16 stencil nodes
        gaps = ((ax[:, None] - ax[None]) ** 2 + (ay[:, None] - ay[None]) ** 2)
        between_nodes = kernel(gaps * self.spacing ** 2)               # (16, 16)
        return ((self.weights @ between_nodes) * self.weights).sum(axis=1)

    def spread(self, charges: np.ndarray) -> np.ndarray:
        """Charges (N, C) onto the grid: (C, nx, ny), each point shared by its 16 nodes."""
        nx, ny = self.shape
        columns = charges.shape[1]
        nodes = self.nodes[None] + (np.arange(columns) * nx * ny)[:, None, None]  # (C, N, 16)
        values = self.weights[None] * charges.T[:, :, None]
        return np.bincount(nodes.ravel(), values.ravel(),
                           minlength=columns * nx * ny).reshape(columns, nx, ny)

    def spectra(self, grids: np.ndarray) -> np.ndarray:
        """2-D FFT of grids (C, nx, ny) zero-padded to (2 nx, 2 ny), so that products with
        a kernel spectrum give linear, not cyclic, convolutions. The padding rows are zero,
        so the second axis is transformed first, for the nx real rows only."""
        nx, ny = self.shape
        return np.fft.fft(np.fft.rfft(grids, n=2 * ny, axis=2), n=2 * nx, axis=1)

    def gather(self, products: np.ndarray) -> np.ndarray:
        """Back from spectra (C, 2 nx, ny + 1) to the grid, then interpolated at the
        points: (C, N)."""
        nx, ny = self.shape
        rows = np.fft.ifft(products, axis=1)[:, :nx]
        fields = np.fft.irfft(rows, n=2 * ny, axis=2)[:, :, :ny].reshape(len(products), -1)
        return np.einsum("cnk,nk->cn", fields[:, self.nodes], self.weights)

    def total(self, spectrum: np.ndarray, kernel: np.ndarray) -> float:
        """sum_i sum_j kernel(y_i, y_j) for one charge grid, without going back to space:
        by Parseval, <s, K * s> = sum_k |S_k|^2 K_k / M over the M padded frequencies. The
        real FFT keeps half the last axis, so its inner bins count twice."""
        nx, ny = self.shape
        twice = np.full(ny + 1, 2.0)
        twice[[0, -1]] = 1.0
        return float(np.sum(np.abs(spectrum) ** 2 * kernel.real * twice) / (4 * nx * ny))


class InterpolatedGradient:
    """dC/dY and KL(P || Q) with sparse P and grid-interpolated repulsion, O(N + G log G).

    attraction_i = sum_j p_ij K1_ij (y_i - y_j)          (neighbours only)
    repulsion_i  = sum_j K2_ij (y_i - y_j) / Z = (y_i phi2_i - psi_i) / Z
    with phi1 = sum_j K1_ij, phi2 = sum_j K2_ij, psi = sum_j K2_ij y_j, Z = sum_i phi1_i
    minus the self terms (j = i) as the grid computes them.
    Kernel spectra depend only on the grid's size and spacing, so they are kept."""

    def __init__(self, rows, cols, values, worker: ThreadPoolExecutor | None = None):
        # pairs sorted by row (CSR order): each row's attraction is then one contiguous
        # segment, summed by np.add.reduceat; k-NN leaves no row empty
        order = np.lexsort((cols, rows))
        self.rows, self.cols, self.values = rows[order], cols[order], values[order]
        self.row_starts = np.flatnonzero(np.r_[True, self.rows[1:] != self.rows[:-1]])
        self.row_sizes = np.diff(np.r_[self.row_starts, len(self.rows)])
        assert len(self.row_starts) == self.rows[-1] + 1, "every point needs a neighbour"
        self.spectra = {}
        self.worker = worker  # a thread for the attraction (None: this thread)

    def kernels(self, grid: Grid):
        key = (grid.shape, grid.spacing)
        if key not in self.spectra:
            if len(self.spectra) > 64:
                self.spectra.clear()
            self.spectra[key] = (grid.kernel_spectrum(lambda r2: 1.0 / (1.0 + r2)),
                                 grid.kernel_spectrum(lambda r2: 1.0 / (1.0 + r2) ** 2))
        return self.spectra[key]

    def repulsion(self, Y: np.ndarray) -> tuple[np.ndarray, float]:
        """(sum_j K2_ij (y_i - y_j) / Z, Z) through the grid."""
        grid = Grid(Y)
        k1, k2 = self.kernels(grid)
        spectra = grid.spectra(grid.spread(np.column_stack([np.ones(len(Y)), Y])))
        phi2, psi_x, psi_y = grid.gather(spectra * k2)
        self_terms = grid.self_interaction(lambda r2: 1.0 / (1.0 + r2)).sum()
        z = max(grid.total(spectra[0], k1) - self_terms, MACHINE_EPSILON)  # k != l only
        return (Y * phi2[:, None] - np.column_stack([psi_x, psi_y])) / z, z

    def attraction(self, Y: np.ndarray, exaggeration: float) -> tuple[np.ndarray, np.ndarray]:
        """(sum_j p_ij K1_ij (y_i - y_j), K1 of every stored pair)."""
        x, y = Y[:, 0].copy(), Y[:, 1].copy()  # contiguous columns: take() is fastest
        # y_i repeated over its row's pairs (CSR order) is cheaper than a gather
        dx = np.repeat(x, self.row_sizes) - x.take(self.cols)
        dy = np.repeat(y, self.row_sizes) - y.take(self.cols)
        kernel = 1.0 / (1.0 + dx * dx + dy * dy)
        pull = exaggeration * self.values * kernel            # p_ij K1_ij
        return np.column_stack([np.add.reduceat(pull * d, self.row_starts)
                                for d in (dx, dy)]), kernel

    def __call__(self, Y: np.ndarray, exaggeration: float = 1.0, with_kl: bool = True):
        # the two halves are independent and NumPy releases the GIL in its loops, so the
        # attraction runs on a second thread (a second core) while the grid works
        if self.worker is None:
            (attraction, kernel), (repulsion, z) = (self.attraction(Y, exaggeration),
                                                    self.repulsion(Y))
        else:
            pending = self.worker.submit(self.attraction, Y, exaggeration)
            repulsion, z = self.repulsion(Y)
            attraction, kernel = pending.result()
        kl = float("nan")
        if with_kl:  # over the stored pairs: the rest of P is zero
            q = np.maximum(kernel / z, MACHINE_EPSILON)
            kl = float(np.sum(self.values * np.log(np.maximum(self.values, MACHINE_EPSILON)
                                                   / q)))
        return 4.0 * (attraction - repulsion), kl


# ============================================================================ optimisation
def pca(X: np.ndarray, dims: int) -> np.ndarray:
    """Project centred rows onto the top `dims` principal axes (SVD), signs made
    deterministic: each axis points towards its largest absolute projection."""
    centred = X - X.mean(axis=0)
    _, _, axes = np.linalg.svd(centred, full_matrices=False)
    projected = centred @ axes[:dims].T
    signs = np.sign(projected[np.abs(projected).argmax(axis=0), np.arange(projected.shape[1])])
    return projected * np.where(signs == 0, 1, signs)


def pca_initialisation(X: np.ndarray) -> np.ndarray:
    """First two principal components, scaled so the first has std 1e-4 (as scikit-learn)."""
    projected = pca(X, 2)
    return projected / np.std(projected[:, 0]) * 1e-4


def optimise(Y: np.ndarray, gradient, iterations: int, learning_rate: float,
             progress=None) -> tuple[np.ndarray, float]:
    """Gradient descent with momentum and per-coordinate gains (Jacobs 1988).

    `gradient(Y, exaggeration, with_kl)` returns (dC/dY, KL or nan). Early exaggeration
    multiplies P by 12 for the first 250 iterations, with momentum 0.5; then momentum 0.8.
    KL is computed every 50 iterations and at the last one (it costs a pass over P)."""
    update, gains, kl = np.zeros_like(Y), np.ones_like(Y), float("nan")
    for step in range(iterations):
        early = step < EXAGGERATION_ITERATIONS
        report = step % 50 == 49 or step == iterations - 1
        grad, step_kl = gradient(Y, EARLY_EXAGGERATION if early else 1.0, report)
        kl = step_kl if report else kl
        same_sign = update * grad > 0.0       # still heading downhill: trust less, shrink
        gains = np.where(same_sign, gains * 0.8, gains + 0.2).clip(min=0.01)
        # Y(t) = Y(t-1) + eta g * (-dC/dY) + alpha(t) (Y(t-1) - Y(t-2)), alpha 0.5 then 0.8
        update = (0.5 if early else 0.8) * update - learning_rate * gains * grad
        Y = Y + update
        if progress is not None:
            progress(step, kl)
    return Y, kl


def tsne(X, perplexity: float = 30.0, seed: int = 0, method: str = "auto",
         iterations: int = 1000, learning_rate="auto", return_kl: bool = False, progress=None):
    """Embed (N, D) data in 2-D. method: "exact", "fft" or "auto" (exact up to 750 points).

    Returns the (N, 2) embedding, and KL(P || Q) at the end when return_kl is set. The seed
    only breaks ties: the PCA initialisation is deterministic."""
    X = np.asarray(X, np.float64).reshape(len(X), -1)
    n = len(X)
    if n < 4:
        raise ValueError(f"t-SNE needs at least 4 points, got {n}")
    perplexity = min(perplexity, (n - 1) / 3)
    if method == "auto":
        method = "exact" if n <= EXACT_UP_TO else "fft"
    if learning_rate == "auto":
        learning_rate = max(n / EARLY_EXAGGERATION / 4, 50.0)
    rng = np.random.default_rng(seed)
    Y = pca_initialisation(X) + rng.normal(0, 1e-12, (n, 2))
    if method not in ("exact", "fft"):
        raise ValueError(f"unknown t-SNE method '{method}': use auto, exact or fft")
    with ThreadPoolExecutor(max_workers=1) as worker:
        if method == "exact":
            P = exact_affinities(X, perplexity)
            gradient = (lambda Y, exaggeration, with_kl:
                        exact_gradient(Y, P, exaggeration, with_kl))
        else:
            gradient = InterpolatedGradient(*sparse_affinities(X, perplexity), worker)
        Y, kl = optimise(Y, gradient, iterations, learning_rate, progress)
    return (Y, kl) if return_kl else Y


# ============================================================================ evaluation
def trustworthiness(X, Y, k: int = 5) -> float:
    """Venna & Kaski (2001): 1 - 2 / (n k (2n - 3k - 1)) sum_i sum_{j in U_k(i)} (r(i, j) - k),
    U_k(i) = the map's k nearest neighbours of i that are not among its k nearest in the
    data, r(i, j) = the rank of j by distance to i in the data (nearest = 1).
    The normalisation makes the worst map score 0 only for k < n / 2; beyond, the
    score could leave [0, 1], so such k is refused (max_trustworthiness_k gives the largest)."""
    X = np.asarray(X, np.float64).reshape(len(X), -1)
    Y = np.asarray(Y, np.float64)
    n = len(X)
    if not 1 <= k <= max_trustworthiness_k(n):
        raise ValueError(f"trustworthiness of {n} points needs 1 <= k < {n / 2:g}, got {k}")
    map_neighbours, _ = nearest_neighbours(Y, k)
    penalty = 0.0
    for start in range(0, n, 1024):                     # ranks in chunks: memory 1024 x N
        block = squared_distances(X[start:start + 1024], X)
        rows = np.arange(len(block))
        block[rows, start + rows] = -np.inf             # self gets rank 0
        ranks = np.empty_like(block, dtype=np.int64)
        np.put_along_axis(ranks, np.argsort(block, axis=1, kind="stable"),
                          np.arange(n)[None, :], axis=1)
        neighbour_ranks = np.take_along_axis(ranks, map_neighbours[start:start + 1024], 1)
        penalty += np.maximum(neighbour_ranks - k, 0).sum()
    return 1.0 - 2.0 / (n * k * (2.0 * n - 3.0 * k - 1.0)) * penalty


def max_trustworthiness_k(n: int) -> int:
    """The largest k < n / 2."""
    return (n - 1) // 2


def knn_accuracy(Y, labels, k: int = 10) -> float:
    """Leave-one-out k-nearest-neighbour classification accuracy in the map."""
    neighbours, _ = nearest_neighbours(np.asarray(Y, np.float64), k)
    labels = np.asarray(labels)
    votes = np.apply_along_axis(np.bincount, 1, labels[neighbours], minlength=labels.max() + 1)
    return float((votes.argmax(axis=1) == labels).mean())
