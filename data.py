"""Data sets: find or download, verify, decode, cache, and serve as tensors in [-1, 1].

Every data set comes out the same way, whatever its file format:

    ds = data.load("usps", split="train", data_root="data")     # an ImageSet
    ds.images()      # float32 (N, 3, H, W) in [-1, 1], gray replicated to 3 channels
    ds.labels        # int64 (N,) or None (an unlabelled folder)

Digits default to 28x28, faces to 64x64 (center-cropped to a square, then resized).
USPS digits get MNIST's framing first (`mnist_framed`), so that digits of every data
set are about 20 pixels tall at 28x28; a course-layout folder is taken as it is.

| name     | files (under --data-root)                                   | format            |
|----------|-------------------------------------------------------------|-------------------|
| mnist    | mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]    | IDX               |
| usps     | usps/usps.bz2, usps/usps.t.bz2                              | LIBSVM, bzip2     |
| svhn     | svhn/{train,test}_32x32.mat                                 | MATLAB v5         |
| mnistm   | mnist_m/ folder or mnist_m.tar.gz, or mnist_m_{train,test}.pt[.tar.gz] | PNG / torch |
| celeba   | celeba/img_align_celeba/ or .zip, list_attr_celeba.txt, list_eval_partition.txt | JPEG |
| a folder | DIR/data/*.png + DIR/{train,val,test}.csv, or DIR/*.png      | the course layout |

Decoding is done once: the decoded uint8 arrays go to a cache (`--cache`, default
$DLCV_CACHE or ~/.cache/dlcv-from-scratch) keyed by the data folder and by the source
files' resolved paths, sizes and times, so the second load of 60,000 digits is a single
`np.load` and another copy of a data set never answers for this one. Images stay uint8 in memory (a quarter of the
float size) and become floats batch by batch in `ImageSet.images`.

Downloads come from the data sets' public addresses, show progress, land in a `.part`
file and are renamed only after their published MD5 matched.
"""
import bz2
import csv
import gzip
import hashlib
import io
import os
import struct
import sys
import tarfile
import urllib.error
import urllib.request
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from util import Progress, UserError, read_arrays, write_arrays, write_image, write_text

CACHE_VERSION = 3  # raise it when a reader's output changes (3: 16-bit PNGs scaled right)
DIGITS = ("mnist", "mnistm", "svhn", "usps")
SPLITS = {**{name: ("train", "test") for name in DIGITS},
          "celeba": ("train", "test", "val", "all")}     # a folder: train, test, val
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def default_cache() -> Path:
    """Where decoded arrays and the FID weights live unless --cache says otherwise:
    $DLCV_CACHE if set (the tests point it at a temporary folder), else
    ~/.cache/dlcv-from-scratch. Read at each call, not at import."""
    return Path(os.environ.get("DLCV_CACHE") or Path.home() / ".cache" / "dlcv-from-scratch")


def cache_folder(cache_dir) -> Path | None:
    """None: the default cache; "" (--cache ""): no cache; else that folder."""
    if cache_dir is None:
        return default_cache()
    return Path(cache_dir).expanduser() if str(cache_dir) else None


# ============================================================================ the result
@dataclass
class ImageSet:
    """Images as uint8 (N, C, H, W) with C = 1 or 3, plus whatever labels the set has."""
    pixels: torch.Tensor
    labels: torch.Tensor | None = None              # int64 (N,)
    names: list[str] | None = None                  # file names, for prediction csvs
    classes: list[str] = field(default_factory=list)
    attributes: torch.Tensor | None = None          # CelebA: int64 (N, 40) of 0/1
    attribute_names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.pixels)

    @property
    def image_size(self) -> int:
        return self.pixels.shape[-1]

    def images(self, index=slice(None)) -> torch.Tensor:
        """float32 (n, 3, H, W) in [-1, 1]: x = u8 / 127.5 - 1, gray expanded to RGB."""
        selected = self.pixels[index].float().div_(127.5).sub_(1.0)
        return selected.expand(-1, 3, -1, -1) if selected.shape[1] == 1 else selected

    def subset(self, index) -> "ImageSet":
        names = None if self.names is None else [self.names[i] for i in index.tolist()]
        return self._map(lambda tensor: tensor[index], names)

    def to(self, device) -> "ImageSet":
        """Move the uint8 pixels (and labels) once, e.g. to the GPU, so batches cost no copy."""
        return self._map(lambda tensor: tensor.to(device), self.names)

    def _map(self, change, names) -> "ImageSet":
        """The same set with `change` applied to every per-image tensor."""
        def apply(tensor):
            return None if tensor is None else change(tensor)
        return replace(self, pixels=change(self.pixels), labels=apply(self.labels),
                       attributes=apply(self.attributes), names=names)

    def batches(self, batch_size: int, order: torch.Tensor | None = None,
                drop_last: bool = False):
        """Yield (images, labels-or-None) minibatches, in `order` (a permutation of the
        images, e.g. an epoch's from a data stream: parallel.Random.permutation) or in
        the stored order."""
        count = len(self)
        order = (torch.arange(count) if order is None else order).to(self.pixels.device)
        stop = count - count % batch_size if drop_last else count
        for start in range(0, stop, batch_size):
            index = order[start:start + batch_size]
            yield self.images(index), None if self.labels is None else self.labels[index]


# ============================================================================ downloads
def md5_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def download_file(urls: list[str], target: Path, md5: str | None, hint: str = "") -> Path:
    """Fetch the first address that works into target.part, check MD5, rename to target.

    Offline or a failed checksum ends in one line that names the file to place by hand."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    by_hand = f"download it by hand and save it as {target}" + (f" ({hint})" if hint else "")
    failures = []
    for url in urls:
        try:
            _stream_to(url, partial)
        except (urllib.error.URLError, OSError, ValueError) as error:
            failures.append(f"{url}: {getattr(error, 'reason', error)}")
            continue
        if md5 is not None and (got := md5_of(partial)) != md5:
            partial.unlink()
            raise UserError(f"download of {target.name} is corrupt (md5 {got}, expected "
                            f"{md5}): run again, or {by_hand}")
        partial.replace(target)
        return target
    raise UserError(f"could not download {target.name} ({'; '.join(failures)}): "
                    f"check the network, or {by_hand}")


def _stream_to(url: str, path: Path):
    request = urllib.request.Request(url, headers={"User-Agent": "dlcv-from-scratch"})
    with urllib.request.urlopen(request, timeout=60) as response:
        if response.headers.get("Content-Type", "").startswith("text/html"):
            raise ValueError("got a web page instead of the file (quota or login page)")
        size = int(response.headers.get("Content-Length") or 0) or None
        progress = Progress(desc=f"download {path.name[:-5]}", total=size, unit="B")
        with open(path, "wb") as handle:
            while block := response.read(1 << 16):
                handle.write(block)
                progress.update(len(block))
        progress.close()


def safe_extract(archive: Path, destination: Path) -> Path:
    """Unpack a .tar[.gz] or .zip, refusing members that would land outside destination."""
    destination = Path(destination).resolve()
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as bundle:
                _refuse_escapes(bundle.namelist(), destination, archive)
                bundle.extractall(destination)
        else:
            with tarfile.open(archive) as bundle:
                members = bundle.getmembers()
                _refuse_escapes([m.name for m in members], destination, archive)
                if any(m.issym() or m.islnk() for m in members):
                    raise UserError(f"archive {archive} holds links; refusing to unpack it")
                bundle.extractall(destination, filter="data")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error) as error:
        raise UserError(f"archive {archive} is truncated or damaged ({error}): delete it "
                        "and download it again")
    return destination


def _refuse_escapes(names, destination: Path, archive: Path):
    for name in names:
        if not (destination / name).resolve().is_relative_to(destination):
            raise UserError(f"archive {archive} has a member '{name}' that would be written "
                            f"outside {destination}; refusing to unpack it")


# ============================================================================ file formats
def read_idx(path: Path) -> np.ndarray:
    """IDX (LeCun's MNIST format): magic 0 0 type ndim, big-endian int32 dims, raw data."""
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise UserError(f"{path} is not an IDX file of unsigned bytes: re-download it")
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}i", raw[4:4 + 4 * ndim])
    body = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if body.size != np.prod(shape):
        raise UserError(f"{path} is truncated ({body.size} of {np.prod(shape)} bytes): "
                        "delete it and download it again")
    return body.reshape(shape)


def read_libsvm(path: Path, features: int) -> tuple[np.ndarray, np.ndarray]:
    """LIBSVM sparse text: `label index:value ...`, 1-based indices, absent values are 0."""
    lines = _text(_read_bytes(path), path).split("\n")
    rows = [(number, line.split()) for number, line in enumerate(lines, start=1)
            if line.strip()]
    labels = np.zeros(len(rows), np.int64)
    values = np.zeros((len(rows), features), np.float32)
    for i, (number, row) in enumerate(rows):  # one pass over text lines, then cached
        labels[i], indices, entries = _libsvm_row(row, features, f"{path}, line {number}")
        values[i, indices - 1] = entries
    return values, labels


def _libsvm_row(row: list[str], features: int, where: str):
    """(label, indices, values) of one LIBSVM line, or an error naming the line."""
    fix = (f"{where}: expected 'label index:value ...' (a whole-number label, indices 1 to "
           f"{features}, numbers as values); fix or remove that line, or download the file "
           "again")
    if not all(item.count(":") == 1 for item in row[1:]):
        raise UserError(fix)
    try:
        label = float(row[0])
        pairs = np.array([item.split(":") for item in row[1:]], np.float64).reshape(-1, 2)
    except ValueError:  # a field that is no number
        raise UserError(fix) from None
    indices = pairs[:, 0]
    if (not label.is_integer() or not np.isfinite(pairs).all()
            or (indices != np.rint(indices)).any() or (indices < 1).any()
            or (indices > features).any()):
        raise UserError(fix)
    return int(label), indices.astype(np.int64), pairs[:, 1]


def _text(raw: bytes, path) -> str:
    """A text file's contents (a byte-order mark dropped), or an error naming it."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise UserError(f"{path} is not a text file (byte {error.start} is no UTF-8): it "
                        "is damaged or not the expected file; download it again") from None


# MATLAB level-5 MAT-file: 128-byte header, then tagged data elements, 8-byte aligned.
MAT_NUMERIC = {1: np.int8, 2: np.uint8, 3: np.int16, 4: np.uint16, 5: np.int32,
               6: np.uint32, 7: np.float32, 9: np.float64, 12: np.int64, 13: np.uint64}
MAT_CLASS = {6: np.float64, 7: np.float32, 8: np.int8, 9: np.uint8, 10: np.int16,
             11: np.uint16, 12: np.int32, 13: np.uint32, 14: np.int64, 15: np.uint64}
MI_MATRIX, MI_COMPRESSED = 14, 15


def read_mat(path: Path) -> dict[str, np.ndarray]:
    """Numeric arrays of a MAT v5 file (zlib-compressed elements included), by name.

    Element tag: uint32 type, uint32 byte count; a 'small' element packs both into
    the first 4 bytes (count in the upper half) with its data in the next 4. A matrix
    holds sub-elements: flags (class), dimensions, name, real part (column-major)."""
    raw = _read_bytes(path)
    if len(raw) < 128 or raw[126:128] != b"IM":
        raise UserError(f"{path} is not a little-endian MATLAB v5 file: re-download it")
    arrays, offset = {}, 128
    try:
        while offset + 8 <= len(raw):
            kind, body, offset = _mat_element(raw, offset)
            if kind == MI_COMPRESSED:
                kind, body, _ = _mat_element(zlib.decompress(body), 0)
            if kind == MI_MATRIX:
                name, array = _mat_matrix(body)
                if array is not None:
                    arrays[name] = array
    except (zlib.error, struct.error, ValueError) as error:
        raise UserError(f"{path} is truncated or damaged ({error}): delete it and download "
                        "it again")
    return arrays


def _mat_element(raw: bytes, offset: int) -> tuple[int, bytes, int]:
    kind, size = struct.unpack_from("<II", raw, offset)
    if kind >> 16:  # small data element format
        return kind & 0xFFFF, raw[offset + 4:offset + 4 + (kind >> 16)], offset + 8
    start, end = offset + 8, offset + 8 + size
    if end > len(raw):
        raise ValueError(f"element at byte {offset} runs past the end of the file")
    return kind, raw[start:end], end + (-size % 8 if kind != MI_COMPRESSED else 0)


def _mat_matrix(body: bytes) -> tuple[str, np.ndarray | None]:
    elements, offset = [], 0
    while offset + 8 <= len(body):
        kind, data, offset = _mat_element(body, offset)
        elements.append((kind, data))
    (_, flags), (_, dims), (_, name), (real_kind, real) = elements[:4]
    matlab_class = struct.unpack_from("<I", flags)[0] & 0xFF
    if matlab_class not in MAT_CLASS:  # cells, structs, chars, sparse: not needed here
        return name.decode("ascii"), None
    shape = np.frombuffer(dims, np.int32)
    values = np.frombuffer(real, MAT_NUMERIC[real_kind]).astype(MAT_CLASS[matlab_class])
    return name.decode("ascii"), values.reshape(shape, order="F")


def _read_bytes(path: Path) -> bytes:
    """Whole file, transparently gunzipped / bunzipped by suffix."""
    opener = {".gz": gzip.open, ".bz2": bz2.open}.get(Path(path).suffix, open)
    try:
        with opener(path, "rb") as handle:
            return handle.read()
    except (EOFError, OSError, zlib.error) as error:
        raise UserError(f"{path} is truncated or damaged ({error}): delete it and "
                        "download it again")


def _decode(blob_or_path, size: int | None = None, square: bool = False) -> np.ndarray:
    """One image file -> uint8 (H, W, C); optionally center-cropped square and resized.
    A file that claims more pixels than Pillow's safety limit (Image.MAX_IMAGE_PIXELS,
    89 million: a decompression bomb, a few kB that decode to gigabytes) is refused
    before it is decoded."""
    source = io.BytesIO(blob_or_path) if isinstance(blob_or_path, bytes) else blob_or_path
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(source)
    with image:
        image = _eight_bit(image)
        if square:
            side = min(image.size)
            left, top = (image.width - side) // 2, (image.height - side) // 2
            image = image.crop((left, top, left + side, top + side))
        if size is not None and image.size != (size, size):
            image = image.resize((size, size), Image.BICUBIC, reducing_gap=None)
        return np.asarray(image).reshape(image.height, image.width, -1)


def _eight_bit(image: Image.Image) -> Image.Image:
    """8-bit gray ('L') or RGB. Pillow opens 16-bit gray PNGs as 'I;16' (or 'I'), values
    0..65535, and its convert('L') clips them at 255 instead of scaling: scale by the
    bit depth, 65535 / 255 = 257."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        wide = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.rint(wide / 257).clip(0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB" if image.mode not in ("L", "1") else "L")


def _decode_all(blobs, desc: str, size=None, square=False, names=None) -> np.ndarray:
    """Decode many files into one uint8 (N, C, H, W) array, with a progress line.
    Gray images among colour ones are replicated to three channels; `names` (default:
    the paths) name a file that cannot be read."""
    decoded = []
    for index, blob in enumerate(Progress(blobs, desc, unit="img")):
        name = names[index] if names is not None else blob
        try:
            decoded.append(_decode(blob, size, square))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise UserError(f"{desc}: {name} claims more than {Image.MAX_IMAGE_PIXELS:,} "
                            "pixels (a decompression bomb, or no face or digit picture): "
                            "remove it") from None
        except (OSError, ValueError, SyntaxError) as error:  # Pillow's errors for bad files
            raise UserError(f"{desc}: {name} is not a readable image ({error}): remove or "
                            "replace it") from None
    if len({image.shape[2] for image in decoded}) > 1:
        decoded = [np.repeat(image, 3 // image.shape[2], axis=2) for image in decoded]
    shapes = {image.shape[:2] for image in decoded}
    if len(shapes) > 1:
        raise UserError(f"{desc}: images have different sizes {sorted(shapes)[:3]}: give "
                        "--image-size so they can be resized to one")
    return np.stack(decoded).transpose(0, 3, 1, 2)


# ============================================================================ data sets
MNIST_MIRRORS = ["https://ossci-datasets.s3.amazonaws.com/mnist/",
                 "http://yann.lecun.com/exdb/mnist/"]
MNIST_FILES = {  # published MD5s of the .gz files (as torchvision checks them)
    "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
}
USPS_URL = "https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/multiclass/"
USPS_FILES = {"usps.bz2": "ec16c51db3855ca6c91edd34d0e9b197",
              "usps.t.bz2": "8ea070ee2aca1ac39742fdd1ef5ed118"}
SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"
SVHN_FILES = {"train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373",
              "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3"}
MNISTM_URL = "https://github.com/liyxi/mnist-m/releases/download/data/"
MNISTM_FILES = {"mnist_m_train.pt.tar.gz": "191ed53db9933bd85cc9700558847391",
                "mnist_m_test.pt.tar.gz": "e11cb4d7fff76d7ec588b1134907db59"}
CELEBA_DRIVE = "https://drive.google.com/uc?export=download&id="
CELEBA_FILES = {  # Google Drive ids and MD5s of the official aligned-faces release
    "img_align_celeba.zip": ("0B7EVK8r0v71pZjFTYXZWM3FlRnM", "00d2c5bc6d35e252742224ab0c1e8fcb"),
    "list_attr_celeba.txt": ("0B7EVK8r0v71pblRyaVFSWGxPY0U", "75e246fa4810816ffd6ee81facbd244c"),
    "list_eval_partition.txt": ("0B7EVK8r0v71pY0NSMzRuSXJEVkk", "d32c9cbf5e040fd4025c592c306e6668"),
}
DIGIT_CLASSES = [str(d) for d in range(10)]


def _first_existing(candidates) -> Path | None:
    return next((Path(c) for c in candidates if Path(c).exists()), None)


def _mnist(root: Path, split: str, download: bool):
    prefix = "train" if split == "train" else "t10k"
    found = {}
    for stem in (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"):
        found[stem] = _first_existing(
            folder / f"{stem}{suffix}" for folder in (root / "mnist", root / "MNIST" / "raw")
            for suffix in ("", ".gz"))
        if found[stem] is None:
            _need(download, "MNIST", root / "mnist", f"{stem}.gz")
            found[stem] = download_file([u + f"{stem}.gz" for u in MNIST_MIRRORS],
                                        root / "mnist" / f"{stem}.gz", MNIST_FILES[stem])
    images, labels = (read_idx(path) for path in found.values())
    _check_counts("MNIST", images, labels, classes=10)
    return dict(pixels=images[:, None], labels=labels.astype(np.int64)), list(found.values())


def _usps(root: Path, split: str, download: bool):
    name = "usps.bz2" if split == "train" else "usps.t.bz2"
    path = _first_existing([root / "usps" / name, root / "usps" / name[:-4]])
    if path is None:
        _need(download, "USPS", root / "usps", name)
        path = download_file([USPS_URL + name], root / "usps" / name, USPS_FILES[name])
    values, labels = read_libsvm(path, features=256)
    labels = labels - 1  # LIBSVM's USPS stores digit + 1
    # values in [-1, 1] -> bytes; (N, 256) row-major is (N, 16, 16)
    pixels = np.rint((values + 1) * 127.5).clip(0, 255).astype(np.uint8).reshape(-1, 1, 16, 16)
    _check_counts("USPS", pixels, labels, classes=10)
    return dict(pixels=mnist_framed(pixels), labels=labels), [path]


def mnist_framed(usps_pixels: np.ndarray) -> np.ndarray:
    """(N, 1, 16, 16) -> (N, 1, 22, 22): a 3-pixel black border around each USPS digit.

    USPS digits fill their whole 16x16 frame, while MNIST's were scaled into a 20x20 box
    and centred in 28x28 (LeCun et al. 1998). Resized to 28x28 as they come, USPS digits
    are 28 pixels tall against MNIST's 20: a change of scale that a small CNN's features
    do not absorb, and that feature alignment (DANN, ADDA) cannot undo. With the border,
    16 / 22 * 28 = 20 pixels, the MNIST framing, and the domains differ in style only."""
    return np.pad(usps_pixels, ((0, 0), (0, 0), (3, 3), (3, 3)))


def _svhn(root: Path, split: str, download: bool):
    name = f"{'train' if split == 'train' else 'test'}_32x32.mat"
    path = root / "svhn" / name
    if not path.exists():
        _need(download, "SVHN", root / "svhn", name)
        download_file([SVHN_URL + name], path, SVHN_FILES[name])
    arrays = read_mat(path)
    if "X" not in arrays or "y" not in arrays:
        raise UserError(f"{path} has no X and y arrays: is it SVHN's cropped-digits file?")
    pixels = arrays["X"].astype(np.uint8).transpose(3, 2, 0, 1)  # (H, W, C, N) -> (N, C, H, W)
    labels = arrays["y"].reshape(-1).astype(np.int64) % 10       # SVHN writes digit 0 as 10
    _check_counts("SVHN", pixels, labels, classes=10)
    return dict(pixels=pixels, labels=labels), [path]


def _mnistm(root: Path, split: str, download: bool):
    """Original layout (folder or mnist_m.tar.gz, 32x32 PNGs) or the .pt release (28x28)."""
    part = "train" if split == "train" else "test"
    folder = _first_existing([root / "mnist_m" / "mnist_m", root / "mnist_m"])
    if folder is not None and (folder / f"mnist_m_{part}_labels.txt").exists():
        label_file = folder / f"mnist_m_{part}_labels.txt"
        names, labels = _parse_name_label(_text(label_file.read_bytes(), label_file),
                                          label_file, classes=10)
        blobs = [(folder / f"mnist_m_{part}" / n).read_bytes() for n in names]
        return _mnistm_from(names, labels, blobs), [folder / f"mnist_m_{part}_labels.txt"]
    archive = root / "mnist_m" / "mnist_m.tar.gz"
    if archive.exists():
        return _mnistm_from_tar(archive, part), [archive]
    tensor_file = root / "mnist_m" / f"mnist_m_{part}.pt"
    if not tensor_file.exists():
        bundle = root / "mnist_m" / f"mnist_m_{part}.pt.tar.gz"
        if not bundle.exists():
            _need(download, "MNIST-M", root / "mnist_m", "mnist_m.tar.gz or " + bundle.name)
            download_file([MNISTM_URL + bundle.name], bundle, MNISTM_FILES[bundle.name])
        safe_extract(bundle, bundle.parent)
    try:
        images, labels = torch.load(tensor_file, weights_only=True)  # (N, 28, 28, 3) uint8
    except Exception as error:  # truncated, or not the release's (images, labels) pair
        raise UserError(f"{tensor_file} cannot be read as MNIST-M ({type(error).__name__}): "
                        "delete it and download it again") from None
    pixels = images.numpy().transpose(0, 3, 1, 2)
    _check_counts("MNIST-M", pixels, labels.numpy(), classes=10)
    return dict(pixels=pixels, labels=labels.numpy().astype(np.int64)), [tensor_file]


def _mnistm_from_tar(archive: Path, part: str):
    try:
        with tarfile.open(archive) as bundle:
            members = {m.name.split("mnist_m/", 1)[-1]: m for m in bundle.getmembers()}
            label_member = members.get(f"mnist_m_{part}_labels.txt")
            if label_member is None:
                raise UserError(f"{archive} has no mnist_m_{part}_labels.txt: it is not the "
                                "original MNIST-M archive")
            source = f"{archive}:{label_member.name}"
            text = _text(bundle.extractfile(label_member).read(), source)
            names, labels = _parse_name_label(text, source, classes=10)
            blobs = [bundle.extractfile(members[f"mnist_m_{part}/{n}"]).read() for n in names]
    except (tarfile.TarError, EOFError, zlib.error, KeyError) as error:
        raise UserError(f"{archive} is truncated or damaged ({error}): delete it and "
                        "download it again")
    return _mnistm_from(names, labels, blobs)


def _mnistm_from(names, labels, blobs):
    pixels = _decode_all(blobs, "decode MNIST-M", names=names)
    _check_counts("MNIST-M", pixels, labels, classes=10)
    return dict(pixels=pixels, labels=labels, names=names)


def _parse_name_label(text: str, source, classes: int) -> tuple[list[str], np.ndarray]:
    """Lines `name label`, label in 0 .. classes - 1 (MNIST-M's labels.txt, CelebA's
    partition file); a line with another number of fields is named."""
    names, labels = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            row = line.split()
            if len(row) != 2:
                raise UserError(f"{source}, line {number}: {len(row)} field(s) where 'name "
                                "label' has 2: fix or remove that line")
            names.append(row[0])
            labels.append(_label(row[1], source, number, classes))
    return names, np.array(labels, np.int64)


def _label(text: str, source, line: int, classes: int | None = None) -> int:
    """A class label of a text file: a whole number from 0 (below `classes` when given),
    else an error naming the line."""
    if not text.strip().isdigit() or (classes is not None and int(text) >= classes):
        below = f" below {classes}" if classes is not None else " up"
        raise UserError(f"{source}, line {line}: label '{text}' is not a whole number from 0"
                        f"{below}: fix or remove that line")
    return int(text)


CELEBA_SPLITS = {"train": (0,), "test": (1, 2), "val": (1,), "all": (0, 1, 2)}


def _celeba(root: Path, split: str, download: bool, size: int):
    """Aligned CelebA: images present on disk joined to the official annotation files.

    'test' is everything outside the official training range (valid + test), the held-out
    faces that FID is measured against."""
    folder = root / "celeba"
    for name, (drive_id, md5) in CELEBA_FILES.items():
        if name == "img_align_celeba.zip" and (folder / "img_align_celeba").is_dir():
            continue
        if not (folder / name).exists():
            _need(download, "CelebA", folder, name)
            download_file([CELEBA_DRIVE + drive_id], folder / name, md5,
                          hint="Google Drive often refuses this; fetch it in a browser "
                               "from the CelebA page")
    attribute_names, attributes = _parse_celeba_attributes(folder / "list_attr_celeba.txt")
    partition_file = folder / "list_eval_partition.txt"
    partition = dict(zip(*_parse_name_label(_text(partition_file.read_bytes(), partition_file),
                                            partition_file, classes=3)))
    wanted = set(CELEBA_SPLITS[split])
    if (folder / "img_align_celeba").is_dir():
        files = {p.name: p for p in (folder / "img_align_celeba").glob("*.jpg")}
        names = sorted(n for n in files if n in attributes and partition.get(n) in wanted)
        blobs = [files[n] for n in names]
        source = folder / "img_align_celeba"
    else:
        source = folder / "img_align_celeba.zip"
        names, blobs = _celeba_from_zip(source, attributes, partition, wanted)
    if not names:
        raise UserError(f"no CelebA images of split '{split}' found in {source}: check that "
                        "the images and list_eval_partition.txt belong together")
    pixels = _decode_all(blobs, "decode CelebA", size=size, square=True, names=names)
    table = np.stack([attributes[n] for n in names])
    return (dict(pixels=pixels, names=names, attributes=table,
                 attribute_names=attribute_names),
            [source, folder / "list_attr_celeba.txt", folder / "list_eval_partition.txt"])


def _celeba_from_zip(archive: Path, attributes, partition, wanted):
    try:
        with zipfile.ZipFile(archive) as bundle:
            members = {Path(m).name: m for m in bundle.namelist() if m.endswith(".jpg")}
            names = sorted(n for n in members if n in attributes and partition.get(n) in wanted)
            return names, [bundle.read(members[n]) for n in names]
    except (zipfile.BadZipFile, EOFError, zlib.error) as error:
        raise UserError(f"{archive} is truncated or damaged ({error}): delete it and "
                        "download it again")


def _parse_celeba_attributes(path: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """list_attr_celeba.txt: count, the 40 names, then `file v1 ... v40` with v in {-1, 1};
    a line that is not so is named."""
    lines = _text(path.read_bytes(), path).splitlines()
    if len(lines) < 2 or not lines[1].split():
        raise UserError(f"{path} has no line of attribute names (line 2): it is damaged; "
                        "download it again")
    names, rows = lines[1].split(), []
    for number, line in enumerate(lines[2:], start=3):
        row = line.split()
        if row and (len(row) != len(names) + 1 or not set(row[1:]) <= {"1", "-1"}):
            raise UserError(f"{path}, line {number}: not a file name and {len(names)} values "
                            "of 1 or -1: the file is damaged; download it again (or fix "
                            "that line)")
        if row:
            rows.append(row)
    values = (np.array([row[1:] for row in rows], dtype=np.int8).reshape(len(rows), len(names))
              > 0).astype(np.int64)
    return names, dict(zip((row[0] for row in rows), values))


def _folder(root: Path, split: str, size: int | None):
    """The course layout: DIR/data/*.png with DIR/{split}.csv (`image_name,label`, the
    label column optional), or simply a folder of images (unlabelled, e.g. faces)."""
    csv_name = {"train": ["train.csv"], "test": ["test.csv", "val.csv"],
                "val": ["val.csv"]}.get(split, [f"{split}.csv"])
    table = _first_existing(root / name for name in csv_name)
    if table is not None:
        # utf-8-sig: a byte-order mark, as Windows editors write, is not part of the header
        with open(table, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            numbered = [(reader.line_num, row) for row in reader]  # (line in the file, row)
        rows = [row for _, row in numbered]
        if not rows or "image_name" not in rows[0]:
            raise UserError(f"{table} must start with the header 'image_name,label' (label "
                            "optional)")
        image_dir = root / "data" if (root / "data").is_dir() else root
        for number, row in numbered:  # csv gives extra fields the key None, missing ones None
            if None in row or None in row.values() or not row["image_name"].strip():
                raise UserError(f"{table}, line {number}: not 'image_name,label' (or "
                                "'image_name' alone, as in the header): fix or remove that "
                                "line")
        names = [row["image_name"] for row in rows]
        _refuse_repeats(names, [number for number, _ in numbered], table)
        missing = [n for n in names if not (image_dir / n).is_file()]
        if missing:
            raise UserError(f"{table} lists {len(missing)} images missing from {image_dir} "
                            f"(first: {missing[0]}): put the images in {image_dir}")
        labels = (np.array([_label(row["label"] or "", table, number)
                            for number, row in numbered], np.int64)
                  if rows[0].get("label") not in (None, "") else None)
        paths = [image_dir / n for n in names]
        sources = [table, image_dir]
    else:
        paths = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise UserError(f"{root} has neither {' nor '.join(csv_name)} nor image files: "
                            "give a folder with data/*.png and train.csv/val.csv, or a "
                            "folder of images")
        names, labels, sources = [p.name for p in paths], None, [root]
    pixels = _decode_all(paths, f"decode {root.name}", size=size)
    return dict(pixels=pixels, labels=labels, names=names), sources


def _refuse_repeats(names: list[str], lines: list[int], source):
    """An image listed twice (with one label or two) would count twice, or be two things."""
    first = {}
    for name, line in zip(names, lines):
        if name in first:
            raise UserError(f"{source} lists {name} twice (lines {first[name]} and {line}): "
                            "keep one line per image")
        first[name] = line


def _need(download: bool, what: str, folder: Path, name: str):
    if not download:
        raise UserError(f"{what} not found: expected {folder / name}; put the file there "
                        "(or point --data-root at the folder that holds it), or allow "
                        "downloading")


def _check_counts(what: str, images, labels, classes: int):
    if len(images) != len(labels):
        raise UserError(f"{what}: {len(images)} images but {len(labels)} labels; the files do "
                        "not belong together: download them again")
    if len(labels) and (labels.min() < 0 or labels.max() >= classes):
        raise UserError(f"{what}: labels outside 0..{classes - 1}; the file is not the "
                        "expected data set")


# ============================================================================ load + cache
READERS = {"mnist": _mnist, "usps": _usps, "svhn": _svhn, "mnistm": _mnistm}


def load(name: str, split: str = "train", data_root="data", image_size: int | None = None,
         attribute: str | None = None, download: bool = True, cache_dir=None,
         limit: int | None = None) -> ImageSet:
    """Load a data set by name (mnist, mnistm, svhn, usps, celeba) or folder path.

    image_size: digits default 28, faces 64, folders keep their size. attribute: for
    CelebA, the attribute (e.g. 'Smiling') whose 0/1 value becomes the label.
    cache_dir: None for the default cache, "" for none (see cache_folder).
    limit: keep the first `limit` images (for quick runs)."""
    check_split(name, split)
    root = Path(data_root).expanduser()
    if name in READERS or name == "celeba":
        if not root.is_dir() and not download:
            raise UserError(f"data folder {root} does not exist: pass --data-root DIR, the "
                            "folder that holds mnist/, usps/, mnist_m/, svhn/, celeba/")
        size = image_size or (28 if name in DIGITS else 64)
        reader = ((lambda: _celeba(root, split, download, size)) if name == "celeba"
                  else (lambda: READERS[name](root, split, download)))
        where = root
    elif Path(name).expanduser().is_dir():
        where = Path(name).expanduser()
        size = image_size
        reader = lambda: _folder(where, split, size)  # noqa: E731
    else:
        raise UserError(f"unknown data set '{name}': use one of mnist, mnistm, svhn, usps, "
                        "celeba, or the path of an existing image folder")
    # the cache entry belongs to this copy of the data: another --data-root has its own
    entry = f"{Path(name).name}-{_digest(str(where.resolve()))}-{split}-{size}"
    arrays = _cached(lambda: _resized(*reader(), size), entry, cache_folder(cache_dir))
    images = _as_image_set(arrays, attribute, name)
    return images.subset(torch.arange(min(limit, len(images)))) if limit else images


def check_split(name: str, split: str):
    splits = SPLITS.get(name, ("train", "test", "val"))
    if split not in splits:
        raise UserError(f"unknown split '{split}' for {name}: use {', '.join(splits)}")


def _cached(reader, entry: str, cache_dir: Path | None) -> dict:
    """Run `reader` once; afterwards load its arrays from an .npz keyed by the sources.

    ENTRY.sources names the source files with their sizes and times; the arrays are
    served only while every one of them is unchanged. A damaged cache file is rebuilt."""
    if cache_dir is None:
        return reader()[0]
    index = cache_dir / f"{entry}.sources"
    if index.exists():
        key = index.read_text()
        cached = _cache_file(cache_dir, entry, key)
        if cached.exists() and _sources_key(key) == key:
            try:
                return read_arrays(cached, "it is decoded again")
            except UserError as error:
                print(f"cache file {cached} is damaged ({error}): deleting it and decoding "
                      "again", file=sys.stderr)
                cached.unlink()
    arrays, sources = reader()
    key = _sources_signature(sources)
    write_arrays(arrays, _cache_file(cache_dir, entry, key))
    write_text(key, index)
    return arrays


def _cache_file(cache_dir: Path, entry: str, key: str) -> Path:
    return cache_dir / f"{entry}-v{CACHE_VERSION}-{_digest(key)}.npz"


def _sources_signature(sources) -> str:
    """Resolved path, size and modification time of every source: stale caches never load."""
    parts = []
    for source in sources:
        stat = Path(source).stat()
        parts.append(f"{Path(source).resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
    return "\n".join(parts)


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def _sources_key(key: str) -> str:
    """Recompute the signature of the sources named in a stored key ('' if one vanished)."""
    try:
        return _sources_signature(line.rsplit(":", 2)[0] for line in key.splitlines())
    except OSError:
        return ""


def _resized(arrays: dict, sources: list, size: int | None) -> tuple[dict, list]:
    """Bring decoded pixels to size x size before they are cached."""
    pixels = torch.from_numpy(np.require(arrays["pixels"], np.uint8, ["C", "W"]))
    if size is not None and pixels.shape[-2:] != (size, size):
        pixels = resize(pixels, size)
    kept = {name: value for name, value in arrays.items() if value is not None}
    return {**kept, "pixels": pixels.numpy()}, sources


def _as_image_set(arrays: dict, attribute: str | None, name: str) -> ImageSet:
    pixels = torch.from_numpy(np.require(arrays["pixels"], np.uint8, ["C", "W"]))
    names = [str(n) for n in arrays["names"]] if "names" in arrays else None
    labels = torch.from_numpy(np.asarray(arrays["labels"], np.int64)) if "labels" in arrays \
        else None
    classes = DIGIT_CLASSES if name in DIGITS else []
    attributes, attribute_names = None, []
    if "attributes" in arrays:
        attributes = torch.from_numpy(np.asarray(arrays["attributes"], np.int64))
        attribute_names = [str(n) for n in arrays["attribute_names"]]
    if attribute is not None:
        if attribute not in attribute_names:
            raise UserError(f"attribute '{attribute}' is not available for {name}: choose "
                            f"one of {', '.join(attribute_names) or 'none (no attributes)'}")
        labels = attributes[:, attribute_names.index(attribute)]
        classes = [f"not {attribute}", attribute]
    elif labels is not None and not classes:
        classes = [str(c) for c in range(int(labels.max()) + 1)]
    return ImageSet(pixels, labels, names, classes, attributes, attribute_names)


def resize(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, C, h, w) -> uint8 (N, C, size, size), bilinear with antialiasing."""
    resized = torch.cat([F.interpolate(chunk.float(), size=(size, size), mode="bilinear",
                                       align_corners=False, antialias=True)
                         for chunk in pixels.split(4096)])
    return resized.round_().clamp_(0, 255).to(torch.uint8)


def describe(images: ImageSet) -> str:
    """Counts per class (or per attribute value), image size and value range, as text."""
    lines = [f"{len(images)} images, {images.pixels.shape[1]} channel(s) served as 3, "
             f"{images.image_size}x{images.image_size}"]
    if images.labels is not None:
        counts = torch.bincount(images.labels, minlength=len(images.classes)).tolist()
        lines.append("  " + "  ".join(f"{c}: {n}" for c, n in zip(images.classes, counts)))
    else:
        lines.append("  (no labels)")
    return "\n".join(lines)


# ============================================================================ image I/O
def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float in [-1, 1] -> uint8 (rounded to nearest, clamped), same shape, on the CPU."""
    return images.detach().float().add(1).mul(127.5).add_(0.5).clamp_(0, 255) \
        .to(torch.uint8).cpu()


def make_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2,
              pad_value: float = 0.0) -> torch.Tensor:
    """Tile (N, C, H, W) into one (C, rows*(H+p)+p, nrow*(W+p)+p) image, like torchvision."""
    count, channels, height, width = images.shape
    columns = min(nrow, count)
    rows = -(-count // columns)
    cell_h, cell_w = height + padding, width + padding
    grid = images.new_full((channels, rows * cell_h + padding, columns * cell_w + padding),
                           pad_value)
    # place all images at once: pad to a full rows x columns table, then fold the table
    table = images.new_full((rows * columns, channels, cell_h, cell_w), pad_value)
    table[:count, :, :height, :width] = images
    table = table.view(rows, columns, channels, cell_h, cell_w).permute(2, 0, 3, 1, 4)
    grid[:, padding:, padding:] = table.reshape(channels, rows * cell_h, columns * cell_w)
    return grid


def grid_image(images: torch.Tensor, nrow: int = 8, padding: int = 2) -> Image.Image:
    """Images in [-1, 1] as one picture, a grid on black (torchvision's save_image)."""
    return to_image(make_grid(images.detach().float().cpu(), nrow, padding, pad_value=-1.0))


def to_image(image: torch.Tensor) -> Image.Image:
    """One image (C, H, W) in [-1, 1] as a Pillow image (gray for one channel)."""
    array = to_uint8(image).permute(1, 2, 0).numpy()
    return Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)


def save_grid(images: torch.Tensor, path, nrow: int = 8, padding: int = 2) -> Path:
    """Save images in [-1, 1] as one PNG grid."""
    return write_image(grid_image(images, nrow, padding), path)


def save_images(images: torch.Tensor, folder, names: list[str]) -> list[Path]:
    """Save each image in [-1, 1] as its own PNG, e.g. names 0_001.png ... 9_100.png."""
    return [write_image(to_image(image), Path(folder) / name) for image, name in
            zip(images, names)]
