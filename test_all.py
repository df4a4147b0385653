"""Tests, grouped by module. Each test names the claim it checks and compares with ground
truth: numbers written by hand, a reference implementation (scipy's MAT writer, torch's
own layers), or a closed form. Run: python -m pytest -q test_all.py
"""
import base64
import bz2
import contextlib
import copy
import dataclasses
import errno
import functools
import gzip
import hashlib
import html.parser
import inspect
import io
import json
import math
import multiprocessing
import os
import re
import shlex
import socket
import struct
import subprocess
import sys
import tarfile
import types
import urllib.error
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import unquote

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.optim.optimizer import (register_optimizer_step_post_hook,
                                   register_optimizer_step_pre_hook)

# the project's modules in import order (each after those it imports); the sections
# below follow this order
import util
import parallel
import nets
import data
import plots
import tsne
import pages
import training
import metrics
import hog
import classifier
import reports
import gan
import vae
import ddpm
import uda
import run
import bench

SHARED_DATA = Path(__file__).resolve().parent.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own default cache: nothing from the user's ~/.cache or from
    another test can answer a load."""
    folder = tmp_path_factory.mktemp("default-cache")
    monkeypatch.setenv("DLCV_CACHE", str(folder))

    def no_network(url, path):  # and no download: a test that tried one fails offline too
        raise urllib.error.URLError(f"tests do not download ({url})")
    monkeypatch.setattr(data, "_stream_to", no_network)
    return folder


def one_line_error(capsys, argv) -> str:
    """Run the command line, expect exit 2 and stderr ending in one error line (progress
    lines may come before it, a traceback may not); return that line."""
    assert run.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == lines[-1:] and not any("Traceback" in line for line in lines), lines
    return lines[-1]


# ============================================================================ shared stubs
# Tiny data and settings, stub networks and recorders that several sections use.


def write_idx(path: Path, array: np.ndarray):
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def make_mnist(root: Path, count=6, gz=True, folder="mnist"):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
    labels = np.arange(count) % 10
    (root / folder).mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for prefix in ("train", "t10k"):
        write_idx(root / folder / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(root / folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
    return images, labels


def fake_network(monkeypatch, payload: bytes | None):
    """Replace the one network call; payload None means 'offline'."""
    def stream(url, path):
        if payload is None:
            raise urllib.error.URLError("Temporary failure in name resolution")
        Path(path).write_bytes(payload)
    monkeypatch.setattr(data, "_stream_to", stream)


def image_folder(folder: Path, count: int = 3, size: int = 16) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (size, size, 3), np.uint8)) \
            .save(folder / f"{i}.png")
    return folder


class PooledFeatures(nn.Module):
    """A cheap stand-in for Inception in the tracker tests (Inception itself is checked
    against pytorch-fid above): 4x4 average pools of the [0, 1] input, 48 features."""

    def forward(self, images):
        return F.adaptive_avg_pool2d(images, 4).flatten(1)


@pytest.fixture
def cheap_fid(tmp_path, monkeypatch):
    """load_fid_inception gives PooledFeatures; returns the path of its 'weights' file."""
    weights = tmp_path / "stand-in.pth"
    weights.write_bytes(b"stand-in weights")

    def load(cache_dir=None, device="cpu", weights=None):
        network = PooledFeatures()
        network.weights_file = Path(weights or tmp_path / "stand-in.pth")
        return network
    monkeypatch.setattr(metrics, "load_fid_inception", load)
    return weights


def own_fid(fake: torch.Tensor, real: torch.Tensor) -> float:
    """The FID formula on PooledFeatures' features, computed apart from the tracker."""
    def statistics(images):
        return metrics.gaussian_statistics(PooledFeatures()((images + 1) / 2).double().numpy())
    return metrics.frechet_distance(*statistics(fake), *statistics(real))


def own_kid(fake: torch.Tensor, real: torch.Tensor) -> tuple[float, float]:
    """KID on PooledFeatures' features with the trackers' subsets, apart from the tracker."""
    def features(images):
        return PooledFeatures()((images + 1) / 2).double().numpy()
    return metrics.kid(features(real), features(fake),
                       torch.Generator().manual_seed(metrics.KID_SEED))


def clusters(per_cluster=30, dims=10, seed=0):
    """Three well separated Gaussian blobs with their labels."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 20, (3, dims))
    X = np.concatenate([c + rng.normal(0, 1, (per_cluster, dims)) for c in centres])
    return X, np.repeat(np.arange(3), per_cluster)


def toy_digits(count=64, seed=0) -> data.ImageSet:
    """Two classes a small CNN separates at once: dark images (0) and bright ones (1)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % 2
    pixels = (torch.rand(count, 3, 28, 28, generator=generator) * 100
              + 150 * labels.view(-1, 1, 1, 1)).to(torch.uint8)
    return data.ImageSet(pixels, labels, classes=["dark", "bright"])


def toy_domain(count=40, seed=0, inverted=False, labels=None) -> data.ImageSet:
    """Ten classes told apart by the row of a bright band; the target domain inverts the
    colours, a shift a classifier trained on the source does not survive. The labels are
    drawn from the seed, so two splits or domains label their images differently (labels
    taken from the wrong one do not agree by chance)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (count,), generator=generator) if labels is None else labels
    pixels = torch.rand(count, 3, 28, 28, generator=generator) * 60
    rows = 2 * labels + 4
    pixels[torch.arange(count), :, rows] = 255.0
    pixels = pixels.to(torch.uint8)
    return data.ImageSet(255 - pixels if inverted else pixels, labels,
                         names=[f"{i:05d}.png" for i in range(count)],
                         classes=[str(d) for d in range(10)])


TOY_SIZES = {("mnistm", "train"): 45, ("usps", "train"): 38, ("mnistm", "test"): 23,
             ("usps", "test"): 29}  # no two alike, none a multiple of a batch of 8


def toy_load(name, split, image_size):
    if name == "svhn":
        raise util.UserError("SVHN not found: expected data/svhn/train_32x32.mat")
    return toy_domain(TOY_SIZES.get((name, split), 40), seed=len(name) + 10 * (split == "test"),
                      inverted=name != "mnistm")


def tiny_uda(**changes) -> "uda.UDASettings":
    return uda.UDASettings(**{"epochs": 1, "adapt_epochs": 1, "batch_size": 8,
                              "tsne_points": 20, **changes})


def toy_faces(count=32, size=32) -> data.ImageSet:
    generator = torch.Generator().manual_seed(0)
    return data.ImageSet((torch.rand(count, 3, size, size, generator=generator) * 255)
                         .to(torch.uint8), torch.arange(count) % 2)


def tiny_gan(**changes) -> "gan.GANSettings":
    return gan.GANSettings(**{"image_size": 32, "steps": 2, "batch_size": 4,
                              "sample_every": 1, "fid_images": 0, **changes})


def tiny_vae(**changes) -> "vae.VAESettings":
    return vae.VAESettings(**{"latent_dim": 8, "epochs": 2, "batch_size": 8,
                              "tsne_points": 16, "fid_images": 0, **changes})


# Which images and labels each loss sees, which parameters each optimiser moves and by
# which gradient, which networks stay frozen. Stub networks small enough for a hand-written
# reference (tiny Linear layers, no batch norm or dropout), optimisers whose every step is
# recorded, and the reference gradient by autograd of the loss as the paper writes it.
def recording_sgd(params, lr: float) -> torch.optim.SGD:
    """Plain SGD (no momentum: the step is exactly -lr * grad) that keeps, at each step,
    a copy of the gradient of every parameter it holds (zeros where there is none)."""
    params = list(params)
    optimizer = torch.optim.SGD(params, lr=lr)
    optimizer.seen = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: opt.seen.append(
        [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params]))
    return optimizer


def gradients(loss, params) -> list[torch.Tensor]:
    """d loss / d p for each p (zeros where the loss does not depend on p)."""
    params = list(params)
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def assert_all_close(actual, expected, atol=1e-6, what=""):
    assert len(actual) == len(expected), what
    for index, (a, e) in enumerate(zip(actual, expected)):
        assert torch.allclose(a, e, atol=atol, rtol=1e-5), (what, index, (a - e).abs().max())


def parameters_of(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


class Recorder(nn.Module):
    """Wraps a network; keeps a copy of every input and output."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.inputs, self.outputs = inner, [], []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        out = self.inner(x)
        self.outputs.append(out.detach().clone())
        return out


@contextlib.contextmanager
def optimiser_hooks(before=None, after=None):
    """Call before(optimizer) and after(optimizer) around every optimiser step taken inside
    the with block (torch's global hooks: the training loops build their own optimisers)."""
    handles = [register(lambda optimizer, args, kwargs, call=call: call(optimizer))
               for register, call in ((register_optimizer_step_pre_hook, before),
                                      (register_optimizer_step_post_hook, after))
               if call is not None]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def held(optimizer) -> set:
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


def ids(*modules) -> set:
    return {id(p) for module in modules for p in module.parameters()}


def moving_average(initial, snapshots, decay):
    """nets.update_ema applied after step k = 0, 1, ...: d = min(decay, (1 + k) / (10 + k))."""
    average = [p.clone() for p in initial]
    for k, current in enumerate(snapshots):
        d = min(decay, (1 + k) / (10 + k))
        average = [d * a + (1 - d) * c for a, c in zip(average, current)]
    return average


def labels_fit(images: torch.Tensor, labels: torch.Tensor) -> bool:
    """toy_domain draws class k as a band at row 2k + 4 (bright, or dark when inverted)."""
    rows = images.mean(dim=(1, 3))                                        # (B, 28)
    band = torch.where(images.mean(dim=(1, 2, 3))[:, None] < 0, rows, -rows).argmax(dim=1)
    return torch.equal(band, 2 * labels.cpu() + 4)


def alone_equals_in_batch(function, batch: torch.Tensor, atol: float = 1e-5) -> bool:
    """function of each row alone equals its row of function(batch): eval mode, no batch
    statistics, no dropout mask that depends on the batch."""
    together = function(batch)
    alone = torch.cat([function(batch[i:i + 1]) for i in range(len(batch))])
    return torch.allclose(together, alone, atol=atol)


# What a run saved, and what its numbers should be, computed here: the states of every
# checkpoint it wrote, and an accuracy by hand.
def saved_states(monkeypatch, folder: Path) -> list:
    """Every state util.save_checkpoint writes into folder (a checkpoint.pt), copied."""
    states, real_save = [], util.save_checkpoint

    def saving(state, path):
        if Path(path).parent == Path(folder) and Path(path).name == "checkpoint.pt":
            states.append(copy.deepcopy(state))
        return real_save(state, path)
    monkeypatch.setattr(util, "save_checkpoint", saving)
    return states


def own_accuracy(network: nn.Module, images: data.ImageSet) -> tuple[float, torch.Tensor]:
    """The share of images whose argmax class under network (in eval mode) is their label."""
    with torch.no_grad():
        predicted = network.eval()(images.images()).argmax(dim=1)
    return int((predicted == images.labels).sum()) / len(images), predicted


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header that claims width x height one-bit pixels, with a few bytes of
    data: what a decompression bomb looks like to Image.open."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))



class Page(html.parser.HTMLParser):
    """What a browser would take from an HTML page: the files it loads or links (src,
    href), its reload delay, its tables (rows of cell texts), the <pre> blocks and the
    text."""

    def __init__(self, path: Path):
        super().__init__()
        self.links, self.refresh, self.tables, self.pres, self.text = [], None, [], [], ""
        self.cell = self.pre = None
        self.feed(Path(path).read_text())

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.links += [attrs[key] for key in ("src", "href") if key in attrs]
        if tag == "meta" and attrs.get("http-equiv") == "refresh":
            self.refresh = int(attrs["content"])
        if tag == "table":
            self.tables.append([])
        if tag == "tr":
            self.tables[-1].append([])
        if tag in ("td", "th"):
            self.cell = ""
        if tag == "pre":
            self.pre = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self.cell)
            self.cell = None
        if tag == "pre":
            self.pres.append(self.pre)
            self.pre = None

    def handle_data(self, text):
        self.text += text
        self.cell = None if self.cell is None else self.cell + text
        self.pre = None if self.pre is None else self.pre + text

    def files(self, folder: Path) -> list[Path]:
        """Every linked file, checked to lie inside folder and to exist (anchors aside)."""
        paths = [(folder / unquote(link)).resolve() for link in self.links
                 if not link.startswith("#")]
        for path in paths:
            assert path.is_relative_to(folder.resolve()) and path.is_file(), path
        return paths

    def table(self, first_header: str) -> dict:
        """The table whose header starts with first_header: {first cell: rest of the row}."""
        rows = next(table for table in self.tables if table[0][0] == first_header)
        return {row[0]: row[1:] for row in rows[1:]}


# ============================================================================ util
# Pins errors, progress, atomic files, checkpoints (finite weights, hash or not), locks,
# devices, seeds.


class RunsCode:
    """Unpickling this calls Path.touch(marker): what a crafted checkpoint could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_progress_prints_rate_and_eta_lines_when_not_a_terminal():
    stream = io.StringIO()
    progress = util.Progress(range(4), "train", interval=0.0, stream=stream)
    for _ in progress:
        progress.update(0, loss=0.5)
    lines = stream.getvalue().splitlines()
    assert lines[-1].startswith("train: 100% 4/4") and "it/s" in lines[-1]
    assert "loss=0.5" in lines[-1] and "<" in lines[-1] and "\r" not in stream.getvalue()


def test_progress_of_a_resumed_run_rates_only_the_new_steps(monkeypatch):
    clock = iter([0.0, 10.0, 10.0])  # created at t = 0 s; updated, then drawn at t = 10 s
    monkeypatch.setattr(util.time, "perf_counter", lambda: next(clock))
    progress = util.Progress(desc="DDPM", total=100, initial=60, interval=1e9,
                             stream=io.StringIO())
    progress.update(20)  # 20 new steps in 10 s: 2 it/s, 20 left, ETA 10 s
    line = progress.line()
    assert "80% 80/100" in line and "2.00 it/s" in line and "<00:10" in line, line


def test_checkpoint_write_is_atomic_and_damage_is_reported(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    util.save_checkpoint({"step": 1}, path)

    def crash(obj, target):
        Path(target).write_bytes(b"half")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        util.save_checkpoint({"step": 2}, path)
    assert util.load_checkpoint(path)["step"] == 1  # the old checkpoint survived
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # and the half-written temporary is gone
    path.write_bytes(b"garbage")
    with pytest.raises(util.UserError, match="damaged"):
        util.load_checkpoint(path)


def test_arrays_are_written_atomically_through_a_per_process_temporary(tmp_path, monkeypatch):
    """Two runs decoding into one cache must not share a temporary file (they did, and
    one of them crashed renaming the other's)."""
    temporaries = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda tmp, path: (temporaries.append(Path(tmp).name),
                                                          real_replace(tmp, path)))
    arrays = {"pixels": np.arange(6, dtype=np.uint8).reshape(1, 1, 2, 3), "labels": np.ones(1)}
    path = util.write_arrays(arrays, tmp_path / "cache.npz")
    with np.load(path) as stored:
        assert {k: stored[k].tolist() for k in stored} == {k: v.tolist() for k, v in arrays.items()}
    assert temporaries == [f"cache.npz.{os.getpid()}.tmp"] and os.listdir(tmp_path) == ["cache.npz"]


def test_a_crafted_checkpoint_is_refused_without_running_its_code(tmp_path, capsys):
    marker, crafted = tmp_path / "ran", tmp_path / "crafted.pt"
    torch.save({"command": "gan", "settings": {}, "gan": RunsCode(marker)}, crafted)
    with pytest.raises(util.UserError, match="cannot be read as a checkpoint"):
        util.load_checkpoint(crafted)
    line = one_line_error(capsys, ["gan", "--generate", "2", "--ckpt", str(crafted),
                                   "--out", str(tmp_path / "o")])
    assert "cannot be read as a checkpoint" in line and not marker.exists()


def test_checkpoint_of_non_finite_weights_is_refused_and_the_last_good_one_kept(tmp_path):
    path = tmp_path / "checkpoint.pt"
    util.save_checkpoint({"step": 1, "model": {"w": torch.ones(3)}}, path)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(util.UserError, match="NaN or infinite .at step 2"):
            util.save_checkpoint({"step": 2, "model": {"w": torch.tensor([1.0, bad])},
                                  "optimizer": [{"m": torch.zeros(1)}]}, path)
    assert util.load_checkpoint(path)["step"] == 1 and os.listdir(tmp_path) == ["checkpoint.pt"]


def test_non_finite_weights_are_refused_when_a_checkpoint_loads_hash_or_not(tmp_path, capsys):
    """A file of an earlier version carries no SHA-256, and save_checkpoint's own check
    never saw it: --generate must not sample images from its NaN weights."""
    settings = tiny_gan()
    weights = gan.GAN(settings).state_dict()
    for bad in (float("nan"), float("inf")):
        broken = {name: tensor.clone() for name, tensor in weights.items()}
        next(t for t in broken.values() if t.is_floating_point()).view(-1)[0] = bad
        path = tmp_path / f"old_{bad}.pt"
        torch.save({"command": "gan", "settings": dataclasses.asdict(settings), "step": 2,
                    "gan": broken}, path)  # as an earlier version wrote it: no sha256
        with pytest.raises(util.UserError, match="NaN or infinite weights"):
            util.load_checkpoint(path)
        images = tmp_path / f"images_{bad}"
        line = one_line_error(capsys, ["gan", "--generate", "2", "--ckpt", str(path),
                                       "--out", str(images)])
        assert "NaN or infinite weights" in line and "another checkpoint" in line
        assert not images.exists()
    good = tmp_path / "good.pt"
    torch.save({"command": "gan", "settings": dataclasses.asdict(settings), "gan": weights},
               good)
    assert util.load_checkpoint(good)["command"] == "gan"  # finite and hashless: accepted


def test_a_temporary_left_by_a_killed_writer_is_removed_on_the_next_write(tmp_path):
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f"checkpoint.pt.{ended}.tmp"
    writing = tmp_path / f"checkpoint.pt.{os.getppid()}.tmp"   # a live process's
    other = tmp_path / f"results.json.{ended}.tmp"              # another file's
    for path in (stale, writing, other):
        path.write_bytes(b"half")
    util.save_checkpoint({"step": 1}, tmp_path / "checkpoint.pt")
    assert not stale.exists() and writing.exists() and other.exists()


def test_a_folder_lock_refuses_a_second_run_and_takes_over_a_dead_ones(tmp_path, capsys):
    with util.exclusive(tmp_path):
        with pytest.raises(util.UserError, match=f"another run .process {os.getpid()}."):
            with util.exclusive(tmp_path):
                pass
    assert not (tmp_path / ".lock").exists()
    (tmp_path / ".lock").write_text("999999999")  # no such process: a killed run's lock
    with util.exclusive(tmp_path):
        assert (tmp_path / ".lock").read_text() == str(os.getpid())
    run_folder = tmp_path / "out" / "gan_b"
    run_folder.mkdir(parents=True)
    (run_folder / ".lock").write_text(str(os.getppid()))
    line = one_line_error(capsys, ["gan", "--data-root", str(tmp_path / "none"),
                                   "--no-download", "--out", str(tmp_path / "out")])
    assert "another run" in line and (run_folder / ".lock").exists()


def damage_the_largest_tensor(checkpoint: Path, count: int = 64):
    """Overwrite `count` bytes in the middle of the largest tensor record of a torch.save
    zip with 0xff (NaN as float32), as a disk fault would: the file still opens."""
    with zipfile.ZipFile(checkpoint) as bundle:
        largest = max(bundle.infolist(), key=lambda info: info.file_size)
    with open(checkpoint, "r+b") as handle:
        handle.seek(largest.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", handle.read(4))
        handle.seek(largest.header_offset + 30 + name_length + extra_length
                    + largest.file_size // 2)
        handle.write(b"\xff" * count)


def test_a_checkpoint_damaged_after_it_was_written_is_named_damaged(tmp_path):
    """The bytes of a tensor changed on disk: torch.load reads the file without complaint,
    but the SHA-256 saved inside no longer matches. Catches a checkpoint whose NaNs would
    land in the weights or the optimiser state unnoticed."""
    state = {"command": "x", "settings": {}, "weights": torch.randn(4096), "step": 3}
    path = util.save_checkpoint(state, tmp_path / "checkpoint.pt")
    loaded = util.load_checkpoint(path)
    assert loaded.keys() == state.keys() and torch.equal(loaded["weights"], state["weights"])
    damage_the_largest_tensor(path)
    assert torch.load(path, weights_only=True)["weights"].isnan().sum() == 16  # it opens
    with pytest.raises(util.UserError, match="is damaged: its contents no longer match"):
        util.load_checkpoint(path, given_by="--detector")
    with pytest.raises(util.UserError, match="give --detector another checkpoint"):
        util.load_checkpoint(path, given_by="--detector")
    old = tmp_path / "old.pt"  # an earlier version's file, without the SHA-256: read as is
    torch.save(state, old)
    assert util.load_checkpoint(old)["step"] == 3


def test_payload_sha256_sees_every_value_and_not_the_container():
    state = {"a": torch.ones(3), "b": [1, 2.5, "x"], "c": {"d": torch.zeros(2, 2)}}
    digest = util.payload_sha256(state)
    assert digest == util.payload_sha256({"c": {"d": torch.zeros(2, 2)}, "b": [1, 2.5, "x"],
                                          "a": torch.ones(3)})  # key order
    for changed in ({**state, "a": torch.tensor([1.0, 1.0, 1.0 + 2**-20])},
                    {**state, "b": [1, 2.5, "y"]}, {**state, "c": {"d": torch.zeros(4)}},
                    {**state, "a": torch.ones(3, dtype=torch.float64)}):
        assert util.payload_sha256(changed) != digest


def test_device_names_are_checked_whatever_the_command(monkeypatch, capsys):
    assert util.choose_device("cpu").type == "cpu"
    assert util.choose_device("auto").type in ("cpu", "cuda", "mps")
    for name in ("tpu", "gpu7", "cuda:x", "cpu:0", "cuda:-1"):
        with pytest.raises(util.UserError, match=f"--device {re.escape(name)}: no such device"):
            util.choose_device(name)
    if not torch.cuda.is_available():
        with pytest.raises(util.UserError, match="not available"):
            util.choose_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a one-GPU machine
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert util.choose_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(util.UserError, match="this machine has 1 GPU"):
        util.choose_device("cuda:7")
    monkeypatch.undo()
    assert "no such device" in one_line_error(capsys, ["data", "--name", "mnist", "--device",
                                                       "gpu7"])  # data does not use it


# ============================================================================ parallel
# Pins each process's share of the batch and its random numbers; 1 and N processes alike.


def digit_folder(root: Path, count: int = 16, inverted: bool = False) -> str:
    """toy_domain's digits as a course folder (data/*.png, train.csv, val.csv)."""
    # labels 0..9 in turn: the 2-process test compares accuracies, and these runs' weights
    # differ in the last bits, at no image near a decision boundary for these labels
    digits = toy_domain(count, inverted=inverted, labels=torch.arange(count) % 10)
    (root / "data").mkdir(parents=True)
    data.save_images(digits.pixels.float() / 127.5 - 1, root / "data", digits.names)
    rows = "".join(f"{name},{int(label)}\n" for name, label in zip(digits.names, digits.labels))
    for split in ("train", "val"):
        (root / f"{split}.csv").write_text("image_name,label\n" + rows)
    return str(root)


def free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


def rank_main(rank: int, world: int, port: int, argv: list, folder: str, die_at: int):
    """One process of a torchrun-like launch (the environment torchrun sets), running
    run.main(argv); its stderr goes to FOLDER/rank{rank}.err, its exit code to
    FOLDER/rank{rank}.code. die_at: process 1 is killed at that step."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), DLCV_DIST_TIMEOUT="60")
    torch.set_num_threads(1)
    if die_at and rank == 1:
        real_add = training.StepLog.add

        def add(log, numbers):
            if len(log.history["step"]) + 1 >= die_at:  # a commit a step (--sample-every 1)
                os._exit(9)  # as if killed: no message, no clean-up
            real_add(log, numbers)
        training.StepLog.add = add
    sys.stderr = open(Path(folder) / f"rank{rank}.err", "w", buffering=1)  # for the test
    code = run.main(argv)
    (Path(folder) / f"rank{rank}.code").write_text(str(code))


def launch(argv: list, folder: Path, world: int = 2, die_at: int = 0) -> list[int]:
    """run.main(argv) in `world` fresh processes joined by gloo on localhost, as
    torchrun --nproc_per_node world would start them; their exit codes by rank."""
    folder.mkdir(parents=True, exist_ok=True)
    context, port = multiprocessing.get_context("spawn"), free_port()
    processes = [context.Process(target=rank_main,
                                 args=(r, world, port, [str(a) for a in argv], str(folder),
                                       die_at)) for r in range(world)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=240)
        assert process.exitcode is not None, "a process hung"
    return [int((folder / f"rank{r}.code").read_text()) if (folder / f"rank{r}.code").exists()
            else processes[r].exitcode for r in range(world)]


def weights_of(checkpoint: Path, key: str) -> dict:
    return {name: value.float() for name, value in
            torch.load(checkpoint, weights_only=True)[key].items()
            if value.is_floating_point()}


def relative_difference(one: dict, two: dict, start: dict) -> float:
    """||w_2 - w_1|| / ||w_1 - w_0||: how far two runs' weights lie apart, measured
    against how far training moved them (w_0: the initial weights). Adam's first steps
    are about lr sign(gradient), so rounding can flip a few steps of near-zero gradients:
    equal runs stay near 0.01 here, per-process batch-norm statistics reach 0.3."""
    def norm(pairs):
        return math.sqrt(sum(float((a - b).pow(2).sum()) for a, b in pairs))
    names = [name for name in start if name in one]
    return norm((two[n], one[n]) for n in names) / norm((one[n], start[n]) for n in names)


GAN_FLAGS = ["--image-size", "32", "--steps", "3", "--batch-size", "4", "--sample-every", "1",
             "--fid-images", "0", "--no-download"]


def assert_same_run(one: Path, two: Path, key: str, start: dict):
    """The runs in folders one and two (checkpoint.pt) are the same run: the first step's
    logged numbers agree closely (a wrong share of the batch moves them by percents), and
    the weights after all steps too (per-process batch-norm statistics: 0.3 or more)."""
    first = [torch.load(folder / "checkpoint.pt", weights_only=True)["history"]
             for folder in (one, two)]
    assert first[0]["step"] == first[1]["step"]
    for name, values in first[0].items():
        if name != "step":  # losses, and accuracies (dropout left on would move them)
            assert values[0] == pytest.approx(first[1][name][0], rel=1e-4, abs=1e-6), name
    weights = [weights_of(folder / "checkpoint.pt", key) for folder in (one, two)]
    assert relative_difference(*weights, start) < 0.05


def torchrun(argv: list, nproc: int = 2, timeout: int = 300):
    """python -m torch.distributed.run --standalone --nproc_per_node N run.py ARGV: the
    real launcher, on localhost."""
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
         str(nproc), "run.py", *map(str, argv)], cwd=Path(__file__).resolve().parent,
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=timeout)


def fixed_stream(seed: int) -> parallel.Random:
    """A stream that draws like torch.Generator().manual_seed(seed) in every process."""
    return parallel.Random(seed, per_process=False)


def fake_world(monkeypatch, world: int, rank: int):
    monkeypatch.setattr(parallel, "world", lambda: world)
    monkeypatch.setattr(parallel, "rank", lambda: rank)


def test_random_shift_moves_content_by_the_drawn_amount():
    image = torch.full((1, 3, 28, 28), -1.0)
    image[:, :, 12:16, 10:14] = 1.0  # a bright square away from the borders
    shifted = classifier.random_shift(image, 0.1, parallel.Random(1))
    drawn = (torch.rand(1, 2, generator=torch.Generator().manual_seed(1)) * 2 - 1) * 0.2
    mass = (image[0, 0] + 1), (shifted[0, 0] + 1)
    coords = torch.arange(28.0)

    def centroid(m):
        return torch.stack([(m.sum(0) * coords).sum(), (m.sum(1) * coords).sum()]) / m.sum()
    moved = centroid(mass[1]) - centroid(mass[0])  # (x, y) in pixels
    assert torch.allclose(moved, -drawn[0] * 28 / 2, atol=1e-3)
    assert torch.equal(classifier.random_shift(image, 0.0, parallel.Random(1)), image)


@pytest.mark.parametrize("variant", ["a", "b", "wgan-gp", "hacks"])
def test_two_processes_train_the_same_gan_as_one(tmp_path, variant):
    """Every draw of the global batch split, batch norm over both shares, G and D each
    averaging its gradients: the 3 steps of 2 processes are those of 1 (variant a: batch norm in D, b:
    spectral norm and DiffAugment, wgan-gp: the penalty's double backward, hacks: noisy
    and flipped targets, instance noise and dropout)."""
    faces = str(image_folder(tmp_path / "faces", 8, 32))
    argv = ["gan", "--variant", variant, "--data", faces, *GAN_FLAGS]
    assert run.main(argv + ["--out", str(tmp_path / "one")]) == 0
    assert launch(argv + ["--out", tmp_path / "two"], tmp_path / "logs") == [0, 0]
    settings = gan.GANSettings(**torch.load(tmp_path / "one" / f"gan_{variant}" /
                                            "checkpoint.pt", weights_only=True)["settings"])
    torch.manual_seed(0)
    start = {k: v.float() for k, v in gan.GAN(settings).state_dict().items()
             if v.is_floating_point()}
    assert_same_run(tmp_path / "one" / f"gan_{variant}", tmp_path / "two" / f"gan_{variant}",
                    "gan", start)
    assert (tmp_path / "two" / f"gan_{variant}" / "samples.png").is_file()
    assert (tmp_path / "logs" / "rank1.err").read_text() == ""  # rank 0 alone speaks


def test_torchrun_ddpm_equals_one_process_resumes_and_writes_the_same_1000_images(tmp_path):
    """Under the real torchrun, 2 processes train the DDPM (dropout masks drawn for the
    global batch) as 1 does, a run stopped at step 2 and resumed equals one that was not,
    and the 1000 course images, sampled half by each process, carry the same names and
    pixels as those of 1 process."""
    digits = digit_folder(tmp_path / "digits")
    argv = ["ddpm", "--data", digits, "--timesteps", "20", "--width", "8", "--batch-size",
            "4", "--sample-every", "1", "--sampling-steps", "2", "--fid-images", "0",
            "--amp", "off", "--no-download"]
    assert run.main(argv + ["--steps", "3", "--out", str(tmp_path / "one")]) == 0
    first = torchrun(argv + ["--steps", "2", "--out", tmp_path / "two"])
    assert first.returncode == 0, first.stderr[-2000:]
    resumed = torchrun(argv + ["--steps", "3", "--resume", "--out", tmp_path / "two"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout and resumed.stdout.count("done:") == 1
    _, settings = ddpm.load(tmp_path / "one" / "ddpm" / "checkpoint.pt", "cpu")
    torch.manual_seed(0)
    start = {k: v.float() for k, v in ddpm.Diffusion(settings).state_dict().items()}
    assert_same_run(tmp_path / "one" / "ddpm", tmp_path / "two" / "ddpm", "model", start)
    images = [sorted((tmp_path / run_ / "ddpm" / "images").iterdir()) for run_ in ("one", "two")]
    assert [p.name for p in images[0]] == [p.name for p in images[1]] and len(images[0]) == 1000
    for mine, theirs in zip(images[0][::97], images[1][::97]):
        difference = np.abs(np.asarray(Image.open(mine), int) - np.asarray(Image.open(theirs), int))
        assert difference.max() <= 2, mine.name


def test_two_processes_train_the_same_vae_uda_and_classifier_as_one(tmp_path):
    """Batch norm over both shares, dropout masks of the global batch, gradient reversal
    inside DANN's graph, ADDA's two phases (F_s and C frozen, F_t and D averaging their gradients): each
    model's 2-process run is its 1-process run."""
    faces = str(image_folder(tmp_path / "faces", 8, 64))
    source, target = digit_folder(tmp_path / "src"), digit_folder(tmp_path / "tgt", inverted=True)
    commands = {  # folder of the checkpoint, key of its weights, model for the start
        "vae": (["vae", "--data", faces, "--epochs", "1", "--batch-size", "4", "--latent-dim",
                 "8", "--fid-images", "0", "--tsne-points", "0"], "vae_lambda1", "model",
                lambda: vae.VAE(8)),
        "uda": (["uda", "--method", "all", "--src", source, "--tgt", target, "--epochs", "1",
                 "--adapt-epochs", "1", "--batch-size", "8", "--tsne-points", "8",
                 "--confidence", "0.2"],  # self-ensembling's consistency terms take part
                "uda", "networks", None),
        "classifier": (["classifier", "--data", source, "--epochs", "1", "--batch-size", "8"],
                       "classifier", "network", lambda: nets.digit_classifier()),
    }
    for name, (argv, folder, key, build) in commands.items():
        argv = argv + ["--no-download"]
        assert run.main(argv + ["--out", str(tmp_path / "one")]) == 0, name
        assert launch(argv + ["--out", tmp_path / "two"], tmp_path / name) == [0, 0], name
        runs = [(tmp_path / "one" / folder, tmp_path / "two" / folder, build)]
        if name == "uda":
            scenario = f"{Path(source).name}-{Path(target).name}"
            runs = [(tmp_path / "one" / folder / scenario / method,
                     tmp_path / "two" / folder / scenario / method,
                     functools.partial(uda.Networks, method)) for method in uda.METHODS]
        for one, two, build_model in runs:
            torch.manual_seed(0)
            start = {k: v.float() for k, v in build_model().state_dict().items()
                     if v.is_floating_point()}
            assert_same_run(one, two, key, start)
    assert (tmp_path / "two" / "uda" / scenario / "dann" / "tsne_domain.png").is_file()
    confident = torch.load(tmp_path / "one" / "uda" / scenario / "self-ensembling" /
                           "checkpoint.pt", weights_only=True)["history"]["confident"]
    assert confident[0] > 0  # the class balance and its batch mean over processes


def test_a_process_that_dies_ends_the_run_with_one_line_and_keeps_the_checkpoint(tmp_path):
    """Process 1 is killed at step 3: process 0 does not hang, it says in one line what
    happened and what to do, exits with 2, and the checkpoint of step 2 stays readable."""
    faces = str(image_folder(tmp_path / "faces", 8, 32))
    argv = ["gan", "--variant", "b", "--data", faces, *GAN_FLAGS, "--steps", "6", "--out",
            tmp_path / "two"]
    codes = launch(argv, tmp_path / "logs", die_at=3)
    assert codes[0] == 2 and codes[1] != 0
    lines = (tmp_path / "logs" / "rank0.err").read_text().strip().splitlines()
    assert lines[-1].startswith("error: the processes of this torchrun lost each other")
    assert "--resume" in lines[-1] and not any("Traceback" in line for line in lines)
    state = util.load_checkpoint(tmp_path / "two" / "gan_b" / "checkpoint.pt")
    assert state["step"] == 2


def test_torchrun_refuses_an_uneven_batch_missing_gpus_or_backend_and_one_process_commands(
        tmp_path, monkeypatch, capsys):
    """Each a one-line error with exit 2, said by rank 0 alone."""
    faces = str(image_folder(tmp_path / "faces", 8, 32))
    argv = ["gan", "--data", faces, *GAN_FLAGS, "--batch-size", "5", "--out", tmp_path / "o"]
    assert launch(argv, tmp_path / "batch") == [2, 2]
    said = [(tmp_path / "batch" / f"rank{r}.err").read_text() for r in (0, 1)]
    assert said[0].strip().splitlines()[-1] == ("error: --batch-size 5 does not split over 2 "
                                                "processes: use a multiple of 2")
    assert said[1] == ""
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it, without starting anything
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert "torchrun started 2 processes on a machine with 1 GPUs" in one_line_error(
        capsys, ["gan", "--device", "cuda", "--data", faces, *GAN_FLAGS])
    monkeypatch.setattr(torch.distributed, "is_backend_available", lambda name: False)
    assert "this torch build has no 'gloo' backend" in one_line_error(
        capsys, ["gan", "--device", "cpu", "--data", faces, *GAN_FLAGS])
    assert "'run.py fid' runs in one process" in one_line_error(
        capsys, ["fid", faces, faces])


@pytest.mark.parametrize("world", [2, 4])
def test_rows_give_each_process_its_contiguous_share_of_the_global_batch(monkeypatch, world):
    batch = torch.arange(8 * 3).view(8, 3)
    shares = []
    for rank in range(world):
        fake_world(monkeypatch, world, rank)
        shares.append(parallel.rows(batch))
    assert torch.equal(torch.cat(shares), batch)  # in order, each row once
    assert all(len(share) == 8 // world for share in shares)
    fake_world(monkeypatch, 3, 0)
    with pytest.raises(util.UserError, match="does not split into 3 equal shares"):
        parallel.rows(batch)


def test_random_draws_the_global_batch_and_keeps_this_processs_rows(monkeypatch):
    """With N processes each draws count * N rows from the same stream and keeps its own,
    so together they hold exactly the numbers one process draws for the whole batch;
    indices are drawn for the global batch size."""
    fake_world(monkeypatch, 1, 0)
    one = parallel.Random(7)
    whole = [one.randn(6, 2), one.rand(6), one.randint(0, 5, (6, 3)), one.indices(50, 6)]
    order = one.permutation(9)
    for world in (2, 3):
        shares = []
        for rank in range(world):
            fake_world(monkeypatch, world, rank)
            rng = parallel.Random(7)
            count = 6 // world
            shares.append([rng.randn(count, 2), rng.rand(count), rng.randint(0, 5, (count, 3)),
                           rng.indices(50, 6)])
            assert torch.equal(rng.permutation(9), order)  # an epoch's order: all of it
        for index, expected in enumerate(whole):
            assert torch.equal(torch.cat([share[index] for share in shares]), expected)
    fake_world(monkeypatch, 1, 0)
    generator = torch.Generator().manual_seed(7)
    assert torch.equal(whole[0], torch.randn(6, 2, generator=generator))  # torch's draw
    assert sorted(order.tolist()) == list(range(9))


def test_a_fixed_stream_draws_the_whole_batch_in_every_process(monkeypatch):
    """Evaluation shares out its batches itself (in_order): a fixed stream's z must be all
    of them in every process, the numbers one process draws."""
    fake_world(monkeypatch, 1, 0)
    expected = fixed_stream(4).randn(6, 3)
    for rank in range(2):
        fake_world(monkeypatch, 2, rank)
        assert torch.equal(fixed_stream(4).randn(6, 3), expected)


def test_distributed_weights_average_their_gradients_once_a_backward(monkeypatch):
    """With N processes, each trainable weight's gradient becomes the mean of the N
    processes' gradients as backward accumulates it (all_reduce faked here: the other
    process's gradient is 3 g); frozen weights and weights the backward does not reach
    exchange nothing."""
    fake_world(monkeypatch, 2, 0)
    exchanged = []

    def all_reduce(tensor):  # the sum over 2 processes whose other one holds 3 g
        exchanged.append(tensor.shape)
        tensor.mul_(4)
    monkeypatch.setattr(parallel.dist, "all_reduce", all_reduce)
    model = parallel.distribute(nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1)))
    model[1].bias.requires_grad_(False)
    x = torch.randn(5, 3)
    model(x).sum().backward(inputs=[model[0].weight, model[0].bias, model[1].weight])
    grads = torch.autograd.grad(model(x).sum(), [model[0].weight, model[1].weight])
    assert torch.allclose(model[0].weight.grad, 2 * grads[0])  # (g + 3 g) / 2
    assert torch.allclose(model[1].weight.grad, 2 * grads[1])
    assert len(exchanged) == 3 and model[1].bias.grad is None
    model.zero_grad()
    model(x).sum().backward(inputs=[model[1].weight])  # a backward that reaches one weight
    assert len(exchanged) == 4 and model[0].weight.grad is None


def test_a_shared_batch_mean_is_the_mean_of_every_processs_rows(monkeypatch):
    """Two processes whose rows are x and 3 x: the mean over the global batch is 2 x.mean(0)
    in both, and the gradient reaches each process's own rows (SumOverProcesses)."""
    fake_world(monkeypatch, 2, 0)
    monkeypatch.setattr(parallel.dist, "all_reduce", lambda tensor: tensor.mul_(4))
    layer = parallel.share_batch_layers(nn.Sequential(nets.BatchMean()))[0]
    assert isinstance(layer, parallel.SharedBatchMean)
    x = torch.randn(5, 3, requires_grad=True)
    mean = layer(x)
    assert torch.allclose(mean, 2 * x.mean(dim=0))
    mean.sum().backward()  # d/dx of sum_k (sum of 10 rows)_k / 10, the sums summed again
    assert torch.allclose(x.grad, torch.full_like(x, 4 / 10))
    fake_world(monkeypatch, 1, 0)
    assert torch.equal(nets.BatchMean()(x), x.mean(dim=0))


def test_random_state_round_trips_through_a_checkpoint():
    rng = parallel.Random(3)
    rng.randn(5)
    state = rng.state_dict()
    expected = rng.rand(4)
    other = parallel.Random(99)
    other.load_state_dict(state)
    assert torch.equal(other.rand(4), expected)


# ============================================================================ nets
# Pins the building blocks against torch's own; each architecture's shapes and sizes.


def saved_layout(rows) -> dict:
    """{state_dict key: shape} of an nn.Sequential given as (index, kind, c_in, c_out) rows:
    the layout that checkpoints saved by the earlier, looped DCGAN builders hold."""
    layout = {}
    for index, kind, c_in, c_out in rows:
        if kind == "up":           # ConvTranspose2d: weight (in, out, kh, kw)
            layout[f"{index}.weight"] = (c_in, c_out, 4, 4)
        elif kind == "conv":       # Conv2d without bias: weight (out, in, kh, kw)
            layout[f"{index}.weight"] = (c_out, c_in, 4, 4)
        elif kind == "spectral":   # W_orig, a bias, u (out,) and v (in * 4 * 4,)
            layout.update({f"{index}.bias": (c_out,), f"{index}.weight_orig": (c_out, c_in, 4, 4),
                           f"{index}.weight_u": (c_out,), f"{index}.weight_v": (c_in * 16,)})
        else:                      # BatchNorm2d
            layout.update({f"{index}.{name}": (c_out,) for name in
                           ("weight", "bias", "running_mean", "running_var")})
            layout[f"{index}.num_batches_tracked"] = ()
    return layout


def generator_rows(latent: int, image_size: int) -> list:
    """ConvTranspose2d, BatchNorm2d, ReLU per stage (index 3 k, 3 k + 1), output conv last."""
    widths = [512, 256, 128, 64] if image_size == 64 else [256, 128, 64]
    channels = [latent] + widths
    rows = []
    for k, (c_in, c_out) in enumerate(zip(channels, channels[1:])):
        rows += [(3 * k, "up", c_in, c_out), (3 * k + 1, "norm", c_out, c_out)]
    return rows + [(3 * len(widths), "up", widths[-1], 3)]


def discriminator_rows(image_size: int, spectral: bool, outputs: int) -> list:
    widths = [64, 128, 256, 512] if image_size == 64 else [64, 128, 256]
    if spectral:  # conv, LeakyReLU per stage
        channels = [3] + widths + [outputs]
        return [(2 * k, "spectral", c_in, c_out)
                for k, (c_in, c_out) in enumerate(zip(channels, channels[1:]))]
    rows, index = [(0, "conv", 3, 64)], 2  # no batch norm on the input layer
    for c_in, c_out in zip(widths, widths[1:]):
        rows += [(index, "conv", c_in, c_out), (index + 1, "norm", c_out, c_out)]
        index += 3
    return rows + [(index, "conv", widths[-1], outputs)]


def dcgan_pair(image_size: int, variant: str, d_norm: str):
    """G and D as gan.GAN builds them for a variant (d_norm: b's and ACGAN's --d-norm)."""
    model = gan.GAN(gan.GANSettings(variant=variant, image_size=image_size, d_norm=d_norm))
    return model.generator, model.discriminator


# a's D has batch norm whatever --d-norm says; b and ACGAN follow it
VARIANT_NORMS = [("a", "spectral", "batch"), ("b", "batch", "batch"),
                 ("acgan", "batch", "batch"), ("b", "spectral", "spectral"),
                 ("acgan", "spectral", "spectral")]


def test_dcgan_parameter_counts_match_the_seed_reports():
    assert sum(p.numel() for p in nets.dcgan_generator().parameters()) == 3_576_704
    assert sum(p.numel() for p in nets.dcgan_discriminator().parameters()) == 2_765_568
    z = torch.randn(2, 100, 1, 1)
    assert nets.dcgan_generator()(z).shape == (2, 3, 64, 64)
    assert nets.dcgan_discriminator()(torch.randn(2, 3, 64, 64)).shape == (2, 1, 1, 1)


def test_summary_rows_match_the_network():
    model = nets.dcgan_discriminator()
    table = nets.summary(model, (3, 64, 64))
    assert "Total params: 2,765,568" in table and "Trainable params: 2,765,568" in table
    assert "Conv2d-1" in table and "[-1, 64, 32, 32]" in table and "[-1, 1, 1, 1]" in table
    rows = [line for line in table.splitlines() if line.strip().split("-")[0] in
            ("Conv2d", "BatchNorm2d", "LeakyReLU")]
    assert len(rows) == len([m for m in model.modules() if not list(m.children())])
    # torchsummary's memory lines: params 2,765,568 * 4 bytes = 10.55 MB
    assert "Params size (MB): 10.55" in table and "Input size (MB): 0.05" in table
    frozen = nets.dcgan_generator()
    frozen[0].weight.requires_grad_(False)
    assert "Non-trainable params: 819,200" in nets.summary(frozen, (100, 1, 1))


@pytest.mark.parametrize("image_size", [64, 32])
@pytest.mark.parametrize("variant, d_norm, norm", VARIANT_NORMS)
def test_written_out_dcgan_keeps_the_saved_state_dict_layout(image_size, variant, d_norm,
                                                             norm):
    generator, discriminator = dcgan_pair(image_size, variant, d_norm)
    acgan = variant == "acgan"
    for network, rows in ((generator, generator_rows(100 + 2 * acgan, image_size)),
                          (discriminator, discriminator_rows(image_size, norm == "spectral",
                                                             2 if acgan else 1))):
        layout = {key: tuple(value.shape) for key, value in network.state_dict().items()}
        assert layout == saved_layout(rows)


@pytest.mark.parametrize("image_size", [64, 32])
@pytest.mark.parametrize("variant, d_norm, norm", VARIANT_NORMS)
def test_dcgan_maps_z_to_an_image_and_an_image_to_logits(image_size, variant, d_norm, norm):
    generator, discriminator = dcgan_pair(image_size, variant, d_norm)
    z = torch.randn(2, generator[0].in_channels, 1, 1)
    images = generator(z)
    assert images.shape == (2, 3, image_size, image_size) and images.abs().max() <= 1
    assert discriminator(images).shape == (2, 2 if variant == "acgan" else 1, 1, 1)
    slopes = {m.negative_slope for m in discriminator.modules() if isinstance(m, nn.LeakyReLU)}
    assert slopes == {0.2}
    has_batch_norm = any(isinstance(m, nn.BatchNorm2d) for m in discriminator.modules())
    assert has_batch_norm == (norm == "batch")


def test_dcgan_parameter_counts_by_hand():
    # G, 64x64: transposed convs 100*512*16 + 512*256*16 + 256*128*16 + 128*64*16 + 64*3*16
    # = 3,574,784, batch norm 2 (512 + 256 + 128 + 64) = 1,920: 3,576,704.
    # At 32x32 the widest stage goes: 100*256*16 + 256*128*16 + 128*64*16 + 64*3*16
    # + 2 (256 + 128 + 64) = 1,068,928.
    # D, variant a: convs 3*64*16 + 64*128*16 + 128*256*16 + 256*512*16 + 512*16 = 2,763,776,
    # batch norm 2 (128 + 256 + 512) = 1,792: 2,765,568. Spectral norm (--d-norm spectral): no
    # batch norm, a bias on each conv (64 + 128 + 256 + 512 + 1 = 961): 2,764,737.
    def count(network):
        return sum(p.numel() for p in network.parameters())
    assert count(nets.dcgan_generator()) == 3_576_704
    assert count(nets.dcgan_generator(image_size=32)) == 1_068_928
    assert count(nets.dcgan_discriminator()) == 2_765_568
    assert count(nets.dcgan_discriminator(norm="spectral")) == 2_764_737


@pytest.mark.parametrize("build", [nets.dcgan_generator, nets.dcgan_discriminator])
def test_dcgan_refuses_sizes_it_has_no_layers_for(build):
    with pytest.raises(ValueError, match="32x32 or 64x64"):
        build(image_size=48)


def test_summary_forward_shows_only_the_layers_it_runs():
    model = vae.VAE(latent_dim=8)
    table = nets.summary(model, (3, 64, 64), forward=model.encode)
    encoder_leaves = len([m for m in model.encoder.modules() if not list(m.children())])
    rows = [line for line in table.splitlines() if re.match(r"\s+\w+-\d+ ", line)]
    assert len(rows) == encoder_leaves + 2            # ... then to_mu and to_logvar
    assert rows[-1].split()[1:3] == ["[-1,", "8]"]    # log sigma^2 (B, 8)
    halves = model.encoder, model.to_mu, model.to_logvar
    assert f"Total params: {sum(p.numel() for m in halves for p in m.parameters()):,}" in table


def test_summary_repeats_extra_inputs_over_the_batch():
    unet = nets.UNet(width=16, classes=10)
    table = nets.summary(unet, (3, 28, 28), extra_inputs=(torch.tensor(7), torch.tensor(3)))
    assert re.search(r"Embedding-\d+ +\[-1, 64\]", table)  # one class per image: (B, 4 * 16)
    assert f"Total params: {sum(p.numel() for p in unet.parameters()):,}" in table


def test_gradient_reversal_is_identity_forward_and_minus_lambda_backward():
    x = torch.randn(5, 3, requires_grad=True)
    weights = torch.randn(5, 3)
    reversed_ = nets.grad_reverse(x, 0.7)
    assert torch.equal(reversed_, x)
    (reversed_ * weights).sum().backward()
    reference = x.detach().clone().requires_grad_(True)
    (-0.7 * reference * weights).sum().backward()  # autograd of -lambda x
    assert torch.allclose(x.grad, reference.grad, atol=0)


@pytest.mark.parametrize("layer", [torch.nn.Linear(20, 7), torch.nn.Conv2d(3, 8, 4),
                                   torch.nn.ConvTranspose2d(8, 5, 4)], ids=lambda m: type(m).__name__)
def test_spectral_norm_matches_torch(layer):
    ours = nets.spectral_norm(copy.deepcopy(layer))
    theirs = torch.nn.utils.spectral_norm(copy.deepcopy(layer))
    with torch.no_grad():  # identical weights (deep copies) and identical u, v
        ours.weight_u.copy_(theirs.weight_u)
        ours.weight_v.copy_(theirs.weight_v)
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    x = torch.randn(2, 20) if isinstance(layer, torch.nn.Linear) else torch.randn(2, 8, 8, 8)[:, :layer.in_channels]
    for _ in range(3):  # training-mode forwards move u
        assert torch.allclose(ours(x), theirs(x), atol=1e-6)
        assert torch.allclose(ours.weight, theirs.weight, atol=1e-7)
        assert torch.allclose(ours.weight_u, theirs.weight_u, atol=1e-7)
    ours.eval(), theirs.eval()
    u = ours.weight_u.clone()
    assert torch.allclose(ours(x), theirs(x), atol=1e-6) and torch.equal(ours.weight_u, u)
    ours(x).sum().backward()  # the gradient reaches the raw weight
    assert ours.weight_orig.grad is not None and ours.weight_orig.grad.abs().sum() > 0


def test_spectral_norm_sigma_converges_to_the_largest_singular_value():
    layer = nets.spectral_norm(torch.nn.Conv2d(16, 32, 3), n_power_iterations=1)
    x = torch.randn(1, 16, 5, 5)
    for _ in range(200):
        layer(x)
    largest = torch.linalg.matrix_norm(layer.weight_orig.detach().flatten(1), ord=2)
    sigma = layer.weight_orig.detach().flatten(1).norm() / layer.weight.detach().flatten(1).norm()
    assert torch.isclose(sigma, largest, rtol=1e-5)
    assert torch.isclose(torch.linalg.matrix_norm(layer.weight.detach().flatten(1), ord=2),
                         torch.tensor(1.0), rtol=1e-5)


@pytest.mark.parametrize("step", [5, 100_000])
def test_ema_update_is_the_moving_average_with_warm_up(step):
    model = gan.GAN(gan.GANSettings(variant="b", image_size=32))
    before = [p.clone() for p in model.ema.parameters()]
    with torch.no_grad():
        for p in model.generator.parameters():
            p.add_(1.0)
    model.generator.train()(torch.randn(4, 100, 1, 1))  # new batch-norm statistics
    model.update_ema(step=step, decay=0.999)
    d = min(0.999, (1 + step) / (10 + step))  # 6 / 15 while warming up
    for old, new, current in zip(before, model.ema.parameters(), model.generator.parameters()):
        assert torch.allclose(new, d * old + (1 - d) * current)
    for averaged, current in zip(model.ema.buffers(), model.generator.buffers()):
        assert torch.equal(averaged, current)


def test_recompute_batch_norm_equals_torchs_swa_update_bn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 5), nn.BatchNorm1d(5, momentum=0.3))
    batches = [torch.randn(8, 3, 8, 8) * 3 + 1 for _ in range(5)]
    reference = copy.deepcopy(model)
    torch.optim.swa_utils.update_bn([(batch,) for batch in batches], reference)
    nets.recompute_batch_norm(model.train(), batches)
    assert not model.training and model[5].momentum == 0.3
    for ours, theirs in zip(model.buffers(), reference.buffers()):
        assert torch.allclose(ours, theirs, atol=1e-6)


def test_recompute_batch_norm_turns_dropout_off():
    model = nn.Sequential(nn.Dropout(0.5), nn.BatchNorm1d(3))
    batches = [torch.randn(64, 3) * 2 + 1 for _ in range(4)]
    nets.recompute_batch_norm(model, batches)
    # dropout would double the variance; without it the statistics are those of the inputs
    assert torch.allclose(model[1].running_mean, torch.stack(batches).mean(dim=(0, 1)))
    assert torch.allclose(model[1].running_var,
                          torch.stack([b.var(dim=0) for b in batches]).mean(dim=0))


def test_timestep_embedding_is_the_transformer_sinusoid():
    embedding = nets.timestep_embedding(torch.tensor([0, 3]), 8)
    frequencies = 10000 ** (-torch.arange(4) / 4)
    assert torch.allclose(embedding[1], torch.cat([torch.sin(3 * frequencies),
                                                   torch.cos(3 * frequencies)]))
    assert torch.equal(embedding[0], torch.tensor([0.0] * 4 + [1.0] * 4))


@pytest.mark.parametrize("layer", [nn.Linear(6, 4), nn.Conv2d(2, 3, 3),
                                   nn.ConvTranspose2d(3, 2, 3)], ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("training", [True, False])
def test_spectral_norm_gradient_flows_through_sigma_as_torchs_does(layer, training):
    """d/dW of f(W / sigma(W)) includes the term through sigma = u^T W v; a sigma computed
    from a detached W gives another gradient, which this test tells apart."""
    torch.manual_seed(0)
    ours = nets.spectral_norm(copy.deepcopy(layer)).train(training)
    theirs = torch.nn.utils.spectral_norm(copy.deepcopy(layer)).train(training)
    with torch.no_grad():
        ours.weight_u.copy_(theirs.weight_u)
        ours.weight_v.copy_(theirs.weight_v)
    x = torch.randn(2, 6) if isinstance(layer, nn.Linear) else torch.randn(2, layer.in_channels,
                                                                           5, 5)
    cotangent = torch.randn_like(copy.deepcopy(theirs)(x))
    (theirs(x) * cotangent).sum().backward()
    (ours(x) * cotangent).sum().backward()
    assert torch.allclose(ours.weight_orig.grad, theirs.weight_orig.grad, atol=1e-6)
    # the gradient with sigma held constant, (dL/dW_sn) / sigma, differs: the test can fail
    w_sn = theirs.weight.detach().requires_grad_(True)
    sigma = (theirs.weight_orig.detach().flatten() @ w_sn.detach().flatten()) / \
        w_sn.detach().flatten().pow(2).sum()
    out = (F.linear(x, w_sn, theirs.bias) if isinstance(layer, nn.Linear) else
           F.conv2d(x, w_sn, theirs.bias) if isinstance(layer, nn.Conv2d) else
           F.conv_transpose2d(x, w_sn, theirs.bias))
    (out * cotangent).sum().backward()
    assert not torch.allclose(w_sn.grad / sigma, theirs.weight_orig.grad, atol=1e-4)


def test_standardise_gives_each_image_zero_mean_and_unit_variance():
    images = torch.rand(3, 3, 5, 5) * torch.tensor([1.0, 5.0, 0.5])[:, None, None, None]
    standardised = nets.Standardise()(images + 7.0)  # brightness and contrast are gone
    assert torch.allclose(standardised.mean(dim=(1, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(standardised.std(dim=(1, 2, 3)), torch.ones(3), atol=1e-3)
    assert torch.allclose(nets.Standardise()(-images), -nets.Standardise()(images), atol=1e-6)


def test_dcgan_discriminator_norm_choices_and_the_spectral_flag_agree():
    def layout(network):
        return {key: tuple(value.shape) for key, value in network.state_dict().items()}
    assert layout(nets.dcgan_discriminator(norm="spectral")) == \
        layout(nets.dcgan_discriminator(norm="spectral"))
    assert layout(nets.dcgan_discriminator(norm="batch")) == layout(nets.dcgan_discriminator())
    # norm "none": the spectral D's convolutions with biases, without u and v
    assert layout(nets.dcgan_discriminator(norm="none")) == {
        key.replace("weight_orig", "weight"): shape
        for key, shape in layout(nets.dcgan_discriminator(norm="spectral")).items()
        if not key.endswith(("weight_u", "weight_v"))}
    with pytest.raises(ValueError, match="batch, spectral or none"):
        nets.dcgan_discriminator(norm="layer")


# ============================================================================ data
# Pins every file format byte for byte, a malformed line of each text file named,
# downloads, archives, the cache, folders, grids.


# A MATLAB v5 file written by scipy.io.savemat(..., do_compression=True) (the reference
# writer): X = (arange(180) * 7 % 251) as uint8 (4, 3, 3, 5), y = [10, 1, 2, 9, 10] double.
SCIPY_MAT = (
    "TUFUTEFCIDUuMCBNQVQtZmlsZSBQbGF0Zm9ybTogcG9zaXgsIENyZWF0ZWQgb246IFN1biBOb3YgMjIgMTU6MDA6"
    "MTAgMjAyNgAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAABSU0PAAAA"
    "7AAAAHic42NgYPgAxGxAzAHEnAwQwArEAkDMAsTMUAwSYwTCCCDNBMRbQAqtyzZmLrkvdYnXo1k5buaVnuNMtl8N"
    "spe5Ne75vv6VaoJEcN9JdqfaHQWrnyneFPHv0kpdcHvyOU4XRvOitb4dh5m3fdRJl4+aeoHPs2V/+aa3Gg+kwyYa"
    "5ix/NOuqgDezXeWWkP5TrHt/GOepJc65LhrQfaxu5xf950qxMyyK171ceEc8iMu1YXf0tIs8R1isSnUzFt+TCZ90"
    "tvUAg9k7zZT59lVbP6x4LBcp6NN+KGnuDeHTbI41JvmrnoKcDQD1ylbgDwAAADQAAAB4nONjYGCIAGI2IOaA0iDA"
    "CuWDaEYwZmSoBNKcQKzBAAMqDhD6gz1UAMpXcoDJAwCGUQPT")


SCIPY_X = (np.arange(180, dtype=np.uint8) * 7 % 251).reshape(4, 3, 3, 5)


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def make_mnistm_tar(path: Path, count=4):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
    with tarfile.open(path, "w:gz") as bundle:
        for part in ("train", "test"):
            members = {f"mnist_m/mnist_m_{part}/{i:08d}.png": png_bytes(images[i])
                       for i in range(count)}
            members[f"mnist_m/mnist_m_{part}_labels.txt"] = "".join(
                f"{i:08d}.png {(3 * i) % 10}\n" for i in range(count)).encode()
            for name, blob in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                bundle.addfile(info, io.BytesIO(blob))
    return images


def make_celeba(root: Path, present=("000001.jpg", "000003.jpg", "000004.jpg")):
    """Annotations for five faces, images for only three of them, as in a subset."""
    folder = root / "celeba"
    folder.mkdir(parents=True)
    names = [f"{i:06d}.jpg" for i in range(1, 6)]
    attribute_names = ["Male", "Smiling"]
    rows = [f"{n} {' '.join('1' if (i + j) % 2 else '-1' for j in range(2))}"
            for i, n in enumerate(names)]
    (folder / "list_attr_celeba.txt").write_text(
        f"{len(names)}\n{' '.join(attribute_names)}\n" + "\n".join(rows) + "\n")
    (folder / "list_eval_partition.txt").write_text(
        "".join(f"{n} {0 if i < 3 else 2}\n" for i, n in enumerate(names)))
    with zipfile.ZipFile(folder / "img_align_celeba.zip", "w") as bundle:
        for i, name in enumerate(present):
            face = np.full((218, 178, 3), 40 * (i + 1), np.uint8)
            face[:20] = 255  # a band cut away by the center crop
            buffer = io.BytesIO()
            Image.fromarray(face).save(buffer, format="JPEG", quality=95)
            bundle.writestr(f"img_align_celeba/{name}", buffer.getvalue())


def make_course_folder(root: Path, with_labels=True):
    (root / "data").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((28, 28, 3), 50 * i, np.uint8)).save(root / "data" / f"{i:05d}.png")
    header = "image_name,label\n" if with_labels else "image_name\n"
    body = "".join(f"{i:05d}.png{f',{i + 4}' if with_labels else ''}\n" for i in range(3))
    (root / "train.csv").write_text(header + body)
    (root / "val.csv").write_text(header + body.splitlines(True)[0])


@pytest.fixture(scope="session")
def real_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("real-cache")


@pytest.mark.parametrize("gz,folder", [(True, "mnist"), (False, "MNIST/raw")])
def test_mnist_idx_loads_exact_pixels_as_rgb_in_unit_range(tmp_path, gz, folder):
    images, labels = make_mnist(tmp_path, gz=gz, folder=folder)
    ds = data.load("mnist", "train", tmp_path, download=False, cache_dir=tmp_path / "cache")
    batch = ds.images()
    assert batch.shape == (6, 3, 28, 28) and batch.dtype == torch.float32
    assert torch.equal(ds.labels, torch.from_numpy(labels).long())
    expected = torch.from_numpy(images).float() / 127.5 - 1
    assert torch.allclose(batch[:, 0], expected) and torch.equal(batch[:, 0], batch[:, 2])
    assert torch.equal(data.to_uint8(batch[:, :1]), ds.pixels)  # exact round trip


def test_truncated_idx_gives_one_line_error(tmp_path, capsys):
    make_mnist(tmp_path)
    path = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-100]))
    line = one_line_error(capsys, ["data", "--name", "mnist", "--data-root", str(tmp_path),
                                   "--cache", str(tmp_path / "c"), "--out", str(tmp_path)])
    assert "truncated" in line and "download it again" in line


def test_usps_libsvm_values_map_to_bytes_and_labels_shift(tmp_path):
    (tmp_path / "usps").mkdir()
    # two images: first has pixel 1 = -1 and pixel 256 = 1, the rest omitted (= 0)
    text = "1 1:-1 256:1\n10 2:0.5\n"
    for name in ("usps.bz2", "usps.t.bz2"):
        (tmp_path / "usps" / name).write_bytes(bz2.compress(text.encode()))
    ds = data.load("usps", "test", tmp_path, image_size=22, download=False, cache_dir="")
    assert ds.labels.tolist() == [0, 9]
    first = ds.pixels[0, 0]  # the 16x16 digit sits inside a 3-pixel black border
    assert first[3, 3] == 0 and first[18, 18] == 255 and first[8, 8] == 128  # (v+1)*127.5
    assert ds.pixels[1, 0, 3, 4] == round(1.5 * 127.5)
    assert first[:3].sum() == first[19:].sum() == first[:, :3].sum() == first[:, 19:].sum() == 0
    assert data.load("usps", "test", tmp_path, download=False, cache_dir="") \
        .pixels.shape == (2, 1, 28, 28)


def test_mat_reader_matches_scipy_compressed_file(tmp_path):
    path = tmp_path / "x.mat"
    path.write_bytes(base64.b64decode(SCIPY_MAT))
    arrays = data.read_mat(path)
    assert arrays["X"].dtype == np.uint8 and np.array_equal(arrays["X"], SCIPY_X)
    assert arrays["y"].dtype == np.float64 and arrays["y"].ravel().tolist() == [10, 1, 2, 9, 10]


def test_svhn_transposes_images_and_maps_label_10_to_0(tmp_path):
    (tmp_path / "svhn").mkdir()
    for name in ("train_32x32.mat", "test_32x32.mat"):
        (tmp_path / "svhn" / name).write_bytes(base64.b64decode(SCIPY_MAT))
    ds = data.load("svhn", "train", tmp_path, download=False, cache_dir="")
    assert ds.labels.tolist() == [0, 1, 2, 9, 0] and ds.pixels.shape == (5, 3, 28, 28)
    arrays, _ = data._svhn(tmp_path, "train", download=False)
    # (H, W, C, N) -> (N, C, H, W): pixel [n, c, h, w] is X[h, w, c, n]
    assert np.array_equal(arrays["pixels"], SCIPY_X.transpose(3, 2, 0, 1))


def test_truncated_mat_gives_clear_error(tmp_path):
    path = tmp_path / "x.mat"
    path.write_bytes(base64.b64decode(SCIPY_MAT)[:-40])
    with pytest.raises(util.UserError, match="truncated or damaged"):
        data.read_mat(path)


def test_mnistm_from_archive_and_from_folder_agree_with_the_pngs(tmp_path):
    (tmp_path / "mnist_m").mkdir()
    images = make_mnistm_tar(tmp_path / "mnist_m" / "mnist_m.tar.gz")
    from_tar = data.load("mnistm", "test", tmp_path, image_size=32, download=False,
                         cache_dir="")
    assert torch.equal(from_tar.pixels, torch.from_numpy(images).permute(0, 3, 1, 2))
    assert from_tar.labels.tolist() == [0, 3, 6, 9]
    data.safe_extract(tmp_path / "mnist_m" / "mnist_m.tar.gz", tmp_path / "mnist_m")
    (tmp_path / "mnist_m" / "mnist_m.tar.gz").unlink()
    from_folder = data.load("mnistm", "test", tmp_path, image_size=32, download=False,
                            cache_dir="")
    assert torch.equal(from_folder.pixels, from_tar.pixels)
    assert data.load("mnistm", "test", tmp_path, download=False, cache_dir="") \
        .pixels.shape == (4, 3, 28, 28)


def test_mnistm_release_tensor_archive_loads(tmp_path):
    images = torch.randint(0, 256, (3, 28, 28, 3), dtype=torch.uint8)
    labels = torch.tensor([7, 0, 2])
    staging = tmp_path / "staging"
    staging.mkdir()
    torch.save((images, labels), staging / "mnist_m_train.pt")
    (tmp_path / "mnist_m").mkdir()
    with tarfile.open(tmp_path / "mnist_m" / "mnist_m_train.pt.tar.gz", "w:gz") as bundle:
        bundle.add(staging / "mnist_m_train.pt", arcname="mnist_m_train.pt")
    ds = data.load("mnistm", "train", tmp_path, download=False, cache_dir="")
    assert torch.equal(ds.pixels, images.permute(0, 3, 1, 2)) and ds.labels.tolist() == [7, 0, 2]


def test_celeba_joins_attributes_to_present_images_and_center_crops(tmp_path):
    make_celeba(tmp_path)
    train = data.load("celeba", "train", tmp_path, image_size=16, attribute="Smiling",
                      download=False, cache_dir="")
    assert train.names == ["000001.jpg", "000003.jpg"]  # 000002 has no image
    assert train.labels.tolist() == [1, 1] and train.attributes.tolist() == [[0, 1], [0, 1]]
    assert train.pixels.shape == (2, 3, 16, 16) and train.attribute_names == ["Male", "Smiling"]
    # the white band at the top is outside the centered 178x178 square
    assert (train.pixels[0].float() - 40).abs().max() <= 3
    test = data.load("celeba", "test", tmp_path, image_size=16, download=False, cache_dir="")
    assert test.names == ["000004.jpg"] and test.labels is None


def test_course_csv_layout_labels_names_and_val_as_test(tmp_path):
    make_course_folder(tmp_path / "svhn")
    train = data.load(str(tmp_path / "svhn"), "train", cache_dir=tmp_path / "cache")
    assert train.labels.tolist() == [4, 5, 6] and train.names[0] == "00000.png"
    assert train.pixels[2].float().mean() == 100
    test = data.load(str(tmp_path / "svhn"), "test", cache_dir=tmp_path / "cache")
    assert len(test) == 1 and test.names == ["00000.png"]


def test_course_csv_without_labels_and_plain_image_folder(tmp_path):
    make_course_folder(tmp_path / "digits", with_labels=False)
    ds = data.load(str(tmp_path / "digits"), "train", cache_dir="")
    assert ds.labels is None and len(ds) == 3
    faces = data.load(str(tmp_path / "digits" / "data"), "train", image_size=8, cache_dir="")
    assert faces.labels is None and faces.pixels.shape == (3, 3, 8, 8)


def test_course_csv_with_missing_images_names_the_folder(tmp_path, capsys):
    make_course_folder(tmp_path / "d")
    (tmp_path / "d" / "data" / "00001.png").unlink()
    line = one_line_error(capsys, ["data", "--name", str(tmp_path / "d"), "--cache", "",
                                   "--out", str(tmp_path)])
    assert "missing" in line and "00001.png" in line


def test_empty_folder_and_unknown_name_say_what_to_give(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    line = one_line_error(capsys, ["data", "--name", str(tmp_path / "empty"),
                                   "--out", str(tmp_path)])
    assert "train.csv" in line
    assert "use one of mnist" in one_line_error(capsys, ["data", "--name", "cifar"])


def test_missing_data_folder_without_download_says_what_to_do(tmp_path, capsys):
    line = one_line_error(capsys, ["data", "--name", "mnist", "--no-download",
                                   "--data-root", str(tmp_path / "nowhere")])
    assert "--data-root" in line


def test_download_checks_md5_then_renames(tmp_path, monkeypatch):
    fake_network(monkeypatch, b"hello")
    target = data.download_file(["http://x/f"], tmp_path / "f.bin",
                                md5="5d41402abc4b2a76b9719d911017c592")  # md5("hello")
    assert target.read_bytes() == b"hello" and not (tmp_path / "f.bin.part").exists()


def test_download_with_wrong_md5_keeps_nothing_and_says_so(tmp_path, monkeypatch):
    fake_network(monkeypatch, b"not the file")
    with pytest.raises(util.UserError, match="corrupt") as error:
        data.download_file(["http://x/f"], tmp_path / "f.bin", md5="0" * 32)
    assert str(tmp_path / "f.bin") in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_offline_download_names_the_file_to_place_by_hand(tmp_path, monkeypatch, capsys):
    fake_network(monkeypatch, None)
    line = one_line_error(capsys, ["data", "--name", "usps", "--data-root", str(tmp_path),
                                   "--out", str(tmp_path)])
    assert "by hand" in line and str(tmp_path / "usps" / "usps.bz2") in line


def test_downloaded_usps_is_verified_and_loaded(tmp_path, monkeypatch):
    content = bz2.compress(b"3 1:1\n")
    monkeypatch.setitem(data.USPS_FILES, "usps.bz2", __import__("hashlib").md5(content).hexdigest())
    fake_network(monkeypatch, content)
    ds = data.load("usps", "train", tmp_path, cache_dir="")
    assert ds.labels.tolist() == [2] and (tmp_path / "usps" / "usps.bz2").exists()


def test_truncated_archive_gives_clear_error(tmp_path):
    archive = tmp_path / "a.tar.gz"
    make_mnistm_tar(archive, count=30)
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(util.UserError, match="truncated or damaged"):
        data.safe_extract(archive, tmp_path / "out")


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_archive_member_escaping_the_folder_is_refused(tmp_path, kind):
    archive = tmp_path / f"evil.{kind}"
    if kind == "tar":
        with tarfile.open(archive, "w") as bundle:
            info = tarfile.TarInfo("../escaped.txt")
            info.size = 2
            bundle.addfile(info, io.BytesIO(b"hi"))
    else:
        with zipfile.ZipFile(archive, "w") as bundle:
            bundle.writestr("../escaped.txt", "hi")
    (tmp_path / "out").mkdir()
    with pytest.raises(util.UserError, match="outside"):
        data.safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists()


def test_second_load_comes_from_cache_until_a_source_changes(tmp_path, monkeypatch):
    make_mnist(tmp_path)
    first = data.load("mnist", "train", tmp_path, download=False, cache_dir=tmp_path / "c")
    monkeypatch.setattr(data, "read_idx", lambda path: (_ for _ in ()).throw(
        AssertionError("decoded again")))
    second = data.load("mnist", "train", tmp_path, download=False, cache_dir=tmp_path / "c")
    assert torch.equal(first.pixels, second.pixels) and torch.equal(first.labels, second.labels)
    source = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="decoded again"):
        data.load("mnist", "train", tmp_path, download=False, cache_dir=tmp_path / "c")


def test_cache_belongs_to_the_data_folder_it_was_decoded_from(tmp_path):
    """Another copy of a data set, or an empty folder, never gets the first one's cached
    arrays (they did: the cache was keyed by name, split and size alone)."""
    cache = tmp_path / "cache"
    images, _ = make_mnist(tmp_path / "first")
    first = data.load("mnist", "train", tmp_path / "first", download=False, cache_dir=cache)
    assert np.array_equal(first.pixels[:, 0].numpy(), images)
    (tmp_path / "empty").mkdir()
    with pytest.raises(util.UserError, match="MNIST not found"):
        data.load("mnist", "train", tmp_path / "empty", download=False, cache_dir=cache)
    make_mnist(tmp_path / "second")
    write_idx(tmp_path / "second" / "mnist" / "train-images-idx3-ubyte.gz",
              np.zeros_like(images))
    second = data.load("mnist", "train", tmp_path / "second", download=False, cache_dir=cache)
    assert second.pixels.max() == 0


def test_the_default_cache_is_read_at_call_time_and_empty_means_none(tmp_path, private_cache):
    assert data.cache_folder(None) == private_cache and data.cache_folder("") is None
    make_mnist(tmp_path)
    data.load("mnist", "train", tmp_path, download=False)
    assert any(name.suffix == ".npz" for name in private_cache.iterdir())


def test_a_damaged_cache_file_is_rebuilt_and_said(tmp_path, capsys):
    images, _ = make_mnist(tmp_path)
    data.load("mnist", "train", tmp_path, download=False, cache_dir=tmp_path / "c")
    (cached,) = (tmp_path / "c").glob("*.npz")
    cached.write_bytes(cached.read_bytes()[:100])
    again = data.load("mnist", "train", tmp_path, download=False, cache_dir=tmp_path / "c")
    assert np.array_equal(again.pixels[:, 0].numpy(), images)
    assert "is damaged" in capsys.readouterr().err
    with np.load(cached) as rebuilt:
        assert rebuilt["pixels"].shape == (6, 1, 28, 28)


def test_unknown_split_is_refused_not_served_as_test(tmp_path, capsys):
    make_mnist(tmp_path)
    with pytest.raises(util.UserError, match="unknown split 'val' for mnist"):
        data.load("mnist", "val", tmp_path, download=False, cache_dir="")
    line = one_line_error(capsys, ["data", "--name", "mnist", "--splits", "train,foo",
                                   "--data-root", str(tmp_path), "--out", str(tmp_path / "o")])
    assert "unknown split 'foo'" in line and not (tmp_path / "o").exists()  # before loading


def test_16_bit_png_is_scaled_by_its_bit_depth(tmp_path):
    """Pillow's convert('L') clips 16-bit values at 255: 99.6% of a photo turned white."""
    deep = np.array([[0, 257, 32896, 65535]], np.uint16)            # / 257: 0, 1, 128, 255
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    ds = data.load(str(tmp_path), "train", cache_dir="")
    assert ds.pixels[0, 0, 0].tolist() == [0, 1, 128, 255]


def test_gray_and_colour_images_in_one_folder_are_served_as_colour(tmp_path):
    Image.fromarray(np.full((8, 8), 200, np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.full((8, 8, 3), (10, 20, 30), np.uint8)).save(tmp_path / "b.png")
    ds = data.load(str(tmp_path), "train", cache_dir="")
    assert ds.pixels.shape == (2, 3, 8, 8)
    assert ds.pixels[0].unique().tolist() == [200] and ds.pixels[1, :, 0, 0].tolist() == [10, 20, 30]


@pytest.mark.parametrize("content", [b"not an image", b""])
def test_an_unreadable_image_in_a_folder_is_named(tmp_path, capsys, content):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(content)
    line = one_line_error(capsys, ["data", "--name", str(tmp_path), "--splits", "train",
                                   "--cache", "", "--out", str(tmp_path / "o")])
    assert "b.png is not a readable image" in line


def test_a_bad_label_names_its_file_and_line(tmp_path, capsys):
    make_course_folder(tmp_path / "course")
    table = tmp_path / "course" / "train.csv"
    table.write_text(table.read_text().replace("00001.png,5", "00001.png,five"))
    line = one_line_error(capsys, ["data", "--name", str(tmp_path / "course"), "--cache", "",
                                   "--out", str(tmp_path / "o")])
    assert f"{table}, line 3: label 'five'" in line
    folder = tmp_path / "mnist_m" / "mnist_m"
    (folder / "mnist_m_train").mkdir(parents=True)
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / "mnist_m_train" / name)
    (folder / "mnist_m_train_labels.txt").write_text("a.png 3\n\nb.png -1\n")
    with pytest.raises(util.UserError, match="labels.txt, line 3: label '-1'"):
        data.load("mnistm", "train", tmp_path, download=False, cache_dir="")


def malformed_text_files(root: Path) -> list:
    """(data set name, the text file its loader parses, a malformed line written into it,
    what the error must say) for every text file a loader parses."""
    make_celeba(root)
    make_course_folder(root / "course")
    mnistm = root / "mnist_m" / "mnist_m"
    (mnistm / "mnist_m_train").mkdir(parents=True)
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(mnistm / "mnist_m_train" / name)
    (root / "usps").mkdir()
    celeba, course = root / "celeba", root / "course" / "train.csv"
    attributes, partition = celeba / "list_attr_celeba.txt", celeba / "list_eval_partition.txt"
    labels = mnistm / "mnist_m_train_labels.txt"

    def usps(line):
        (root / "usps" / "usps.bz2").write_bytes(bz2.compress(f"1 1:-1\n{line}\n".encode()))
        return root / "usps" / "usps.bz2", 2
    def replace_line(path, number, line):
        lines = path.read_text().splitlines()
        lines[number - 1] = line
        path.write_text("\n".join(lines) + "\n")
        return path, number
    originals = {path: path.read_text() for path in (attributes, partition, course)}
    cases = [("celeba", lambda: replace_line(attributes, 4, "000002.jpg 1")),       # a field short
             ("celeba", lambda: replace_line(attributes, 4, "000002.jpg 1 -1 1")),  # one too many
             ("celeba", lambda: replace_line(attributes, 4, "000002.jpg 1 0")),     # not 1 or -1
             ("celeba", lambda: replace_line(attributes, 4, "000002.jpg 1 yes")),
             ("celeba", lambda: replace_line(partition, 2, "000002.jpg")),
             ("celeba", lambda: replace_line(partition, 2, "000002.jpg 0 1")),
             ("celeba", lambda: replace_line(partition, 2, "000002.jpg 3")),        # no split 3
             ("celeba", lambda: replace_line(partition, 2, "000002.jpg train")),
             ("mnistm", lambda: replace_line(labels, 2, "b.png")),
             ("mnistm", lambda: replace_line(labels, 2, "b.png 3 4")),
             ("mnistm", lambda: replace_line(labels, 2, "b.png 10")),               # no digit 10
             ("mnistm", lambda: replace_line(labels, 2, "b.png 2.5")),
             ("course", lambda: replace_line(course, 3, "00001.png")),
             ("course", lambda: replace_line(course, 3, "00001.png,5,7")),
             ("course", lambda: replace_line(course, 3, ",5")),
             ("course", lambda: replace_line(course, 3, "00001.png,5.0")),
             ("usps", lambda: usps("3 1:0.5 2")),          # an index without its value
             ("usps", lambda: usps("3 1:0.5:2")),
             ("usps", lambda: usps("3 1:half")),
             ("usps", lambda: usps("three 1:0.5")),
             ("usps", lambda: usps("3.5 1:0.5")),
             ("usps", lambda: usps("3 0:0.5")),            # indices start at 1
             ("usps", lambda: usps("3 257:0.5")),          # USPS has 256 pixels
             ("usps", lambda: usps("3 1:nan"))]
    return cases, originals, labels


def test_every_text_file_a_loader_parses_names_its_malformed_line(tmp_path, capsys):
    """A line with a field short, one too many, or a value that is no number of the
    kind the format has ends in one error line naming the file and the line (before,
    numpy's ValueError escaped as a traceback, or the line was read wrongly)."""
    cases, originals, labels = malformed_text_files(tmp_path)
    for name, damage in cases:
        for path, text in originals.items():
            path.write_text(text)
        labels.write_text("a.png 3\nb.png 4\n")
        path, number = damage()
        argv = ["data", "--name", str(tmp_path / "course") if name == "course" else name,
                "--data-root", str(tmp_path), "--cache", "", "--out", str(tmp_path / "o")]
        line = one_line_error(capsys, argv)
        assert f"{path}, line {number}" in line, (name, path.read_bytes()[-40:], line)
        assert not (tmp_path / "o").exists()
    for path, text in originals.items():  # the files as written load
        path.write_text(text)
    labels.write_text("a.png 3\nb.png 4\n")
    assert data.load("celeba", "train", tmp_path, download=False, cache_dir="", image_size=8) \
        .attributes.shape == (2, 2)


def test_a_text_file_that_is_not_utf8_is_named(tmp_path, capsys):
    make_celeba(tmp_path)
    (tmp_path / "celeba" / "list_eval_partition.txt").write_bytes(b"000001.jpg 0\n\xff\xfe 1\n")
    with pytest.raises(util.UserError, match="list_eval_partition.txt is not a text file"):
        data.load("celeba", "train", tmp_path, download=False, cache_dir="")


def test_make_grid_places_each_image_at_its_padded_cell():
    images = torch.arange(3, dtype=torch.float32).view(3, 1, 1, 1).expand(3, 1, 2, 3) + 1
    grid = data.make_grid(images, nrow=2, padding=1)
    assert grid.shape == (1, 2 * 3 + 1, 2 * 4 + 1)  # rows*(H+p)+p, cols*(W+p)+p
    expected = torch.zeros(1, 7, 9)
    for index in range(3):
        row, col = divmod(index, 2)
        expected[0, 1 + row * 3:1 + row * 3 + 2, 1 + col * 4:1 + col * 4 + 3] = index + 1
    assert torch.equal(grid, expected)


def test_save_grid_and_numbered_images_write_pngs(tmp_path):
    images = torch.linspace(-1, 1, 5 * 3 * 4 * 4).view(5, 3, 4, 4)
    grid_path = data.save_grid(images, tmp_path / "grid.png", nrow=5, padding=2)
    assert Image.open(grid_path).size == (5 * 6 + 2, 6 + 2)
    paths = data.save_images(images, tmp_path / "gen", [f"{i}_001.png" for i in range(5)])
    saved = np.asarray(Image.open(paths[4]))
    assert saved.shape == (4, 4, 3) and saved[-1, -1, -1] == 255
    assert np.array_equal(saved, data.to_uint8(images[4]).permute(1, 2, 0).numpy())


def test_resize_keeps_constant_images_constant():
    pixels = torch.full((2, 1, 16, 16), 77, dtype=torch.uint8)
    resized = data.resize(pixels, 28)
    assert resized.shape == (2, 1, 28, 28) and (resized == 77).all()


def test_batches_follow_the_given_order():
    ds = data.ImageSet(torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1),
                       torch.arange(10))
    order = torch.tensor([3, 9, 0, 4, 1, 8, 2, 7, 6, 5])
    seen = [labels for _, labels in ds.batches(4, order)]
    assert [b.tolist() for b in seen] == [[3, 9, 0, 4], [1, 8, 2, 7], [6, 5]]
    assert [b.tolist() for _, b in ds.batches(4, order, drop_last=True)] == [[3, 9, 0, 4],
                                                                          [1, 8, 2, 7]]
    assert [b.tolist() for _, b in ds.batches(6)] == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9]]


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not present")
@pytest.mark.parametrize("name,counts", [("mnist", (60000, 10000)), ("usps", (7291, 2007)),
                                         ("mnistm", (25000, 9001)), ("celeba", (8000, 2000))])
def test_real_data_sets_have_published_counts_and_look_like_images(name, counts, real_cache):
    for split, count in zip(("train", "test"), counts):
        ds = data.load(name, split, SHARED_DATA, download=False, cache_dir=real_cache)
        assert len(ds) == count
        assert ds.pixels.shape[-1] == (64 if name == "celeba" else 28)
        sample = ds.images(slice(0, 500))
        assert sample.min() >= -1 and sample.max() <= 1 and sample.max() > 0.9
        per_image_spread = sample.flatten(1).std(dim=1)
        assert (per_image_spread > 0.05).all(), "an all-constant image"
        if name == "celeba":
            assert len(ds.attribute_names) == 40 and ds.attributes.shape == (count, 40)
        else:
            assert torch.bincount(ds.labels, minlength=10).min() > count // 20


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not present")
def test_real_usps_digits_are_as_tall_as_mnist_digits(real_cache):
    """The MNIST framing (data.mnist_framed): at 28x28 both kinds of digit are ~20 pixels
    tall; USPS resized without the border would be 28."""
    def mean_height(name):
        ink = data.load(name, "test", SHARED_DATA, download=False, cache_dir=real_cache) \
            .images(slice(0, 1000)).mean(dim=1) > 0                   # (1000, 28, 28)
        return ink.any(dim=2).float().sum(dim=1).mean().item()
    usps, mnist = mean_height("usps"), mean_height("mnist")
    assert abs(usps - mnist) < 1.5 and 18 < mnist < 22


def test_a_course_csv_saved_with_a_byte_order_mark_reads_like_one_without(tmp_path):
    """Windows editors save UTF-8 with a byte-order mark before 'image_name'."""
    make_course_folder(tmp_path / "plain")
    make_course_folder(tmp_path / "marked")
    table = tmp_path / "marked" / "train.csv"
    table.write_bytes(b"\xef\xbb\xbf" + table.read_bytes())
    plain, marked = (data.load(str(tmp_path / name), "train", cache_dir="")
                     for name in ("plain", "marked"))
    assert marked.names == plain.names and torch.equal(marked.labels, plain.labels)


@pytest.mark.parametrize("second_label", ["4", "7"])
def test_a_course_csv_naming_an_image_twice_is_refused(tmp_path, capsys, second_label):
    make_course_folder(tmp_path / "d")
    table = tmp_path / "d" / "train.csv"
    table.write_text(table.read_text() + f"00000.png,{second_label}\n")
    line = one_line_error(capsys, ["data", "--name", str(tmp_path / "d"), "--cache", "",
                                   "--out", str(tmp_path / "out")])
    assert "lists 00000.png twice (lines 2 and 5)" in line


def test_an_image_claiming_too_many_pixels_is_refused_before_it_is_decoded(tmp_path):
    folder = image_folder(tmp_path / "images")
    (folder / "bomb.png").write_bytes(png_claiming(14000, 14000))  # 196 million pixels
    with pytest.raises(util.UserError, match="bomb.png claims more than 89,478,485 pixels"):
        data.load(str(folder), "train", cache_dir="")
    (folder / "bomb.png").write_bytes(png_claiming(10000, 10000))  # only Pillow's warning
    with pytest.raises(util.UserError, match="bomb.png claims more than"):
        data.load(str(folder), "train", cache_dir="")


# ============================================================================ plots
# Pins ticks, lines, scatter points and grid labels where the axes say.


def test_line_plot_takes_one_x_per_series(tmp_path):
    plots.line_plot({"a": [3, 2], "b": [4, 3, 1]}, tmp_path / "p.png",
                    x={"a": [10, 20], "b": [5, 15, 40]}, title="t")
    assert Image.open(tmp_path / "p.png").size[0] > 100


def test_nice_ticks_are_round_steps_covering_the_range():
    assert plots.nice_ticks(0, 1) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert plots.nice_ticks(-3, 47) == [0, 10, 20, 30, 40]
    assert plots.nice_ticks(5, 5) == [4.6, 4.8, 5.0, 5.2, 5.4]  # a point: widened by 1


def test_grid_labels_sit_beside_their_rows_and_above_their_columns(tmp_path):
    cell, padding = 20, 2
    grid = data.grid_image(torch.ones(6, 3, cell, cell), nrow=3)  # white cells
    labelled = plots.label_grid(grid, cell, rows=["first", "second"],
                                columns=["a", "b", "c"], title="a title")
    ink = np.asarray(labelled.convert("L")) < 128
    left = ink.shape[1] - (3 * (cell + padding) + padding)  # the label column's width
    top = ink.shape[0] - (2 * (cell + padding) + padding)   # title and column labels
    assert top == 38 and ink[:18].any()                      # the title line
    for column in range(3):  # some ink above each column's centre
        centre = left + padding + column * (cell + padding) + cell // 2
        assert ink[20:top, centre - 4:centre + 4].any(), column
    for row in range(2):     # some ink left of each row, level with it
        middle = top + padding + row * (cell + padding) + cell // 2
        assert ink[middle - 4:middle + 4, :left].any(), row


def test_line_plot_draws_each_series_in_its_colour(tmp_path):
    path = plots.line_plot({"loss": [3.0, 2.0, 1.0], "accuracy": [0.1, 0.5, 0.9]},
                           tmp_path / "curves.png", title="training", ylabel="value")
    image = np.asarray(Image.open(path))
    colours = {tuple(int(c[k:k + 2], 16) for k in (1, 3, 5)) for c in plots.TAB10[:2]}
    present = {tuple(p) for p in image.reshape(-1, 3)}
    assert image.shape[0] == 420 and image.shape[1] > 640 and colours <= present


def test_scatter_plot_puts_points_where_the_axes_say(tmp_path):
    points = np.array([[0.0, 0.0], [10.0, 10.0]])
    figure_path = plots.scatter_plot(points, [0, 3], tmp_path / "s.png", title="t-SNE",
                                     names=["zero", "one", "two", "three"])
    image = np.asarray(Image.open(figure_path))
    figure = plots.Figure((-0.3, 10.3), (-0.3, 10.3), size=(640, 600),
                          legend=["zero", "three"])
    px, py = figure.to_pixels(points[:, 0], points[:, 1])
    red = (0xd6, 0x27, 0x28)  # tab10 colour of label 3
    blue = (0x1f, 0x77, 0xb4)
    assert tuple(image[int(round(py[0])), int(round(px[0]))]) == blue
    assert tuple(image[int(round(py[1])), int(round(px[1]))]) == red


def test_counts_on_the_x_axis_get_whole_ticks():
    assert plots.nice_ticks(1, 3, whole=True) == [1, 2, 3]        # not 1.5, 2.5
    assert plots.nice_ticks(2, 2, whole=True) == [1, 2, 3]        # one step: widened by 1
    assert plots.nice_ticks(0, 10, whole=True) == [0, 2, 4, 6, 8, 10]  # never 2.5
    assert plots.nice_ticks(1, 3) == [1.0, 1.5, 2.0, 2.5, 3.0]   # values keep their halves


def test_line_plot_of_steps_has_whole_ticks_and_of_values_any(monkeypatch, tmp_path):
    seen = []
    real = plots.nice_ticks
    monkeypatch.setattr(plots, "nice_ticks", lambda low, high, count=5, whole=False:
                        seen.append(whole) or real(low, high, count, whole))
    plots.line_plot({"FID": [300.0, 250.0, 240.0]}, tmp_path / "a.png", x=[1, 2, 3])
    plots.line_plot({"loss": [1.0, 2.0]}, tmp_path / "b.png", x=[0.5, 1.5])
    assert seen == [True, False, False, False]  # x then y of each figure


# ============================================================================ tsne
# Pins affinities, gradients and the optimiser against definitions and autograd.


def brute_force_trustworthiness(X, Y, k):
    """The definition, written out with loops."""
    n = len(X)
    data_order = [list(np.argsort(((X - X[i]) ** 2).sum(1), kind="stable")) for i in range(n)]
    map_order = [np.argsort(((Y - Y[i]) ** 2).sum(1), kind="stable") for i in range(n)]
    total = 0
    for i in range(n):
        data_nearest = set(data_order[i][1:k + 1])
        for j in map_order[i][1:k + 1]:
            if j not in data_nearest:
                total += data_order[i].index(j) - k
    return 1 - 2 / (n * k * (2 * n - 3 * k - 1)) * total


def test_conditional_probabilities_reach_the_requested_perplexity():
    X, _ = clusters()
    distances = tsne.squared_distances(X, X)[~np.eye(len(X), dtype=bool)].reshape(len(X), -1)
    P = tsne.conditional_probabilities(distances, perplexity=12.0)
    entropy = -(P * np.log(np.maximum(P, 1e-300))).sum(axis=1)
    assert np.allclose(P.sum(axis=1), 1) and np.allclose(np.exp(entropy), 12.0, rtol=1e-4)


def test_exact_affinities_are_symmetric_normalised_and_zero_on_the_diagonal():
    X, _ = clusters()
    P = tsne.exact_affinities(X, 10.0)
    assert np.allclose(P, P.T) and np.isclose(P.sum(), 1) and np.all(np.diag(P) == 0)


def test_sparse_affinities_equal_exact_ones_when_every_point_is_a_neighbour():
    X, _ = clusters(per_cluster=10)  # 30 points, k = min(29, 3 * 10 + 1) = 29: all of them
    rows, cols, values = tsne.sparse_affinities(X, 10.0)
    dense = np.zeros((30, 30))
    dense[rows, cols] = values
    assert np.allclose(dense, tsne.exact_affinities(X, 10.0), atol=1e-12)


def test_nearest_neighbours_match_a_full_sort():
    X = np.random.default_rng(2).normal(size=(50, 3))
    indices, distances = tsne.nearest_neighbours(X, 5, chunk=7)
    full = ((X[:, None] - X[None]) ** 2).sum(-1)
    np.fill_diagonal(full, np.inf)
    assert np.array_equal(indices, np.argsort(full, axis=1)[:, :5])
    assert np.allclose(distances, np.sort(full, axis=1)[:, :5])


def test_exact_gradient_and_kl_match_autograd():
    X, _ = clusters(per_cluster=8)
    P = tsne.exact_affinities(X, 5.0)
    Y = np.random.default_rng(3).normal(size=(len(X), 2))
    gradient, kl = tsne.exact_gradient(Y, P)
    y = torch.tensor(Y, requires_grad=True)
    p = torch.tensor(P)
    off = ~torch.eye(len(X), dtype=torch.bool)
    kernel = (1 / (1 + ((y[:, None] - y[None]) ** 2).sum(-1)))[off]
    q = kernel / kernel.sum()
    torch_kl = (torch.special.xlogy(p[off], p[off]) - p[off] * torch.log(q)).sum()
    torch_kl.backward()
    assert np.isclose(kl, torch_kl.item()) and np.allclose(gradient, y.grad.numpy(), atol=1e-9)


@pytest.mark.parametrize("scale,tolerance", [(1.0, 0.01), (5.0, 0.1)])
def test_interpolated_gradient_approximates_the_exact_one(scale, tolerance):
    X = np.random.default_rng(4).normal(size=(400, 5))
    P = tsne.exact_affinities(X, 30.0)
    rows, cols = np.nonzero(P)
    Y = np.random.default_rng(5).normal(0, scale, (400, 2))
    exact, exact_kl = tsne.exact_gradient(Y, P)
    approximate, approximate_kl = tsne.InterpolatedGradient(rows, cols, P[rows, cols])(Y)
    assert np.linalg.norm(approximate - exact) / np.linalg.norm(exact) < tolerance
    assert abs(approximate_kl - exact_kl) / exact_kl < tolerance
    with ThreadPoolExecutor(1) as worker:  # the threaded split gives the same numbers
        threaded = tsne.InterpolatedGradient(rows, cols, P[rows, cols], worker)(Y)
    assert np.array_equal(threaded[0], approximate) and threaded[1] == approximate_kl


def test_grid_convolution_is_exact_for_a_tiny_map():
    """Points within a fraction of a grid cell: cubic interpolation of the smooth kernel
    is exact to ~1e-9, so phi1 equals the brute-force sum of (1 + r^2)^-1."""
    Y = np.random.default_rng(6).normal(0, 0.01, (30, 2))
    grid = tsne.Grid(Y)
    k1 = grid.kernel_spectrum(lambda r2: 1 / (1 + r2))
    spectrum = grid.spectra(grid.spread(np.ones((30, 1))))
    (phi1,) = grid.gather(spectrum * k1)
    assert np.allclose(phi1, (1 / (1 + tsne.squared_distances(Y, Y))).sum(axis=1), rtol=1e-7)


def test_grid_total_by_parseval_equals_the_sum_of_the_gathered_field():
    Y = np.random.default_rng(7).uniform(0, 30, (40, 2))
    grid = tsne.Grid(Y)
    k1 = grid.kernel_spectrum(lambda r2: 1 / (1 + r2))
    spectrum = grid.spectra(grid.spread(np.ones((40, 1))))
    assert np.isclose(grid.total(spectrum[0], k1), grid.gather(spectrum * k1).sum(),
                      rtol=1e-10)


def test_grid_self_interaction_is_a_lone_charge_seen_by_itself():
    Y = np.random.default_rng(8).uniform(0, 20, (5, 2))
    grid = tsne.Grid(Y)
    kernel = (lambda r2: 1 / (1 + r2))
    spectrum = grid.kernel_spectrum(kernel)
    alone = grid.gather(grid.spectra(grid.spread(np.eye(5))) * spectrum).diagonal()
    assert np.allclose(grid.self_interaction(kernel), alone, rtol=1e-10)


def test_pca_initialisation_has_std_1e4_on_the_first_axis():
    X, _ = clusters()
    Y = tsne.pca_initialisation(X)
    assert Y.shape == (90, 2) and np.isclose(Y[:, 0].std(), 1e-4)


@pytest.mark.parametrize("method", ["exact", "fft"])
def test_tsne_separates_clusters_and_repeats_for_a_seed(method):
    X, labels = clusters()
    Y, kl = tsne.tsne(X, perplexity=10.0, method=method, iterations=400, return_kl=True)
    assert Y.shape == (90, 2) and np.isfinite(kl) and kl < 1.0
    # a random map scores 1/3; a point on a cluster's rim may see a neighbour across
    assert tsne.knn_accuracy(Y, labels, k=5) >= 0.97
    assert tsne.trustworthiness(X, Y, k=5) > 0.9
    assert np.array_equal(Y, tsne.tsne(X, perplexity=10.0, method=method, iterations=400))


def test_trustworthiness_matches_its_definition():
    rng = np.random.default_rng(7)
    X = rng.normal(size=(60, 4))
    Y = X[:, :2] + rng.normal(0, 0.5, (60, 2))
    assert np.isclose(tsne.trustworthiness(X, Y, 5), brute_force_trustworthiness(X, Y, 5))
    assert np.isclose(tsne.trustworthiness(X, X, 5), 1.0)


def test_trustworthiness_refuses_k_of_half_the_points_and_the_command_lowers_k(tmp_path):
    """With 14 points and k = 12 it used to report 1.0119: the score is only normalised
    to [0, 1] for k < N / 2."""
    X, _ = clusters(per_cluster=5)
    Y = X[:, :2]
    assert tsne.max_trustworthiness_k(14) == 6 and tsne.max_trustworthiness_k(15) == 7
    with pytest.raises(ValueError, match="1 <= k < 7"):
        tsne.trustworthiness(X[:14], Y[:14], 7)
    np.savez(tmp_path / "f.npz", features=X[:14])
    assert run.main(["tsne", str(tmp_path / "f.npz"), "--perplexity", "4",
                     "--iterations", "300", "--out", str(tmp_path)]) == 0
    results = __import__("json").loads((tmp_path / "tsne" / "results.json").read_text())
    assert results["trustworthiness_k"] == 6 and 0 <= results["trustworthiness"] <= 1


def test_knn_accuracy_on_two_groups():
    Y = np.column_stack([[0.0, 1, 2, 3, 100, 101, 102, 103], np.zeros(8)])
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 0])
    # k = 3: every point's neighbours are the rest of its group; only the 0 at 103 is
    # outvoted by its three neighbours labelled 1
    assert tsne.knn_accuracy(Y, labels, k=3) == 7 / 8


def test_tsne_exaggerates_p_for_the_first_iterations_with_momentum_half_then_0_8():
    """gradient(Y, exaggeration, with_kl) gets EARLY_EXAGGERATION (12) for iterations
    0 .. EXAGGERATION_ITERATIONS - 1 (250) and 1 after. Momentum: where the gradient is 0
    the update is momentum times the last one, 0.5 up to iteration 249 and 0.8 from 250."""
    assert tsne.EARLY_EXAGGERATION == 12.0 and tsne.EXAGGERATION_ITERATIONS == 250
    kicks = {0, 248}  # a unit gradient at these iterations, zero elsewhere
    exaggerations, positions = [], []

    def gradient(Y, exaggeration, with_kl):
        positions.append(Y.copy())
        exaggerations.append(exaggeration)
        return (np.ones_like(Y) if len(exaggerations) - 1 in kicks else np.zeros_like(Y)), 0.0
    Y, _ = tsne.optimise(np.zeros((4, 2)), gradient, 253, 1.0)
    assert exaggerations == [12.0] * 250 + [1.0] * 3
    positions.append(Y)
    updates = np.diff(np.array(positions)[:, 0, 0])                  # update of iteration k
    assert np.isclose(updates[1] / updates[0], 0.5)                  # early
    assert np.isclose(updates[249] / updates[248], 0.5)              # still early at 249
    assert np.isclose(updates[250] / updates[249], 0.8)              # late from 250
    assert np.isclose(updates[252] / updates[251], 0.8)


@pytest.mark.parametrize("method", ["exact", "interpolated"])
def test_exaggeration_multiplies_the_attraction_and_not_the_repulsion(method):
    """With P exaggerated by a, dC/dY = 4 sum_j (a p_ij - q_ij) K_ij (y_i - y_j): the
    gradient of a sum p_ij (-log K_ij) + log Z, by autograd."""
    X = np.random.default_rng(4).normal(size=(150, 5))
    P = tsne.exact_affinities(X, 20.0)
    Y = np.random.default_rng(5).normal(size=(150, 2))
    y, p = torch.tensor(Y, requires_grad=True), torch.tensor(P)
    kernel = 1 / (1 + ((y[:, None] - y[None]) ** 2).sum(-1))
    off = ~torch.eye(150, dtype=torch.bool)
    (12.0 * (-p[off] * kernel[off].log()).sum() + kernel[off].sum().log()).backward()
    if method == "exact":
        gradient, _ = tsne.exact_gradient(Y, P, 12.0)
        assert np.allclose(gradient, y.grad.numpy(), atol=1e-10)
    else:
        rows, cols = np.nonzero(P)
        gradient, _ = tsne.InterpolatedGradient(rows, cols, P[rows, cols])(Y, 12.0)
        assert np.linalg.norm(gradient - y.grad.numpy()) / np.linalg.norm(y.grad.numpy()) < 0.01


def test_tsne_update_is_momentum_minus_learning_rate_times_gain_times_gradient():
    """Jacobs' gains: a coordinate's gain shrinks (x 0.8) while its gradient keeps the sign
    of its last update, grows (+ 0.2) otherwise (also on the first step), never below 0.01;
    update = momentum * update - learning_rate * gain * gradient; Y += update."""
    rng = np.random.default_rng(0)
    grads = rng.normal(size=(6, 5, 2))
    calls = []

    def gradient(Y, exaggeration, with_kl):
        calls.append(Y.copy())
        return grads[len(calls) - 1], 0.0
    Y0 = rng.normal(size=(5, 2))
    Y, _ = tsne.optimise(Y0.copy(), gradient, 6, 3.0)
    expected, update, gains = Y0.copy(), np.zeros_like(Y0), np.ones_like(Y0)
    for g in grads:
        gains = np.where(update * g > 0, gains * 0.8, gains + 0.2).clip(min=0.01)
        update = 0.5 * update - 3.0 * gains * g
        expected = expected + update
    assert np.allclose(Y, expected, atol=1e-12)


@pytest.mark.parametrize("count", [100, 3000])
def test_tsne_learning_rate_auto_is_n_over_12_over_4_at_least_50(monkeypatch, count):
    """sklearn's 'auto' rule (Belkina et al. 2019): max(N / early exaggeration / 4, 50)."""
    seen = []
    monkeypatch.setattr(tsne, "optimise", lambda Y, gradient, iterations, learning_rate,
                        progress=None: seen.append(learning_rate) or (Y, 0.0))
    tsne.tsne(np.random.default_rng(0).normal(size=(count, 3)), iterations=1)
    assert seen == [max(count / 12 / 4, 50.0)]


# ============================================================================ pages
# Pins the run page (reloading while running, not when finished; its numbers; links that
# stay inside the folder; escaped names) and the command line that repeats a run.


def fake_run(out: Path, step: int = 1, steps: int = 4, history: dict | None = None,
             **changes) -> SimpleNamespace:
    """What pages.run_page and the results writers read of a training.Run, after
    `step` + 1 of `steps` steps (by default a GAN's history of two checkpoints)."""
    history = history or {"step": [2, 4][:step // 2 + 1], "loss_d": [0.5, 0.25][:step // 2 + 1],
                          "fid": [80.5], "fid_step": [2]}
    return SimpleNamespace(**{"out": out, "command": "gan", "settings": tiny_gan(),
                              "seed": 3, "step": step, "steps": steps, "every": 2,
                              "seconds": 4.0, "history": history, "desc": "GAN b",
                              **changes})


def test_a_run_page_reloads_while_the_run_goes_on_and_not_once_it_is_finished(tmp_path):
    running = Page(pages.run_page(fake_run(tmp_path, step=1, seconds=60.0)))
    # 60 s for 2 steps: 30 s a step, a checkpoint every 2 steps
    assert running.refresh == 60 and "Running: step 2 of 4" in running.text
    assert "about 0:01:00 more" in running.text
    finished = Page(pages.run_page(fake_run(tmp_path, step=3), {"fid": 80.5}))
    assert finished.refresh is None and "Finished: 4 steps" in finished.text
    assert "http-equiv" not in (tmp_path / "index.html").read_text()


def test_a_run_page_shows_the_numbers_of_results_json_and_the_curves_last_values(tmp_path):
    results = {"fid": 80.53421234, "steps": 4, "variant": "b", "seconds_per_step": 0.0123456789,
               "fid_curve": {"step": [2], "fid": [80.5]}, "command_line": "python run.py gan"}
    page = Page(pages.run_page(fake_run(tmp_path, step=3), results))
    shown = page.table("result")
    assert set(shown) == {"fid", "steps", "variant", "seconds_per_step"}  # no lists, dicts
    for name, (cell,) in shown.items():
        value = results[name]
        assert (cell == value if isinstance(value, str) else
                float(cell) == pytest.approx(value, rel=1e-5)), name
    assert page.table("curve") == {"loss_d": ["0.25", "4"], "fid": ["80.5", "2"]}


def test_a_run_page_links_files_inside_its_folder_and_escapes_its_names(tmp_path):
    out = tmp_path / 'a&b <i>"quoted"# 50%?'
    for name in ("samples.png", "samples.gif", "loss.png", "grids/step_000002.png",
                 "grids/step_000004.png"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(out / name, format="GIF" if name.endswith("gif") else "PNG")
    (out / "grids" / "step_000006.png").write_bytes(b"")  # a step this run has not reached
    attribute = '<b>Smiling</b> & "x"'  # a setting's value, shown and in the command line
    page = Page(pages.run_page(fake_run(out, step=3, desc='<script>"GAN"</script>',
                                        settings=tiny_gan(attribute=attribute))))
    files = page.files(out)
    assert {f.name for f in files} >= {"samples.png", "samples.gif", "loss.png",
                                       "step_000002.png", "step_000004.png"}
    assert "step_000006.png" not in {f.name for f in files}
    text = (out / "index.html").read_text()
    assert '<script>"GAN"' not in text and "<i>" not in text and "<b>" not in text
    assert f'<script>"GAN"</script>: {tmp_path.name}/a&b <i>"quoted"# 50%?' in page.text
    assert page.table("setting")["attribute"] == [attribute]
    words = shlex.split(page.pres[0])
    assert words[words.index("--attribute") + 1] == attribute


def test_the_earlier_grids_are_a_strip_of_captioned_pictures_without_scripts(tmp_path):
    for step in (2, 4):
        pages.grid_path(tmp_path, step).parent.mkdir(exist_ok=True)
        Image.new("RGB", (4, 4)).save(pages.grid_path(tmp_path, step))
    text = pages.run_page(fake_run(tmp_path, step=3)).read_text()
    strip = text[text.index('<div class="strip">'):]
    assert re.findall(r'src="(grids/step_\d+\.png)".*?<figcaption>([^<]*)', strip)[:2] == [
        ("grids/step_000002.png", "step 2"), ("grids/step_000004.png", "step 4")]


# ============================================================================ training
# Pins the run around every loop: step log, the training clock through the loop, NaN
# stop, best.pt.


def test_step_log_means_between_commits_and_time_without_pauses(monkeypatch):
    clock = iter([0.0, 4.0, 100.0, 103.0])  # trains 0-4 s, pictures 4-100 s, trains 3 s
    monkeypatch.setattr(training.time, "perf_counter", lambda: next(clock))
    log = training.StepLog({"step": [10], "loss": [9.0]}, seconds=50.0)  # resumed at step 10
    for loss in (1.0, 2.0, 6.0):
        log.add({"loss": loss})
    log.commit(13)
    log.start_clock()
    log.add({"loss": 5.0})
    log.commit(14)
    assert log.history == {"step": [10, 13, 14], "loss": [9.0, 3.0, 5.0]}
    assert log.seconds == 50.0 + 4.0 + 3.0


def test_nan_loss_is_a_user_error():
    training.check_finite(torch.tensor(1.0), step=3)
    with pytest.raises(util.UserError, match="diverged"):
        training.check_finite(torch.tensor(float("nan")), step=3)


def test_each_stream_is_seeded_from_the_seed_and_its_name():
    digest = hashlib.sha256(b"7/noise").digest()
    assert training.stream_seed(7, "noise") == int.from_bytes(digest[:8], "little") >> 1
    names = ("weights", "dropout", "data", "noise", "augment", "grid", "fid")
    seeds = {training.stream_seed(seed, name) for seed in (0, 1) for name in names}
    assert len(seeds) == 2 * len(names) and all(0 <= seed < 2 ** 63 for seed in seeds)
    grid = torch.Generator().manual_seed(training.stream_seed(3, "grid"))
    assert torch.equal(training.fixed_random(3, "grid").randn(4), torch.randn(4, generator=grid))
    training.seed_weights(3)
    weights = torch.rand(2)
    torch.manual_seed(training.stream_seed(3, "weights"))
    assert torch.equal(weights, torch.rand(2))


def draw_through_a_run(out, settings, stop_after=None) -> list:
    """A Run of 4 steps (checkpoints after steps 2 and 4) whose loop draws from its
    "noise" and "data" streams and from torch's default stream (where dropout draws)."""
    run = training.Run(out, "test", settings, 5, "cpu", state={}, steps=4, every=2)
    noise, data_order = run.random("noise"), run.random("data")
    drawn = []
    for step in run:
        drawn.append(torch.cat([noise.randn(2), data_order.rand(2), torch.rand(2)]))
        if run.at_checkpoint:
            run.save_checkpoint()
            if step + 1 == stop_after:
                break
    return drawn


def test_a_resumed_run_draws_what_the_uninterrupted_one_drew(tmp_path):
    settings = tiny_gan(steps=4)
    whole = draw_through_a_run(tmp_path / "whole", settings)
    first = draw_through_a_run(tmp_path / "parts", settings, stop_after=2)
    torch.manual_seed(123)  # whatever ran in between (another run, a picture)
    rest = draw_through_a_run(tmp_path / "parts", dataclasses.replace(settings, resume=True))
    assert len(first) == len(rest) == 2
    assert all(torch.equal(a, b) for a, b in zip(whole, first + rest))
    assert len({tuple(row.tolist()) for row in torch.cat(whole).view(-1, 2)}) == 12  # apart
    # a checkpoint of an earlier version, without the streams: refused, not drawn afresh
    stored = util.load_checkpoint(tmp_path / "parts" / "checkpoint.pt")
    del stored["random"]
    util.save_checkpoint(stored, tmp_path / "parts" / "checkpoint.pt")
    with pytest.raises(util.UserError, match="holds no random stream 'dropout'.*without "
                                             "--resume"):
        draw_through_a_run(tmp_path / "parts", dataclasses.replace(settings, resume=True))


def test_run_writes_best_pt_only_when_an_fid_beats_every_earlier_one(tmp_path):
    layer = nn.Linear(2, 1)
    scores = {2: 5.0, 4: 3.0, 6: 4.0}  # measured at steps 2, 4 and 6 only
    best_steps = []
    run = training.Run(tmp_path, "test", tiny_gan(), 0, "cpu", state={"layer": layer},
                       steps=7, every=1)
    for step in run:
        run.log({"loss": 0.0})
        if run.at_checkpoint:
            if step + 1 in scores:
                run.history.setdefault("fid", []).append(scores[step + 1])
                run.history.setdefault("fid_step", []).append(step + 1)
            if (tmp_path / "best.pt").exists():
                best_steps.append(util.load_checkpoint(tmp_path / "best.pt")["step"])
            run.save_checkpoint()
    assert util.load_checkpoint(tmp_path / "best.pt")["step"] == 4
    # seen before each checkpoint: none until step 2, then 2 (steps 3, 4), then 4 for good
    assert best_steps == [2, 2, 4, 4, 4]


def test_run_takes_the_logged_numbers_from_the_device_every_ten_steps(tmp_path, monkeypatch):
    """No wait for the GPU at every step: the numbers of 10 steps (and of a checkpoint
    step) come to the CPU together; the sums, and a NaN's step, are those of each step."""
    taken, real_stack = [], torch.stack
    monkeypatch.setattr(torch, "stack", lambda tensors, *a, **k: taken.append(len(tensors))
                        or real_stack(tensors, *a, **k))
    run = training.Run(tmp_path, "test", tiny_gan(), 0, "cpu", state={}, steps=25, every=20)
    for step in run:
        run.log({"loss": torch.tensor(float(step))})
    assert taken == [10, 10, 5]  # steps 1-10, 11-20 (a checkpoint), 21-25 (the last)
    assert run.history == {"step": [20, 25], "loss": [9.5, 22.0]}  # means of 0..19, 20..24
    monkeypatch.setattr(torch, "stack", real_stack)
    run = training.Run(tmp_path, "test", tiny_gan(), 0, "cpu", state={}, steps=30, every=30)
    with pytest.raises(util.UserError, match="test loss became nan at step 13"):
        for step in run:
            run.log({"loss": torch.tensor(float("nan") if step == 12 else 1.0)})
    assert run.step == 19  # found when steps 11-20 were taken


def test_run_seconds_are_the_steps_time_without_evaluation_through_the_loop(tmp_path,
                                                                            monkeypatch):
    """The clock through Run's own loop (not StepLog alone): each step takes 1 s, each
    checkpoint's evaluation 100 s, building the run 1000 s; the seconds saved in the
    checkpoints are the steps' alone, counted across a resume."""
    now = [0.0]
    monkeypatch.setattr(training.time, "perf_counter", lambda: now[0])

    def train(steps, resume=False):
        run = training.Run(tmp_path, "test", tiny_gan(steps=steps, resume=resume), 0, "cpu",
                           state={"layer": nn.Linear(1, 1)}, steps=steps, every=2,
                           may_change=("steps",))
        now[0] += 1000.0  # data loading, FID statistics: before the loop
        saved = []
        for _ in run:
            now[0] += 1.0                                   # the step
            run.log({"loss": 0.0})
            if run.at_checkpoint:
                now[0] += 100.0                             # evaluation and pictures
                run.save_checkpoint()
                saved.append(util.load_checkpoint(tmp_path / "checkpoint.pt")["seconds"])
                now[0] += 100.0                             # the checkpoint's own time
        return run, saved
    run, saved = train(5)
    assert saved == [2.0, 4.0, 5.0] and run.seconds == 5.0
    run, saved = train(7, resume=True)  # steps 5 and 6 on top of the first run's 5 s
    assert saved == [6.0, 7.0] and run.seconds == 7.0


# ============================================================================ metrics
# Pins FID's Inception against pytorch-fid, the Frechet distance, KID against its formula
# and its unbiasedness, FID_inf's line, the held-out cache with its features, the final
# and best FID of a curve.


REFERENCE = Path(__file__).resolve().parent.parent / "shared" / "reference" \
    / "fid_inception_seed0.npz"


def reference_state(reference) -> dict:
    """The weight rule of ../shared/data/README.md: sorted keys, one generator seeded 0."""
    generator = torch.Generator().manual_seed(0)
    state = {}
    for key, shape_text in zip(reference["keys"].tolist(), reference["shapes"].tolist()):
        shape = tuple(int(s) for s in shape_text.split(",")) if shape_text else ()
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(0)
        elif key.endswith("running_var"):
            state[key] = 0.5 + torch.rand(shape, generator=generator)
        elif key.endswith("running_mean"):
            state[key] = 0.1 * torch.randn(shape, generator=generator)
        elif len(shape) == 4:
            fan_in = shape[1] * shape[2] * shape[3]
            state[key] = torch.randn(shape, generator=generator) * (2 / fan_in) ** 0.5
        elif len(shape) == 2:
            state[key] = torch.randn(shape, generator=generator) * (1 / shape[1]) ** 0.5
        elif key.endswith(".bn.weight"):
            state[key] = 1 + 0.1 * torch.randn(shape, generator=generator)
        else:
            state[key] = 0.1 * torch.randn(shape, generator=generator)
    return state


@pytest.fixture(scope="module")
def reference_inception():
    if not REFERENCE.is_file():
        pytest.skip("../shared/reference/fid_inception_seed0.npz is not present")
    reference = np.load(REFERENCE)
    assert reference["keys"].tolist() == sorted(reference["keys"].tolist())
    network = metrics.FIDInception()
    network.load_state_dict(reference_state(reference), strict=True)  # same keys, same shapes
    return network.eval(), reference


@pytest.mark.parametrize("name", ["x64", "x28"])
def test_fid_inception_blocks_match_pytorch_fid(reference_inception, name):
    network, reference = reference_inception
    with torch.no_grad():
        blocks = network.blocks(torch.from_numpy(reference[name]))
    for index, block in enumerate(blocks):
        pooled = block.mean(dim=(2, 3)) if block.dim() == 4 else block
        expected = torch.from_numpy(reference[f"{name}_block{index}"])
        assert (pooled - expected).abs().max() <= 1e-4, f"block {index}"
    if name == "x64":
        with torch.no_grad():
            logits = network.logits(torch.from_numpy(reference[name]))
        assert (logits - torch.from_numpy(reference["x64_logits"])).abs().max() <= 1e-4


@pytest.mark.parametrize("case", ["full", "lowrank"])
def test_frechet_distance_matches_pytorch_fid(case):
    if not REFERENCE.is_file():
        pytest.skip("../shared/reference/fid_inception_seed0.npz is not present")
    reference = np.load(REFERENCE)
    fid = metrics.frechet_distance(reference[f"{case}_mu1"], reference[f"{case}_sigma1"],
                                   reference[f"{case}_mu2"], reference[f"{case}_sigma2"])
    assert abs(fid / float(reference[f"{case}_fid"]) - 1) <= 1e-6


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 6))
    sigma = a @ a.T + np.eye(6)
    mu = rng.normal(size=6)
    assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-9  # same Gaussian
    # commuting (diagonal) covariances: sum (sqrt(s1) - sqrt(s2))^2 + ||mu1 - mu2||^2
    s1, s2 = rng.uniform(0.5, 2, 6), rng.uniform(0.5, 2, 6)
    expected = np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2) + np.sum((mu - 1) ** 2)
    assert np.isclose(metrics.frechet_distance(mu, np.diag(s1), np.ones(6), np.diag(s2)),
                      expected, rtol=1e-10)


def test_gaussian_statistics_are_mean_and_unbiased_covariance():
    features = np.random.default_rng(1).normal(size=(40, 3))
    mu, sigma = metrics.gaussian_statistics(features)
    centred = features - features.mean(0)
    assert np.allclose(mu, features.mean(0)) and np.allclose(sigma, centred.T @ centred / 39)


def mmd2_with_loops(x, y, unbiased=True) -> float:
    """MMD^2 with k(a, b) = (a . b / d + 1)^3 as Binkowski et al. write it, one pair at a
    time; unbiased=False keeps the pairs i = j (the biased V-statistic)."""
    def k(a, b):
        return (sum(float(p) * float(q) for p, q in zip(a, b)) / len(a) + 1) ** 3

    def within(z):
        pairs = [(i, j) for i in range(len(z)) for j in range(len(z)) if i != j or not unbiased]
        return sum(k(z[i], z[j]) for i, j in pairs) / len(pairs)
    between = sum(k(a, b) for a in x for b in y) / (len(x) * len(y))
    return within(x) + within(y) - 2 * between


@pytest.mark.parametrize("kernels", ["of every pair at once", "of each subset"])
def test_kid_matches_the_formula_written_with_loops(monkeypatch, kernels):
    """Catches: the diagonal kept or divided by m^2, d not dividing the dot product, another
    exponent, the cross term counted once, subsets with repeats, a sample-size std; and,
    where the kernels of all pairs are computed once, a subset reading other rows or
    columns than its own (x's rows against y's, or its rows without its columns)."""
    entries = 0 if kernels == "of each subset" else metrics.KID_KERNEL_ENTRIES
    kernel, calls = metrics.polynomial_kernel, []
    monkeypatch.setattr(metrics, "polynomial_kernel", lambda x, y: calls.append(1) or kernel(x, y))
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(5, 3, generator=generator, dtype=torch.float64)
    y = torch.rand(4, 3, generator=generator, dtype=torch.float64) + 0.5
    assert float(metrics.mmd2_unbiased(x, y)) == pytest.approx(mmd2_with_loops(x, y), rel=1e-12)
    for subset_size, subsets in ((10, 3), (3, 6)):  # min(10, 5, 4) = 4 a side; 3 a side
        calls.clear()
        mean, std = metrics.kid(x.numpy(), y.numpy(), torch.Generator().manual_seed(7),
                                subsets=subsets, subset_size=subset_size,
                                kernel_entries=entries)
        assert len(calls) == (3 if kernels == "of every pair at once" else 3 * subsets)
        draws, m = torch.Generator().manual_seed(7), min(subset_size, 4)
        estimates = []
        for _ in range(subsets):  # without replacement
            real = x[torch.randperm(5, generator=draws)[:m]]
            fake = y[torch.randperm(4, generator=draws)[:m]]
            assert len(set(map(tuple, real.tolist()))) == m
            estimates.append(mmd2_with_loops(real, fake))
        assert (mean, std) == pytest.approx((np.mean(estimates), np.std(estimates)), rel=1e-10)
        assert std > 0  # the subsets differ


def test_kid_of_two_samples_of_one_distribution_averages_to_zero_unlike_the_biased_mmd():
    """Binkowski et al.'s reason for KID: E[MMD^2_u] = MMD^2 = 0 here at any sample size,
    while the estimate that keeps the pairs i = j is above 0 by O(1/m). Catches the
    diagonal kept in either within-sample mean."""
    unbiased, biased = [], []
    for seed in range(300):
        generator = torch.Generator().manual_seed(seed)
        x, y = (torch.randn(8, 3, generator=generator, dtype=torch.float64) + 0.5
                for _ in range(2))
        unbiased.append(metrics.kid(x.numpy(), y.numpy(), generator, subsets=2,
                                    subset_size=6)[0])
        k = metrics.polynomial_kernel
        biased.append(float(k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean()))
    error = np.std(unbiased) / np.sqrt(len(unbiased))
    assert abs(np.mean(unbiased)) < 3 * error
    assert np.mean(biased) > 10 * np.std(biased) / np.sqrt(len(biased))


def test_fid_infinity_recovers_the_intercept_of_a_known_one_over_n_law():
    """The line: FIDs made to follow 12.5 + 300 / N give back 12.5 (catches a line in N
    instead of 1/N, or its slope returned). The sizes: n/4 to n, evenly spaced in 1/N."""
    counts = metrics.fid_infinity_counts(400)
    assert counts[0] == 100 and counts[-1] == 400 and len(counts) == metrics.FID_INF_POINTS
    steps = np.diff(1 / np.asarray(counts, float))
    assert np.allclose(steps, steps.mean(), rtol=0.1)  # even, up to rounding N to integers
    fids = [12.5 + 300 / count for count in counts]
    assert metrics.intercept_in_inverse_count(counts, fids) == pytest.approx(12.5, rel=1e-9)
    assert metrics.fid_infinity_counts(2) == [2]
    with pytest.raises(util.UserError, match="give at least 3"):
        metrics.fid_infinity(np.zeros((2, 4)), np.zeros(4), np.eye(4), torch.Generator())


def test_fid_infinity_of_samples_of_the_reference_averages_to_zero_unlike_fid_n():
    """Features drawn from the reference Gaussian itself: FID_N is above 0 by about
    (d + d(d + 1)/4) / N, FID_inf about 0 on average (Chong & Forsyth's point). Catches
    subsets that are not random draws of the features, or not of the sizes fitted."""
    at_n, at_infinity = [], []
    for seed in range(30):
        features = np.random.default_rng(seed).normal(size=(400, 4))
        at_n.append(metrics.frechet_distance(*metrics.gaussian_statistics(features),
                                             np.zeros(4), np.eye(4)))
        at_infinity.append(metrics.fid_infinity(features, np.zeros(4), np.eye(4),
                                                torch.Generator().manual_seed(seed)))
    assert abs(np.mean(at_infinity)) < 3 * np.std(at_infinity) / np.sqrt(30)
    assert np.mean(at_n) > 10 * np.std(at_n) / np.sqrt(30)


def test_fid_results_are_the_last_and_the_lowest_fid_of_the_curve_and_both_sides_counts():
    tracker = metrics.FIDTracker.__new__(metrics.FIDTracker)  # no Inception: results only
    tracker.count, tracker.weights, tracker.seconds = 7, "w", 1.5
    tracker.real = types.SimpleNamespace(count=19)
    history = {"fid": [9.0, 4.0, 6.0, 5.0], "fid_step": [10, 20, 30, 35],
               "kid": [0.3, 0.1, 0.2, 0.25], "kid_std": [0.01, 0.02, 0.03, 0.04]}
    results = tracker.results(history)
    assert (results["fid"], results["best_fid"], results["best_fid_step"]) == (5.0, 4.0, 20)
    assert (results["kid"], results["kid_std"]) == (0.25, 0.04)  # the last, as the FID
    assert (results["fid_images"], results["fid_real_images"]) == (7, 19)
    assert results["fid_curve"] == {"images": 7, "real_images": 19, "step": [10, 20, 30, 35],
                                    "fid": [9.0, 4.0, 6.0, 5.0], "kid": history["kid"],
                                    "kid_std": history["kid_std"]}
    assert results["fid_seconds"] == 1.5 and results["fid_weights"] == "w"


def test_fid_weights_offline_says_where_to_put_the_file(tmp_path, monkeypatch):
    fake_network(monkeypatch, None)
    with pytest.raises(util.UserError, match="by hand") as error:
        metrics.fid_weights(tmp_path)
    assert "pt_inception-2015-12-05-6726825d.pth" in str(error.value)


def test_fid_weights_with_wrong_sha256_are_removed(tmp_path, monkeypatch):
    fake_network(monkeypatch, b"not weights")
    with pytest.raises(util.UserError, match="corrupt"):
        metrics.fid_weights(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_fid_command_saves_statistics_and_compares(tmp_path, capsys, monkeypatch):
    """End to end with a random-weight network file: stats of a folder equal stats of the
    same folder's saved .npz, so the FID between them is 0."""
    weights = tmp_path / "w.pth"
    torch.manual_seed(0)
    torch.save(metrics.FIDInception().state_dict(), weights)
    folder = tmp_path / "faces"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (16, 16, 3), np.uint8)) \
            .save(folder / f"{i}.png")
    common = ["--weights", str(weights), "--cache", "", "--device", "cpu"]
    # saved under s.npz, as np.savez names it, which is what `fid` reads back
    assert run.main(["fid", str(folder), str(tmp_path / "s"), "--save-stats"] + common) == 0
    assert run.main(["fid", str(folder), str(tmp_path / "s.npz")] + common) == 0
    lines = capsys.readouterr().out.strip().splitlines()[-3:]
    assert [line.split(":")[0] for line in lines] == ["FID", "KID", "FID_inf"]
    assert abs(float(lines[0].split()[1])) < 1e-6
    assert lines[0].endswith(f"(3 images of {folder} against 3 images of {tmp_path / 's.npz'})")


def test_fid_command_prints_fid_kid_and_fid_infinity_with_the_image_counts(tmp_path, capsys,
                                                                           cheap_fid):
    """Each figure as metrics computes it from the same statistics, KID's subsets and
    FID_inf's drawn by --seed; a statistics file written before KID (mu and sigma only)
    still gives FID and FID_inf, and one line on what KID lacks."""
    judged, reference = image_folder(tmp_path / "a", 12), image_folder(tmp_path / "b", 10)
    common = ["--cache", "", "--seed", "3"]
    assert run.main(["fid", str(judged), str(reference)] + common) == 0
    fid, kid, fid_inf = capsys.readouterr().out.strip().splitlines()
    a, b = (metrics.load_statistics(folder, PooledFeatures, cache_dir="")[0]
            for folder in (judged, reference))
    mean, std = metrics.kid(b.features, a.features, torch.Generator().manual_seed(3))
    compared = f"12 images of {judged} against 10 images of {reference}"
    between = metrics.frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
    assert fid == f"FID: {between:.4f} ({compared})"
    assert kid == (f"KID: {mean:.4f} +- {std:.4f} (mean and std over 100 subsets of 10 images "
                   f"a side; {compared})")
    extrapolated = metrics.fid_infinity(a.features, b.mu, b.sigma,
                                        torch.Generator().manual_seed(3))
    assert fid_inf.startswith(f"FID_inf: {extrapolated:.4f} (FIDs of 8 subsets of 3 to 12 of "
                              f"the {compared}, extrapolated")
    old = util.write_arrays({"mu": b.mu, "sigma": b.sigma}, tmp_path / "old.npz")
    assert run.main(["fid", str(judged), str(old)] + common) == 0
    fid, kid, fid_inf = capsys.readouterr().out.strip().splitlines()
    assert fid.endswith(f"(12 images of {judged} against an unknown number of images of {old})")
    assert kid.startswith(f"KID: not computed: {old} has only mu and sigma")
    assert fid_inf.startswith(f"FID_inf: {extrapolated:.4f}")
    assert run.main(["fid", "--save-stats", str(reference), str(tmp_path / "new.npz")]
                    + common) == 0  # saved with its features: KID as from the folder
    assert run.main(["fid", str(judged), str(tmp_path / "new.npz")] + common) == 0
    assert f"KID: {mean:.4f} +- {std:.4f}" in capsys.readouterr().out


def test_held_out_statistics_are_computed_once_then_read_from_the_cache(tmp_path, cheap_fid,
                                                                         monkeypatch, capsys):
    real, other = toy_faces(8), data.ImageSet(toy_faces(8).pixels.flip(0))
    cache = tmp_path / "cache"
    first = metrics.FIDTracker(real, 4, 1, "cpu", cache, cheap_fid)
    original = metrics.image_statistics
    monkeypatch.setattr(metrics, "image_statistics",
                        lambda *args, **kwargs: pytest.fail("held-out statistics recomputed"))
    second = metrics.FIDTracker(real, 4, 1, "cpu", cache, cheap_fid)
    assert np.array_equal(first.real.sigma, second.real.sigma)
    assert second.real.features.dtype == np.float32 and second.real.count == 8
    assert np.array_equal(first.real.features, second.real.features)  # KID's side, too
    monkeypatch.setattr(metrics, "image_statistics", original)
    [entry] = cache.glob("fid_real_*.npz")
    stored = dict(np.load(entry))
    # a damaged entry is rebuilt, with a line that says so: torn, written before KID (no
    # features), features with a NaN, features of fewer images than the count
    for damage, says in ((b"torn", "cannot be read"),
                         ({**stored, "features": None}, "holds no features"),
                         ({**stored, "features": stored["features"] * np.nan}, "'features'"),
                         ({**stored, "features": stored["features"][:7]}, "'count'")):
        if isinstance(damage, bytes):
            entry.write_bytes(damage)
        else:
            util.write_arrays({k: v for k, v in damage.items() if v is not None}, entry)
        third = metrics.FIDTracker(real, 4, 1, "cpu", cache, cheap_fid)
        assert "is damaged" in (err := capsys.readouterr().err) and says in err, damage
        assert np.allclose(third.real.sigma, first.real.sigma)
        assert np.array_equal(third.real.features, first.real.features)
    metrics.FIDTracker(other, 4, 1, "cpu", cache, cheap_fid)  # other images: their own entry
    assert len(list(cache.glob("fid_real_*.npz"))) == 2


def test_measure_adds_kid_at_the_fid_steps_and_none_before_a_resume_from_before_kid(
        tmp_path, cheap_fid):
    """A history from a checkpoint written before KID (FID at steps 1 and 2, no KID): KID
    starts at step 3 with None before it, so each curve keeps one value a step, and the
    pictures draw it. Catches KID lists shorter than the steps they are drawn against."""
    tracker = metrics.FIDTracker(toy_faces(8), 4, 1, "cpu", tmp_path / "cache", cheap_fid)
    history = {"fid": [5.0, 4.0], "fid_step": [1, 2]}
    fake = toy_faces(4).images()
    images = tracker.measure(history, 3, lambda batch: batch, [fake[:2], fake[2:]])
    assert torch.equal(images, fake)
    scores = history["kid"][-1], history["kid_std"][-1]
    assert scores == pytest.approx(own_kid(fake, toy_faces(8).images()), rel=1e-9)
    assert history["kid"] == [None, None, scores[0]] and history["fid_step"] == [1, 2, 3]
    curve = tracker.results(history)["fid_curve"]
    assert len(curve["kid"]) == len(curve["kid_std"]) == len(curve["step"]) == 3
    reports.fid_curve(tracker, history, tmp_path / "fid.png", "test")
    assert (tmp_path / "kid.png").is_file()


# ============================================================================ hog
# Pins HOG features against a pixel-by-pixel reference, the SVM's balanced objective,
# the detector, the face rates.


def own_cell_histograms(image: np.ndarray, cell=4, bins=9) -> np.ndarray:
    """Dalal & Triggs' cell histograms pixel by pixel: (C, H, W) -> (bins, H/cell, W/cell)."""
    channels, height, width = image.shape
    padded = np.pad(image, ((0, 0), (1, 1), (1, 1)), mode="edge")
    histograms = np.zeros((bins, height // cell, width // cell))
    for y in range(height):
        for x in range(width):
            gx = padded[:, y + 1, x + 2] - padded[:, y + 1, x]
            gy = padded[:, y + 2, x + 1] - padded[:, y, x + 1]
            c = int(np.argmax(np.hypot(gx, gy)))
            magnitude, angle = math.hypot(gx[c], gy[c]), math.atan2(gy[c], gx[c]) % math.pi
            width_of_bin = math.pi / bins
            centre_below = math.floor(angle / width_of_bin - 0.5)   # bin centres (k + .5) w
            share_above = angle / width_of_bin - 0.5 - centre_below
            histograms[centre_below % bins, y // cell, x // cell] += magnitude * (1 - share_above)
            histograms[(centre_below + 1) % bins, y // cell, x // cell] += magnitude * share_above
    return histograms


def synthetic_faces(count: int, seed: int) -> torch.Tensor:
    """A toy 'face' at 64x64: a light disc with two dark eyes and a mouth, on noise."""
    generator = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    centre = 32 + torch.randint(-2, 3, (count, 2, 1, 1), generator=generator)
    cy, cx = centre[:, 0], centre[:, 1]
    disc = ((y - cy) ** 2 + (x - cx) ** 2 < 26 ** 2).float()
    eyes = sum(((y - cy + 8) ** 2 + (x - cx - dx) ** 2 < 16).float() for dx in (-10, 10))
    mouth = ((y - cy - 12).abs() < 2).float() * ((x - cx).abs() < 9).float()
    face = 0.8 * disc - 1.5 * (eyes + mouth) * disc - 0.4
    noise = torch.rand(count, 3, 64, 64, generator=generator) * 0.2
    return (face[:, None].expand(-1, 3, -1, -1) + noise).clamp(-1, 1)


def test_hog_cell_histograms_match_a_pixel_by_pixel_reference():
    """Catches: signed instead of unsigned angles, votes to one bin only, bins off by
    half a width, the wrong channel, a border rule other than repeating the edge."""
    image = torch.rand(2, 3, 8, 12, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ours = hog.cell_histograms(image)
    for i in range(2):
        assert np.allclose(ours[i].numpy(), own_cell_histograms(image[i].double().numpy()),
                           atol=1e-5)


def test_hog_ramps_vote_where_their_edges_point():
    """A horizontal ramp I = a x has gradient (2a, 0) inside, a at the repeated border:
    angle 0 lies halfway between the centres 10 and 170 degrees, so bins 0 and 8 share
    each cell's 4 (a + 3 * 2a) = 28a. A vertical ramp's 90 degrees is bin 4's centre."""
    a = 0.1
    ramp = (torch.arange(8.0) * a).expand(1, 3, 8, 8)
    across = hog.cell_histograms(ramp)[0, :, 0, 0]       # the top-left cell
    expected = torch.zeros(9)
    expected[0] = expected[8] = 14 * a
    assert torch.allclose(across, expected, atol=1e-6)
    down = hog.cell_histograms(ramp.transpose(2, 3))[0, :, 0, 0]
    expected = torch.zeros(9)
    expected[4] = 28 * a
    assert torch.allclose(down, expected, atol=1e-5)  # pi / 2 in float32: a hair past 4.0


def test_hog_blocks_are_l2_hys_normalised_2x2_cells_and_windows_are_7x7_blocks():
    histograms = torch.rand(1, 9, 10, 10, generator=torch.Generator().manual_seed(1))
    histograms[0, 3, 2, 2] = 50.0  # one strong edge, so that the clip at 0.2 matters
    blocks = hog.block_features(histograms)
    assert blocks.shape == (1, 36, 9, 9)
    for by, bx in ((0, 0), (1, 1), (2, 1), (8, 8)):
        v = torch.cat([histograms[0, :, by, bx], histograms[0, :, by, bx + 1],
                       histograms[0, :, by + 1, bx], histograms[0, :, by + 1, bx + 1]])
        v = (v / (v.norm() ** 2 + 1e-4).sqrt()).clamp(max=0.2)
        assert torch.allclose(blocks[0, :, by, bx], v / (v.norm() ** 2 + 1e-4).sqrt(),
                              atol=1e-6)
    image = torch.rand(1, 3, 40, 40, generator=torch.Generator().manual_seed(2)) * 2 - 1
    windows = hog.window_features(image)                 # 10x10 cells, 9x9 blocks
    assert windows.shape == (1, 9, 1764)                     # 3x3 windows, one cell apart
    blocks = hog.block_features(hog.cell_histograms(image))
    assert torch.equal(windows[0, 3 * 1 + 2], blocks[0, :, 1:8, 2:9].reshape(-1))


def test_linear_svm_separates_separable_windows_with_a_margin():
    generator = torch.Generator().manual_seed(3)
    direction = torch.randn(20, generator=generator)
    features = torch.randn(300, 20, generator=generator)
    margin = features @ direction
    features, margin = features[margin.abs() > 1], margin[margin.abs() > 1]
    is_face = margin > 0
    svm = nn.Linear(20, 1)
    hog.fit_svm(svm, features, is_face, penalty=1e-6)
    scores = svm(features).squeeze(1).detach()
    assert torch.equal(scores > 0, is_face)
    assert (scores[is_face] > 0.5).all() and (scores[~is_face] < -0.5).all()


def test_svm_minimises_the_mean_over_faces_plus_the_mean_over_non_faces():
    """40 faces against 5 non-faces that overlap them: at the fitted w, b the gradient of
    the balanced objective (each class's mean hinge^2, plus the ridge) is zero, and that
    of one mean over all 45 windows is not: each class counts the same."""
    generator = torch.Generator().manual_seed(4)
    features = torch.cat([torch.randn(40, 3, generator=generator) + 0.5,
                          torch.randn(5, 3, generator=generator) - 0.5])
    is_face = torch.arange(45) < 40
    svm = nn.Linear(3, 1)
    hog.fit_svm(svm, features, is_face, penalty=1e-3)
    y = is_face.float() * 2 - 1

    def objective(balanced):
        hinge = F.relu(1 - y * svm(features).squeeze(1)).pow(2)
        mean = (hinge[is_face].mean() + hinge[~is_face].mean()) if balanced else hinge.mean()
        return mean + 1e-3 * svm.weight.pow(2).sum()
    balanced = torch.cat([g.flatten() for g in gradients(objective(True), svm.parameters())])
    pooled = torch.cat([g.flatten() for g in gradients(objective(False), svm.parameters())])
    assert balanced.abs().max() < 1e-3 and pooled.abs().max() > 3e-2


def test_face_rates_are_the_shares_found_among_faces_backgrounds_and_scrambled_faces():
    """A stub detector that calls an image a face when its top-left tile is bright:
    faces (bright corner) 1, backgrounds (dark) 0, and the faces scrambled, whose corner
    tile comes from anywhere in the face, the share whose new corner tile is bright."""
    faces = torch.full((6, 3, 64, 64), -1.0)
    faces[:, :, :16, :16] = 1.0  # the one bright tile of 16, in the corner
    backgrounds = torch.full((9, 3, 64, 64), -1.0)
    seen = []

    class Corner:
        def detect(self, images):
            seen.append(images)
            return images[:, :, :16, :16].mean(dim=(1, 2, 3)) > 0
    rates = hog.face_rates(Corner(), faces, backgrounds, seed=2)
    scrambled = seen[2]
    assert len(seen) == 3 and scrambled.shape == faces.shape
    assert torch.equal(scrambled.sort(dim=-1).values.sum(dim=(1, 2, 3)),
                       faces.sort(dim=-1).values.sum(dim=(1, 2, 3)))  # the same pixels
    corner_bright = (scrambled[:, :, :16, :16].mean(dim=(1, 2, 3)) > 0).float().mean().item()
    assert rates == {"faces_detected": 1.0, "backgrounds_detected": 0.0,
                     "scrambled_detected": corner_bright}
    assert corner_bright < 1.0


def test_scrambled_faces_keep_every_tile_in_a_new_order():
    faces = toy_faces(3, 16).images()
    mixed = hog.scrambled(faces, torch.Generator().manual_seed(0))
    def tiles(images):  # (N, 16, C*4*4), tile contents
        return images.unfold(2, 4, 4).unfold(3, 4, 4).permute(0, 2, 3, 1, 4, 5).reshape(3, 16, -1)
    for before, after in zip(tiles(faces), tiles(mixed)):
        assert not torch.equal(before, after)
        assert torch.equal(before[before[:, 0].argsort()], after[after[:, 0].argsort()])


def test_face_detector_finds_toy_faces_not_noise_and_facerate_writes_its_rate(tmp_path, capsys):
    """The whole pipeline on toy faces; the threshold is set on held-back non-faces, and
    the command's rate is the detector's on the folder."""
    noise = torch.rand(240, 3, 28, 28, generator=torch.Generator().manual_seed(4)) * 2 - 1
    detector = hog.train_face_detector(synthetic_faces(120, 0), noise, seed=0)
    assert detector.threshold.item() != 0
    rates = hog.face_rates(detector, synthetic_faces(40, 1), noise[:40] * 0.9, seed=1)
    assert rates["faces_detected"] >= 0.9 and rates["backgrounds_detected"] <= 0.1
    path = hog.save_face_detector(detector, rates, tmp_path / "detector.pt")
    folder = tmp_path / "generated"
    images = torch.cat([synthetic_faces(6, 2), noise[:4].repeat(1, 1, 3, 3)[..., :64, :64]])
    data.save_images(images, folder, [f"{i}.png" for i in range(10)])
    found = hog.load_face_detector(path).detect(data.load(str(folder), "train",
                                                              cache_dir="").images())
    assert run.main(["facerate", "--folder", str(folder), "--detector", str(path),
                     "--out", str(tmp_path / "o")]) == 0
    saved = json.loads(next((tmp_path / "o" / "facerate").glob("generated-*.json"))
                       .read_text())
    assert saved["faces"] == int(found.sum()) and saved["images"] == 10
    assert saved["face_rate"] == pytest.approx(int(found.sum()) / 10, rel=1e-6)
    assert f"face rate {found.float().mean():.4f}" in capsys.readouterr().out
    line = one_line_error(capsys, ["facerate", "--folder", str(folder), "--detector",
                                   str(tmp_path / "none.pt")])
    assert "--detector" in line and "not found" in line


# ============================================================================ classifier
# Pins the digit classifier's shifts, step and resume; epochs with a partial batch; each
# accuracy of the saved network on the test split; predictions in eval mode.


def test_classifier_run_writes_every_file_and_learns_a_toy_task(tmp_path):
    settings = classifier.ClassifierSettings(epochs=2, batch_size=16, lr=3e-3)
    results = classifier.train(toy_digits(), toy_digits(seed=1), settings,
                                       tmp_path, "cpu", seed=0)
    assert results["test_accuracy"] == 1.0 and results["total"] == 64
    for name in ("checkpoint.pt", "loss.png", "accuracy.png", "results.json"):
        assert (tmp_path / name).is_file(), name


def test_resumed_classifier_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    settings = classifier.ClassifierSettings(epochs=2, batch_size=16, lr=3e-3)
    classifier.train(toy_digits(), toy_digits(seed=1), settings,
                             tmp_path / "whole", "cpu", seed=3)

    def interrupt(*args, **kwargs):  # stop right after the first epoch's checkpoint
        raise KeyboardInterrupt
    with monkeypatch.context() as patch:
        patch.setattr(plots, "line_plot", interrupt)
        with pytest.raises(KeyboardInterrupt):
            classifier.train(toy_digits(), toy_digits(seed=1), settings,
                                     tmp_path / "parts", "cpu", seed=3)
    assert util.load_checkpoint(tmp_path / "parts" / "checkpoint.pt")["step"] == 4  # epoch 1
    resumed = classifier.ClassifierSettings(epochs=2, batch_size=16, lr=3e-3, resume=True)
    classifier.train(toy_digits(), toy_digits(seed=1), resumed,
                             tmp_path / "parts", "cpu", seed=3)
    whole = util.load_checkpoint(tmp_path / "whole" / "checkpoint.pt")["network"]
    parts = util.load_checkpoint(tmp_path / "parts" / "checkpoint.pt")["network"]
    for name in whole:
        assert torch.equal(whole[name], parts[name]), name


def recorded_digit_classifiers(monkeypatch) -> list:
    """nets.digit_classifier replaced by one Linear layer in a Recorder (the same initial
    weights every time); returns the list the networks built go into."""
    networks = []

    def tiny_classifier(classes=10, **kwargs):
        torch.manual_seed(0)
        networks.append(Recorder(nn.Sequential(nn.Flatten(), nn.Linear(3 * 28 * 28, classes))))
        return networks[-1]
    monkeypatch.setattr(nets, "digit_classifier", tiny_classifier)
    return networks


def test_classifier_step_descends_label_smoothed_cross_entropy_of_shifted_digits_one_cycle(
        tmp_path, monkeypatch):
    """The digit evaluator's step: AdamW with the settings' weight decay, the one-cycle
    learning rate, the gradient of CE with label smoothing 0.1 of the network on randomly
    shifted images (none is a raw training image) and their own labels (toy_digits: dark 0,
    bright 1)."""
    networks = recorded_digit_classifiers(monkeypatch)
    train = toy_digits(32)
    settings = classifier.ClassifierSettings(epochs=2, batch_size=8, lr=0.01, weight_decay=0.02)
    reference = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], 0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(reference, 0.01, total_steps=2 * 4)
    one_cycle = []  # torch's one-cycle learning rates for 2 epochs of 4 steps
    for _ in range(2 * 4):
        one_cycle.append(reference.param_groups[0]["lr"])
        reference.step()
        schedule.step()
    raw = train.images()
    checked = []

    def before(optimizer):
        network = networks[0]
        images = network.inputs[-1]
        assert isinstance(optimizer, torch.optim.AdamW) and held(optimizer) == ids(network)
        for group in optimizer.param_groups:
            assert math.isclose(group["lr"], one_cycle[len(checked)], rel_tol=1e-9)
            assert group["weight_decay"] == 0.02
        assert not any(torch.equal(image, other) for image in images for other in raw)
        labels = (images.mean(dim=(1, 2, 3)) > 0).long()
        loss = F.cross_entropy(network.inner(images), labels, label_smoothing=0.1)
        assert_all_close([p.grad for p in network.parameters()],
                         gradients(loss, network.inner.parameters()), what=len(checked))
        checked.append(len(images))
    with optimiser_hooks(before):
        classifier.train(train, toy_digits(8, seed=1), settings, tmp_path, "cpu", 0)
    assert checked == [8] * 8


def test_classifier_epochs_cover_every_image_and_each_accuracy_is_the_saved_nets_on_test(
        tmp_path, monkeypatch):
    """21 training digits in batches of 8: each epoch three steps, the last of 5 digits;
    after each epoch the accuracy of the network as saved then on the test split (13
    digits, four of them labelled against their brightness, so no network reads them
    all right and the train split's accuracy differs), computed here by hand;
    results.json holds the last network's."""
    networks = recorded_digit_classifiers(monkeypatch)
    states = saved_states(monkeypatch, tmp_path)
    sizes = []
    train, test = toy_digits(21), toy_digits(13, seed=1)
    test.labels[::4] = 1 - test.labels[::4]
    settings = classifier.ClassifierSettings(epochs=2, batch_size=8, lr=0.01)
    with optimiser_hooks(lambda optimizer: sizes.append(len(networks[0].inputs[-1]))):
        results = classifier.train(train, test, settings, tmp_path, "cpu", 0)
    assert sizes == [8, 8, 5] * 2 and len(states) == 2
    for epoch, state in enumerate(states):
        network = nets.digit_classifier(classes=2)  # the recorded stub, built again
        network.load_state_dict(state["network"])
        accuracy, _ = own_accuracy(network, test)
        assert state["history"]["test_accuracy"][-1] == accuracy, epoch
    assert accuracy < 1.0 and own_accuracy(network, train)[0] != accuracy
    assert results == json.loads((tmp_path / "results.json").read_text())
    assert (results["test_accuracy"], results["correct"], results["total"]) == (
        accuracy, round(accuracy * 13), 13)


def test_accuracy_is_the_share_of_predictions_equal_to_their_labels():
    predictions = torch.tensor([3, 1, 4, 1, 5, 9, 2])
    labels = torch.tensor([3, 1, 4, 0, 5, 0, 0])
    assert classifier.accuracy(predictions, labels) == (4 / 7, 4, 7)


def test_classifier_uda_and_fid_features_predict_each_image_on_its_own():
    """classifier.predict (the digit accuracy, UDA's evaluation) and FID's Inception run in
    eval mode: batch norm's running statistics, no dropout."""
    network = nets.digit_classifier(classes=10)
    network.train()(torch.randn(32, 3, 28, 28) + 3)  # running statistics far from the data
    network.train()
    digits = toy_domain(12)
    together = classifier.predict(network, digits)
    alone = torch.cat([classifier.predict(network, digits.subset(torch.tensor([i])))
                       for i in range(12)])
    assert torch.equal(together, alone) and not network.training
    nets_ = uda.Networks("dann")
    nets_.train()
    logits = nn.Sequential(nets_.features, nets_.classifier)
    logits(torch.randn(16, 3, 28, 28) + 2)  # running statistics
    nets_.train()
    assert torch.equal(uda.predict(nets_.features, nets_.classifier, digits),
                       torch.cat([uda.predict(nets_.features, nets_.classifier,
                                              digits.subset(torch.tensor([i])))
                                  for i in range(12)]))
    features = reports.embed(nets_.features.train(), digits)
    assert np.allclose(features[4:5], reports.embed(nets_.features.train(),
                                                    digits.subset(torch.tensor([4]))),
                       atol=1e-5)
    inception = metrics.for_inference(metrics.FIDInception(), "cpu")
    inception.train()
    images = torch.rand(3, 3, 8, 8) * 2 - 1
    features = metrics.inception_features(metrics.for_inference(inception, "cpu"), images,
                                          batch_size=3)
    assert np.allclose(features[1:2], metrics.inception_features(inception, images[1:2]),
                       atol=1e-4)


# ============================================================================ reports
# Pins labelled grids written once; every number of results.json and results.md from a
# given history; the csv, the course digits' seconds, every promised file.


def test_every_method_writes_every_promised_file(tmp_path):
    settings = tiny_uda(src="mnistm", tgt="usps")
    rows = run.uda_methods(settings, uda.METHODS, toy_load, tmp_path, "cpu", seed=0)
    assert list(rows) == list(uda.METHODS)
    for method in uda.METHODS:
        for name in ("checkpoint.pt", "loss.png", "accuracy.png", "tsne_class.png",
                     "tsne_domain.png", "results.json", "predictions.csv"):
            assert (tmp_path / method / name).is_file(), (method, name)
        total = TOY_SIZES[("usps", "test")]
        assert rows[method]["total"] == total and 0 <= rows[method]["correct"] <= total
    assert (tmp_path / "gta" / "generated.png").is_file()  # G's drawings, GTA alone
    assert not (tmp_path / "dann" / "generated.png").exists()
    table = (tmp_path / "results.md").read_text()
    assert "| ADDA | " in table and f"({rows['adda']['correct']}/{total})" in table


def test_table_reports_a_scenario_with_missing_data_and_runs_the_rest(tmp_path):
    table = run.uda_table(tiny_uda(tsne_points=0), ("source",), toy_load, tmp_path, "cpu", 0)
    assert set(table) == {"mnistm-svhn", "mnistm-usps", "usps-mnistm", "svhn-usps"}
    assert "error" in table["svhn-usps"] and "rows" in table["usps-mnistm"]
    text = (tmp_path / "results.md").read_text()
    assert "svhn -> usps not run: SVHN not found" in text
    rows = [line for line in text.splitlines() if line.startswith("| Trained")]
    assert len(rows) == 1 and rows[0].startswith("| Trained on source | not run | 0.")


def test_predictions_csv_has_the_course_header_and_one_row_per_image(tmp_path, capsys):
    settings = tiny_uda(src="mnistm", tgt="usps", method="dann", tsne_points=0)
    run.uda_methods(settings, ["dann"], toy_load, tmp_path, "cpu", seed=0)
    lines = (tmp_path / "dann" / "predictions.csv").read_text().splitlines()
    assert lines[0] == "image_name,label" and len(lines) == 1 + TOY_SIZES[("usps", "test")]
    assert all(name.endswith(".png") and label.isdigit() and 0 <= int(label) <= 9
               for name, label in (line.split(",") for line in lines[1:]))
    folder = tmp_path / "unlabelled"
    images = toy_domain(5, seed=9, inverted=True)
    data.save_images(images.images(), folder, images.names[:5])
    csv_path = tmp_path / "pred.csv"
    assert run.main(["uda", "--predict", str(folder), "--ckpt",
                     str(tmp_path / "dann" / "checkpoint.pt"), "--csv", str(csv_path)]) == 0
    rows = csv_path.read_text().splitlines()
    assert rows[0] == "image_name,label" and [r.split(",")[0] for r in rows[1:]] == \
        images.names[:5]


def test_reports_label_a_grid_in_memory_and_write_it_once(tmp_path, monkeypatch):
    """The grid, its labels and title are one picture, written by one atomic write (no
    unlabelled grid on disk in between)."""
    writes, real_replace = [], os.replace
    monkeypatch.setattr(os, "replace", lambda source, target: writes.append(Path(target))
                        or real_replace(source, target))  # the atomic writes' renames
    images = torch.linspace(-1, 1, 4).view(4, 1, 1, 1).expand(4, 3, 8, 8)
    path = reports.save_grid(images, tmp_path / "g.png", nrow=2, rows=["a", "b"],
                             title="a title")
    assert writes == [path]
    saved = np.asarray(Image.open(path).convert("RGB"))
    grid = np.asarray(data.grid_image(images, nrow=2))
    assert saved.shape[0] > grid.shape[0] and saved.shape[1] > grid.shape[1]  # the labels
    height, width = grid.shape[:2]
    assert any((saved[-height:, left:left + width] == grid).all()  # the grid under the title,
               for left in range(saved.shape[1] - width + 1))  # right of the row labels


def test_every_curve_a_run_draws_has_a_y_axis_label(tmp_path, monkeypatch, cheap_fid):
    drawn = []
    real = plots.line_plot
    monkeypatch.setattr(plots, "line_plot", lambda series, path, **kw: drawn.append(
        (Path(path).name, kw.get("ylabel"))) or real(series, path, **kw))
    for variant in ("b", "wgan-gp"):
        gan.train(toy_faces(), toy_faces(6), tiny_gan(variant=variant, fid_images=4),
                  tmp_path / variant, "cpu", 0, weights=cheap_fid)
    vae.train(toy_faces(16, 64), toy_faces(8, 64), tiny_vae(epochs=1, tsne_points=0),
              tmp_path / "vae", "cpu", 0)
    settings = tiny_uda(src="mnistm", tgt="usps", method="dann", tsne_points=0)
    uda.train(uda.load_domains(settings, toy_load), settings, tmp_path / "uda", "cpu", 0)
    classifier.train(toy_digits(16), toy_digits(8, seed=1), classifier.ClassifierSettings(
        epochs=1, batch_size=8), tmp_path / "classifier", "cpu", 0)
    assert {name for name, _ in drawn} >= {"loss.png", "d_outputs.png", "fid.png", "kid.png",
                                           "mse.png", "kl.png", "accuracy.png"}
    assert all(ylabel for _, ylabel in drawn), drawn


def test_the_improved_gans_grid_says_how_many_steps_its_average_holds(tmp_path, monkeypatch):
    titles = []
    monkeypatch.setattr(reports, "save_grid", lambda images, path, **kw: titles.append(
        kw.get("title")))
    gan.train(toy_faces(), None, tiny_gan(variant="b", steps=20, sample_every=20), tmp_path,
              "cpu", 0)
    # after step 20 (t = 19): d = 20 / 29, an average of about 1 / (1 - d) = 3 steps
    assert titles == ["GAN variant b, step 20: fixed z (G's weights averaged over about "
                      "the last 3 steps)"]


def test_gan_pictures_keep_each_checkpoints_grid_and_animate_them_in_order(tmp_path):
    settings = tiny_gan(variant="b")
    frames = [torch.full((32, 3, 8, 8), value) for value in (-1.0, 0.0, 1.0)]
    history = {"step": [], "loss_d": [], "loss_g": [], "D(x)": [], "D(G(z))": []}
    for step, samples in zip((5, 10, 15), frames):
        for name in history:
            history[name].append(step if name == "step" else 0.5)
        reports.gan_pictures(tmp_path, settings, history, metrics.NoFID(""), samples, None,
                             None)
    grids = sorted(p.name for p in (tmp_path / "grids").iterdir())
    assert grids == ["step_000005.png", "step_000010.png", "step_000015.png"]
    animation = Image.open(tmp_path / "samples.gif")
    assert animation.n_frames == 3
    for index, samples in enumerate(frames):  # each frame: that checkpoint's grid
        animation.seek(index)
        grid = np.asarray(data.grid_image(samples).convert("RGB"), dtype=int)
        drawn = np.asarray(animation.convert("RGB"), dtype=int)[-grid.shape[0]:,
                                                                -grid.shape[1]:]
        assert np.abs(drawn - grid).max() <= 8, index  # GIF's palette, nearly exact


def test_the_data_preview_has_a_title(tmp_path, capsys):
    faces = image_folder(tmp_path / "faces", count=5, size=16)
    assert run.main(["data", "--name", str(faces), "--splits", "train", "--cache", "",
                     "--out", str(tmp_path / "out")]) == 0
    preview, = (tmp_path / "out" / "data").glob("faces-*-train-preview.png")
    ink = np.asarray(Image.open(preview).convert("L")) < 128
    grid = data.grid_image(torch.zeros(5, 3, 16, 16))
    assert ink.shape[0] == grid.height + 20 and ink[:18].any()  # a title line above


def stub_digit_classifier(monkeypatch, path: Path) -> nn.Module:
    """A saved 'run.py classifier' checkpoint of a one-Linear digit classifier (built in
    place of nets.digit_classifier); the network, in eval mode."""
    def tiny_classifier(classes=10, **kwargs):
        torch.manual_seed(5)
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 28 * 28, classes))
    monkeypatch.setattr(nets, "digit_classifier", tiny_classifier)
    network = tiny_classifier()
    util.save_checkpoint({"command": "classifier", "settings": {}, "network":
                          network.state_dict(), "classes": [str(d) for d in range(10)]}, path)
    return network.eval()


def test_final_numbers_are_each_curves_last_point_and_gan_results_its_step_and_seconds(
        tmp_path):
    history = {"step": [5, 10, 13], "loss_d": [1.0, 0.5, 0.25], "loss_g": [2.0, 1.5, 1.0],
               "D(x)": [0.6, 0.7, 0.8], "D(G(z))": [0.3, 0.4, 0.45]}
    run_ = fake_run(tmp_path, history=history, seconds=26.0, settings=tiny_gan(variant="a"))
    results = reports.gan_results(tmp_path, run_.settings, run_, metrics.NoFID("not asked for"))
    assert results == json.loads((tmp_path / "results.json").read_text())
    assert {k: v for k, v in results.items() if k.startswith("final_")} == {
        "final_loss_d": 0.25, "final_loss_g": 1.0, "final_D(x)": 0.8, "final_D(G(z))": 0.45}
    assert results["steps"] == 13 and results["train_seconds"] == 26.0
    assert results["seconds_per_step"] == 2.0 and results["seed"] == 3


def test_vae_results_are_the_last_epochs_test_figures_and_the_ten_faces_mse_per_value(
        tmp_path):
    history = {"step": [3, 6, 9], "train_mse": [0.5, 0.4, 0.3], "train_kl": [9.0, 8.0, 7.0],
               "test_mse": [0.45, 0.35, 0.31], "test_kl": [8.5, 7.5, 6.5]}
    generator = torch.Generator().manual_seed(0)
    faces = torch.rand(10, 3, 8, 8, generator=generator) * 2 - 1
    rebuilt = faces.clone()
    rebuilt[3, 1, 2, 5] += 0.5   # one pixel of one face off by 0.5, another by 0.25
    rebuilt[7, 0, 0, 0] -= 0.25
    results = reports.vae_results(tmp_path, tiny_vae(), fake_run(
        tmp_path, history=history, seconds=27.0, command="vae", settings=tiny_vae()),
                                  {"fid": None}, faces, rebuilt, faces[:10], None)
    assert results == json.loads((tmp_path / "results.json").read_text())
    assert results["reconstruction_mse_10_faces"] == pytest.approx(
        (0.5 ** 2 + 0.25 ** 2) / (10 * 3 * 8 * 8))  # a mean over every pixel of every face
    assert (results["test_mse"], results["test_kl"], results["epochs"]) == (0.31, 6.5, 3)
    assert results["train_seconds"] == 27.0 and results["seconds_per_epoch"] == 9.0


def test_ddpm_results_grade_each_digit_against_its_own_label(tmp_path, monkeypatch):
    network = stub_digit_classifier(monkeypatch, tmp_path / "classifier.pt")
    digits = toy_domain(23, seed=4)
    images = digits.images()
    with torch.no_grad():  # the pixels as the saved PNGs hold them: whole bytes
        read = network((images * 127.5 + 127.5).round().clamp(0, 255) / 127.5 - 1).argmax(1)
    labels = read.clone()
    labels[::3] = (labels[::3] + 1) % 10  # every third image graded wrong
    settings = ddpm.DDPMSettings(classifier=str(tmp_path / "classifier.pt"))
    history = {"step": [4, 8, 11], "loss": [0.9, 0.5, 0.4]}
    grades = classifier.grade(images, labels, settings.classifier, "cpu")
    run_ = fake_run(tmp_path, history=history, seconds=12.0, command="ddpm", settings=settings)
    results = reports.ddpm_results(tmp_path, settings, run_, metrics.NoFID("no"),
                                   images, grades, 2.5, 7)
    assert results == json.loads((tmp_path / "results.json").read_text())
    assert (results["digit_correct"], results["digit_total"]) == (23 - 8, 23)
    assert results["digit_accuracy"] == 15 / 23
    assert (results["steps"], results["final_loss"], results["train_seconds"]) == (11, 0.4, 12.0)
    assert results["seconds_for_1000_images"] == 2.5 and results["sampling_steps"] == 7


def test_course_digits_seconds_are_the_sampling_time_and_the_images_keep_their_order(
        tmp_path, monkeypatch):
    """seconds_for_1000_images: the time spent in the sampler (2 s a batch here), not the
    saving of the PNGs (100 s here); the images come back and are named in batch order."""
    now = [0.0]
    monkeypatch.setattr(reports.time, "perf_counter", lambda: now[0])
    real_save = data.save_images
    monkeypatch.setattr(data, "save_images", lambda *args: (now.__setitem__(0, now[0] + 100)
                                                            or real_save(*args)))

    def sample_batch(batch, on_step):
        now[0] += 2.0
        labels, _ = batch
        return labels.view(-1, 1, 1, 1).expand(-1, 3, 4, 4).float() / 10 - 0.5
    names, labels = reports.course_names(per_digit=3)
    images, seconds = reports.save_course_digits(sample_batch, ddpm.label_batches(labels, 0, 7),
                                                 1, tmp_path, names)
    assert seconds == 2.0 * 5 and images[:, 0, 0, 0].tolist() == (labels / 10 - 0.5).tolist()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)


def test_embed_gives_every_images_features_in_order_in_eval_mode():
    """The t-SNE's inputs: 13 images in batches of 5, by an encoder left in train mode
    (batch norm with running statistics unlike the images): each image's eval-mode
    features, in order."""
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(3 * 28 * 28, 4), nn.BatchNorm1d(4))
    encoder(torch.randn(16, 3, 28, 28) + 2)  # running statistics far from the images
    digits = toy_domain(13, seed=6)
    features = reports.embed(encoder.train(), digits, batch_size=5)
    with torch.no_grad():
        expected = encoder.eval()(digits.images())
    assert np.allclose(features, expected.numpy(), atol=1e-5)


def test_uda_results_and_tables_are_the_target_predictions_accuracy_and_the_curves_end(
        tmp_path):
    test = toy_domain(23, seed=4, inverted=True)
    predictions = test.labels.clone()
    predictions[:6] = (predictions[:6] + 3) % 10  # six of 23 wrong
    domains = uda.Domains(toy_domain(45), toy_domain(38, seed=1, inverted=True),
                          toy_domain(29, seed=2), test)
    history = {"step": [5, 10, 15], "class": [2.0, 1.0, 0.5],
               "target_accuracy": [0.1, 0.2, 0.3], "source_accuracy": [0.5, 0.6, 0.7]}
    settings = tiny_uda(src="mnistm", tgt="usps", method="dann", tsne_points=0)
    run_ = fake_run(tmp_path, history=history, seconds=12.0, command="uda", settings=settings)
    results = reports.uda_results(tmp_path, settings, run_, domains, predictions,
                                  classifier.accuracy(predictions, test.labels), None, None,
                                  None)
    assert results == json.loads((tmp_path / "results.json").read_text())
    assert (results["target_accuracy"], results["correct"], results["total"]) == \
        (17 / 23, 17, 23)
    assert results["source_test_accuracy"] == 0.7 and results["epochs"] == 3
    assert results["train_seconds"] == 12.0
    rows = (tmp_path / "predictions.csv").read_text().splitlines()
    assert rows == ["image_name,label"] + [f"{name},{int(label)}" for name, label
                                           in zip(test.names, predictions)]
    other = {**results, "target_accuracy": 0.5, "correct": 10, "total": 20}
    assert reports.scenario_table({"dann": results, "source": other}, "mnistm", "usps") == (
        "| mnistm -> usps | accuracy on usps test |\n|---|---|\n"
        "| DANN | 0.7391 (17/23) |\n| Trained on source | 0.5000 (10/20) |\n")
    table = reports.full_table({"mnistm-usps": {"rows": {"dann": results}},
                                "usps-mnistm": {"rows": {"dann": other, "source": other}},
                                "svhn-usps": {"error": "SVHN not found"}})
    assert table.splitlines()[2:4] == [
        "| Trained on source | not run | 0.5000 (10/20) | not run |",
        "| DANN | 0.7391 (17/23) | 0.5000 (10/20) | not run |"]


# ============================================================================ gan
# Pins losses, DiffAugment, each variant's step and the numbers it logs with stub
# players, the loop's wiring.


SIDE, LATENT = 8, 4  # the stub networks' image side and z size


def stub_players(model: "gan.GAN", side: int = SIDE) -> "gan.GAN":
    """Make G and D one Linear layer each (no batch norm: a reference can score images in
    any grouping), wrapped to record what they are given."""
    outputs = 2 if model.attribute_channels else 1
    torch.manual_seed(0)
    model.generator = Recorder(nn.Sequential(
        nn.Flatten(), nn.Linear(LATENT + model.attribute_channels, 3 * side * side), nn.Tanh(),
        nn.Unflatten(1, (3, side, side))))                                # (B, 3, S, S)
    model.discriminator = Recorder(nn.Sequential(
        nn.Flatten(), nn.Linear(3 * side * side, outputs), nn.Unflatten(1, (outputs, 1, 1))))
    with torch.no_grad():  # scores on both sides of +-1, where the hinge bends
        model.discriminator.inner[1].weight.mul_(6)
    return model


def stub_gan(variant: str) -> tuple["gan.GAN", "gan.GANSettings"]:
    settings = tiny_gan(variant=variant, latent_dim=LATENT)
    return stub_players(gan.GAN(settings)), settings


def stub_augment(images, policy, generator):
    """A deterministic, differentiable stand-in for DiffAugment: mirror and dim."""
    return images.flip(3) * 0.5 + 0.25


def real_batch(count=6):
    generator = torch.Generator().manual_seed(7)
    return torch.rand(count, 3, SIDE, SIDE, generator=generator) * 2 - 1


def linear_critic_gan(settings):
    """gan.GAN with its critic replaced by D(x) = <w, x>, whose every number is known."""
    model = gan.GAN(settings)
    model.discriminator = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 1, bias=False))
    with torch.no_grad():
        model.discriminator[1].weight.normal_(0, 0.05)  # ||w|| about 2.8
    return model


def hacks_step(monkeypatch=None, noise_std=0.0, seed=0, **changes):
    """One gan.train_step of variant hacks on 8 toy faces, D wrapped in a Recorder; with
    monkeypatch, also the targets D's loss was given. -> (D, real images, numbers, targets)"""
    settings = tiny_gan(variant="hacks", batch_size=8, **changes)
    torch.manual_seed(seed)
    model = gan.GAN(settings).train()
    model.discriminator = Recorder(model.discriminator)
    given = []
    if monkeypatch is not None:
        loss = gan.discriminator_loss

        def recorded(real_logits, fake_logits, hinge, targets=None):
            given.append(targets)
            return loss(real_logits, fake_logits, hinge, targets=targets)
        monkeypatch.setattr(gan, "discriminator_loss", recorded)
    real = toy_faces().images(slice(0, 8))
    numbers = gan.train_step(model, gan.build_optimizers(model, settings), real, None,
                             settings, parallel.Random(seed), parallel.Random(seed),
                             noise_std=noise_std)
    return model.discriminator, real, numbers, given


@pytest.mark.parametrize("variant", ["a", "b"])
def test_gan_fid_curve_is_of_the_fixed_samples_of_each_checkpoint_against_all_held_out(
        tmp_path, cheap_fid, variant):
    """At each checkpoint: FID of fid_images samples (z of the fixed stream "fid", the EMA generator
    for b) against every held-out face; final = last point, best.pt = the lowest.
    Catches: FID against the training faces or only fid_images of the held-out ones,
    other z at each checkpoint, the FID of weights other than those saved, best.pt
    written at the highest FID or at every checkpoint."""
    held_out = data.ImageSet(toy_faces(10).pixels.flip(0))  # not the training faces
    results = gan.train(toy_faces(), held_out, tiny_gan(variant=variant, steps=3,
                                                        fid_images=6),
                        tmp_path, "cpu", 0, weights=cheap_fid)
    curve = results["fid_curve"]
    assert curve["step"] == [1, 2, 3] and curve["images"] == 6
    assert results["fid"] == curve["fid"][-1] and results["best_fid"] == min(curve["fid"])
    assert results["fid_real_images"] == 10 and results["fid_weights"].startswith("stand-in")
    for name, step in (("checkpoint.pt", 3), ("best.pt", results["best_fid_step"])):
        model, settings = gan.load(tmp_path / name, "cpu")
        assert util.load_checkpoint(tmp_path / name)["step"] == step
        fake = torch.cat([model.sample(*batch) for batch in gan.noise_batches(settings, 6, 0, "fid")])
        assert own_fid(fake, held_out.images()) == pytest.approx(curve["fid"][step - 1],
                                                                 rel=1e-6)
        assert own_kid(fake, held_out.images()) == pytest.approx(  # KID of the same images
            (curve["kid"][step - 1], curve["kid_std"][step - 1]), rel=1e-6)
    assert (results["kid"], results["kid_std"]) == (curve["kid"][-1], curve["kid_std"][-1])
    assert (tmp_path / "fid.png").is_file()
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["best_fid_step"] == curve["step"][int(np.argmin(curve["fid"]))]


def own_mean_score(discriminator, images: torch.Tensor, batch: int) -> float:
    """sigmoid(D) of images in batches of `batch`, D a copy in training mode, dropout 0;
    ACGAN's D: its first output (real or fake), not its attribute's."""
    discriminator = copy.deepcopy(discriminator).train()
    for layer in discriminator.modules():
        if isinstance(layer, torch.nn.Dropout):
            layer.p = 0.0
    with torch.no_grad():
        return torch.cat([torch.sigmoid(discriminator(images[i:i + batch]).flatten(1)[:, 0])
                          for i in range(0, len(images), batch)]).mean().item()


@pytest.mark.parametrize("variant, d_norm", [("hacks", "batch"), ("b", "spectral")])
def test_memorisation_scores_fixed_training_and_held_out_faces_as_d_sees_batches(variant,
                                                                                  d_norm):
    """gan.memorisation: D's mean sigmoid over the first `count` training faces and as many
    held-out ones (fewer here: all 9), in batches of batch_size with batch norm's batch
    statistics, dropout off and no draw from the dropout stream, D left as it was.
    Catches the two sides swapped, scores after running statistics (eval mode) or of one
    batch of all, dropout masks left on (they would shift the run's default stream), raw
    scores instead of sigmoids, count not cut to the held-out faces, and a scoring that
    moves D's running statistics or spectral norm's vectors (training would then depend
    on when FID runs)."""
    settings = tiny_gan(variant=variant, d_norm=d_norm, batch_size=4)
    training.seed_weights(0)
    model = gan.GAN(settings)
    faces, held_out = toy_faces(12), data.ImageSet(toy_faces(12).pixels.flip(0)[:9])
    state, saved = torch.get_rng_state(), copy.deepcopy(model.discriminator.state_dict())
    scores = gan.memorisation(model, faces, held_out, settings, count=10)
    assert torch.equal(torch.get_rng_state(), state)  # dropout drew nothing
    assert all(torch.equal(value, saved[name])
               for name, value in model.discriminator.state_dict().items())
    d = model.discriminator
    expected = {"D(training x)": own_mean_score(d, faces.images()[:9], 4),
                "D(held-out x)": own_mean_score(d, held_out.images()[:9], 4)}
    assert scores == pytest.approx(expected, rel=1e-6)
    assert abs(expected["D(training x)"] - expected["D(held-out x)"]) > 1e-5  # >> rel 1e-6
    assert abs(own_mean_score(d, faces.images()[:10], 4) - expected["D(training x)"]) > 1e-5
    if d_norm == "batch":  # what batch norm makes of the batches
        assert abs(own_mean_score(d, faces.images()[:9], 9) - expected["D(training x)"]) > 1e-4
        with torch.no_grad():
            evaluated = torch.sigmoid(copy.deepcopy(d).eval()(faces.images()[:9])).mean()
        assert abs(evaluated.item() - expected["D(training x)"]) > 1e-4
    assert all(layer.training for layer in d.modules())  # dropout on for training


@pytest.mark.parametrize("variant", ["b", "acgan", "wgan-gp"])
def test_a_gan_run_records_ds_memorisation_scores_at_the_fid_steps(tmp_path, cheap_fid,
                                                                    monkeypatch, variant):
    """At each FID step the run records gan.memorisation of the weights it then saves, in
    the history, in results.json and on d_outputs.png; a WGAN-GP critic's scores are no
    probabilities, so it records none."""
    drawn, line_plot = {}, plots.line_plot

    def recorded(series, path, **options):
        drawn[Path(path).name] = (series, options["x"])
        return line_plot(series, path, **options)
    monkeypatch.setattr(plots, "line_plot", recorded)
    held_out = data.ImageSet(toy_faces(10).pixels.flip(0))
    settings = tiny_gan(variant=variant, steps=4, fid_every=2, fid_images=4, n_critic=1)
    faces = toy_faces()
    results = gan.train(faces, held_out, settings, tmp_path, "cpu", 0, weights=cheap_fid)
    if variant == "wgan-gp":
        assert "memorisation" not in results
        return
    curve = results["memorisation"]
    assert curve["step"] == [2, 4] == results["fid_curve"]["step"]
    model, _ = gan.load(tmp_path / "checkpoint.pt", "cpu")  # 10 faces a side, 4 a batch
    assert (curve["training_faces"][-1], curve["held_out_faces"][-1]) == pytest.approx(
        (own_mean_score(model.discriminator, faces.images()[:10], 4),
         own_mean_score(model.discriminator, held_out.images(), 4)), rel=1e-6)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["memorisation"] == curve
    series, x = drawn["d_outputs.png"]
    assert series["D(x), held-out faces"] == curve["held_out_faces"]
    assert series["D(x), fixed training faces"] == curve["training_faces"]
    assert x["D(x), held-out faces"] == [2, 4] and len(series["D(x)"]) == 4


@pytest.mark.parametrize("variant", ["a", "hacks"])
def test_logged_d_outputs_are_the_d_steps_scores_of_real_and_fake_before_its_update(variant):
    """D(x) and D(G(z)) on the loss curves: sigmoid of the scores D gave in its own step,
    before it moved, to the real batch and to this step's fakes (not the updated D's
    scores that G's step sees, nor raw scores)."""
    model, settings = stub_gan(variant)
    d_before = copy.deepcopy(model.discriminator.inner)
    real = real_batch()
    numbers = gan.train_step(model, gan.build_optimizers(model, settings), real, None,
                             settings, parallel.Random(0), parallel.Random(0), noise_std=0.0)
    fake = model.generator.outputs[0]
    with torch.no_grad():
        assert numbers["D(x)"].item() == pytest.approx(
            torch.sigmoid(d_before(real).flatten()).mean().item(), rel=1e-6)
        assert numbers["D(G(z))"].item() == pytest.approx(
            torch.sigmoid(d_before(fake).flatten()).mean().item(), rel=1e-6)
        moved = torch.sigmoid(model.discriminator.inner(fake).flatten()).mean().item()
    assert abs(moved - numbers["D(G(z))"].item()) > 1e-4  # the update changed D's score


def test_logged_wgan_gp_numbers_are_the_last_critic_steps_estimate_and_loss_with_penalty():
    """With a linear critic D(x) = <w, x> + b, grad_x D = w at every x~, so the penalty is
    (||w|| - 1)^2 whatever the interpolation draws; W = mean D(x) - mean D(G(z)) of the
    critic as it was in the last of the n_critic steps, on that step's real batch and
    fakes; the logged D loss is -W + lambda * penalty. Catches the first critic step's
    numbers logged, or the critic's after its update."""
    model, settings = stub_gan("wgan-gp")
    settings = dataclasses.replace(settings, n_critic=2, gp_weight=7.0)
    optimizers = gan.build_optimizers(model, settings)
    critics, critic_step = [], optimizers["discriminator"].step

    def step_after_a_snapshot(*args, **kwargs):  # the critic each step's forward saw
        critics.append(copy.deepcopy(model.discriminator.inner))
        return critic_step(*args, **kwargs)
    optimizers["discriminator"].step = step_after_a_snapshot
    batches = iter([real_batch(), real_batch().flip(0) * 0.5])
    real = None

    def next_batch():
        nonlocal real
        real = next(batches)
        return real
    numbers = gan.wgan_gp_step(model, optimizers, next_batch, settings, parallel.Random(0))
    critic, fake = critics[-1], model.generator.outputs[1]  # the second critic step's
    with torch.no_grad():
        wasserstein = (critic(real).mean() - critic(fake).mean()).item()
    penalty = (critic[1].weight.norm().item() - 1) ** 2
    assert abs((critics[0][1].weight.norm().item() - 1) ** 2 - penalty) > 1e-6
    assert numbers["wasserstein"].item() == pytest.approx(wasserstein, rel=1e-5)
    assert numbers["penalty"].item() == pytest.approx(penalty, rel=1e-4)
    assert numbers["loss_d"].item() == pytest.approx(-wasserstein + 7.0 * penalty, rel=1e-4)


@pytest.mark.parametrize("variant", ["a", "b"])
def test_gan_samples_come_from_the_weight_average_in_eval_mode(variant):
    """FID's samples, the grids and --generate: the averaged G where the variant keeps one
    (b), else G, in eval mode (running batch-norm statistics), whatever mode it was in."""
    settings = tiny_gan(variant=variant)
    model = gan.GAN(settings)
    with torch.no_grad():  # the last weights and the average apart
        for parameter in model.generator.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    model.train()
    z = torch.randn(5, settings.latent_dim, generator=torch.Generator().manual_seed(1))
    used = copy.deepcopy(model.ema if variant == "b" else model.generator).eval()
    other = copy.deepcopy(model.generator).eval()
    with torch.no_grad():
        expected = used(z[:, :, None, None])
        assert torch.allclose(model.sample(z), expected, atol=1e-6)
        assert (variant == "a") == torch.allclose(other(z[:, :, None, None]), expected)


def test_gan_losses_match_their_formulas():
    real, fake = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    bce = -torch.sigmoid(real).log().mean() - (1 - torch.sigmoid(fake)).log().mean()
    assert torch.isclose(gan.discriminator_loss(real, fake, hinge=False), bce)
    assert torch.isclose(gan.generator_loss(fake, hinge=False),
                         -torch.sigmoid(fake).log().mean())
    hinge = gan.discriminator_loss(torch.tensor([2.0, 0.5]), torch.tensor([-3.0, 0.0]), True)
    assert torch.isclose(hinge, torch.tensor((0 + 0.5) / 2 + (0 + 1) / 2))
    assert gan.generator_loss(torch.tensor([1.0, 3.0]), hinge=True) == -2.0


def test_translation_shifts_whole_pixels_and_fills_mid_gray():
    images = torch.randn(3, 2, 16, 16)
    shifted = gan._translation(images, parallel.Random(4))
    shifts = torch.randint(-2, 3, (3, 2), generator=torch.Generator().manual_seed(4))
    for image, moved, (dy, dx) in zip(images, shifted, shifts.tolist()):
        expected = torch.zeros_like(image)
        expected[:, max(dy, 0):16 + min(dy, 0), max(dx, 0):16 + min(dx, 0)] = \
            image[:, max(-dy, 0):16 + min(-dy, 0), max(-dx, 0):16 + min(-dx, 0)]
        assert torch.equal(moved, expected)


@pytest.mark.parametrize("side", [16, 15])
def test_cutout_zeroes_dataugments_square_and_augmentations_pass_gradients(side):
    """DiffAugment's rand_cutout written out with loops: a square of int(side / 2 + 0.5)
    pixels, its offsets drawn from 0 to side - (its size odd), starting size // 2 before
    them, clipped at the border."""
    count = 64
    images = torch.ones(count, 3, side, side, requires_grad=True)
    cut = gan._cutout(images, parallel.Random(2))
    size = int(side * 0.5 + 0.5)
    offsets = torch.randint(0, side + (1 - size % 2), (count, 2),
                            generator=torch.Generator().manual_seed(2))
    zeroed_areas = set()
    for image, (oy, ox) in zip(cut, offsets.tolist()):
        mask = torch.ones(side, side)
        for i in range(size):
            for j in range(size):
                y, x = oy + i - size // 2, ox + j - size // 2
                mask[min(max(y, 0), side - 1), min(max(x, 0), side - 1)] = 0
        assert torch.equal(image, mask.expand(3, -1, -1)), (oy, ox)
        zeroed_areas.add(int((mask == 0).sum()))
    assert size * size in zeroed_areas and min(zeroed_areas) < size * size  # inside, over
    augmented = gan.diff_augment(images, "translation,color,cutout", parallel.Random(0))
    augmented.sum().backward()
    assert images.grad.abs().sum() > 0


@pytest.mark.parametrize("variant", ["b", "acgan"])
def test_ema_generator_gets_batch_norm_statistics_that_fit_its_weights(variant):
    torch.manual_seed(0)
    model = gan.GAN(gan.GANSettings(variant=variant, image_size=32))
    with torch.no_grad():  # an average far from the weights whose statistics it holds
        for p in model.ema.parameters():
            p.mul_(1.5).add_(0.2)
    z = model.generator_input(torch.randn(256, 100),
                              torch.arange(256) % 2 if variant == "acgan" else None)
    batch_statistics = model.ema.train()(z)  # what statistics that fit would give

    def gap():
        return (model.ema.eval()(z) - batch_statistics).abs().mean().item()
    before = gap()
    model.refresh_ema_statistics(gan.GANSettings(variant=variant, image_size=32), seed=0)
    assert gap() < before / 5  # what is left: 1,024 z against 256 estimate the statistics


@pytest.mark.parametrize("variant", ["a", "b", "acgan"])
def test_a_tiny_gan_run_writes_grid_curves_checkpoint_and_results(tmp_path, variant):
    results = gan.train(toy_faces(), None, tiny_gan(variant=variant), tmp_path, "cpu", 0)
    assert results["steps"] == 2
    names = ["samples.png", "loss.png", "d_outputs.png", "checkpoint.pt", "results.json"]
    for name in names + (["pairs.png"] if variant == "acgan" else []):
        assert (tmp_path / name).is_file(), name
    grid = Image.open(tmp_path / "samples.png")  # 32 samples, 8 per row, padding 2
    assert grid.size[1] == 20 + 4 * 34 + 2 and grid.size[0] >= 8 * 34 + 2  # under a title


@pytest.mark.parametrize("variant", ["b", "hacks"])  # hacks: D's dropout masks too
def test_resumed_gan_run_equals_an_uninterrupted_one(tmp_path, monkeypatch, variant):
    settings = tiny_gan(variant=variant, steps=3)
    gan.train(toy_faces(), None, settings, tmp_path / "whole", "cpu", 1)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    with monkeypatch.context() as patch:
        patch.setattr(reports, "gan_pictures", interrupt)  # right after the step-1 checkpoint
        with pytest.raises(KeyboardInterrupt):
            gan.train(toy_faces(), None, settings, tmp_path / "parts", "cpu", 1)
    gan.train(toy_faces(), None, dataclasses.replace(settings, resume=True),
              tmp_path / "parts", "cpu", 1)
    whole = util.load_checkpoint(tmp_path / "whole" / "checkpoint.pt")
    parts = util.load_checkpoint(tmp_path / "parts" / "checkpoint.pt")
    assert whole["step"] == parts["step"] == 3
    for name, tensor in whole["gan"].items():
        assert torch.equal(tensor, parts["gan"][name]), name


def test_gan_measures_the_fid_every_fid_every_steps_and_checkpoints_in_between(
        tmp_path, monkeypatch, cheap_fid):
    saved = []
    save = training.Run.save_checkpoint

    def recorded(run):
        saved.append(run.step + 1)
        save(run)
    monkeypatch.setattr(training.Run, "save_checkpoint", recorded)
    results = gan.train(toy_faces(), toy_faces(12), tiny_gan(
        variant="b", steps=6, sample_every=2, fid_every=4, fid_images=10), tmp_path, "cpu",
        0, weights=cheap_fid)
    assert saved == [2, 4, 6] and results["fid_curve"]["step"] == [4, 6]  # and the last
    with pytest.raises(util.UserError, match="--fid-every 3 is no multiple of "
                                             "--sample-every 2"):
        gan.train(toy_faces(), None, tiny_gan(steps=2, sample_every=2, fid_every=3),
                  tmp_path / "other", "cpu", 0)


def test_generate_writes_exactly_n_images_of_the_right_size(tmp_path, capsys):
    gan.train(toy_faces(), None, tiny_gan(variant="b", steps=1), tmp_path / "run", "cpu", 0)
    folder = tmp_path / "faces"
    assert run.main(["gan", "--generate", "7", "--ckpt", str(tmp_path / "run" / "checkpoint.pt"),
                     "--out", str(folder)]) == 0
    files = sorted(folder.iterdir())
    assert len(files) == 7 and files[0].name == "0000.png"
    assert all(Image.open(f).size == (32, 32) for f in files)
    first = np.asarray(Image.open(files[0]))
    assert run.main(["gan", "--generate", "7", "--ckpt", str(tmp_path / "run" / "checkpoint.pt"),
                     "--out", str(folder)]) == 0
    assert np.array_equal(first, np.asarray(Image.open(files[0])))  # a fixed seed


def test_nan_loss_stops_the_gan_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    calls = {"count": 0}
    real_loss = gan.discriminator_loss

    def diverging(real, fake, hinge, targets=None):
        calls["count"] += 1
        loss = real_loss(real, fake, hinge, targets)
        return loss * float("nan") if calls["count"] >= 3 else loss
    monkeypatch.setattr(gan, "discriminator_loss", diverging)
    with pytest.raises(util.UserError, match="diverged"):
        gan.train(toy_faces(), None, tiny_gan(variant="a", steps=5), tmp_path, "cpu", 0)
    assert util.load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 2


@pytest.mark.parametrize("variant", ["a", "b", "acgan"])
def test_gan_step_descends_d_loss_on_real_and_detached_fake_then_g_loss_against_updated_d(
        monkeypatch, variant):
    """Against a reference written from the papers: D descends (hinge for b and ACGAN,
    BCE for a) real up and fake down, plus ACGAN's attribute loss of real and fake; G then
    descends its loss (plus ACGAN's attribute loss of the fake) scored by the updated D;
    b and ACGAN augment every image D sees. Catches: hinge switched, augmentation skipped
    anywhere (or added to a), an attribute term dropped or given the wrong attributes, the
    D step moving G (fake not detached) or the G step moving D, the G step scored by the
    old D."""
    monkeypatch.setattr(gan, "diff_augment", stub_augment)
    model, settings = stub_gan(variant)
    G, D = model.generator, model.discriminator
    G0, D0 = copy.deepcopy(G.inner), copy.deepcopy(D.inner)
    lr_g, lr_d = 0.05, 0.2
    optimizers = {"generator": recording_sgd(G.parameters(), lr_g),
                  "discriminator": recording_sgd(D.parameters(), lr_d)}
    real = real_batch()
    real_attributes = torch.tensor([1, 1, 1, 0, 0, 0]) if variant == "acgan" else None
    numbers = gan.train_step(model, optimizers, real, real_attributes, settings,
                             parallel.Random(3), parallel.Random(3))

    improved, acgan = variant != "a", variant == "acgan"
    augment = (lambda x: stub_augment(x, "", None)) if improved else (lambda x: x)
    generator_input = G.inputs[0]                                          # (B, L [+ 2], 1, 1)
    fake_attributes = generator_input.flatten(1)[:, LATENT:].argmax(1) if acgan else None
    if acgan:
        assert not torch.equal(fake_attributes, real_attributes)  # the test can tell them apart

    def d_loss(real_out, fake_out):
        r, f = real_out.flatten(1), fake_out.flatten(1)
        loss = (F.relu(1 - r[:, 0]).mean() + F.relu(1 + f[:, 0]).mean() if improved else
                -F.logsigmoid(r[:, 0]).mean() - F.logsigmoid(-f[:, 0]).mean())
        if acgan:
            loss = loss + F.binary_cross_entropy_with_logits(r[:, 1], real_attributes.float()) \
                + F.binary_cross_entropy_with_logits(f[:, 1], fake_attributes.float())
        return loss

    def g_loss(fake_out):
        f = fake_out.flatten(1)
        loss = -f[:, 0].mean() if improved else -F.logsigmoid(f[:, 0]).mean()
        if acgan:
            loss = loss + F.binary_cross_entropy_with_logits(f[:, 1], fake_attributes.float())
        return loss

    fake = G0(generator_input)
    assert torch.allclose(fake, G.outputs[0])
    d_reference = d_loss(D0(augment(real)), D0(augment(fake.detach())))
    d_gradient = gradients(d_reference, D0.parameters())
    D1 = copy.deepcopy(D0)
    with torch.no_grad():
        for p, g in zip(D1.parameters(), d_gradient):
            p.sub_(lr_d * g)
    g_reference = g_loss(D1(augment(fake)))
    g_gradient = gradients(g_reference, G0.parameters())

    assert len(optimizers["discriminator"].seen) == len(optimizers["generator"].seen) == 1
    assert_all_close(optimizers["discriminator"].seen[0], d_gradient, what="D's gradient")
    assert_all_close(optimizers["generator"].seen[0], g_gradient, what="G's gradient")
    assert_all_close(list(D.parameters()), list(D1.parameters()), what="D after the step")
    assert_all_close(list(G.parameters()),
                     [p - lr_g * g for p, g in zip(G0.parameters(), g_gradient)],
                     what="G after the step")
    assert math.isclose(float(numbers["loss_d"].detach()), d_reference.item(), rel_tol=1e-5)
    assert math.isclose(float(numbers["loss_g"].detach()), g_reference.item(), rel_tol=1e-5)


@pytest.mark.parametrize("variant, policy", [
    ("a", "translation,color,cutout"), ("b", "translation,color,cutout"),
    ("acgan", "translation,color,cutout"), ("b", "")])
def test_improved_gans_augment_every_image_d_sees_and_dcgan_none(variant, policy):
    """With the real DiffAugment and a policy: in b and ACGAN none of the 3B images D
    scores (real and fake in its step, fake in G's) is a raw real or generated image; in
    a every one is, and in b with the default policy '' too."""
    model, settings = stub_gan(variant)
    settings = dataclasses.replace(settings, augment=policy)
    optimizers = {"generator": recording_sgd(model.generator.parameters(), 0.0),
                  "discriminator": recording_sgd(model.discriminator.parameters(), 0.0)}
    real = real_batch()
    attributes = torch.tensor([1, 0, 1, 0, 1, 0]) if variant == "acgan" else None
    gan.train_step(model, optimizers, real, attributes, settings, parallel.Random(1),
                   parallel.Random(1))
    fake = torch.cat(model.generator.outputs)
    seen = torch.cat(model.discriminator.inputs)                          # (3B, 3, S, S)
    assert len(seen) == 3 * len(real)

    def count_raw(images, among):
        return sum(any(torch.equal(image, other) for other in among) for image in images)
    if variant == "a" or not policy:
        assert count_raw(seen, torch.cat([real, fake])) == 3 * len(real)
        assert count_raw(real, seen) == len(real) and count_raw(fake, seen) == len(fake)
    else:
        assert count_raw(seen, torch.cat([real, fake])) == 0


def test_color_augmentation_is_diffaugments_brightness_saturation_and_contrast():
    """Zhao et al.'s rand_brightness x + (r - 0.5), rand_saturation (x - gray) 2r + gray,
    rand_contrast (x - mean) (r + 0.5) + mean, each r uniform per image, in that order."""
    images = torch.rand(3, 3, 5, 5) * 2 - 1
    draws = torch.Generator().manual_seed(6)
    brightness, saturation, contrast = (torch.rand(3, 1, 1, 1, generator=draws)
                                        for _ in range(3))
    x = images + (brightness - 0.5)
    gray = x.mean(dim=1, keepdim=True)
    x = (x - gray) * (saturation * 2) + gray
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * (contrast + 0.5) + mean
    assert torch.allclose(gan.diff_augment(images, "color", parallel.Random(6)),
                          x, atol=1e-6)


@pytest.mark.parametrize("variant", ["a", "b", "acgan"])
def test_gan_optimisers_are_dcgans_adam_or_twice_its_rate_each_over_its_own_player(variant):
    """a: Adam 2e-4 for both; b and ACGAN: 4e-4 for both; betas (0.5, 0.999)."""
    settings = tiny_gan(variant=variant)
    model = gan.GAN(settings)
    optimizers = gan.build_optimizers(model, settings)
    lr_g, lr_d = (2e-4, 2e-4) if variant == "a" else (4e-4, 4e-4)
    for name, network, lr in (("generator", model.generator, lr_g),
                              ("discriminator", model.discriminator, lr_d)):
        optimizer = optimizers[name]
        assert isinstance(optimizer, torch.optim.Adam), name
        assert held(optimizer) == ids(network), name
        for group in optimizer.param_groups:
            assert group["lr"] == lr and tuple(group["betas"]) == (0.5, 0.999), name


def test_gan_training_steps_on_dataset_faces_with_their_attributes_and_averages_g(
        tmp_path, monkeypatch):
    """Each train_step gets faces of the data set with their own attribute labels, and
    after each step the EMA generator moves toward G: ema <- d ema + (1 - d) G,
    d = min(decay, (1 + k) / (10 + k)) at step k."""
    faces = toy_faces(16, 32)
    steps, real_step, models, batches, after = 3, gan.train_step, [], [], []

    class SmallGAN(gan.GAN):  # G and D of one Linear layer: fast
        def __init__(self, settings):
            super().__init__(settings)
            stub_players(self, side=32)
            self.ema = copy.deepcopy(self.generator).requires_grad_(False)
            self.initial = parameters_of(self.generator)
            models.append(self)
    monkeypatch.setattr(gan, "GAN", SmallGAN)

    def recording(*args, **kwargs):
        arguments = inspect.signature(real_step).bind(*args, **kwargs).arguments
        batches.append((arguments["real"].clone(), arguments["real_attributes"].clone()))
        numbers = real_step(*args, **kwargs)
        after.append(parameters_of(arguments["gan"].generator))
        return numbers
    monkeypatch.setattr(gan, "train_step", recording)
    gan.train(faces, None, tiny_gan(variant="acgan", steps=steps, sample_every=steps,
                                    latent_dim=LATENT, ema_decay=0.5), tmp_path, "cpu", 0)
    dataset = faces.images()
    assert len(models) == 1 and len(batches) == steps
    for real, attributes in batches:
        index = [next(i for i, face in enumerate(dataset) if torch.equal(face, image))
                 for image in real]
        assert torch.equal(attributes, faces.labels[index])
    assert_all_close(list(models[0].ema.parameters()),
                     moving_average(models[0].initial, after, 0.5), what="EMA of G")


def test_gradient_penalty_of_a_linear_critic_is_norm_of_w_minus_1_squared():
    # D(x) = <w, x> has gradient w everywhere, so the penalty is (||w|| - 1)^2 whatever
    # the samples, and its gradient in w is 2 (||w|| - 1) w / ||w||
    critic = nn.Linear(12, 1, bias=False)
    with torch.no_grad():
        critic.weight.mul_(3.0)
    w = critic.weight.detach().flatten()
    penalty = gan.gradient_penalty(critic, torch.randn(5, 12), torch.randn(5, 12),
                                   parallel.Random(0))
    assert torch.isclose(penalty, (w.norm() - 1) ** 2, rtol=1e-5)
    penalty.backward()  # needs create_graph=True: the penalty is a function of w
    assert torch.allclose(critic.weight.grad.flatten(), 2 * (w.norm() - 1) * w / w.norm(),
                          atol=1e-6)


def test_gradient_penalty_is_taken_per_sample_at_eps_x_plus_1_minus_eps_fake():
    # D(x) = ||x||^2 / 2 has gradient x: the penalty is the mean of (||xhat_i|| - 1)^2,
    # xhat_i = eps_i x_i + (1 - eps_i) x~_i, one eps_i ~ U[0, 1] per sample from rng
    real, fake = torch.randn(6, 4), torch.randn(6, 4) * 3
    penalty = gan.gradient_penalty(lambda x: 0.5 * (x ** 2).sum(dim=1), real, fake,
                                   parallel.Random(5))
    eps = torch.rand(6, 1, generator=torch.Generator().manual_seed(5))
    x_hat = eps * real + (1 - eps) * fake
    assert torch.isclose(penalty, ((x_hat.norm(dim=1) - 1) ** 2).mean(), rtol=1e-5)


def test_wgan_gp_critic_has_no_batch_norm_and_scores_each_image_alone():
    critic = gan.GAN(tiny_gan(variant="wgan-gp")).discriminator.train()
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.Dropout)) for m in critic.modules())
    convs = [m for m in critic.modules() if isinstance(m, nn.Conv2d)]
    assert all(conv.bias is not None for conv in convs)  # nothing cancels the biases
    images = torch.randn(5, 3, 32, 32)
    # the penalty's per-sample gradients need this: a score does not depend on the batch
    assert torch.allclose(critic(images)[:2], critic(images[:2]), atol=1e-6)


def test_one_critic_step_descends_the_wgan_gp_loss_and_g_ascends_the_critic():
    settings = tiny_gan(variant="wgan-gp", n_critic=1)
    model = linear_critic_gan(settings).train()
    fakes = []
    model.generator.register_forward_hook(lambda module, inputs, output: fakes.append(output))
    real = toy_faces().images(slice(0, 4))
    w = model.discriminator[1].weight.detach().flatten().clone()
    optimizers = {"discriminator": torch.optim.SGD(model.discriminator.parameters(), lr=0.1),
                  "generator": torch.optim.SGD(model.generator.parameters(), lr=0.0)}
    numbers = gan.wgan_gp_step(model, optimizers, lambda: real, settings,
                               parallel.Random(0))
    real_mean, fake_mean = real.flatten(1).mean(0), fakes[0].detach().flatten(1).mean(0)
    # E[D(x)] - E[D(x~)] = <w, E[x] - E[x~]>; the penalty (||w|| - 1)^2;
    # L_D = E[D(x~)] - E[D(x)] + 10 (||w|| - 1)^2
    wasserstein, penalty = w @ (real_mean - fake_mean), (w.norm() - 1) ** 2
    assert torch.isclose(numbers["wasserstein"], wasserstein, atol=1e-5)
    assert torch.isclose(numbers["penalty"], penalty, rtol=1e-5)
    assert torch.isclose(numbers["loss_d"], -wasserstein + 10 * penalty, rtol=1e-5)
    # one SGD step on L_D: grad_w = E[x~] - E[x] + 10 * 2 (||w|| - 1) w / ||w||
    gradient = fake_mean - real_mean + 20 * (w.norm() - 1) * w / w.norm()
    w_after = model.discriminator[1].weight.detach().flatten()
    assert torch.allclose(w_after, w - 0.1 * gradient, atol=1e-6)
    # G's loss -E[D(G(z))], scored by the updated critic, on new z
    assert torch.isclose(numbers["loss_g"], -(w_after @ fakes[1].detach().flatten(1).mean(0)),
                         atol=1e-5)
    assert not torch.equal(fakes[0], fakes[1])


def test_wgan_gp_step_takes_n_critic_steps_each_on_its_own_batch_and_z():
    settings = tiny_gan(variant="wgan-gp", n_critic=3)
    model = gan.GAN(settings).train()
    optimizers = gan.build_optimizers(model, settings)
    steps = {name: 0 for name in optimizers}
    for name, optimizer in optimizers.items():
        def counted(*args, name=name, step=optimizer.step, **kwargs):
            steps[name] += 1
            return step(*args, **kwargs)
        optimizer.step = counted
    noise = []
    model.generator.register_forward_hook(lambda module, inputs, output:
                                          noise.append(inputs[0].flatten(1)))
    faces, batches = toy_faces(), []

    def real_batch():
        batches.append(faces.images(slice(4 * len(batches), 4 * len(batches) + 4)))
        return batches[-1]
    gan.wgan_gp_step(model, optimizers, real_batch, settings, parallel.Random(0))
    assert steps == {"discriminator": 3, "generator": 1} and len(batches) == 3
    assert len(noise) == 4 and len({tuple(z[0].tolist()) for z in noise}) == 4  # 3 + G's


def test_wgan_gp_and_hacks_use_their_papers_adam_settings():
    for variant, lr, betas in (("wgan-gp", 1e-4, (0.0, 0.9)), ("hacks", 2e-4, (0.5, 0.999))):
        settings = tiny_gan(variant=variant)
        optimizers = gan.build_optimizers(gan.GAN(settings), settings)
        for optimizer in optimizers.values():
            assert isinstance(optimizer, torch.optim.Adam)
            assert (optimizer.defaults["lr"], optimizer.defaults["betas"]) == (lr, betas)


@pytest.mark.parametrize("variant", ["wgan-gp", "hacks"])
def test_a_tiny_run_of_the_new_variants_writes_curves_that_fit_them(tmp_path, monkeypatch,
                                                                    variant):
    drawn, line_plot = {}, plots.line_plot

    def recorded(series, path, title="", **options):
        drawn[Path(path).name] = (sorted(series), title)
        return line_plot(series, path, title=title, **options)
    monkeypatch.setattr(plots, "line_plot", recorded)
    results = gan.train(toy_faces(), None, tiny_gan(variant=variant, n_critic=2), tmp_path,
                        "cpu", 0)
    assert results["steps"] == 2
    for name in ["samples.png", "loss.png", "d_outputs.png", "checkpoint.pt", "results.json"]:
        assert (tmp_path / name).is_file(), name
    if variant == "wgan-gp":  # the critic's score is no probability: no sigmoid of it
        assert drawn["d_outputs.png"] == (
            ["E[D(x)] - E[D(G(z))]"], "GAN variant wgan-gp: the critic's Wasserstein estimate")
        assert drawn["loss.png"][0] == ["D loss", "G loss", "gradient penalty"]
        assert {"final_wasserstein", "final_penalty"} <= set(results)
    else:
        assert drawn["d_outputs.png"] == (["D(G(z))", "D(x)"],
                                          "GAN variant hacks: sigmoid of D's score")
    folder = tmp_path / "faces"  # the checkpoint loads back into the variant's networks
    assert run.main(["gan", "--generate", "3", "--ckpt", str(tmp_path / "checkpoint.pt"),
                     "--out", str(folder)]) == 0
    assert len(list(folder.iterdir())) == 3


def test_bce_against_soft_targets_matches_its_formula():
    real, fake = torch.randn(6), torch.randn(6)
    ones, zeros = torch.ones(6), torch.zeros(6)
    assert torch.isclose(gan.discriminator_loss(real, fake, False, targets=(ones, zeros)),
                         gan.discriminator_loss(real, fake, False))
    t = torch.full((6,), 0.9)  # -t log sigmoid(l) - (1 - t) log(1 - sigmoid(l)), fakes t = 0
    by_hand = (-(t * torch.sigmoid(real).log() + (1 - t) * (1 - torch.sigmoid(real)).log())
               - (1 - torch.sigmoid(fake)).log()).mean()
    assert torch.isclose(gan.discriminator_loss(real, fake, False, targets=(t, zeros)), by_hand)


def test_hacks_trains_d_toward_smoothed_noisy_real_targets_and_zero_for_fakes(monkeypatch):
    _, _, _, targets = hacks_step(monkeypatch, label_flip=0.0)
    (real_targets, fake_targets), = targets
    assert real_targets.shape == fake_targets.shape == (8,)
    assert ((real_targets >= 0.9 - 0.1) & (real_targets <= 0.9)).all()  # smoothed ...
    assert real_targets.std() > 0.01                                     # ... and noisy
    assert torch.equal(fake_targets, torch.zeros(8))                    # one-sided


def test_hacks_flips_the_share_of_targets_it_is_given(monkeypatch):
    _, _, _, targets = hacks_step(monkeypatch, label_flip=1.0)  # every target swapped
    (real_targets, fake_targets), = targets
    assert torch.equal(real_targets, torch.zeros(8))
    assert ((fake_targets >= 0.8) & (fake_targets <= 0.9)).all()
    settings = tiny_gan(variant="hacks", label_flip=0.05)
    real_targets, fake_targets = gan.discriminator_targets(
        20_000, settings, parallel.Random(0))
    # 5% of each; the binomial's standard deviation is 0.0015, so 0.01 is 6 of them
    assert abs((real_targets == 0).float().mean() - 0.05) < 0.01
    assert abs((fake_targets > 0).float().mean() - 0.05) < 0.01
    kept = real_targets[real_targets > 0]  # U[0.8, 0.9]: mean 0.85, spanning the interval
    assert kept.min() >= 0.8 and kept.max() <= 0.9 and abs(kept.mean() - 0.85) < 0.002
    assert kept.min() < 0.801 and kept.max() > 0.899


def test_hacks_generator_keeps_the_non_saturating_loss_with_target_1():
    seen, _, numbers, _ = hacks_step()
    g_scores = seen.outputs[2].flatten()  # D's scores of the fakes in G's step
    assert torch.isclose(numbers["loss_g"],
                         F.binary_cross_entropy_with_logits(g_scores, torch.ones(8)))


def test_instance_noise_falls_linearly_from_its_setting_to_zero(tmp_path, monkeypatch):
    settings = tiny_gan(variant="hacks", steps=10, instance_noise=0.2)
    assert [gan.instance_noise_std(t, settings) for t in (0, 5, 10)] == [0.2, 0.1, 0.0]
    assert gan.instance_noise_std(0, tiny_gan(variant="a")) == 0.0
    given, step = [], gan.train_step

    def recorded(*args, noise_std, **kwargs):
        given.append(noise_std)
        return step(*args, noise_std=noise_std, **kwargs)
    monkeypatch.setattr(gan, "train_step", recorded)
    gan.train(toy_faces(), None, tiny_gan(variant="hacks", steps=2, sample_every=2,
                                          instance_noise=0.2), tmp_path, "cpu", 0)
    assert given == [0.2, 0.1]  # sigma_0 (1 - t / T) at t = 0 and t = T - 1 = 1


def test_every_image_hacks_d_sees_carries_the_instance_noise():
    # the same step with noise_std 0 and 0.5 draws the same n: D sees x + 0.5 n instead of x
    clean, real, _, _ = hacks_step(noise_std=0.0)
    noisy, _, _, _ = hacks_step(noise_std=0.5)
    assert torch.equal(clean.inputs[0], real)
    assert len(noisy.inputs) == 3  # real and fake in D's step, fake in G's step
    for with_noise, without in zip(noisy.inputs, clean.inputs):
        noise = with_noise - without
        assert abs(noise.std() - 0.5) < 0.02 and abs(noise.mean()) < 0.02
    assert not torch.equal(noisy.inputs[1] - clean.inputs[1], noisy.inputs[2] - clean.inputs[2])


def test_other_variants_see_no_instance_noise():
    settings = tiny_gan(variant="a", batch_size=4)
    torch.manual_seed(0)
    model = gan.GAN(settings).train()
    model.discriminator = Recorder(model.discriminator)
    real = toy_faces().images(slice(0, 4))
    gan.train_step(model, gan.build_optimizers(model, settings), real, None, settings,
                   parallel.Random(0), parallel.Random(0), noise_std=0.5)
    assert torch.equal(model.discriminator.inputs[0], real)


@pytest.mark.parametrize("image_size, dropouts", [(32, 3), (64, 4)])
def test_dropout_sits_after_each_leaky_relu_of_hacks_d_only_and_acts_in_training(image_size,
                                                                                 dropouts):
    for variant in gan.VARIANTS:
        layers = list(gan.GAN(tiny_gan(variant=variant, image_size=image_size))
                      .discriminator)
        found = [(i, m.p) for i, m in enumerate(layers) if isinstance(m, nn.Dropout)]
        if variant != "hacks":
            assert found == [], variant
            continue
        assert [p for _, p in found] == [0.3] * dropouts
        assert all(isinstance(layers[i - 1], nn.LeakyReLU) for i, _ in found)
        assert len(found) == sum(isinstance(m, nn.LeakyReLU) for m in layers)
    discriminator = gan.GAN(tiny_gan(variant="hacks", image_size=image_size)).discriminator
    images = torch.randn(4, 3, image_size, image_size)
    discriminator.eval()
    assert torch.equal(discriminator(images), discriminator(images))
    discriminator.train()
    assert not torch.equal(discriminator(images), discriminator(images))


@pytest.mark.parametrize("variant", ["a", "b"])
def test_a_gan_sample_depends_on_its_own_z_alone_even_after_training(variant):
    """G in train mode would normalise each sample with its batch's statistics. The
    generator used for results (the EMA for b) samples in eval mode, whatever mode
    training left it in."""
    model = gan.GAN(tiny_gan(variant=variant))
    model.train()
    model.generator(torch.randn(8, 100, 1, 1))  # running statistics that are not 0 and 1
    if model.ema is not None:
        model.update_ema(0, 0.999)
    model.train()
    assert alone_equals_in_batch(lambda z: model.sample(z), torch.randn(6, 100))


def test_gan_training_refreshes_the_averages_statistics_before_fid_and_pictures(
        tmp_path, cheap_fid, monkeypatch):
    """At each checkpoint of b: the EMA generator's batch-norm statistics, then its FID,
    then the checkpoint and the pictures (the red cast of RESULTS.md came from copied
    statistics)."""
    calls = []
    for module, name in ((gan.GAN, "refresh_ema_statistics"), (metrics.FIDTracker, "measure"),
                         (training.Run, "save_checkpoint"), (reports, "gan_pictures")):
        original = getattr(module, name)

        def recorded(*args, original=original, name=name, **kwargs):
            calls.append(name)
            return original(*args, **kwargs)
        monkeypatch.setattr(module, name, recorded)
    gan.train(toy_faces(), toy_faces(6), tiny_gan(variant="b", steps=2, sample_every=1,
                                                 fid_images=4), tmp_path, "cpu", 0,
              weights=cheap_fid)
    assert calls == ["refresh_ema_statistics", "measure", "save_checkpoint",
                     "gan_pictures"] * 2


@pytest.mark.parametrize("variant", ["a", "b", "acgan", "wgan-gp", "hacks"])
def test_every_tensor_of_a_gan_step_and_sample_is_on_the_models_device(variant):
    """On the meta device an op mixing a CPU tensor with the model's fails: so a z, a
    target, a noise or an index created without the device (fine on a CPU, an error or a
    copy on a GPU) is caught here without a GPU."""
    meta = torch.device("meta")
    settings = gan.GANSettings(variant=variant, image_size=32, batch_size=4,
                               augment="translation,color,cutout")
    model = gan.GAN(settings).to(meta)
    rng = parallel.Random(0, meta)
    faces = data.ImageSet(torch.zeros(8, 3, 32, 32, dtype=torch.uint8),
                          torch.arange(8) % 2).to(meta)
    optimizers = gan.build_optimizers(model, settings)
    if variant == "wgan-gp":
        gan.wgan_gp_step(model, optimizers, lambda: gan.real_batch(faces, settings, rng)[0],
                         settings, rng)
    else:
        gan.train_step(model, optimizers, *gan.real_batch(faces, settings, rng), settings, rng,
                       rng, noise_std=0.1)
    model.update_ema(3, settings.ema_decay)
    assert model.sample(*gan.fixed_noise(settings, 4, 0)).device == meta


# ============================================================================ vae
# Pins the ELBO's terms, the reparameterisation, the step and loop, every test figure,
# curve point and result of each epoch's model, eval-mode sampling.


class StubVAE(nn.Module):
    """encode: a Linear map to (mu, logvar); decode: a Linear map back to the image."""

    def __init__(self, latent_dim=3, side=8):
        super().__init__()
        self.to_code = nn.Sequential(nn.Flatten(), nn.Linear(3 * side * side, 2 * latent_dim))
        self.from_code = nn.Sequential(nn.Linear(latent_dim, 3 * side * side), nn.Tanh(),
                                       nn.Unflatten(1, (3, side, side)))
        self.codes = []

    def encode(self, x):
        return self.to_code(x).chunk(2, dim=1)

    def decode(self, z):
        self.codes.append(z.detach().clone())
        return self.from_code(z)


@pytest.mark.parametrize("fid_every, fid_steps", [(2, [4, 6]), (0, [2, 4, 6])])
def test_vae_fid_every_k_epochs_and_of_the_reconstructions(tmp_path, cheap_fid, fid_every,
                                                           fid_steps):
    faces, test = toy_faces(16, 64), data.ImageSet(toy_faces(12, 64).pixels.flip(0))
    results = vae.train(faces, test, tiny_vae(epochs=3, fid_every=fid_every, fid_images=10,
                                              tsne_points=0), tmp_path, "cpu", 0,
                        weights=cheap_fid)
    # 2 steps an epoch: epochs 2 and 3 (fid_every 2), or every epoch (0)
    assert results["fid_curve"]["step"] == fid_steps
    # best.pt: the checkpoint of the lowest FID, saved after that FID was measured
    assert util.load_checkpoint(tmp_path / "best.pt")["step"] == results["best_fid_step"]
    model = util.load_trained(tmp_path / "checkpoint.pt", "cpu", vae.VAESettings,
                              lambda s: vae.VAE(s.latent_dim), "model", "vae")[0]
    assert results["fid"] == pytest.approx(own_fid(torch.cat(
        [vae.decode(model, z) for z in vae.prior_samples(10, 8, 0, "fid")]), test.images()), rel=1e-6)
    first_ten = test.subset(torch.arange(10))
    assert results["reconstruction_fid"] == pytest.approx(
        own_fid(vae.reconstructions(model, first_ten), test.images()), rel=1e-6)
    assert (results["reconstruction_kid"], results["reconstruction_kid_std"]) == pytest.approx(
        own_kid(vae.reconstructions(model, first_ten), test.images()), rel=1e-6)
    assert results["reconstruction_images"] == 10


class NormedVAE(StubVAE):
    """StubVAE with batch norm on the code (so train mode, with batch statistics, and eval
    mode give different figures) and log sigma^2 = -40 (so z = mu to 1e-8 whatever eps is
    drawn: each figure is a function of the weights and the images alone)."""

    def __init__(self, latent_dim=3, side=8):
        super().__init__(latent_dim, side)
        self.to_code = nn.Sequential(nn.Flatten(), nn.Linear(3 * side * side, latent_dim),
                                     nn.BatchNorm1d(latent_dim))
        self.seen = []

    def encode(self, x):
        self.seen.append(x.detach().clone())
        mu = self.to_code(x)
        return mu, torch.full_like(mu, -40.0)


def own_vae_figures(model: nn.Module, images: torch.Tensor, mode: str = "eval"):
    """(per-pixel MSE, per-image KL) of images by a NormedVAE, each a mean over the images,
    z = mu: the KL of N(mu, e^-40) against N(0, 1) is 1/2 sum_j (mu_j^2 + e^-40 + 40 - 1)."""
    model = copy.deepcopy(model).train(mode == "train")
    with torch.no_grad():
        mu = model.to_code(images)
        mse = (model.from_code(mu) - images).pow(2).mean().item()
    kl = 0.5 * (mu.double().pow(2) + math.exp(-40) + 40 - 1).sum(dim=1).mean().item()
    return mse, kl


def test_vae_test_figures_are_means_over_every_test_image_in_eval_mode():
    """13 test faces in batches of 5: the last batch holds 3, so a mean over batches would
    weigh its faces more; batch norm in train mode would use the batches' statistics."""
    torch.manual_seed(0)
    model = NormedVAE()
    model.train().to_code(torch.randn(32, 3, 8, 8) * 2 + 1)  # running statistics unlike the faces
    test = toy_faces(13, 8)
    figures = vae.evaluate_test(model.train(), test, seed=0, latent_dim=3, batch_size=5)
    mse, kl = own_vae_figures(model, test.images())
    assert figures["mse"] == pytest.approx(mse, rel=1e-5)
    assert figures["kl"] == pytest.approx(kl, rel=1e-6)
    assert not model.training and [len(x) for x in model.seen] == [5, 5, 3]


def test_vae_curves_results_and_t_sne_inputs_are_each_epochs_model_on_the_test_faces(
        tmp_path, monkeypatch):
    """Through vae.train: each epoch's train MSE and KL are the means over its steps of
    the batches' figures (train mode, per colour value), its test MSE and KL those of the model
    saved at that epoch on the test faces (eval mode); results.json holds the last ones,
    the first ten test faces' reconstruction MSE per colour value, the seconds of the last
    checkpoint and their share per epoch; the t-SNE embeds mu of the test faces."""
    models = []

    def normed(latent_dim):
        torch.manual_seed(0)
        models.append(NormedVAE(latent_dim, side=16))
        return models[-1]
    monkeypatch.setattr(vae, "VAE", normed)
    states = saved_states(monkeypatch, tmp_path)
    embedded = []
    monkeypatch.setattr(tsne, "pca", lambda codes, dims: embedded.append(codes) or codes[:, :2])
    monkeypatch.setattr(tsne, "tsne", lambda points, **kwargs: points)
    step_figures = []

    def before(optimizer):  # the batch the step trained on, by the weights before the step
        model = models[0]
        step_figures.append(own_vae_figures(model, model.seen[-1], mode="train"))
    faces, test = toy_faces(21, 16), data.ImageSet(toy_faces(15, 16).pixels.flip(0),
                                                    torch.arange(15) % 3 == 0)
    settings = tiny_vae(latent_dim=3, epochs=3, batch_size=8, tsne_points=12)
    with optimiser_hooks(before):
        results = vae.train(faces, test, settings, tmp_path, "cpu", seed=0)
    assert len(step_figures) == 3 * 2 and len(states) == 3  # 21 faces: 2 full batches of 8
    for epoch, state in enumerate(states):
        model = NormedVAE(3, side=16)
        model.load_state_dict(state["model"])
        mse, kl = own_vae_figures(model, test.images())
        history = state["history"]
        assert history["test_mse"][-1] == pytest.approx(mse, rel=1e-5), epoch
        assert history["test_kl"][-1] == pytest.approx(kl, rel=1e-6), epoch
        own_train = np.mean(step_figures[2 * epoch:2 * epoch + 2], axis=0)
        assert history["train_mse"][-1] == pytest.approx(own_train[0], rel=1e-5), epoch
        assert history["train_kl"][-1] == pytest.approx(own_train[1], rel=1e-5), epoch
    assert results == json.loads((tmp_path / "results.json").read_text())
    assert (results["test_mse"], results["test_kl"]) == (history["test_mse"][-1],
                                                        history["test_kl"][-1])
    assert results["epochs"] == 3 and results["train_seconds"] == states[-1]["seconds"]
    assert results["seconds_per_epoch"] == pytest.approx(states[-1]["seconds"] / 3)
    ten = test.images()[:10]
    with torch.no_grad():
        rebuilt = model.eval().from_code(model.to_code(ten))
    assert results["reconstruction_mse_10_faces"] == pytest.approx(
        (rebuilt - ten).pow(2).mean().item(), rel=1e-5)
    with torch.no_grad():
        codes = model.eval().to_code(test.images()[:12])
    assert len(embedded) == 1 and np.allclose(embedded[0], codes.double().numpy(), atol=1e-6)


def test_kl_term_matches_torch_distributions_and_a_monte_carlo_estimate():
    mu, logvar = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    closed = torch.distributions.kl_divergence(q, p).sum(dim=1)
    assert torch.allclose(vae.kl_divergence(mu, logvar), closed)
    z = q.sample((200_000,))                                    # (S, 3, 5)
    monte_carlo = (q.log_prob(z) - p.log_prob(z)).sum(dim=2).mean(dim=0)
    assert torch.allclose(vae.kl_divergence(mu, logvar), monte_carlo, rtol=0.03, atol=0.02)


def test_reparameterisation_passes_gradients_to_mu_and_logvar():
    mu = torch.zeros(2, 4, requires_grad=True)
    logvar = torch.zeros(2, 4, requires_grad=True)
    eps = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    z = vae.reparameterise(mu, logvar, eps)
    assert torch.allclose(z, eps)  # mu = 0, sigma = 1
    z.sum().backward()
    assert torch.equal(mu.grad, torch.ones(2, 4))               # dz/dmu = 1
    assert torch.allclose(logvar.grad, 0.5 * eps)                # dz/dlogvar = eps sigma / 2


def test_a_tiny_vae_run_writes_every_file_and_resumes_to_the_same_weights(tmp_path, monkeypatch):
    faces, test = toy_faces(24, 64), toy_faces(16, 64)
    results = vae.train(faces, test, tiny_vae(), tmp_path / "whole", "cpu", seed=0)
    for name in ("mse.png", "kl.png", "reconstructions.png", "samples.png",
                 "interpolation.png", "tsne.png", "checkpoint.pt", "results.json"):
        assert (tmp_path / "whole" / name).is_file(), name
    assert results["epochs"] == 2 and results["test_mse"] > 0
    # one strip of 10 decoded faces under its title line
    assert Image.open(tmp_path / "whole" / "interpolation.png").size == (10 * 66 + 2, 68 + 20)
    animation = Image.open(tmp_path / "whole" / "interpolation.gif")  # 10 faces there, 8 back
    assert animation.n_frames == 18 and animation.size == (3 * 64 + 4, 3 * 64 + 4 + 20)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    with monkeypatch.context() as patch:
        patch.setattr(reports, "vae_epoch_pictures", interrupt)  # right after the first
        # checkpoint
        with pytest.raises(KeyboardInterrupt):
            vae.train(faces, test, tiny_vae(), tmp_path / "parts", "cpu", seed=0)
    vae.train(faces, test, tiny_vae(resume=True), tmp_path / "parts", "cpu", seed=0)
    whole = util.load_checkpoint(tmp_path / "whole" / "checkpoint.pt")["model"]
    parts = util.load_checkpoint(tmp_path / "parts" / "checkpoint.pt")["model"]
    for name, tensor in whole.items():
        assert torch.equal(tensor, parts[name]), name


def test_vae_grids_and_samples_are_the_fixed_z_decoded_by_each_epochs_model(tmp_path,
                                                                            monkeypatch):
    """grids/step_N.png at the end of every epoch, titled with the epoch, samples.gif of
    them in order and samples.png the last: each is the same 32 z of the "grid" stream
    decoded by that epoch's weights in eval mode (a grid of fresh z, of the training
    noise, or of last epoch's model would differ)."""
    states = saved_states(monkeypatch, tmp_path)
    titles = []
    real_label_grid = plots.label_grid
    monkeypatch.setattr(plots, "label_grid", lambda grid, side, title="", **kw: titles.append(
        title) or real_label_grid(grid, side, title=title, **kw))
    faces = toy_faces(24, 64)  # 3 batches of 8 an epoch
    vae.train(faces, toy_faces(16, 64), tiny_vae(epochs=3), tmp_path, "cpu", seed=0)
    steps = [3, 6, 9]
    assert sorted(p.name for p in (tmp_path / "grids").iterdir()) == [
        f"step_{step:06d}.png" for step in steps]
    assert [t for t in titles if t.startswith("epoch")] == ["epoch 1", "epoch 2", "epoch 3"]
    z = training.fixed_random(0, "grid").randn(32, 8)
    grids = []
    for epoch, (state, step) in enumerate(zip(states, steps, strict=True)):
        model = vae.VAE(8)
        model.load_state_dict(state["model"])
        with torch.no_grad():
            expected = np.asarray(data.grid_image(model.eval().decode(z)), dtype=int)
        drawn = np.asarray(Image.open(tmp_path / "grids" / f"step_{step:06d}.png")
                           .convert("RGB"), dtype=int)[-expected.shape[0]:, -expected.shape[1]:]
        assert np.abs(drawn - expected).max() <= 1, epoch
        grids.append(drawn)
    last = np.asarray(Image.open(tmp_path / "samples.png").convert("RGB"), dtype=int)
    assert np.array_equal(last[-grids[-1].shape[0]:, -grids[-1].shape[1]:], grids[-1])
    animation = Image.open(tmp_path / "samples.gif")
    assert animation.n_frames == 3
    for epoch in range(3):  # GIF's palette blurs colours: each frame is nearest its grid
        animation.seek(epoch)
        frame = np.asarray(animation.convert("RGB"), dtype=int)[-grids[0].shape[0]:,
                                                                -grids[0].shape[1]:]
        distances = [np.abs(frame - grid).mean() for grid in grids]
        assert np.argmin(distances) == epoch and distances[epoch] < 1, (epoch, distances)


def test_kl_warm_up_grows_lambda_linearly():
    settings = vae.VAESettings(kl_weight=2.0, warmup_epochs=4)
    assert vae.kl_weight_at(settings, 0, 0.0) == 0.0
    assert vae.kl_weight_at(settings, 1, 0.5) == 2.0 * 1.5 / 4
    assert vae.kl_weight_at(settings, 7, 0.0) == 2.0


def test_vae_losses_sum_the_squared_error_over_each_image_and_average_over_the_batch():
    """reconstruction = mean over images of sum over pixels of (x^ - x)^2, KL the closed
    form summed over dimensions and averaged, mse = reconstruction / pixels per image; the
    decoder gets z = mu + exp(logvar / 2) eps with the eps given."""
    torch.manual_seed(0)
    model = StubVAE()
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    eps = torch.randn(4, 3, generator=torch.Generator().manual_seed(3))
    terms = vae.losses(model, x, eps)
    mu, logvar = model.encode(x)
    z = mu + (0.5 * logvar).exp() * eps
    assert torch.allclose(model.codes[0], z, atol=1e-6)
    squared = (model.from_code(z) - x).pow(2)
    assert torch.isclose(terms["reconstruction"], squared.sum(dim=(1, 2, 3)).mean(), rtol=1e-5)
    assert torch.isclose(terms["mse"], squared.mean(), rtol=1e-5)
    kl = 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1).sum(dim=1).mean()
    assert torch.isclose(terms["kl"], kl, rtol=1e-5)


def test_reparameterised_samples_have_mean_mu_and_standard_deviation_exp_half_logvar():
    count = 40_000
    mu = torch.tensor([1.5, -2.0]).expand(count, 2)
    logvar = torch.tensor([0.25, 4.0]).log().expand(count, 2)             # sigma 0.5 and 2
    eps = torch.randn(count, 2, generator=torch.Generator().manual_seed(0))
    z = vae.reparameterise(mu, logvar, eps)
    assert torch.allclose(z.mean(dim=0), torch.tensor([1.5, -2.0]), atol=0.05)
    assert torch.allclose(z.std(dim=0), torch.tensor([0.5, 2.0]), rtol=0.03)


def test_vae_training_descends_reconstruction_plus_the_warmed_up_lambda_times_kl(
        tmp_path, monkeypatch):
    """Each optimiser step's gradient is d/dtheta [reconstruction + lambda KL] of that
    step's losses, lambda = kl_weight * min(1, (epoch + step / steps) / warmup_epochs).
    Catches lambda not applied (or not warmed up), and the per-pixel MSE as the loss."""
    torch.manual_seed(0)
    model = StubVAE(side=16)
    monkeypatch.setattr(vae, "VAE", lambda *args, **kwargs: model)
    pending, checked = [], []
    real_losses = vae.losses

    def losses(network, x, eps):
        terms = real_losses(network, x, eps)
        if torch.is_grad_enabled() and network.training:
            params = list(model.parameters())
            pending.append((gradients(terms["reconstruction"], params),
                            gradients(terms["kl"], params)))
        return terms
    monkeypatch.setattr(vae, "losses", losses)
    weights = [0.0, 0.125, 0.25, 0.375]  # kl_weight 0.5, warm-up 2 epochs of 2 steps

    def check(optimizer):
        assert len(pending) == 1
        reconstruction, kl = pending.pop()
        weight = weights[len(checked)]
        assert_all_close([p.grad for p in model.parameters()],
                         [r + weight * k for r, k in zip(reconstruction, kl)], atol=1e-5,
                         what=f"step {len(checked)}")
        checked.append(weight)
    with optimiser_hooks(before=check):
        vae.train(toy_faces(16, 16), toy_faces(8, 16), vae.VAESettings(
            latent_dim=3, epochs=2, batch_size=8, kl_weight=0.5, warmup_epochs=2,
            tsne_points=0), tmp_path, "cpu", seed=0)
    assert checked == weights and not pending


def test_vae_decodes_encodes_and_evaluates_each_face_on_its_own():
    model = vae.VAE(8)
    model.train()
    model.decode(model.encode(torch.rand(16, 3, 64, 64) * 2 - 1)[0])  # running statistics
    faces = data.ImageSet((torch.rand(5, 3, 64, 64) * 255).to(torch.uint8))
    assert alone_equals_in_batch(lambda z: vae.decode(model, z), torch.randn(5, 8))
    model.train()
    rebuilt = vae.reconstructions(model, faces)
    assert torch.allclose(rebuilt[1:2], vae.reconstructions(model, faces.subset(
        torch.tensor([1]))), atol=1e-5)
    model.train()
    codes = vae.latent_codes(model, faces)
    assert torch.allclose(codes[3:4], vae.latent_codes(model, faces.subset(torch.tensor([3]))),
                          atol=1e-5)
    model.train()
    interpolated = vae.interpolation(model, faces.images()[0], faces.images()[1])
    assert not model.training and torch.allclose(interpolated[0:1], vae.decode(
        model, model.encode(faces.images()[:1])[0]), atol=1e-5)


def test_every_tensor_of_a_vae_step_is_on_the_models_device():
    meta = torch.device("meta")
    model = vae.VAE(8).to(meta)
    optimizer = torch.optim.Adam(model.parameters())
    terms = vae.losses(model, torch.zeros(4, 3, 64, 64, device=meta),
                       parallel.Random(0, meta).randn(4, 8))
    (terms["reconstruction"] + terms["kl"]).backward()
    optimizer.step()
    assert vae.decode(model, torch.zeros(2, 8)).device == meta


# ============================================================================ ddpm
# Pins schedules, posterior, loss, guidance and samplers against closed forms; the loop.


def skip_course_digits(monkeypatch):
    """ddpm.train without its final 1000 images, their grades and results.json."""
    monkeypatch.setattr(ddpm, "course_digits", lambda *args, **kwargs: (None, None, 0.0))
    monkeypatch.setattr(reports, "ddpm_results", lambda *args, **kwargs: {})


def tiny_diffusion(**changes) -> "ddpm.Diffusion":
    settings = ddpm.DDPMSettings(**{"timesteps": 20, "width": 16, "steps": 2, "batch_size": 4,
                                    "sample_every": 1, "sampling_steps": 4, "fid_images": 0,
                                    "amp": "off", **changes})
    torch.manual_seed(0)
    return ddpm.Diffusion(settings), settings


class PredictsX0(nn.Module):
    """eps_theta that claims x_0 = 0.05 c (c = 10, the null class: 0.5) whatever x_t:
    eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t), with abar_t = alphas_cumprod[t - 1]."""

    def __init__(self, schedule):
        super().__init__()
        self.alphas_cumprod = schedule.alphas_cumprod

    def forward(self, x, t, labels):
        abar = self.alphas_cumprod[t - 1].to(x.dtype).view(-1, 1, 1, 1)
        x0 = 0.05 * labels.to(x.dtype).view(-1, 1, 1, 1)
        return (x - abar.sqrt() * x0) / (1 - abar).sqrt()


def stubbed_diffusion(timesteps=10):
    model, _ = tiny_diffusion(timesteps=timesteps)
    model.network = PredictsX0(model.schedule)
    model.ema = PredictsX0(model.schedule)
    return model


def guided_x0(labels, w):
    """The x_0 of guided eps: eps is affine in the claimed x_0, so guidance mixes the x_0s:
    (1 + w) 0.05 c - w 0.05 * 10."""
    return ((1 + w) * 0.05 * labels.float() - w * 0.5).view(-1, 1, 1, 1)


class TinyEps(nn.Module):
    """A stand-in for the U-Net: eps(x, t, c) = a x + b_c + t / 1000, c in 0 .. CLASSES."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.5))
        self.shift = nn.Embedding(ddpm.CLASSES + 1, 3)

    def forward(self, x, t, labels):
        return self.scale * x + self.shift(labels)[:, :, None, None] \
            + t.float().view(-1, 1, 1, 1) / 1000


def test_ddpm_fid_of_the_1000_course_digits_beside_the_curve(tmp_path, cheap_fid):
    test = toy_domain(12, seed=1)
    _, settings = tiny_diffusion(steps=2, width=8, sampling_steps=2, fid_images=10)
    results = ddpm.train(toy_domain(16), test, settings, tmp_path, "cpu", 0, weights=cheap_fid)
    assert results["fid_curve"]["step"] == [1, 2] and results["fid_curve"]["images"] == 10
    assert util.load_checkpoint(tmp_path / "best.pt")["step"] == results["best_fid_step"]
    model, trained = ddpm.load(tmp_path / "checkpoint.pt", "cpu")
    _, labels = reports.course_names()
    course = torch.cat([ddpm.sample(model, trained, batch, 0, stream)[0]
                        for batch, stream in ddpm.label_batches(labels, "course digits")])
    assert results["course_digits_fid"] == pytest.approx(own_fid(course, test.images()),
                                                         rel=1e-6)
    assert (results["course_digits_kid"], results["course_digits_kid_std"]) == pytest.approx(
        own_kid(course, test.images()), rel=1e-6)
    assert results["course_digits_images"] == 1000 and results["fid_real_images"] == 12
    assert results["fid"] == results["fid_curve"]["fid"][-1] and results["fid_images"] == 10
    digits = torch.cat([ddpm.sample(model, trained, batch, 0, stream)[0]
                        for batch, stream in ddpm.label_batches(torch.arange(10) % 10, "fid")])
    assert results["fid_curve"]["fid"][-1] == pytest.approx(own_fid(digits, test.images()),
                                                            rel=1e-6)


def test_ddpm_grades_the_fid_digits_at_every_fid_step(tmp_path, cheap_fid, monkeypatch):
    """--fid-every 2 with a checkpoint every step: FID, KID and the digit accuracy of the
    FID's digits (the classifier's grade of those very images and labels) at steps 2 and
    4 only; at the end the 1000 course digits graded against their own labels. Catches
    grades of other images, labels or steps."""
    graded = []

    def grade(images, labels, checkpoint, device):
        graded.append((images.clone(), labels.clone()))
        return {"digit_accuracy": 0.1 * len(graded)}
    monkeypatch.setattr(classifier, "grade", grade)
    test = toy_domain(12, seed=1)
    _, settings = tiny_diffusion(steps=4, sample_every=1, fid_every=2, width=8,
                                 sampling_steps=2, fid_images=10)
    results = ddpm.train(toy_domain(16), test, settings, tmp_path, "cpu", 0, weights=cheap_fid)
    history = util.load_checkpoint(tmp_path / "checkpoint.pt")["history"]
    assert history["fid_step"] == [2, 4] and history["digit_accuracy"] == [0.1, 0.2]
    assert (tmp_path / "digit_accuracy.png").is_file()
    assert len(graded) == 3  # at steps 2 and 4, then the 1000 course digits
    model, trained = ddpm.load(tmp_path / "checkpoint.pt", "cpu")
    digits = torch.cat([ddpm.sample(model, trained, batch, 0, stream)[0]
                        for batch, stream in ddpm.label_batches(torch.arange(10) % 10, "fid")])
    assert torch.equal(graded[1][1], torch.arange(10) % 10)
    assert torch.allclose(graded[1][0], digits)
    _, course_labels = reports.course_names()  # the 1000 course digits, each its own label
    course = torch.cat([ddpm.sample(model, trained, batch, 0, stream)[0]
                        for batch, stream in ddpm.label_batches(course_labels, "course digits")])
    assert torch.equal(graded[2][1], course_labels) and torch.allclose(graded[2][0], course)
    assert results["fid_curve"]["fid"][-1] == pytest.approx(own_fid(digits, test.images()),
                                                            rel=1e-6)


@pytest.mark.parametrize("T", [10, 1000])
def test_linear_and_cosine_schedules_match_their_closed_forms(T):
    linear = ddpm.NoiseSchedule(T, "linear")
    assert len(linear.betas) == T and linear.betas[0] == 1e-4 and linear.betas[-1] == 0.02
    assert torch.allclose(linear.alphas_cumprod[2], (1 - linear.betas[:3]).prod())
    cosine = ddpm.NoiseSchedule(T, "cosine")
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in (1, T // 2, T - 1):  # alpha_bar_t = f(t) / f(0) where beta is not clipped
        assert math.isclose(cosine.alphas_cumprod[t - 1].item(), f(t) / f(0), rel_tol=1e-9)
    assert cosine.betas.max() <= 0.999 and math.isclose(cosine.betas[-1].item(), 0.999)


def test_q_sample_has_the_closed_form_mean_and_variance():
    schedule = ddpm.NoiseSchedule(100, "linear")
    x0 = torch.full((20000, 1, 1, 1), 0.7)
    t = torch.full((20000,), 60)
    x_t = schedule.q_sample(x0, t, torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)))
    alpha_bar = schedule.alphas_cumprod[59].item()
    assert abs(x_t.mean().item() - math.sqrt(alpha_bar) * 0.7) < 4 * math.sqrt((1 - alpha_bar) / 20000)
    assert abs(x_t.var().item() - (1 - alpha_bar)) < 0.03 * (1 - alpha_bar)
    assert torch.allclose(schedule.predict_x0(x_t, t, (x_t - math.sqrt(alpha_bar) * x0)
                                              / math.sqrt(1 - alpha_bar)), x0, atol=1e-5)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    x_t = schedule.q_sample(x0, t, noise)   # predict_eps recovers the noise q_sample added
    assert torch.allclose(schedule.predict_eps(x_t, t, x0), noise, atol=1e-4)


def test_posterior_is_the_gaussian_product_of_prior_and_likelihood():
    """q(x_{t-1} | x_t, x_0) is proportional to q(x_t | x_{t-1}) q(x_{t-1} | x_0): precisions
    add, 1/var = alpha_t / beta_t + 1 / (1 - abar_{t-1}), and the mean is the
    precision-weighted average."""
    schedule = ddpm.NoiseSchedule(50, "cosine")
    x0, x_t = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    for step in (2, 17, 50):
        t = torch.full((4,), step)
        i = step - 1
        alpha, beta = schedule.alphas[i].item(), schedule.betas[i].item()
        abar_prev = schedule.alphas_cumprod_prev[i].item()
        precision = alpha / beta + 1 / (1 - abar_prev)
        mean_expected = (math.sqrt(alpha) / beta * x_t + math.sqrt(abar_prev) / (1 - abar_prev)
                         * x0) / precision
        mean, variance = schedule.posterior(x0, x_t, t)
        assert torch.allclose(mean, mean_expected, atol=1e-6)
        assert torch.allclose(variance, torch.full_like(variance, 1 / precision), rtol=1e-6)


def test_ddim_with_eta_zero_is_deterministic_and_eta_one_is_not():
    model, settings = tiny_diffusion()
    labels = torch.arange(3)
    first = ddpm.sample_ddim(model, labels, 1.0, fixed_stream(1), 4, 0.0)[0]
    x_T = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    again = ddpm.sample_ddim(model, labels, 1.0, fixed_stream(1), 4, 0.0)[0]
    assert torch.equal(first, again)
    # deterministic means: only x_T is random; a generator with the same first draw
    # but different later draws gives the same image
    rng = fixed_stream(1)
    rng_state = rng.state_dict()
    assert torch.equal(rng.randn(3, 3, 28, 28), x_T)
    rng.load_state_dict(rng_state)
    noisy = ddpm.sample_ddim(model, labels, 1.0, rng, 4, 1.0)[0]
    assert not torch.allclose(noisy, first)
    assert ddpm.ddim_timesteps(1000, 5) == [1000, 750, 500, 251, 1]


def test_ddim_timesteps_start_at_T_even_for_one_step_and_count_the_sampler_steps():
    """One DDIM step goes from pure noise, t = T, to x_0; more steps than T drop repeats."""
    assert ddpm.ddim_timesteps(1000, 1) == [1000]
    assert ddpm.ddim_timesteps(10, 30) == list(range(10, 0, -1))
    settings = ddpm.DDPMSettings(timesteps=10, sampling_steps=4)
    assert ddpm.sampler_steps(settings) == len(ddpm.ddim_timesteps(10, 4)) == 4
    assert ddpm.sampler_steps(dataclasses.replace(settings, sampler="ddpm")) == 10


def test_ddim_with_all_timesteps_and_eta_one_is_ancestral_sampling():
    """With S = T and eta = 1, sigma_t^2 = beta~_t and the DDIM mean equals the posterior
    mean: the two samplers must produce the same images from the same noise."""
    model, settings = tiny_diffusion(timesteps=8)
    labels = torch.tensor([1, 7])
    ddim = ddpm.sample_ddim(model, labels, 0.5, fixed_stream(3), 8, 1.0)[0]
    ancestral = ddpm.sample_ddpm(model, labels, 0.5, fixed_stream(3))[0]
    assert torch.allclose(ddim, ancestral, atol=1e-4)


def test_guidance_formula_and_zero_guidance_is_the_conditional_prediction():
    conditional, unconditional = torch.randn(2, 3), torch.randn(2, 3)
    assert torch.allclose(ddpm.guide(conditional, unconditional, 2.0),
                          3 * conditional - 2 * unconditional)
    assert torch.equal(ddpm.guide(conditional, unconditional, 0.0), conditional)


def test_ddpm_autocasts_to_bfloat16_on_the_cpu_only_when_asked():
    """--amp auto leaves a CPU in float32 (bfloat16 is emulated, 10x slower, on AVX2)."""
    x = torch.randn(2, 4)
    for amp, dtype in (("auto", torch.float32), ("off", torch.float32), ("on", torch.bfloat16)):
        with ddpm.autocast("cpu", amp):
            assert (x @ x.T).dtype == dtype, amp


def test_ddpm_amp_is_on_for_a_cuda_gpu_unless_off_and_on_a_cpu_only_when_asked():
    enabled = {(device, amp) for device in ("cuda", "cpu", "mps")
               for amp in ("auto", "on", "off") if ddpm.amp_enabled(device, amp)}
    assert enabled == {("cuda", "auto"), ("cuda", "on"), ("cpu", "on")}


def test_the_reverse_process_keeps_one_of_each_digit_from_noise_to_its_sample():
    model, settings = tiny_diffusion(sampler="ddpm")
    images, timesteps, chain = ddpm.reverse_process(model, settings, seed=0)
    assert timesteps == [20 - k for k in range(21)] and chain.shape == (21, 10, 3, 28, 28)
    assert torch.equal(chain[-1], images[::10].clamp(-1, 1))  # x_0 of digits 0, 1, .., 9
    noise = training.fixed_random(0, "reverse process").randn(100, 3, 28, 28)  # x_T
    assert torch.equal(chain[0], noise[::10].clamp(-1, 1))


def test_ddpm_run_writes_course_images_grid_strip_curve_and_resumes(tmp_path, monkeypatch,
                                                                    capsys):
    digits = toy_domain(16)
    _, settings = tiny_diffusion(steps=3, width=8, sampling_steps=2)
    results = ddpm.train(digits, None, settings, tmp_path / "whole", "cpu", seed=2)
    names = sorted(p.name for p in (tmp_path / "whole" / "images").iterdir())
    assert len(names) == 1000 and names[0] == "0_001.png" and names[-1] == "9_100.png"
    assert names.count("3_042.png") == 1
    for name in ("grid.png", "reverse_process.png", "loss.png", "checkpoint.pt", "results.json"):
        assert (tmp_path / "whole" / name).is_file(), name
    grid = Image.open(tmp_path / "whole" / "grid.png")   # title above, digits on the left
    assert grid.size[1] == 20 + 10 * 30 + 2 and grid.size[0] > 10 * 30 + 2
    strip = Image.open(tmp_path / "whole" / "reverse_process.png")  # x3, title and t labels
    assert strip.size[1] == 20 + 18 + 3 * 28 + 4 and strip.size[0] >= 6 * (3 * 28 + 2) + 2
    # x_t of ten digits at every timestep DDIM visits (GIF merges repeated frames)
    visited = set(ddpm.ddim_timesteps(settings.timesteps, settings.sampling_steps) + [0])
    chain = Image.open(tmp_path / "whole" / "reverse_process.gif")
    assert chain.n_frames == len(visited) == 3
    assert chain.size == (10 * (3 * 28 + 2) + 2, 3 * 28 + 4 + 20)
    assert results["digit_accuracy"] is None and "no classifier" in \
        results["digit_accuracy_unavailable"]
    folder = tmp_path / "deliverable"
    assert run.main(["ddpm", "--generate", "--ckpt", str(tmp_path / "whole" / "checkpoint.pt"),
                     "--out", str(folder), "--per-digit", "2"]) == 0
    assert sorted(p.name for p in folder.iterdir()) == [f"{d}_00{i}.png" for d in range(10)
                                                        for i in (1, 2)]
    steps = len(ddpm.ddim_timesteps(settings.timesteps, 50))  # the flag's default S
    assert f"ddim sampling: 100% {steps}/{steps}" in capsys.readouterr().err  # one batch

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    with monkeypatch.context() as patch:
        patch.setattr(ddpm, "reverse_process", interrupt)  # after the step-1 checkpoint
        with pytest.raises(KeyboardInterrupt):
            ddpm.train(digits, None, settings, tmp_path / "parts", "cpu", seed=2)
    skip_course_digits(monkeypatch)
    ddpm.train(digits, None, dataclasses.replace(settings, resume=True), tmp_path / "parts",
               "cpu", seed=2)
    whole = util.load_checkpoint(tmp_path / "whole" / "checkpoint.pt")["model"]
    parts = util.load_checkpoint(tmp_path / "parts" / "checkpoint.pt")["model"]
    for name, tensor in whole.items():
        assert torch.equal(tensor, parts[name]), name


def test_min_snr_weighting_scales_each_images_error_by_min_snr_5_over_snr():
    """Hang et al.: w_t = min(SNR_t, 5) / SNR_t, SNR_t = abar_t / (1 - abar_t), on each
    image's own mean squared error. Catches: SNR / min (the inverse), gamma other than 5,
    SNR of t + 1 or t - 1, the weight on the batch mean instead of each image."""
    model, _ = tiny_diffusion(timesteps=1000, loss_weight="min-snr", drop_class=0.0)
    calls = []

    class Records(nn.Module):
        def forward(self, x_t, t, labels):
            calls.append((x_t.detach().clone(), t.clone()))
            return 0.5 * x_t + 0.1
    model.network = Records()
    x0 = torch.rand(64, 3, 2, 2, generator=torch.Generator().manual_seed(1)) * 2 - 1
    loss = model.loss(x0, torch.arange(64) % 10, parallel.Random(0))
    (x_t, t), = calls
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[t - 1]
    snr = abar / (1 - abar)
    assert (snr > 5).any() and (snr < 5).any()   # both branches of the min are taken
    weight = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / snr
    eps = (x_t - abar.float().sqrt().view(-1, 1, 1, 1) * x0) \
        / (1 - abar.float()).sqrt().view(-1, 1, 1, 1)
    per_image = (0.5 * x_t + 0.1 - eps).pow(2).mean(dim=(1, 2, 3))
    assert torch.isclose(loss, (weight.float() * per_image).mean(), rtol=1e-4)
    assert float(model.loss_weights(torch.tensor([1000]))) == 1.0  # pure noise: SNR < 5
    assert float(model.loss_weights(torch.tensor([1]))) == pytest.approx(
        5 * (1 - 0.9999) / 0.9999)                                  # t = 1: 5 / SNR_1


def test_ddpm_learning_rate_warms_up_then_stays_or_falls_along_a_cosine():
    constant = ddpm.DDPMSettings(lr=1e-3, steps=2000)
    cosine = ddpm.DDPMSettings(lr=1e-3, steps=2000, lr_schedule="cosine")
    assert ddpm.learning_rate(constant, 99) == pytest.approx(1e-3 * 100 / 500)
    assert ddpm.learning_rate(constant, 1999) == pytest.approx(1e-3)
    assert ddpm.learning_rate(cosine, 99) == pytest.approx(
        1e-3 * 100 / 500 * (1 + math.cos(math.pi * 99 / 2000)) / 2)
    assert ddpm.learning_rate(cosine, 1000) == pytest.approx(1e-3 / 2)     # half way
    assert ddpm.learning_rate(cosine, 1999) == pytest.approx(0, abs=1e-8)  # the end


def test_ddpm_dropout_setting_reaches_every_block_of_the_u_net():
    for rate in (0.0, 0.1):
        modules = list(tiny_diffusion(dropout=rate)[0].network.modules())
        dropouts = [m.p for m in modules if isinstance(m, nn.Dropout)]
        assert set(dropouts) == {rate}
        assert len(dropouts) == sum(isinstance(m, nets.ResidualBlock) for m in modules)


def test_ddpm_refuses_an_unknown_loss_weight_or_lr_schedule():
    """A preset's value skips argparse's choices: a typo must not fall to a default."""
    model, _ = tiny_diffusion(loss_weight="min_snr")
    with pytest.raises(util.UserError, match="--loss-weight 'min_snr'"):
        model.loss_weights(torch.tensor([1, 2]))
    with pytest.raises(util.UserError, match="--lr-schedule 'cos'"):
        ddpm.learning_rate(tiny_diffusion(lr_schedule="cos")[1], 0)


@pytest.mark.parametrize("schedule, refused", [("constant", False), ("cosine", True)])
def test_ddpm_resume_refuses_a_new_steps_only_under_a_cosine_lr(schedule, refused, tmp_path,
                                                                monkeypatch):
    """The cosine lr is a function of --steps: resuming with another length would make it
    jump back up, so that resume must say so; a constant lr may run longer."""
    digits = toy_domain(8)
    _, settings = tiny_diffusion(steps=1, width=8, lr_schedule=schedule)
    skip_course_digits(monkeypatch)
    ddpm.train(digits, None, settings, tmp_path, "cpu", seed=0)
    longer = dataclasses.replace(settings, steps=2, resume=True)
    if refused:
        with pytest.raises(util.UserError, match="--steps 1 \\(now 2\\)"):
            ddpm.train(digits, None, longer, tmp_path, "cpu", seed=0)
    else:
        ddpm.train(digits, None, longer, tmp_path, "cpu", seed=0)
        assert util.load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 2


def test_training_loss_regresses_the_noise_at_t_from_1_to_T_and_drops_classes_to_the_null():
    """The network sees x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps for t in {1..T}, the
    label replaced by the null class CLASSES with probability drop_class; the loss is the
    MSE between its output and eps. Catches: x0 as the target, t from {0..T-1}, dropout
    inverted (p = 1 - drop_class), a null token other than CLASSES."""
    T = 5
    model, _ = tiny_diffusion(timesteps=T, drop_class=0.25)
    calls = []

    class Records(nn.Module):
        def forward(self, x_t, t, labels):
            calls.append((x_t.detach().clone(), t.clone(), labels.clone()))
            return 0.5 * x_t + 0.1
    model.network = Records()
    count = 4000
    x0 = torch.rand(count, 1, 2, 2, generator=torch.Generator().manual_seed(1)) * 2 - 1
    labels = torch.arange(count) % 10
    loss = model.loss(x0, labels, parallel.Random(0))
    x_t, t, seen = (torch.cat(parts) for parts in zip(*calls))
    assert len(x_t) == count
    assert set(t.tolist()) == set(range(1, T + 1))
    dropped = seen == ddpm.CLASSES
    assert ddpm.CLASSES == 10 and 0.2 < dropped.float().mean() < 0.3
    assert torch.equal(seen[~dropped], labels[~dropped])
    abar = model.schedule.alphas_cumprod[t - 1].float().view(-1, 1, 1, 1)
    eps = (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()
    assert abs(eps.mean()) < 0.05 and abs(eps.std() - 1) < 0.05  # x_t is q_sample at t
    assert torch.isclose(loss, F.mse_loss(0.5 * x_t + 0.1, eps), rtol=1e-4)


def test_guided_eps_is_one_plus_w_conditional_minus_w_unconditional_of_the_ema_network():
    """eps~ = (1 + w) eps(x, t, c) - w eps(x, t, CLASSES), both from the EMA copy (the raw
    network, here one that answers 0, must not be used for sampling)."""
    model, _ = tiny_diffusion()

    class Stub(nn.Module):  # eps(x, t, c) = 0.1 x + 0.01 t + c
        def forward(self, x, t, labels):
            return 0.1 * x + (0.01 * t + labels).float().view(-1, 1, 1, 1)

    class Zero(nn.Module):
        def forward(self, x, t, labels):
            return torch.zeros_like(x)
    model.network, model.ema = Zero(), Stub()
    x, t, labels = torch.randn(3, 3, 4, 4), torch.tensor([1, 5, 9]), torch.tensor([0, 3, 7])
    w = 2.0
    expected = 0.1 * x + (0.01 * t + (1 + w) * labels - w * ddpm.CLASSES).float().view(-1, 1, 1, 1)
    assert torch.allclose(model.guided_eps(x, t, labels, w), expected, atol=1e-5)


def test_noise_schedule_alpha_bar_prev_is_the_product_up_to_t_minus_1():
    schedule = ddpm.NoiseSchedule(12, "cosine")
    assert torch.allclose(schedule.alphas_cumprod, torch.cumprod(1 - schedule.betas, 0))
    assert schedule.alphas_cumprod_prev[0] == 1.0
    assert torch.equal(schedule.alphas_cumprod_prev[1:], schedule.alphas_cumprod[:-1])


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_steps_from_each_visited_timestep_to_the_next_with_its_alpha_bar(eta):
    """x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z, with
    abar_prev that of the next visited timestep (1 after the last), eps and x0 of the
    guided prediction; z the generator's draws after x_T."""
    model = stubbed_diffusion(10)
    labels, w = torch.tensor([1, 7]), 2.0
    timesteps = ddpm.ddim_timesteps(10, 4)
    assert timesteps == [10, 7, 4, 1]
    x, kept = ddpm.sample_ddim(model, labels, w, fixed_stream(5), 4, eta,
                               keep_at=set(timesteps) | {0})
    draws = torch.Generator().manual_seed(5)
    assert torch.equal(kept[10], torch.randn(2, 3, 28, 28, generator=draws))
    abar = model.schedule.alphas_cumprod.tolist()
    x0 = guided_x0(labels, w)
    for step, previous in zip(timesteps, timesteps[1:] + [0]):
        a, a_prev = abar[step - 1], abar[previous - 1] if previous else 1.0
        eps = (kept[step] - math.sqrt(a) * x0) / math.sqrt(1 - a)
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        noise = torch.randn(2, 3, 28, 28, generator=draws) if sigma > 0 else 0.0
        expected = (math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma ** 2) * eps
                    + sigma * noise)
        assert torch.allclose(kept[previous], expected, atol=1e-5), (step, previous)
    assert torch.allclose(x, x0.expand_as(x), atol=1e-5)


def test_ancestral_sampling_steps_through_the_posterior_of_the_guided_x0():
    """x_{t-1} = mu~(x0, x_t) + sqrt(beta~_t) z for t = T .. 1, no noise at t = 1, with
    abar_{t-1} = alphas_cumprod[t - 2] (1 at t = 1), written out by hand."""
    T = 10
    model = stubbed_diffusion(T)
    labels, w = torch.tensor([2, 9]), 1.5
    x, kept = ddpm.sample_ddpm(model, labels, w, fixed_stream(4),
                               keep_at=set(range(T + 1)))
    draws = torch.Generator().manual_seed(4)
    assert torch.equal(kept[T], torch.randn(2, 3, 28, 28, generator=draws))
    abar, betas = model.schedule.alphas_cumprod.tolist(), model.schedule.betas.tolist()
    x0 = guided_x0(labels, w)
    for t in range(T, 0, -1):
        a, a_prev, beta = abar[t - 1], abar[t - 2] if t > 1 else 1.0, betas[t - 1]
        mean = (math.sqrt(a_prev) * beta / (1 - a) * x0
                + math.sqrt(1 - beta) * (1 - a_prev) / (1 - a) * kept[t])
        variance = (1 - a_prev) / (1 - a) * beta
        noise = torch.randn(2, 3, 28, 28, generator=draws) if t > 1 else 0.0
        assert torch.allclose(kept[t - 1], mean + math.sqrt(variance) * noise, atol=1e-5), t
    assert torch.allclose(x, x0.expand_as(x), atol=1e-5)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_ddpm_training_warms_up_the_lr_descends_the_networks_loss_and_averages_it(
        tmp_path, monkeypatch, schedule):
    """Step k: Adam over the network alone at lr * min(1, (k + 1) / 500) (times
    (1 + cos(pi k / steps)) / 2 under the cosine schedule), the gradient of
    that step's loss on a batch of digits with their labels; then the EMA used for
    sampling moves toward the network (d = min(decay, (1 + k) / (10 + k)))."""
    monkeypatch.setattr(nets, "UNet", TinyEps)
    skip_course_digits(monkeypatch)
    models = []

    class Recording(ddpm.Diffusion):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.initial, self.losses, self.after = parameters_of(self.network), [], []
            models.append(self)

        def loss(self, x0, labels, rng):
            assert self.network.training and labels_fit(x0, labels)
            loss = super().loss(x0, labels, rng)
            self.losses.append(gradients(loss, self.network.parameters()))
            return loss
    monkeypatch.setattr(ddpm, "Diffusion", Recording)
    settings = ddpm.DDPMSettings(timesteps=20, steps=3, batch_size=4, sample_every=3,
                                 sampling_steps=2, lr=1e-2, ema_decay=0.5, fid_images=0,
                                 amp="off", lr_schedule=schedule)
    steps = []

    def before(optimizer):
        model = models[0]
        k = len(steps)
        assert held(optimizer) == ids(model.network)
        decay = 1 if schedule == "constant" else (1 + math.cos(math.pi * k / 3)) / 2
        assert all(math.isclose(group["lr"], 1e-2 * (k + 1) / 500 * decay)
                   for group in optimizer.param_groups)
        assert_all_close([p.grad for p in model.network.parameters()], model.losses[k],
                         what=f"step {k}")
        steps.append(k)
    with optimiser_hooks(before, lambda optimizer: models[0].after.append(
            parameters_of(models[0].network))):
        ddpm.train(toy_domain(16), None, settings, tmp_path, "cpu", seed=0)
    model = models[0]
    assert steps == [0, 1, 2] and len(model.losses) == 3
    assert_all_close(list(model.ema.parameters()),
                     moving_average(model.initial, model.after, 0.5), what="EMA")


def test_ddpm_guidance_uses_the_ema_network_without_dropout():
    """Sampling with dropout on would give each call (and each image) its own mask."""
    model, _ = tiny_diffusion(dropout=0.5)
    model.ema.train()
    x, t, labels = torch.randn(4, 3, 28, 28), torch.full((4,), 7), torch.arange(4)
    first = model.guided_eps(x, t, labels, 2.0)
    assert torch.equal(first, model.guided_eps(x, t, labels, 2.0)) and not model.ema.training
    assert torch.allclose(first[2:3], model.guided_eps(x[2:3], t[2:3], labels[2:3], 2.0),
                          atol=1e-5)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_samplers_clip_the_predicted_x0_to_the_data_range(sampler):
    """A network whose noise implies x_0 = +-3, outside the data's [-1, 1]: both samplers
    end at x_0 clipped to +-1 (DDIM's last step t -> 0 and DDPM's t = 1 return x^_0)."""
    model, settings = tiny_diffusion(timesteps=10, sampler=sampler, sampling_steps=3,
                                     guidance=0.0)

    class ClaimsThree(nn.Module):
        def forward(self, x, t, labels):
            abar = model.schedule.alphas_cumprod[t - 1].float().view(-1, 1, 1, 1)
            x0 = torch.where(labels.view(-1, 1, 1, 1) % 2 == 0, 3.0, -3.0)
            return (x - abar.sqrt() * x0) / (1 - abar).sqrt()
    model.ema = ClaimsThree()
    images, _ = ddpm.sample(model, settings, torch.tensor([0, 1]), seed=0, stream="grid")
    assert torch.allclose(images[0], torch.ones(3, 28, 28), atol=1e-4)
    assert torch.allclose(images[1], -torch.ones(3, 28, 28), atol=1e-4)


def test_an_unknown_sampler_is_refused():
    model, settings = tiny_diffusion(sampler="euler")
    with pytest.raises(util.UserError, match="unknown --sampler 'euler'"):
        ddpm.sample(model, settings, torch.tensor([0]), seed=0, stream="grid")


@pytest.mark.parametrize("loss_weight, sampler", [("uniform", "ddim"), ("min-snr", "ddpm")])
def test_every_tensor_of_a_ddpm_step_and_its_samplers_is_on_the_models_device(loss_weight,
                                                                                sampler):
    meta = torch.device("meta")
    model, settings = tiny_diffusion(timesteps=10, sampling_steps=3, eta=1.0,
                                     loss_weight=loss_weight, sampler=sampler)
    model = model.to(meta)
    loss = model.loss(torch.zeros(4, 3, 28, 28, device=meta),
                      torch.zeros(4, dtype=torch.long, device=meta), parallel.Random(0, meta))
    loss.backward()
    images, kept = ddpm.sample(model, settings, torch.arange(2), seed=0, stream="grid", keep_at={10, 0})
    assert loss.device == images.device == kept[0].device == meta


# ============================================================================ uda
# Pins what each method's losses see and move, the average and its statistics, each
# epoch's accuracies and the results of the saved average, resume.


def domain_of(images: torch.Tensor) -> str:
    """toy_domain: the source (mnistm) is dark with a bright band, the target inverted."""
    means = images.mean(dim=(1, 2, 3))
    assert bool((means < 0).all()) or bool((means > 0).all()), "a batch mixes domains"
    return "source" if means[0] < 0 else "target"


def stub_uda_networks(method: str) -> "uda.Networks":
    """Networks with one-Linear F, C and D (no batch norm, no dropout) on 4x4 images."""
    nets_ = uda.Networks(method)
    torch.manual_seed(0)
    nets_.features = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 6), nn.Tanh())
    nets_.classifier = nn.Linear(6, 10)
    nets_.domain = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1))
    if method == "adda":
        nets_.target_features = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 6), nn.Tanh())
    return nets_


def two_domains(count=6):
    generator = torch.Generator().manual_seed(2)
    source = torch.randn(count, 3, 4, 4, generator=generator)
    target = torch.randn(count, 3, 4, 4, generator=generator) * 0.5 + 1.0
    labels = torch.randint(0, 10, (count,), generator=generator)
    return source, labels, target


def own_entropy(logits):
    p = logits.softmax(dim=1)
    return -(p * p.log()).sum(dim=1).mean()


class TwoHeads(nn.Module):
    """A stub GTA discriminator: one Linear trunk on the flattened image, a data logit
    and class logits."""

    def __init__(self, pixels: int, classes: int = 10):
        super().__init__()
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(pixels, 5), nn.Tanh())
        self.data, self.classes = nn.Linear(5, 1), nn.Linear(5, classes)

    def forward(self, images):
        features = self.trunk(images)
        return self.data(features).squeeze(1), self.classes(features)


def stub_generator(embedding: int, noise: int, side: int) -> nn.Module:
    """[F(x), one-hot of 11, z] (B, E + 11 + Z, 1, 1) -> image (B, 3, side, side)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(embedding + 11 + noise, 3 * side * side),
                         nn.Tanh(), nn.Unflatten(1, (3, side, side)))


def own_augment_reference(images, matrix, offset, flips, noise, noise_std):
    """French et al.'s augmentation pixel by pixel: output pixel p (x, y) takes the input
    at M (p - c) + c + t, c the centre, bilinearly, outside points clamped to the border;
    then the flip, then noise_std times the image's standard deviation times the noise."""
    count, channels, side, _ = images.shape
    centre = (side - 1) / 2
    moved = torch.zeros_like(images)
    for n in range(count):
        for y in range(side):
            for x in range(side):
                sx, sy = (matrix[n] @ torch.tensor([x - centre, y - centre])
                          + centre + offset[n]).tolist()
                sx, sy = min(max(sx, 0.0), side - 1.0), min(max(sy, 0.0), side - 1.0)
                x0, y0 = min(int(sx), side - 2), min(int(sy), side - 2)
                fx, fy = sx - x0, sy - y0
                moved[n, :, y, x] = ((1 - fx) * (1 - fy) * images[n, :, y0, x0]
                                     + fx * (1 - fy) * images[n, :, y0, x0 + 1]
                                     + (1 - fx) * fy * images[n, :, y0 + 1, x0]
                                     + fx * fy * images[n, :, y0 + 1, x0 + 1])
    moved = torch.where(flips, -moved, moved)
    return moved + noise_std * moved.std(dim=(1, 2, 3), keepdim=True) * noise


def small_uda_networks(monkeypatch):
    """uda.Networks with F = Linear + batch norm on the flattened 28x28 image, C and D one
    Linear each: fast, and F's batch-norm statistics still show whether it was frozen."""
    real_networks = uda.Networks

    def small(method, *args, **kwargs):
        nets_ = real_networks(method, *args, **kwargs)
        torch.manual_seed(0)
        nets_.features = nn.Sequential(nn.Flatten(), nn.Linear(3 * 28 * 28, 8),
                                       nn.BatchNorm1d(8), nn.ReLU())
        nets_.classifier, nets_.domain = nn.Linear(8, 10), nn.Linear(8, 1)
        if nets_.target_features is not None:
            nets_.target_features = copy.deepcopy(nets_.features)
            with torch.no_grad():
                nets_.target_features[1].weight.add_(0.1)  # F_t starts unlike F_s
        if nets_.generator is not None:
            nets_.generator = stub_generator(8, uda.GTA_NOISE, 28)
            nets_.discriminator = TwoHeads(3 * 28 * 28)
        return nets_
    monkeypatch.setattr(uda, "Networks", small)


def record_steps(monkeypatch) -> list:
    """Wrap uda's five step functions: each call appends (name, its arguments by name,
    with "lrs": the optimisers' learning rates, "after": the weights of the encoder (F, or
    F_t in adda_step) and C after the step, and "before": theirs before the first call of
    that step); the first adda_step also keeps copies of F_s, C and F_t as they start."""
    calls = []
    for name in ("classify_step", "dann_step", "adda_step", "gta_step", "self_ensembling_step"):
        real = getattr(uda, name)

        def recording(*args, _real=real, _name=name, **kwargs):
            bound = inspect.signature(_real).bind(*args, **kwargs)
            bound.apply_defaults()
            arguments = dict(bound.arguments)
            if "networks" in arguments:
                arguments["nets_"] = arguments["networks"]
            if _name == "self_ensembling_step":
                arguments["nets_"] = arguments["student"]
                arguments["teacher_weights"] = parameters_of(nn.Sequential(
                    arguments["teacher"].features, arguments["teacher"].classifier))
            if _name == "adda_step" and not any(n == "adda_step" for n, _ in calls):
                arguments["start"] = {part: copy.deepcopy(getattr(arguments["nets_"], part)
                                                          .state_dict())
                                      for part in ("features", "classifier", "target_features")}
            nets_ = arguments["nets_"]
            model = nn.Sequential(nets_.target_features if _name == "adda_step"
                                  else nets_.features, nets_.classifier)
            if not any(n == _name for n, _ in calls):
                arguments["before"] = parameters_of(model)
            arguments["lrs"] = [group["lr"] for optimizer in (
                [arguments["optimizer"]] if "optimizer" in arguments else
                arguments["optimizers"].values()) for group in optimizer.param_groups]
            calls.append((_name, arguments))
            losses = _real(*args, **kwargs)
            arguments["after"] = parameters_of(model)
            return losses
        monkeypatch.setattr(uda, name, recording)
    return calls


def test_dann_schedules_match_their_closed_forms():
    progress = np.linspace(0, 1, 11)
    lambdas = np.array([uda.grl_lambda(p) for p in progress])
    assert np.allclose(lambdas, np.tanh(5 * progress))  # 2 / (1 + e^-10p) - 1 = tanh(5p)
    assert lambdas[0] == 0 and np.isclose(lambdas[-1], 0.9999092, atol=1e-7)
    assert uda.annealed_lr(0.01, 0) == 0.01
    assert np.isclose(uda.annealed_lr(0.01, 1), 0.01 / 11 ** 0.75)


def test_entropy_is_log_k_for_uniform_and_zero_for_certain_predictions():
    assert torch.isclose(uda.entropy(torch.zeros(4, 10)), torch.tensor(np.log(10.0)).float())
    assert uda.entropy(torch.tensor([[50.0, 0.0, 0.0]])) < 1e-12
    p = torch.tensor([0.2, 0.3, 0.5])
    assert torch.isclose(uda.entropy(p.log()[None]), -(p * p.log()).sum())


def test_a_quick_run_on_fewer_images_than_a_batch_works(tmp_path):
    """uda --limit 100 with --batch-size 128 crashed in torch.cat (no full batch)."""
    settings = tiny_uda(src="mnistm", tgt="usps", batch_size=64, limit=12, tsne_points=0)
    rows = run.uda_methods(settings, ("dann",), toy_load, tmp_path, "cpu", seed=0)
    assert rows["dann"]["total"] == 12
    source, target = uda.paired_indices(12, 5, 64, parallel.Random(0))
    assert source.shape == target.shape == (1, 12)
    assert sorted(source[0].tolist()) == list(range(12)) and set(target[0].tolist()) == set(range(5))


@pytest.mark.parametrize("method", ["adda"])  # on the toy data, DANN's two differ in 0-1 images
def test_uda_reports_and_predicts_with_the_weight_average(tmp_path, method):
    settings = tiny_uda(src="mnistm", tgt="usps", method=method, tsne_points=0)
    domains = uda.load_domains(settings, toy_load)
    uda.train(domains, settings, tmp_path, "cpu", seed=0)
    state = util.load_checkpoint(tmp_path / "checkpoint.pt")

    def predictions(key):
        nets_ = uda.Networks(method)
        nets_.load_state_dict(state[key])
        return classifier.predict(torch.nn.Sequential(nets_.target_encoder(),
                                                      nets_.classifier), domains.target_test)
    averaged = predictions("average")
    assert not torch.equal(averaged, predictions("networks"))  # the last weights differ
    saved = [int(line.split(",")[1]) for line in
             (tmp_path / "predictions.csv").read_text().splitlines()[1:]]
    assert saved == averaged.tolist()
    model, _ = uda.load_for_prediction(tmp_path / "checkpoint.pt", "cpu")
    assert torch.equal(classifier.predict(model, domains.target_test), averaged)


@pytest.mark.parametrize("method, encoder, domains_seen, frozen", [
    ("source", "features", ["source"], False),
    ("dann", "features", ["source", "target"], False),
    ("adda", "target_features", ["target"], False),
    ("adda", "features", ["source"], True),  # F_s: frozen at its pre-trained average
    ("gta", "features", ["source", "target"], False),
    ("self-ensembling", "features", ["target"], False)])  # the teacher's target batches
def test_weight_average_has_batch_norm_statistics_of_its_own_weights(
        tmp_path, method, encoder, domains_seen, frozen):
    settings = tiny_uda(src="mnistm", tgt="usps", method=method, tsne_points=0)
    domains = uda.load_domains(settings, toy_load)
    uda.train(domains, settings, tmp_path, "cpu", seed=0)
    state = util.load_checkpoint(tmp_path / "checkpoint.pt")
    average, last = uda.Networks(method), uda.Networks(method)
    average.load_state_dict(state["average"])
    last.load_state_dict(state["networks"])
    first = 1 if method == "self-ensembling" else 0  # after self-ensembling's Standardise
    before, conv, norm = getattr(average, encoder)[:first], *getattr(average, encoder)[
        first:first + 2]
    # refresh_statistics takes full batches of 8 alone: of 45 images 40, of 38 images 32
    images = torch.cat([getattr(domains, f"{name}_train").images()[:len(getattr(
        domains, f"{name}_train")) // 8 * 8] for name in domains_seen])
    with torch.no_grad():  # the first batch norm's mean: of the averaged convolution's output
        expected = conv(before(images)).mean(dim=(0, 2, 3))
    assert torch.allclose(norm.running_mean, expected, atol=1e-5)
    assert torch.allclose(getattr(last, encoder)[first + 1].running_mean, expected,
                          atol=1e-5) == frozen


def test_adda_adaptation_freezes_source_nets_and_drops_no_target_features():
    nets_ = uda.Networks("adda")
    uda.set_adaptation_modes(nets_)
    assert not nets_.features.training and not nets_.classifier.training
    target = nets_.target_features
    norms = [m for m in target.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.training for m in norms)  # F_t: batch statistics of the target
    x = torch.randn(8, 3, 28, 28)
    torch.manual_seed(0)
    first = target(x)
    torch.manual_seed(1)
    assert torch.equal(first, target(x))  # no dropout mask the discriminator could see
    nets_.train()  # the other methods' mode
    torch.manual_seed(1)
    assert not torch.equal(nets_.features(x), nets_.features(x))  # dropout on in training


def test_dann_step_reverses_the_domain_gradient_with_the_given_strength():
    """F's gradient of the DANN step = grad(class loss) - reversal * grad(domain loss)."""
    generator = torch.Generator().manual_seed(1)
    source, target = (torch.randn(6, 3, 28, 28, generator=generator) for _ in "st")
    labels, is_source = torch.arange(6), torch.cat([torch.ones(6), torch.zeros(6)])

    def fresh_nets():
        torch.manual_seed(0)
        return uda.Networks("dann").eval()  # eval: both passes see the same network

    def step_gradient(reversal):
        nets_ = fresh_nets()
        optimizer = torch.optim.SGD(nets_.parameters(), lr=0.0)
        uda.dann_step(nets_, source, labels, target, optimizer, reversal)
        return nets_.features[0].weight.grad

    nets_ = fresh_nets()  # the domain loss's own gradient, by autograd, without the GRL
    logits = nets_.domain(torch.cat([nets_.features(source), nets_.features(target)]))
    domain_loss = (F.binary_cross_entropy_with_logits(logits[:6, 0], is_source[:6])
                   + F.binary_cross_entropy_with_logits(logits[6:, 0], is_source[6:]))
    domain_gradient, = torch.autograd.grad(domain_loss, nets_.features[0].weight)
    class_gradient = step_gradient(0.0)
    assert domain_gradient.abs().max() > 1e-3 * class_gradient.abs().max()
    assert torch.allclose(step_gradient(0.7), class_gradient - 0.7 * domain_gradient,
                          atol=1e-6)


def test_dann_step_normalises_each_domain_with_its_own_batch_statistics():
    """Source, then target through F: the running mean of F's first batch norm takes two
    momentum updates, m = 0.9 (0.1 mean_source) + 0.1 mean_target."""
    torch.manual_seed(0)
    nets_ = uda.Networks("dann")
    source, target = torch.randn(4, 3, 28, 28), torch.randn(4, 3, 28, 28) + 1.0
    with torch.no_grad():
        source_mean, target_mean = (nets_.features[0](x).mean(dim=(0, 2, 3))
                                    for x in (source, target))
    optimizer = torch.optim.SGD(nets_.parameters(), lr=0.0)
    uda.dann_step(nets_, source, torch.arange(4), target, optimizer, reversal=1.0)
    assert torch.allclose(nets_.features[1].running_mean,
                          0.9 * 0.1 * source_mean + 0.1 * target_mean, atol=1e-6)


def test_gta_discriminator_sees_real_generated_source_and_generated_target_apart():
    """D's batch norm normalises each batch with its own statistics: the real source,
    the source's and the target's generated images go through D one batch at a time,
    three times in D's step and twice (the generated ones) against the updated D."""
    torch.manual_seed(0)
    nets_ = uda.Networks("gta")
    sizes = []
    nets_.discriminator.trunk.register_forward_hook(
        lambda module, inputs, output: sizes.append(len(inputs[0])))
    source, target = torch.randn(4, 3, 28, 28), torch.randn(4, 3, 28, 28)
    optimizers = {name: torch.optim.SGD(module.parameters(), lr=0.0) for name, module in (
        ("discriminator", nets_.discriminator), ("generator", nets_.generator),
        ("embedding", nn.Sequential(nets_.features, nets_.classifier)))}
    uda.gta_step(nets_, source, torch.arange(4), target,
                 torch.randn(8, uda.GTA_NOISE), optimizers, 0.1, 0.3)
    assert sizes == [4] * 5


@pytest.mark.parametrize("method", ["dann", "adda", "gta", "self-ensembling"])
def test_resumed_uda_run_equals_an_uninterrupted_one(tmp_path, monkeypatch, method):
    # a low confidence threshold, so that self-ensembling's consistency terms take part
    settings = tiny_uda(src="mnistm", tgt="usps", method=method, epochs=2, tsne_points=0,
                        confidence=0.2)
    domains = uda.load_domains(settings, toy_load)
    uda.train(domains, settings, tmp_path / "whole", "cpu", seed=1)

    def interrupt(*args, **kwargs):  # stop right after the first epoch's checkpoint
        raise KeyboardInterrupt
    with monkeypatch.context() as patch:
        patch.setattr(reports, "uda_curves", interrupt)
        with pytest.raises(KeyboardInterrupt):
            uda.train(domains, settings, tmp_path / "parts", "cpu", seed=1)
    uda.train(domains, dataclasses.replace(settings, resume=True), tmp_path / "parts",
              "cpu", seed=1)
    whole = util.load_checkpoint(tmp_path / "whole" / "checkpoint.pt")
    parts = util.load_checkpoint(tmp_path / "parts" / "checkpoint.pt")
    assert parts["step"] == whole["step"] == (5 if method == "adda" else 10)  # 40 / 8 a epoch
    for key in ("networks", "average"):
        for name, tensor in whole[key].items():
            assert torch.equal(tensor, parts[key][name]), (key, name)


def test_adda_started_from_the_source_only_run_equals_adda_from_scratch(tmp_path):
    """ADDA's pre-training repeats the source-only run step for step (annealing included),
    so `--method all` may start ADDA from that run's checkpoint."""
    settings = tiny_uda(src="mnistm", tgt="usps", epochs=2, anneal=True, tsne_points=0)
    domains = uda.load_domains(settings, toy_load)
    uda.train(domains, dataclasses.replace(settings, method="source"), tmp_path / "source", "cpu", 3)
    adda = dataclasses.replace(settings, method="adda")
    scratch = uda.train(domains, adda, tmp_path / "scratch", "cpu", 3)
    reused = uda.train(domains, adda, tmp_path / "reused", "cpu", 3,
                       pretrained=tmp_path / "source" / "checkpoint.pt")
    assert reused["target_accuracy"] == scratch["target_accuracy"]
    whole, started = (util.load_checkpoint(tmp_path / name / "checkpoint.pt")
                      for name in ("scratch", "reused"))
    assert whole["history"] == started["history"] and started["step"] == 5  # adaptation
    for key in ("networks", "average"):
        for name, tensor in whole[key].items():
            assert torch.equal(tensor, started[key][name]), (key, name)


def test_classify_step_descends_the_cross_entropy_of_the_images_and_labels_given():
    nets_ = stub_uda_networks("source")
    source, labels, _ = two_domains()
    params = [*nets_.features.parameters(), *nets_.classifier.parameters()]
    optimizer = recording_sgd(params, 0.0)
    uda.classify_step(nets_, source, labels, optimizer)
    loss = F.cross_entropy(nets_.classifier(nets_.features(source)), labels)
    assert len(optimizer.seen) == 1
    assert_all_close(optimizer.seen[0], gradients(loss, params))


@pytest.mark.parametrize("entropy_weight", [0.0, 0.5])
def test_dann_step_gradients_are_class_minus_lambda_domain_plus_weighted_target_entropy(
        entropy_weight):
    """F gets d/dF [CE(C(F(x_s)), y_s) - lambda L_dom + w H(C(F(x_t)))], C the class and
    entropy terms, D d/dD L_dom with L_dom = mean_s BCE(D(F(x_s)), 1) + mean_t
    BCE(D(F(x_t)), 0). Catches: the class loss on target images, the entropy on source
    logits or unweighted, the reversal strength not applied, the domain labels swapped,
    one mean over the joint batch (half the paper's L_dom, so half its lambda)."""
    nets_ = stub_uda_networks("dann")
    source, labels, target = two_domains()
    reversal = 0.37
    F_, C, D = nets_.features, nets_.classifier, nets_.domain
    optimizer = recording_sgd([*F_.parameters(), *C.parameters(), *D.parameters()], 0.0)
    uda.dann_step(nets_, source, labels, target, optimizer, reversal, entropy_weight)

    source_features, target_features = F_(source), F_(target)
    class_loss = F.cross_entropy(C(source_features), labels)
    # the paper's L_dom: a mean over each domain, summed (not one mean over both)
    domain_loss = (F.binary_cross_entropy_with_logits(D(source_features).squeeze(1),
                                                      torch.ones(6))
                   + F.binary_cross_entropy_with_logits(D(target_features).squeeze(1),
                                                        torch.zeros(6)))
    entropy = own_entropy(C(target_features))

    def grad(loss, module):
        return gradients(loss, module.parameters())
    expected_F = [c - reversal * d + entropy_weight * e for c, d, e in
                  zip(grad(class_loss, F_), grad(domain_loss, F_), grad(entropy, F_))]
    expected_C = [c + entropy_weight * e for c, e in zip(grad(class_loss, C), grad(entropy, C))]
    assert len(optimizer.seen) == 1
    assert_all_close(optimizer.seen[0], expected_F + expected_C + grad(domain_loss, D))


def test_adda_step_trains_d_on_source_1_target_0_then_f_t_toward_1_against_the_new_d():
    """D descends BCE(D(F_s(x_s)), 1) + BCE(D(F_t(x_t)), 0) (a mean over each batch);
    then F_t alone descends BCE(D(F_t(x_t)), 1) scored by the updated D; F_s and C do not
    move. Catches swapped domain labels, F_t trained toward 0, F_s or C stepped, D stepped
    twice."""
    nets_ = stub_uda_networks("adda")
    source, _, target = two_domains()
    Fs, Ft, D, C = nets_.features, nets_.target_features, nets_.domain, nets_.classifier
    Ft0, D0 = copy.deepcopy(Ft), copy.deepcopy(D)
    frozen = parameters_of(Fs) + parameters_of(C)
    lr_d, lr_t = 0.5, 0.3
    optimizers = {"main": recording_sgd([*Fs.parameters(), *C.parameters()], 0.3),
                  "domain": recording_sgd(D.parameters(), lr_d),
                  "target": recording_sgd(Ft.parameters(), lr_t)}
    losses = uda.adda_step(nets_, source, target, optimizers)

    domain_loss = (F.binary_cross_entropy_with_logits(D0(Fs(source)).squeeze(1), torch.ones(6))
                   + F.binary_cross_entropy_with_logits(D0(Ft0(target)).squeeze(1),
                                                        torch.zeros(6)))
    d_gradient = gradients(domain_loss, D0.parameters())
    D1 = copy.deepcopy(D0)
    with torch.no_grad():
        for p, g in zip(D1.parameters(), d_gradient):
            p.sub_(lr_d * g)
    encoder_loss = F.binary_cross_entropy_with_logits(D1(Ft0(target)).squeeze(1), torch.ones(6))
    t_gradient = gradients(encoder_loss, Ft0.parameters())

    assert optimizers["main"].seen == [] and len(optimizers["domain"].seen) == 1
    assert len(optimizers["target"].seen) == 1
    assert_all_close(optimizers["domain"].seen[0], d_gradient, what="D's gradient")
    assert_all_close(optimizers["target"].seen[0], t_gradient, what="F_t's gradient")
    assert_all_close(list(D.parameters()), list(D1.parameters()), what="D after the step")
    assert_all_close(list(Ft.parameters()), [p - lr_t * g for p, g in
                                             zip(Ft0.parameters(), t_gradient)], what="F_t")
    assert_all_close(parameters_of(Fs) + parameters_of(C), frozen, atol=0, what="frozen")
    assert math.isclose(float(losses["domain"].detach()), domain_loss.item(), rel_tol=1e-5)
    assert math.isclose(float(losses["encoder"].detach()), encoder_loss.item(), rel_tol=1e-5)


def test_gta_step_trains_d_then_g_and_f_c_against_the_updated_d():
    """D descends BCE(D_data(x_s), 1) + CE(D_cls(x_s), y_s) + BCE(D_data(g_s), 0) +
    BCE(D_data(g_t), 0); then, with the updated D, G descends CE(D_cls(g_s), y_s) +
    BCE(D_data(g_s), 1), and F and C descend CE(C(F(x_s)), y_s) + a CE(D_cls(g_s), y_s) +
    a alpha BCE(D_data(g_t), 1), where g_s = G(F(x_s), onehot(y_s), z_s) and g_t =
    G(F(x_t), onehot(K), z_t). Catches: target images given their own or no "unknown"
    label, generated images counted as real for D, D's class head trained on generated
    images, G or F scored by the old D, F's target term toward "fake", a and alpha
    swapped or dropped, D's or G's gradient leaking into another player's step."""
    nets_ = stub_uda_networks("gta")
    torch.manual_seed(1)
    nets_.generator, nets_.discriminator = stub_generator(6, 3, 4), TwoHeads(3 * 4 * 4)
    source, labels, target = two_domains()
    noise = torch.randn(12, 3)
    F_, C, G, D = nets_.features, nets_.classifier, nets_.generator, nets_.discriminator
    F0, C0, G0, D0 = (copy.deepcopy(m) for m in (F_, C, G, D))
    lr_d, a, alpha = 0.5, 0.1, 0.3
    optimizers = {"discriminator": recording_sgd(D.parameters(), lr_d),
                  "generator": recording_sgd(G.parameters(), 0.2),
                  "embedding": recording_sgd([*F_.parameters(), *C.parameters()], 0.3)}
    losses = uda.gta_step(nets_, source, labels, target, noise,
                          optimizers, a, alpha)

    def generate(features, condition, z):
        one_hot = torch.zeros(len(features), 11)
        one_hot[torch.arange(len(features)), condition] = 1.0
        return G0(torch.cat([features, one_hot, z], dim=1)[..., None, None])
    fs, ft = F0(source), F0(target)
    gs, gt = generate(fs, labels, noise[:6]), generate(ft, torch.full((6,), 10), noise[6:])

    def bce(logits, value):
        return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, value))
    d_loss = (bce(D0(source)[0], 1) + F.cross_entropy(D0(source)[1], labels)
              + bce(D0(gs.detach())[0], 0) + bce(D0(gt.detach())[0], 0))
    d_gradient = gradients(d_loss, D0.parameters())
    D1 = copy.deepcopy(D0)
    with torch.no_grad():
        for p, g in zip(D1.parameters(), d_gradient):
            p.sub_(lr_d * g)
    g_loss = F.cross_entropy(D1(gs)[1], labels) + bce(D1(gs)[0], 1)
    class_loss = F.cross_entropy(C0(fs), labels)
    f_loss = class_loss + a * F.cross_entropy(D1(gs)[1], labels) + a * alpha * bce(D1(gt)[0], 1)

    assert [len(o.seen) for o in optimizers.values()] == [1, 1, 1]
    assert_all_close(optimizers["discriminator"].seen[0], d_gradient, what="D")
    assert_all_close(optimizers["generator"].seen[0], gradients(g_loss, G0.parameters()),
                     what="G")
    assert_all_close(optimizers["embedding"].seen[0],
                     gradients(f_loss, [*F0.parameters(), *C0.parameters()]), what="F, C")
    assert_all_close(list(D.parameters()), list(D1.parameters()), what="D after the step")
    for name, value in (("discriminator", d_loss), ("generator", g_loss),
                        ("embedding", f_loss), ("class", class_loss)):
        assert math.isclose(float(losses[name].detach()), value.item(), rel_tol=1e-5), name


def test_self_ensembling_step_matches_the_papers_loss_on_the_augmentations_it_names(
        monkeypatch):
    """The student descends CE(S(a_1(x_s)), y_s) + w [mean_t m_t |S(a_2(x_t)) -
    T(a_3(x_t))|^2 / K + b mean(m) sum_k BCE(mean_t S(a_2(x_t))_k, 1/K)] on softmax
    outputs, m_t = [max_k T(a_3(x_t))_k > threshold]; the teacher T learns nothing in the
    step. Catches: the mask taken from the student, no mask, the teacher on the student's
    augmentation (or on the source), a gradient into the teacher, the class balance
    unweighted by the confident share or against another target, w or b dropped."""
    student, teacher = stub_uda_networks("self-ensembling"), stub_uda_networks("source")
    with torch.no_grad():  # the teacher: other weights, larger logits (some confident)
        for p in teacher.parameters():
            p.mul_(1.3).add_(0.05)
        teacher.classifier.weight.mul_(40.0)
    source, labels, target = two_domains(8)
    shifts = iter([0.3, -0.2, 0.1])  # a_1, a_2, a_3: recognisable by their shift

    def recorded_augment(images, rng):
        return images + next(shifts)
    monkeypatch.setattr(uda, "augment", recorded_augment)
    S0, T0 = copy.deepcopy(student), copy.deepcopy(teacher)

    def predict(networks, images):
        return networks.classifier(networks.features(images)).softmax(dim=1)
    teacher_probs = predict(T0, target + 0.1).detach()
    threshold = float(teacher_probs.max(dim=1).values.median())
    mask = (teacher_probs.max(dim=1).values > threshold).float()
    assert 0 < mask.sum() < len(mask)
    w, b = 3.0, 0.5
    optimizer = recording_sgd(student.parameters(), 0.1)
    losses = uda.self_ensembling_step(student, teacher, source, labels, target, optimizer,
                                      parallel.Random(0), w, threshold, b)

    class_loss = F.cross_entropy(S0.classifier(S0.features(source + 0.3)), labels)
    student_probs = predict(S0, target - 0.2)
    consistency = (((student_probs - teacher_probs) ** 2).mean(dim=1) * mask).mean()
    mean_probs = student_probs.mean(dim=0)
    balance = -(0.1 * mean_probs.log() + 0.9 * (1 - mean_probs).log()).sum() * mask.mean()
    loss = class_loss + w * (consistency + b * balance)
    assert len(optimizer.seen) == 1
    assert_all_close(optimizer.seen[0], gradients(loss, S0.parameters()), what="student")
    assert_all_close(list(teacher.parameters()), list(T0.parameters()), atol=0, what="teacher")
    assert all(p.grad is None for p in teacher.parameters())  # no gradient reaches T
    for name, value in (("class", class_loss), ("consistency", consistency),
                        ("balance", balance), ("confident", mask.mean())):
        assert math.isclose(float(losses[name].detach()), value.item(), rel_tol=1e-5), name


def test_augment_deforms_shifts_flips_and_noises_each_image_by_its_own_draw():
    """Against a pixel-by-pixel bilinear reference, with the random numbers drawn in the
    same order: the 2x2 deformation, the shift in pixels (not in affine_grid's [-1, 1]
    units), the flip of half the images, the noise in image standard deviations."""
    images = torch.rand(4, 3, 7, 7, generator=torch.Generator().manual_seed(3)) * 2 - 1
    augmented = uda.augment(images, parallel.Random(5), shift=2.0, deform=0.1, noise=0.1)
    torch.manual_seed(5)
    matrix = torch.eye(2) + 0.1 * torch.randn(4, 2, 2)
    offset = 2.0 * (2 * torch.rand(4, 2) - 1)
    flips = torch.rand(4, 1, 1, 1) < 0.5
    noise = torch.randn(4, 3, 7, 7)
    expected = own_augment_reference(images, matrix, offset, flips, noise, 0.1)
    assert torch.allclose(augmented, expected, atol=1e-5), (augmented - expected).abs().max()
    assert 0 < int(flips.sum()) < 4


def test_gta_networks_have_the_shapes_their_losses_need():
    nets_ = uda.Networks("gta")
    features = torch.randn(5, 800)
    condition = F.one_hot(torch.arange(5), 11).float()
    images = nets_.generator(torch.cat([features, condition, torch.randn(5, uda.GTA_NOISE)],
                                       dim=1)[..., None, None])
    assert images.shape == (5, 3, 28, 28) and images.abs().max() <= 1
    data_logits, class_logits = nets_.discriminator(images)
    assert data_logits.shape == (5,) and class_logits.shape == (5, 10)


@pytest.mark.parametrize("method", ["source", "target", "dann", "dann-ent", "adda", "gta",
                                    "self-ensembling"])
def test_each_uda_method_steps_on_the_domains_labels_and_strengths_it_names(
        tmp_path, monkeypatch, method):
    """Source-only and ADDA's pre-training classify source images with their labels,
    target-only target images with theirs, with one optimiser over F and C; DANN gets
    source images and labels and target images, lambda = 2 / (1 + exp(-10 p)) - 1 at
    p = step / steps, the entropy weight only as DANN + entropy, one optimiser over F, C
    and D; ADDA adapts on source and target batches, D and F_t each with its own Adam
    (adda_lr, betas (0.5, 0.999)) and F_s and C in neither; GTA gets source images and
    labels, target images and one z a row, and three Adams (betas (0.8, 0.999)): D's
    and F and C's at gta_lr / (1 + 1e-4 t), G's at gta_lr; self-ensembling gets source
    images and labels and target images, one optimiser over F and C at a constant rate,
    its weights, and a teacher that is the weight average of the steps before."""
    small_uda_networks(monkeypatch)
    calls = record_steps(monkeypatch)
    settings = tiny_uda(src="mnistm", tgt="usps", method=method, limit=16, epochs=2,
                        entropy_weight=0.3, adda_lr=7e-4, gta_lr=3e-4, adversarial_weight=0.2,
                        target_weight=0.4, consistency_weight=2.0, confidence=0.9,
                        balance_weight=0.01, tsne_points=0)
    uda.train(uda.load_domains(settings, toy_load), settings, tmp_path, "cpu", seed=0)
    steps = 2 * 2  # 16 images a domain, batches of 8, 2 epochs
    names = [name for name, _ in calls]
    if method == "adda":
        assert names == ["classify_step"] * steps + ["adda_step"] * (steps // 2)
    else:
        assert names == [{"source": "classify_step", "target": "classify_step",
                          "gta": "gta_step", "self-ensembling": "self_ensembling_step"}.get(
            method, "dann_step")] * steps
    for index, (name, arguments) in enumerate(calls):
        nets_ = arguments["nets_"]
        if name == "classify_step":
            assert domain_of(arguments["images"]) == ("target" if method == "target"
                                                      else "source")
            assert labels_fit(arguments["images"], arguments["labels"])
            assert held(arguments["optimizer"]) == ids(nets_.features, nets_.classifier)
        elif name == "dann_step":
            assert domain_of(arguments["source"]) == "source"
            assert domain_of(arguments["target"]) == "target"
            assert labels_fit(arguments["source"], arguments["labels"])
            assert math.isclose(arguments["reversal"], math.tanh(5 * index / steps),
                                abs_tol=1e-12)  # 2 / (1 + e^-10p) - 1 = tanh(5p)
            assert arguments["entropy_weight"] == (0.3 if method == "dann-ent" else 0.0)
            assert held(arguments["optimizer"]) == ids(nets_.features, nets_.classifier,
                                                        nets_.domain)
        elif name == "gta_step":
            assert domain_of(arguments["source"]) == "source"
            assert domain_of(arguments["target"]) == "target"
            assert labels_fit(arguments["source"], arguments["labels"])
            assert arguments["noise"].shape == (16, uda.GTA_NOISE)
            assert (arguments["adversarial_weight"], arguments["target_weight"]) == (0.2, 0.4)
            optimizers = arguments["optimizers"]
            assert held(optimizers["discriminator"]) == ids(nets_.discriminator)
            assert held(optimizers["generator"]) == ids(nets_.generator)
            assert held(optimizers["embedding"]) == ids(nets_.features, nets_.classifier)
            decayed = 3e-4 / (1 + 1e-4 * index)  # D's, G's, then F and C's rate at the step
            assert np.allclose(arguments["lrs"], [decayed, 3e-4, decayed], rtol=1e-12, atol=0)
            assert all(tuple(group["betas"]) == (0.8, 0.999) for optimizer in optimizers.values()
                       for group in optimizer.param_groups)
        elif name == "self_ensembling_step":
            assert domain_of(arguments["source"]) == "source"
            assert domain_of(arguments["target"]) == "target"
            assert labels_fit(arguments["source"], arguments["labels"])
            assert held(arguments["optimizer"]) == ids(nets_.features, nets_.classifier)
            assert (arguments["consistency_weight"], arguments["confidence"],
                    arguments["balance_weight"]) == (2.0, 0.9, 0.01)
            assert arguments["teacher"] is not nets_
            assert_all_close(arguments["teacher_weights"], moving_average(
                calls[0][1]["before"], [a["after"] for _, a in calls[:index]],
                settings.ema_decay), what="teacher")
        else:
            assert domain_of(arguments["source"]) == "source"
            assert domain_of(arguments["target"]) == "target"
            optimizers = arguments["optimizers"]
            assert held(optimizers["domain"]) == ids(nets_.domain)
            assert held(optimizers["target"]) == ids(nets_.target_features)
            frozen = ids(nets_.features, nets_.classifier)
            assert not any(held(optimizer) & frozen for optimizer in optimizers.values())
            for part in ("domain", "target"):
                for group in optimizers[part].param_groups:
                    assert group["lr"] == 7e-4 and tuple(group["betas"]) == (0.5, 0.999)
        if name == "self_ensembling_step":  # the paper's constant rate
            assert arguments["lrs"] == [settings.lr]
        elif name not in ("adda_step", "gta_step"):  # DANN's annealing, lr / (1 + 10 p)^0.75
            p = index / steps
            assert all(math.isclose(lr, settings.lr / (1 + 10 * p) ** 0.75, rel_tol=1e-9)
                       for lr in arguments["lrs"])
    # what is evaluated and saved: the moving average of the encoder and C over the steps
    # of the (last) phase, for ADDA its adaptation
    last = [arguments for name, arguments in calls if name == calls[-1][0]]
    averaged, _ = uda.load_for_prediction(tmp_path / "checkpoint.pt", "cpu")
    assert_all_close(list(averaged.parameters()), moving_average(
        last[0]["before"], [arguments["after"] for arguments in last], settings.ema_decay),
        what="weight average")


@pytest.mark.parametrize("method", ["source", "dann", "adda", "gta", "self-ensembling",
                                    "target"])
def test_each_epochs_accuracies_and_the_results_are_the_averages_on_the_test_splits(
        tmp_path, monkeypatch, method):
    """After each epoch: the weight average (as saved then), in eval mode, classifies the
    target test split through its target encoder (ADDA's F_t, else F) and the source test
    split through F; computed here from the saved weights and compared with the curves;
    results.json, predictions.csv and the t-SNE's inputs are those of the last average.
    The four splits differ in size and labels, and the test splits are large, so a wrong
    split, network or set of weights does not give the same accuracy by chance."""
    small_uda_networks(monkeypatch)
    states = saved_states(monkeypatch, tmp_path)
    embedded, coloured = [], []
    monkeypatch.setattr(tsne, "pca", lambda features, dims: embedded.append(features)
                        or features[:, :2])
    monkeypatch.setattr(tsne, "tsne", lambda points, **kwargs: points)
    monkeypatch.setattr(plots, "scatter_plot", lambda points, labels, path, **kwargs:
                        coloured.append((Path(path).name, labels)))
    domains = uda.Domains(toy_domain(45), toy_domain(38, seed=1, inverted=True),
                          toy_domain(83, seed=2), toy_domain(97, seed=3, inverted=True))
    settings = tiny_uda(src="mnistm", tgt="usps", method=method, epochs=2, adapt_epochs=2,
                        tsne_points=30)
    results = uda.train(domains, settings, tmp_path, "cpu", seed=0)
    assert len(states) == 2  # one a epoch (ADDA: of its adaptation)
    for epoch, state in enumerate(states):
        average = uda.Networks(method)
        average.load_state_dict(state["average"])
        encoder = average.target_features if method == "adda" else average.features
        target, predicted = own_accuracy(nn.Sequential(encoder, average.classifier),
                                         domains.target_test)
        source, _ = own_accuracy(nn.Sequential(average.features, average.classifier),
                                 domains.source_test)
        history = state["history"]
        assert len(history["step"]) == epoch + 1
        assert history["target_accuracy"][-1] == pytest.approx(target, abs=1e-12), epoch
        assert history["source_accuracy"][-1] == pytest.approx(source, abs=1e-12), epoch
    last = states[-1]
    assert results == json.loads((tmp_path / "results.json").read_text())
    assert results["target_accuracy"] == pytest.approx(target, abs=1e-12)
    assert (results["correct"], results["total"]) == (int((predicted == domains.target_test
                                                           .labels).sum()), 97)
    assert results["source_test_accuracy"] == pytest.approx(source, abs=1e-12)
    assert results["epochs"] == 2 and results["train_seconds"] == last["seconds"]
    if method == "adda":  # and the source-only pre-training's, apart
        assert results["pretrain_seconds"] == util.load_checkpoint(
            tmp_path / "pretrain" / "checkpoint.pt")["seconds"]
    rows = (tmp_path / "predictions.csv").read_text().splitlines()[1:]
    assert rows == [f"{name},{int(label)}" for name, label in
                    zip(domains.target_test.names, predicted)]
    with torch.no_grad():  # t-SNE: the first 30 test images of each domain, in eval mode
        features = torch.cat([average.features.eval()(domains.source_test.images()[:30]),
                              encoder.eval()(domains.target_test.images()[:30])])
    assert len(embedded) == 1 and np.allclose(embedded[0], features.numpy(), atol=1e-5)
    assert coloured[0][0] == "tsne_domain.png" and coloured[0][1].tolist() == [0] * 30 + [1] * 30
    assert coloured[1][0] == "tsne_class.png" and coloured[1][1].tolist() == (
        domains.source_test.labels[:30].tolist() + domains.target_test.labels[:30].tolist())


def test_adda_adapts_f_t_from_a_copy_of_the_pretrained_f_s_while_f_s_and_c_stay_frozen(
        tmp_path, monkeypatch):
    """At the first adversarial step F_t equals F_s, and F_s and C are the averaged weights
    the source-only run reports; F_s and C are frozen (they require no gradient, and after
    adaptation their weights and batch-norm statistics are unchanged); F_t has moved."""
    small_uda_networks(monkeypatch)
    settings = tiny_uda(src="mnistm", tgt="usps", limit=16, epochs=1, adapt_epochs=1,
                        tsne_points=0)
    domains = uda.load_domains(settings, toy_load)
    uda.train(domains, dataclasses.replace(settings, method="source"), tmp_path / "source",
              "cpu", seed=0)
    source_model, _ = uda.load_for_prediction(tmp_path / "source" / "checkpoint.pt", "cpu")
    calls = record_steps(monkeypatch)
    uda.train(domains, dataclasses.replace(settings, method="adda"), tmp_path / "adda",
              "cpu", seed=0, pretrained=tmp_path / "source" / "checkpoint.pt")
    adversarial = [arguments for name, arguments in calls if name == "adda_step"]
    assert adversarial
    start, nets_ = adversarial[0]["start"], adversarial[0]["nets_"]

    def same(first: dict, second: dict, atol=0.0):
        assert first.keys() == second.keys()
        return all(torch.allclose(first[k].float(), second[k].float(), atol=atol)
                   for k in first)
    assert same(start["target_features"], start["features"])
    assert same(start["features"], source_model[0].state_dict(), atol=1e-6)
    assert same(start["classifier"], source_model[1].state_dict(), atol=1e-6)
    assert not any(p.requires_grad for p in [*nets_.features.parameters(),
                                             *nets_.classifier.parameters()])
    assert same(nets_.features.state_dict(), start["features"])
    assert same(nets_.classifier.state_dict(), start["classifier"])
    assert not same(nets_.target_features.state_dict(), start["target_features"])


@pytest.mark.parametrize("method", ["dann", "self-ensembling"])
def test_uda_refreshes_the_averages_statistics_before_each_evaluation(tmp_path, monkeypatch,
                                                                      method):
    """At each epoch's end the average (self-ensembling's teacher) gets batch-norm
    statistics of its own weights before it is evaluated and saved."""
    calls = []
    for module, name in ((uda, "refresh_statistics"), (uda, "predict"),
                         (training.Run, "save_checkpoint")):
        original = getattr(module, name)

        def recorded(*args, original=original, name=name, **kwargs):
            calls.append(name)
            return original(*args, **kwargs)
        monkeypatch.setattr(module, name, recorded)
    settings = tiny_uda(src="mnistm", tgt="usps", method=method, epochs=2, tsne_points=0)
    uda.train(uda.load_domains(settings, toy_load), settings, tmp_path, "cpu", seed=0)
    epoch = ["refresh_statistics", "predict", "predict", "save_checkpoint"]
    assert calls == epoch * 2 + ["predict"]  # and the final predictions


@pytest.mark.parametrize("method", ["source", "dann", "adda", "gta", "self-ensembling"])
def test_every_tensor_of_a_uda_step_is_on_the_networks_device(method):
    meta = torch.device("meta")
    networks = uda.Networks(method).to(meta)
    source, labels = torch.zeros(4, 3, 28, 28, device=meta), torch.zeros(4, dtype=torch.long,
                                                                         device=meta)
    rng, settings = parallel.Random(0, meta), uda.UDASettings(method=method)
    optimizers = (uda.make_optimizers(networks, settings) if method != "adda" else
                  {"domain": torch.optim.Adam(networks.domain.parameters()),
                   "target": torch.optim.Adam(networks.target_features.parameters())})
    step = {"source": lambda: uda.classify_step(networks, source, labels,
                                                optimizers["optimizer"]),
            "dann": lambda: uda.dann_step(networks, source, labels, source,
                                          optimizers["optimizer"], 0.5, 0.1),
            "adda": lambda: uda.adda_step(networks, source, source, optimizers),
            "gta": lambda: uda.gta_step(networks, source, labels,
                                        source, rng.randn(8, uda.GTA_NOISE), optimizers, 0.1,
                                        0.3),
            "self-ensembling": lambda: uda.self_ensembling_step(
                networks, copy.deepcopy(networks), source, labels, source,
                optimizers["optimizer"], rng, 3.0, 0.9, 0.005)}[method]
    assert all(value.device == meta for value in step().values())


# ============================================================================ run
# Pins flags, presets, one-line errors with exit 2, summaries, the commands' files.


def bad_inputs(tmp: Path) -> list[tuple[list[str], str]]:
    """(command line, what its one error line must say): ordinary mistakes."""
    a_file = tmp / "a_file"
    a_file.write_text("x")
    garbage = tmp / "garbage.pth"
    garbage.write_bytes(b"\x80\x02 not torch")
    foreign = tmp / "foreign.pth"
    torch.save({"weight": torch.ones(2)}, foreign)
    faces = str(image_folder(tmp / "faces"))
    few, nan, mismatch, broken = (tmp / f"{name}.npz" for name in
                                  ("few", "nan", "mismatch", "broken"))
    broken.write_bytes(b"PK\x03\x04 not a zip")
    np.savez(few, features=np.random.default_rng(0).normal(size=(10, 3)))
    np.savez(nan, features=np.array([[0.0, 1.0]] * 40 + [[np.nan, 0.0]]))
    np.savez(mismatch, features=np.zeros((40, 3)), labels=np.zeros(39))
    return [
        (["gan", "--steps", "0"], "--steps 0: give a whole number of at least 1"),
        (["ddpm", "--steps", "-5"], "--steps -5"),
        (["vae", "--epochs", "0"], "--epochs 0"),
        (["uda", "--batch-size", "0"], "--batch-size 0"),
        (["classifier", "--lr", "nan"], "--lr nan: give a finite number"),
        (["vae", "--lr", "inf"], "--lr inf: give a finite number"),
        (["uda", "--lr", "-0.1"], "--lr -0.1: give a number above 0"),
        (["uda", "--method", "gta", "--gta-lr", "0"], "--gta-lr 0.0: give a number above 0"),
        (["uda", "--confidence", "1.5"], "--confidence 1.5: give a number from 0 to 1"),
        (["uda", "--consistency-weight", "-1"], "--consistency-weight -1.0: give a number of "
                                                "at least 0"),
        (["gan", "--image-size", "0"], "--image-size 0"),
        (["data", "--name", "mnist", "--image-size", "-28"], "--image-size -28"),
        (["gan", "--image-size", "48"], "the gan networks take 32 or 64"),
        (["uda", "--image-size", "32"], "the uda networks take 28"),
        (["gan", "--limit", "-1"], "--limit -1: give a whole number of at least 0"),
        (["gan", "--generate", "-3"], "--generate -3"),
        (["ddpm", "--generate", "--per-digit", "0"], "--per-digit 0"),
        (["gan", "--seed", "-1"], "--seed -1"),
        (["gan", "--seed", str(2**32)], "below 2**32"),
        (["ddpm", "--drop-class", "1.5"], "--drop-class 1.5: give a number from 0 to 1"),
        (["ddpm", "--sampling-steps", "2000"], "more than --timesteps 1000"),
        (["ddpm", "--dropout", "1"], "--dropout 1.0: give a rate below 1"),
        (["gan", "--steps", "ten"], "invalid int value: 'ten'"),
        (["gan", "--variant", "c"], "invalid choice: 'c'"),
        (["uda", "--method", "mmd"], "invalid choice: 'mmd'"),
        (["tsne", "mnist", "--perplexity", "0"], "--perplexity 0.0: give a number above 0"),
        (["data", "--name", "mnist", "--out", str(a_file)], "--out"),
        (["data", "--name", "mnist", "--cache", str(a_file)], "--cache"),
        (["data", "--name", "mnist", "--data-root", str(a_file)], "--data-root"),
        (["data", "--name", faces, "--out", str(a_file / "sub")], "Not a directory"),
        (["uda", "--predict", faces, "--ckpt", str(foreign), "--csv", faces], "--csv"),
        (["classify", "--folder", str(a_file)], "is not a folder"),
        (["fid", faces, faces, "--weights", str(tmp / "missing.pth")], "not found"),
        (["fid", faces, faces, "--weights", str(garbage)], "not the pytorch-fid Inception"),
        (["fid", faces, faces, "--weights", str(foreign)], "not the pytorch-fid Inception"),
        (["gan", "--data", faces, "--image-size", "32", "--weights", str(garbage)],
         "not the pytorch-fid Inception"),
        (["vae", "--fid-images", "1"], "--fid-images 1: FID fits a covariance"),
        (["gan", "--generate", "2", "--ckpt", str(foreign)], "not by 'run.py gan'"),
        (["tsne", str(few)], "10 points are too few for perplexity 30"),
        (["tsne", str(nan)], "1 of 41 feature rows hold NaN"),
        (["tsne", str(mismatch)], "'labels' has 39 entries for 40 rows"),
        (["tsne", str(broken)], "cannot be read as an .npz"),
    ]


# Parameters per printed table, hand-computed where the sum is short:
# - vae encoder: convs 3*32*16 + 32*64*16 + 64*128*16 + 128*256*16 = 689,664, batch norm
#   2 (32 + 64 + 128 + 256) = 960, mu and log sigma^2 2 (4096*512 + 512) = 4,195,328.
#   decoder: 512*4096 + 4096 = 2,101,248, transposed convs 256*128*16 + 128*64*16
#   + 64*32*16 + 32*3*16 + 3 = 689,667, batch norm 2 (128 + 64 + 32) = 448.
# - uda features: 3*64*25 + 64 + BN 128 + 64*50*25 + 50 + BN 100 = 85,142;
#   label classifier: 800*100 + 100 + BN 200 + 100*100 + 100 + BN 200 + 100*10 + 10 = 91,610;
#   DANN domain classifier: 800*100 + 100 + BN 200 + 100 + 1 = 80,401;
#   ADDA discriminator: 800*500 + 500 + 500*500 + 500 + 500 + 1 = 651,501;
#   GTA generator (width 32, z of 100): (800 + 11 + 100)*128*9 + 128*64*9 + 64*32*16
#   + 32*3*16 + BN 2 (128 + 64 + 32) = 1,157,952;
#   GTA discriminator: 3*32*9 + 32 + 32*64*9 + 64 + 64*128*9 + 128 + 128*64*9 + 64
#   + BN 2 (32 + 64 + 128 + 64) + 64 + 1 + 64*10 + 10 = 168,331.
# - classifier: 3*32*9 + 64 + 32*32*9 + 64 + 32*64*9 + 128 + 64*64*9 + 128
#   + 3136*256 + 256 + 256*10 + 10 = 871,402.
# - b: a's networks. ACGAN: z has 2 more channels (+ 2*512*16 in G), D 2 outputs
#   (+ 512*16; batch norm leaves the convolutions without bias).
# - ddpm: the default U-Net (width 64, 10 classes + the 'no class' token), as summed by torch.
SUMMARY_TOTALS = [
    ("gan", "a", [3_576_704, 2_765_568]),
    ("gan", "b", [3_576_704, 2_765_568]),
    ("gan", "acgan", [3_593_088, 2_773_760]),
    ("vae", None, [4_885_952, 2_791_363]),
    ("ddpm", None, [3_946_435]),
    ("uda", None, [85_142, 91_610, 80_401, 651_501, 1_157_952, 168_331]),
    ("classifier", None, [871_402]),
]


TRAINED_NETWORKS = {
    "gan": lambda variant: (lambda model: [model.generator, model.discriminator])(
        gan.GAN(gan.GANSettings(variant=variant))),
    "vae": lambda _: [vae.VAE(vae.VAESettings().latent_dim)],
    "ddpm": lambda _: [ddpm.Diffusion(ddpm.DDPMSettings()).network],
    "uda": lambda _: [uda.Networks("source").features, uda.Networks("source").classifier,
                      uda.Networks("dann").domain, uda.Networks("adda").domain,
                      uda.Networks("gta").generator, uda.Networks("gta").discriminator],
    "classifier": lambda _: [nets.digit_classifier()],
}


def test_dataclass_fields_become_flags_and_back():
    import argparse
    parser = argparse.ArgumentParser()
    run.add_flags(parser, run.Common)
    args = parser.parse_args(["--data-root", "x", "--seed", "7", "--no-download"])
    common = run.settings_from(args, run.Common)
    assert (common.data_root, common.seed, common.download) == ("x", 7, False)


def test_data_command_prints_counts_and_writes_preview(tmp_path, capsys):
    make_mnist(tmp_path)
    assert run.main(["data", "--name", "mnist", "--data-root", str(tmp_path), "--no-download",
                     "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "mnist [train]: 6 images" in printed and "0: 1  1: 1" in printed
    width, height = Image.open(tmp_path / "out" / "data" / "mnist-test-preview.png").size
    assert height == 32 + 20 and width >= 6 * 30 + 2  # the grid under its title


def test_a_preset_sets_defaults_that_flags_beside_it_override():
    plain, preset = run.parse(["ddpm"]), run.parse(["ddpm", "--preset", "cpu", "--steps", "10"])
    assert (plain.width, plain.steps, plain.guidance) == (64, 30000, 2.0)
    assert (preset.width, preset.steps, preset.guidance, preset.lr) == (32, 10, 6.0, 1e-3)
    for settings_class, presets in ((gan.GANSettings, gan.PRESETS),  # real settings only
                                    (vae.VAESettings, vae.PRESETS),
                                    (ddpm.DDPMSettings, ddpm.PRESETS),
                                    (uda.UDASettings, uda.PRESETS)):
        choices = {f.name: f.metadata["choices"] for f in dataclasses.fields(settings_class)
                   if "choices" in f.metadata}  # argparse does not check a default's choice
        for values in presets.values():
            settings_class(**values)
            for name, value in values.items():
                assert name not in choices or value in choices[name], (name, value)


@pytest.mark.parametrize("command", ["gan", "vae", "ddpm", "uda"])
def test_every_training_command_has_a_gpu_preset_that_validates(command, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
    args = run.parse([command, "--preset", "gpu", "--device", "cuda"])
    run.validate(args)
    assert args.preset == "gpu"


def test_bad_input_ends_in_one_error_line_and_exit_code_2(tmp_path, capsys):
    for argv, expected in bad_inputs(tmp_path):
        capsys.readouterr()
        line = one_line_error(capsys, argv + (["--out", str(tmp_path / "out")]
                                              if "--out" not in argv else []))
        assert expected in line, (argv, line)
    written = [path for path in (tmp_path / "out").rglob("*") if path.is_file()]
    assert written == []  # each refused before it wrote anything


def test_a_full_disk_is_one_line_and_keeps_what_was_written(tmp_path, capsys, monkeypatch):
    faces = str(image_folder(tmp_path / "faces"))
    assert run.main(["data", "--name", faces, "--splits", "train", "--cache", "",
                     "--out", str(tmp_path / "o")]) == 0
    preview, = (tmp_path / "o" / "data").glob("faces-*-train-preview.png")
    before = preview.read_bytes()

    def full(source, target):
        raise OSError(errno.ENOSPC, "No space left on device", str(target))
    monkeypatch.setattr(os, "replace", full)  # pictures too are written atomically
    line = one_line_error(capsys, ["data", "--name", faces, "--splits", "train",
                                   "--cache", "", "--out", str(tmp_path / "o")])
    assert "No space left on device" in line and "free disk space" in line
    assert preview.read_bytes() == before


def test_resume_refuses_another_commands_checkpoint_and_changed_flags(tmp_path):
    gan.train(toy_faces(), None, tiny_gan(), tmp_path, "cpu", seed=0)
    with pytest.raises(util.UserError, match=r"--seed 0 \(now 1\)"):
        gan.train(toy_faces(), None, tiny_gan(resume=True), tmp_path, "cpu", seed=1)
    with pytest.raises(util.UserError, match=r"--batch-size 4 \(now 8\)"):
        gan.train(toy_faces(), None, tiny_gan(resume=True, batch_size=8), tmp_path, "cpu", 0)
    with pytest.raises(util.UserError, match=r"--variant b \(now a\)"):
        gan.train(toy_faces(), None, tiny_gan(resume=True, variant="a"), tmp_path, "cpu", 0)
    with pytest.raises(util.UserError, match="written by 'run.py gan', not by 'run.py vae'"):
        vae.train(toy_faces(8, 64), toy_faces(8, 64), tiny_vae(resume=True), tmp_path,
                  "cpu", 0)
    longer = gan.train(toy_faces(), None, tiny_gan(resume=True, steps=3), tmp_path, "cpu", 0)
    assert longer["steps"] == 3  # --steps may grow: the run continues


def test_a_diverged_vae_stops_without_saving_nan_weights(tmp_path):
    """--lr inf once ended with exit 0 and a checkpoint of NaN tensors."""
    with pytest.raises(util.UserError, match="NaN or infinite|became nan"):
        vae.train(toy_faces(8, 64), toy_faces(8, 64), tiny_vae(lr=float("inf"), epochs=1),
                  tmp_path, "cpu", seed=0)
    assert not (tmp_path / "checkpoint.pt").exists()
    assert not (tmp_path / "results.json").exists()


def test_warnings_for_adapting_a_domain_to_itself_and_fid_of_other_sizes(tmp_path, capsys):
    assert run.main(["uda", "--src", "usps", "--tgt", "usps", "--no-download",
                     "--data-root", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("warning: --src and --tgt are both usps")
    assert len(lines) == 2 and lines[1].startswith("error: data folder")
    weights = tmp_path / "w.pth"
    torch.manual_seed(0)
    torch.save(metrics.FIDInception().state_dict(), weights)
    small, large = image_folder(tmp_path / "small", 2, 8), image_folder(tmp_path / "large", 2, 16)
    capsys.readouterr()
    assert run.main(["fid", str(small), str(large), "--weights", str(weights),
                     "--cache", ""]) == 0
    assert "warning: the folders hold images of 8 and 16 pixels a side" in capsys.readouterr().err


def test_a_run_without_fid_weights_says_fid_skipped(tmp_path, capsys, monkeypatch):
    fake_network(monkeypatch, None)
    faces = str(image_folder(tmp_path / "faces", 4, 32))
    assert run.main(["gan", "--data", faces, "--image-size", "32", "--steps", "1",
                     "--batch-size", "4", "--sample-every", "1", "--fid-images", "4",
                     "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "FID skipped (could not download" in out and "None" not in out


@pytest.mark.parametrize("name, variant, totals", SUMMARY_TOTALS)
def test_every_summary_prints_its_networks_parameters(name, variant, totals, capsys):
    assert run.main(["summary", name] + (["--variant", variant] if variant else [])) == 0
    out = capsys.readouterr().out
    printed = [int(n.replace(",", "")) for n in re.findall(r"^Total params: ([\d,]+)$", out,
                                                           flags=re.M)]
    assert printed == totals
    # one titled table a network; together they hold the networks the command trains
    # (the VAE's two halves add up to the whole VAE)
    assert len([line for line in out.splitlines() if line.startswith(name)]) == len(totals)
    assert sum(printed) == sum(p.numel() for network in TRAINED_NETWORKS[name](variant)
                               for p in network.parameters())


def test_summary_of_gan_shows_the_variant_that_run_py_gan_trains(capsys):
    assert run.main(["summary", "gan"]) == 0
    default = gan.GANSettings().variant
    assert capsys.readouterr().out.splitlines()[0] == f"gan variant {default}: generator"


@pytest.mark.parametrize("argv, names", [
    (["summary", "gpt"], "gan, vae, ddpm, uda, classifier"),
    (["summary", "gan", "--variant", "c"], "a, b, acgan"),
    (["summary", "vae", "--variant", "a"], "--variant is for gan"),
])
def test_unknown_architecture_names_the_choices(argv, names, capsys):
    assert names in one_line_error(capsys, argv)


def test_curves_draws_the_fid_curves_of_several_runs_in_one_picture(tmp_path, capsys,
                                                                     monkeypatch):
    drawn = {}
    monkeypatch.setattr(plots, "line_plot", lambda series, path, **kw: drawn.update(
        {Path(path).name: (series, kw["x"])}))
    for name, steps, fids in (("gan_a", [250, 500], [300.0, 250.0]),
                              ("gan_b", [250, 500, 750], [280.0, 200.0, 150.0])):
        util.write_json({"fid_curve": {"images": 500, "step": steps, "fid": fids}},
                        tmp_path / name / "results.json")
    assert run.main(["curves", str(tmp_path / "gan_a"), str(tmp_path / "gan_b"),
                     "--to", str(tmp_path / "fid.png")]) == 0
    series, x = drawn.pop("fid.png")
    assert series == {"gan_a (500 samples)": [300.0, 250.0],
                      "gan_b (500 samples)": [280.0, 200.0, 150.0]}
    assert x["gan_b (500 samples)"] == [250, 500, 750]
    assert drawn == {}  # results.json written before KID: no KID picture
    # runs that measured KID (the first before a resume from a checkpoint without it)
    # also get TO_kid.png, and their names say the held-out count
    util.write_json({"fid_curve": {"images": 500, "real_images": 2000, "step": [1, 2],
                                   "fid": [3.0, 2.0], "kid": [None, 0.25]}},
                    tmp_path / "gan_a" / "results.json")
    assert run.main(["curves", str(tmp_path / "gan_a"), "--to", str(tmp_path / "fid.png")]) == 0
    series, x = drawn["fid_kid.png"]
    assert np.isnan(series["gan_a (500 samples against 2,000)"][0])
    assert series["gan_a (500 samples against 2,000)"][1] == 0.25
    util.write_json({"fid": None}, tmp_path / "no_fid" / "results.json")
    assert "has no FID curve" in one_line_error(capsys, ["curves", str(tmp_path / "no_fid")])
    # two runs of one name in different folders are two curves, named by their folders
    util.write_json({"fid_curve": {"images": 500, "step": [1], "fid": [9.0]}},
                    tmp_path / "augmented" / "gan_b" / "results.json")
    assert run.main(["curves", str(tmp_path / "gan_b"), str(tmp_path / "augmented" / "gan_b"),
                     "--to", str(tmp_path / "fid.png")]) == 0
    series, _ = drawn["fid.png"]
    assert series == {f"{tmp_path.name}/gan_b (500 samples)": [280.0, 200.0, 150.0],
                      "augmented/gan_b (500 samples)": [9.0]}


def test_cpu_cost_note_says_about_how_long_a_run_trains_and_the_shorter_preset():
    """RESULTS.md's speeds times the settings' work: the GAN's defaults, 20,000 steps of 128
    faces at 1.21 s a step of 64, are about 13 hours; its cpu preset, 1,000 steps of 64,
    about 20 minutes. Catches the batch or the steps left out, the preset's estimate made
    of the user's settings, a note on a short run."""
    note = run.cpu_cost_note("gan", gan.GANSettings())
    assert note.startswith("note: on a CPU this trains for about 13 hours (20,000 steps of "
                           "128 faces at 64x64")
    assert note.endswith("--preset cpu trains in about 20 minutes")
    assert "about 62 hours" in run.cpu_cost_note("gan", gan.GANSettings(variant="wgan-gp"))
    assert run.cpu_cost_note("gan", gan.GANSettings(image_size=32, steps=300)) is None
    # the DDPM at width 64 costs 4 times width 32's 0.65 s a step of 64 digits
    note = run.cpu_cost_note("ddpm", ddpm.DDPMSettings())
    assert "about 43 hours" in note and note.endswith("trains in about 43 minutes")
    # the VAE and UDA by their training images: long on all of CelebA, not on 8,000 faces
    assert "about 5 hours (20 epochs of 162,770 faces" in run.cpu_cost_note(
        "vae", vae.VAESettings(), 162_770)
    assert run.cpu_cost_note("vae", vae.VAESettings(), 8_000) is None
    note = run.cpu_cost_note("uda", uda.UDASettings(method="all"), (59_001, 7_291))
    assert "about 85 minutes" in note and note.endswith("lower --epochs")
    assert run.cpu_cost_note("uda", uda.UDASettings(), (59_001, 7_291)) is None


def test_a_long_run_on_a_cpu_prints_its_cost_first_unless_a_preset_is_given(
        tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(gan, "train", lambda *args: {"steps": 0, "seconds_per_step": 0.0,
                                                     "fid": None})
    faces = str(image_folder(tmp_path / "faces", 4, 64))
    common = ["gan", "--data", faces, "--device", "cpu", "--cache", "", "--out",
              str(tmp_path / "o")]
    for flags, noted in (([], True), (["--preset", "cpu"], False), (["--steps", "10"], False)):
        assert run.main(common + flags) == 0
        first = capsys.readouterr().out.splitlines()[0]
        assert first.startswith("note: on a CPU this trains for about") == noted, flags


def test_tsne_command_embeds_saved_features_and_writes_plot_and_results(tmp_path, capsys):
    X, labels = clusters()
    np.savez(tmp_path / "features.npz", features=X, labels=labels)
    assert run.main(["tsne", str(tmp_path / "features.npz"), "--out", str(tmp_path),
                     "--iterations", "400", "--perplexity", "10"]) == 0
    results = __import__("json").loads((tmp_path / "tsne" / "results.json").read_text())
    assert results["points"] == 90 and results["knn10_accuracy"] == 1.0
    assert np.load(tmp_path / "tsne" / "embedding.npz")["embedding"].shape == (90, 2)
    assert Image.open(tmp_path / "tsne" / "tsne.png").size[1] == 600
    capsys.readouterr()
    line = one_line_error(capsys, ["tsne", str(tmp_path / "features.npz"), "--key", "x"])
    assert "has no array 'x'" in line


def test_classify_command_reads_digits_from_file_names(tmp_path, capsys):
    settings = classifier.ClassifierSettings(epochs=2, batch_size=16, lr=3e-3)
    classifier.train(toy_digits(), toy_digits(seed=1), settings,
                             tmp_path / "classifier", "cpu", seed=0)
    images = toy_digits(6, seed=2)
    names = [f"{int(label)}_{i:03d}.png" for i, label in enumerate(images.labels)]
    names[0] = "1" + names[0][1:]  # a dark image filed as bright: one wrong answer
    folder = tmp_path / "generated"
    data.save_images(images.images(), folder, names)
    assert run.main(["classify", "--folder", str(folder), "--out", str(tmp_path)]) == 0
    assert "accuracy 0.8333 (5/6)" in capsys.readouterr().out
    for wrong in ("x_001.png", "10.png"):  # 10.png was counted as a 1
        data.save_images(images.images(slice(0, 1)), folder, [wrong])
        line = one_line_error(capsys, ["classify", "--folder", str(folder), "--out",
                                       str(tmp_path)])
        assert f"'{wrong}' is not named by its digit" in line and "3_042.png" in line
        (folder / wrong).unlink()


# Hand-counted: G as in variant a (3,576,704). The WGAN-GP critic is the spectral-norm D
# (--d-norm spectral) without spectral norm: convs 2,763,776 + a bias on each
# (64 + 128 + 256 + 512 + 1) = 2,764,737.
# hacks' D is variant a's (2,765,568) with a Dropout after each of its 4 LeakyReLUs.
@pytest.mark.parametrize("variant, totals, dropouts", [
    ("wgan-gp", [3_576_704, 2_764_737], 0), ("hacks", [3_576_704, 2_765_568], 4)])
def test_summary_prints_the_new_variants(variant, totals, dropouts, capsys):
    assert run.main(["summary", "gan", "--variant", variant]) == 0
    out = capsys.readouterr().out
    assert [int(n.replace(",", "")) for n in re.findall(r"^Total params: ([\d,]+)$", out,
                                                        flags=re.M)] == totals
    discriminator_table = out.split(f"gan variant {variant}: discriminator")[1]
    assert len(re.findall(r"Dropout-\d+", discriminator_table)) == dropouts
    assert ("BatchNorm2d" in discriminator_table) == (variant == "hacks")


def test_gan_flags_take_the_new_variants_and_their_settings():
    args = run.build_parser().parse_args(
        ["gan", "--variant", "wgan-gp", "--n-critic", "3", "--gp-weight", "5",
         "--real-label", "0.8", "--label-flip", "0.1", "--instance-noise", "0.2"])
    settings = run.settings_from(args, gan.GANSettings)
    assert (settings.variant, settings.n_critic, settings.gp_weight, settings.real_label,
            settings.label_flip, settings.instance_noise) == ("wgan-gp", 3, 5.0, 0.8, 0.1, 0.2)
    assert run.build_parser().parse_args(["gan", "--variant", "hacks"]).variant == "hacks"


def test_gan_b_takes_spectral_norm_and_diffaugment_as_flags():
    """b's options for long runs reach its D: spectral norm on every convolution, no batch
    norm; by default a batch-norm D and no augmentation."""
    def built(flags):
        args = run.build_parser().parse_args(["gan", "--variant", "b", *flags])
        settings = run.settings_from(args, gan.GANSettings)
        modules = list(gan.GAN(settings).discriminator.modules())
        convs = [m for m in modules if isinstance(m, nn.Conv2d)]
        return (settings.augment, all(hasattr(c, "weight_orig") for c in convs),
                any(isinstance(m, nn.BatchNorm2d) for m in modules))
    assert built([]) == ("", False, True)
    assert built(["--d-norm", "spectral", "--augment", "translation"]) == \
        ("translation", True, False)


@pytest.mark.parametrize("changes, message", [
    ({"n_critic": 0}, "--n-critic 0"), ({"real_label": 1.2}, "--real-label 1.2"),
    ({"label_noise": 0.95}, "--label-noise 0.95"), ({"label_flip": 1.5}, "--label-flip"),
    ({"dropout": 1.0}, "--dropout")])
def test_gan_refuses_recipe_settings_out_of_range(changes, message, tmp_path, capsys):
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in changes.items()]
    line = one_line_error(capsys, ["gan", "--data-root", str(tmp_path / "none"),
                                   "--out", str(tmp_path / "out")] + flags)
    assert message in line  # refused by run.validate, before any data is read


def write_statistics(path: Path, mu, sigma) -> str:
    np.savez(path, mu=mu, sigma=sigma)
    return str(path)


def bad_inputs_third_round(tmp: Path) -> list[tuple[list[str], str]]:
    """(command line, what its one error line must say): damaged statistics and results,
    hostile images, misspelt devices and policies, outputs that collide with files."""
    faces = image_folder(tmp / "faces")
    bomb = image_folder(tmp / "bomb")
    (bomb / "huge.png").write_bytes(png_claiming(14000, 14000))
    a_file = tmp / "a_file"
    a_file.write_text("x")
    good = np.zeros(8), np.eye(8)
    nan_mu = write_statistics(tmp / "nan_mu.npz", np.full(8, np.nan), np.eye(8))
    nan_sigma = write_statistics(tmp / "nan_sigma.npz", np.zeros(8), np.full((8, 8), np.nan))
    flat_sigma = write_statistics(tmp / "flat.npz", np.zeros(8), np.ones(8))
    words = write_statistics(tmp / "words.npz", np.array(["a", "b"]), np.array([["a"]]))
    eight = write_statistics(tmp / "eight.npz", *good)
    wide = write_statistics(tmp / "wide.npz", np.zeros(16), np.eye(16))
    runs = {}
    for name, text in (("truncated", '{"fid_curve": {"images": 5, "st'), ("listed", "[1, 2]"),
                       ("no_images", '{"fid_curve": {"step": [1], "fid": [3.0]}}'),
                       ("uneven", '{"fid_curve": {"images": 5, "step": [1, 2], "fid": [3.0]}}'),
                       ("short_kid", '{"fid_curve": {"images": 5, "step": [1], "fid": [3.0], '
                                     '"kid": []}}')):
        (tmp / name).mkdir()
        (tmp / name / "results.json").write_text(text)
        runs[name] = str(tmp / name)
    return [
        (["fid", nan_mu, eight], "'mu' holds NaN or infinite values"),
        (["fid", eight, nan_sigma], "'sigma' holds NaN or infinite values"),
        (["fid", flat_sigma, eight], "are not a mean (D,) and a covariance (D, D)"),
        (["fid", words, eight], "not numbers"),
        (["fid", eight, wide], "has 8 features"),
        (["fid", str(faces), str(tmp / "missing")], "missing not found"),
        (["fid", str(bomb), eight], "huge.png claims more than"),
        (["data", "--name", str(bomb)], "huge.png claims more than"),
        (["curves", runs["truncated"]], "is not readable JSON"),
        (["curves", runs["listed"]], "has no FID curve"),
        (["curves", runs["no_images"]], "its fid_curve is not"),
        (["curves", runs["uneven"]], "its fid_curve is not"),
        (["curves", runs["short_kid"]], "its fid_curve is not"),
        (["curves", runs["uneven"], "--to", str(tmp / "curves")], "give a picture file name"),
        (["curves", runs["uneven"], "--to", str(a_file / "c.png")], "is a file, not a folder"),
        (["uda", "--batch-size", "1"], "--batch-size 1: batch norm needs at least 2"),
        (["data", "--name", "mnist", "--device", "gpu7"], "--device gpu7: no such device"),
        (["gan", "--augment", "translation,bogus", "--data", str(tmp / "no_faces")],
         "no augmentation 'bogus'"),
        (["facerate", "--folder", str(faces), "--detector", str(faces)],
         "--detector " + str(faces) + " is a folder: give the path of a checkpoint"),
        (["uda", "--predict", str(faces), "--ckpt", "x.pt", "--csv", str(a_file / "p.csv")],
         "--csv"),
    ]


def test_third_round_of_bad_input_ends_in_one_error_line_each(tmp_path, capsys):
    for argv, expected in bad_inputs_third_round(tmp_path):
        capsys.readouterr()
        line = one_line_error(capsys, argv + ["--out", str(tmp_path / "out"), "--cache", ""])
        assert expected in line, (argv, line)
    assert not (tmp_path / "out").exists()  # no picture, and no empty run folder either


def test_a_damaged_checkpoint_stops_resume_and_generate_and_writes_nothing(tmp_path, capsys):
    faces = str(image_folder(tmp_path / "faces", count=8, size=32))
    argv = ["gan", "--data", faces, "--image-size", "32", "--steps", "2", "--batch-size", "4",
            "--sample-every", "1", "--fid-images", "0", "--out", str(tmp_path / "out")]
    assert run.main(argv) == 0
    folder = tmp_path / "out" / "gan_b"
    (folder / "results.json").unlink()
    damage_the_largest_tensor(folder / "checkpoint.pt")
    damaged = (folder / "checkpoint.pt").read_bytes()
    line = one_line_error(capsys, argv[:6] + ["3"] + argv[7:] + ["--resume"])
    assert "checkpoint.pt is damaged" in line and "drop --resume" in line
    assert not (folder / "results.json").exists()  # no answer from damaged weights
    assert (folder / "checkpoint.pt").read_bytes() == damaged  # and nothing overwritten
    line = one_line_error(capsys, ["gan", "--generate", "2", "--ckpt", str(folder / "checkpoint.pt"),
                                   "--out", str(tmp_path / "images")])
    assert "is damaged" in line and "give --ckpt another checkpoint" in line
    assert not (tmp_path / "images").exists()


def test_a_failed_run_leaves_no_empty_run_folder_and_keeps_a_used_one(tmp_path, capsys):
    argv = ["gan", "--data-root", str(tmp_path / "nothing"), "--no-download",
            "--out", str(tmp_path / "runs")]
    one_line_error(capsys, argv)
    assert not (tmp_path / "runs").exists()
    (tmp_path / "runs" / "gan_b").mkdir(parents=True)
    (tmp_path / "runs" / "gan_b" / "notes.txt").write_text("mine")
    one_line_error(capsys, argv)
    assert (tmp_path / "runs" / "gan_b" / "notes.txt").read_text() == "mine"


def test_a_bad_dist_timeout_is_one_line_under_torchrun_and_ignored_without(monkeypatch,
                                                                         capsys):
    monkeypatch.setenv("DLCV_DIST_TIMEOUT", "abc")
    assert run.main(["summary", "gan"]) == 0  # no torchrun: not read
    capsys.readouterr()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("RANK", "0")
    line = one_line_error(capsys, ["classifier", "--device", "cpu", "--batch-size", "2"])
    assert "DLCV_DIST_TIMEOUT=abc: give a whole number of seconds" in line
    monkeypatch.setenv("RANK", "1")  # the other processes say nothing
    assert run.main(["classifier", "--device", "cpu", "--batch-size", "2"]) == 2
    assert capsys.readouterr().err == ""


def test_facerate_keeps_two_folders_of_one_name_apart(tmp_path, capsys, monkeypatch):
    detector = hog.FaceDetector()
    hog.save_face_detector(detector, {}, tmp_path / "detector.pt")
    for parent in ("run_a", "run_b"):
        image_folder(tmp_path / parent / "samples", size=64)
        assert run.main(["facerate", "--folder", str(tmp_path / parent / "samples"),
                         "--detector", str(tmp_path / "detector.pt"),
                         "--out", str(tmp_path / "out")]) == 0
    written = sorted((tmp_path / "out" / "facerate").glob("samples-*.json"))
    assert len(written) == 2
    assert {json.loads(p.read_text())["folder"] for p in written} == {
        str(tmp_path / "run_a" / "samples"), str(tmp_path / "run_b" / "samples")}


def test_running_out_of_gpu_memory_is_one_line_that_says_lower_the_batch(tmp_path, capsys,
                                                                        monkeypatch):
    def too_big(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 196.00 GiB")
    monkeypatch.setattr(gan, "train_step", too_big)
    line = one_line_error(capsys, ["gan", "--data", str(image_folder(tmp_path / "faces",
                                                                     count=8, size=32)),
                                   "--image-size", "32", "--steps", "1", "--fid-images", "0",
                                   "--out", str(tmp_path / "out")])
    assert "ran out of memory (CUDA out of memory)" in line and "lower --batch-size" in line


def test_a_runs_page_names_the_command_that_repeats_it(capsys):
    """pages.command_line gives back the settings and seed when run.py parses it."""
    cases = [("gan", tiny_gan(variant="wgan-gp", augment="color,cutout", resume=True)),
             ("vae", tiny_vae(kl_weight=0.5, attribute="Male")),
             ("ddpm", tiny_diffusion(amp="on", sampler="ddpm")[1]),
             ("uda", tiny_uda(method="self-ensembling", anneal=False)),
             ("classifier", classifier.ClassifierSettings(epochs=1, data="usps"))]
    classes = {"gan": gan.GANSettings, "vae": vae.VAESettings, "ddpm": ddpm.DDPMSettings,
               "uda": uda.UDASettings, "classifier": classifier.ClassifierSettings}
    for command, settings in cases:
        words = shlex.split(pages.command_line(command, settings, seed=7))
        assert words[:3] == ["python", "run.py", command] and "--resume" not in words
        args = run.parse(words[2:])
        parsed = run.settings_from(args, classes[command])
        assert parsed == dataclasses.replace(settings, resume=False), command
        assert args.seed == 7
    line = pages.command_line("gan", gan.GANSettings(), 0)  # the defaults: the variant named
    assert line == "python run.py gan --variant b --seed 0"


def test_a_training_run_keeps_a_page_that_reloads_until_results_json_is_written(
        tmp_path, monkeypatch):
    calls = []
    real = reports.gan_pictures

    def stop_at_the_second(*args, **kwargs):  # the first checkpoint's page is written
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(*args, **kwargs)
    with monkeypatch.context() as patch:
        patch.setattr(reports, "gan_pictures", stop_at_the_second)
        with pytest.raises(KeyboardInterrupt):
            gan.train(toy_faces(), None, tiny_gan(steps=3), tmp_path, "cpu", 0)
    running = Page(tmp_path / "index.html")
    assert running.refresh is not None and "Running: step 1 of 3" in running.text
    assert [f.name for f in running.files(tmp_path)].count("step_000001.png") == 2
    results = gan.train(toy_faces(), None, tiny_gan(steps=3, resume=True), tmp_path, "cpu",
                        0)
    page = Page(tmp_path / "index.html")
    assert page.refresh is None and "Finished: 3 steps" in page.text
    assert {f.name for f in page.files(tmp_path)} >= {"samples.png", "samples.gif", "loss.png",
                                                      "step_000003.png", "d_outputs.png"}
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert page.pres == [saved["command_line"]]
    for name, (cell,) in page.table("result").items():
        assert cell == str(saved[name]) if isinstance(saved[name], (str, int)) else \
            float(cell) == pytest.approx(saved[name], rel=1e-5) if saved[name] is not None \
            else cell == "none", name
    assert page.table("curve")["loss_d"] == [pages.number(saved["final_loss_d"]), "3"]


def test_the_report_fills_each_part_from_the_runs_and_names_the_command_of_the_rest(
        tmp_path, capsys):
    runs = tmp_path / 'runs & <b>"x"</b>'
    gan.train(toy_faces(), None, tiny_gan(variant="b"), runs / "gan_b", "cpu", 0)
    settings = tiny_uda(src="mnistm", tgt="usps", tsne_points=20)
    run.uda_methods(settings, ["source", "dann"], toy_load, runs / "uda" / "mnistm-usps",
                    "cpu", 0)
    (runs / "gan_b" / "faces").mkdir()
    util.write_json({"folder": str(runs / "gan_b" / "faces"), "face_rate": 0.875},
                    runs / "facerate" / "faces-1234abcd.json")
    (runs / "gan_acgan").mkdir()
    (runs / "gan_acgan" / "results.json").write_text("{not json")
    assert run.main(["report", str(runs)]) == 0
    page = Page(runs / "report.html")
    files = page.files(runs)
    assert {f.name for f in files} >= {"samples.png", "tsne_class.png", "tsne_domain.png"}
    assert {f.parent.relative_to(runs.resolve()).as_posix() for f in files
            if f.name == "index.html"} == {"gan_b", "uda/mnistm-usps/source",
                                           "uda/mnistm-usps/dann"}  # each run's page
    gan_b = json.loads((runs / "gan_b" / "results.json").read_text())
    assert page.table("variant") == {"b": ["2", "32", "none", "", "", "0.875"]}
    assert "gan variant b: generator" in page.pres[1] and "Total params" in page.pres[1]
    assert gan_b["command_line"] in page.text  # under the samples
    accuracy = page.table("method")
    for method, title in (("source", "Trained on source"), ("dann", "DANN")):
        row = json.loads((runs / "uda" / "mnistm-usps" / method / "results.json").read_text())
        cell, = accuracy[title]
        assert cell == f"{pages.number(row['target_accuracy'])} ({row['correct']}/{row['total']})"
    out = f" --out {shlex.quote(str(runs))}"
    lines = [line for text in page.pres for line in text.splitlines()]
    for command in ("gan --variant a", "gan --variant acgan", "vae --kl-weight 1", "ddpm",
                    "uda --table"):  # the parts without a run (acgan's results: damaged)
        assert f"python run.py {command}{out}" in lines, command
    assert "gan_acgan/results.json is damaged" in page.text
    assert "<b>" not in (runs / "report.html").read_text()
    assert one_line_error(capsys, ["report", str(tmp_path / "none")]).endswith(
        "is not a folder: give the folder the runs wrote into (their --out, default runs/)")


def test_the_reports_vae_and_ddpm_tables_show_the_numbers_of_results_json(tmp_path):
    vaes = {"vae_lambda1": {"kl_weight": 1.0, "epochs": 3, "test_mse": 0.0123456789,
                            "test_kl": 31.25, "reconstruction_mse_10_faces": 0.02,
                            "fid": None},
            "vae_lambda0.1": {"kl_weight": 0.1, "epochs": 2, "test_mse": 0.011,
                              "test_kl": 88.5, "reconstruction_mse_10_faces": 0.015,
                              "fid": 123.456789, "reconstruction_fid": 99.5}}
    ddpm_results = {"steps": 500, "sampler": "ddim", "digit_accuracy": 0.937,
                    "fid": 41.2345678, "course_digits_fid": 12.5}
    for name, results in [*vaes.items(), ("ddpm", ddpm_results)]:
        util.write_json(results, tmp_path / name / "results.json")
    page = Page(pages.course_report(tmp_path, str, reports.TITLES, uda.SCENARIOS))
    rows = page.table("lambda")
    assert list(rows) == ["0.1", "1"]  # folders in order; lambda = 1 is the one drawn
    for results in vaes.values():
        cells = rows[pages.number(results["kl_weight"])]
        expected = [results.get(key, "") for _, key in pages.VAE_COLUMNS[1:]]
        assert cells == [pages.number(value) if value != "" else "" for value in expected]
    assert float(rows["1"][1]) == pytest.approx(0.0123456789, rel=1e-5)
    assert page.table("steps") == {"500": ["ddim", "0.937", "41.2346", "12.5"]}
    assert "<h3>lambda = 1</h3>" in (tmp_path / "report.html").read_text()


# ============================================================================ bench
# Pins the benchmarks' commands.


def test_bench_data_times_a_first_and_a_cached_load(tmp_path, capsys):
    make_mnist(tmp_path)
    bench.main(["data", "--data-root", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("mnist train: 6 images, first load")
    assert any(line.startswith("usps train: skipped (USPS not found") for line in lines)


def test_bench_uda_times_the_steps_of_each_method_it_names(capsys, monkeypatch):
    seen = []
    real_train = uda.train
    monkeypatch.setattr(uda, "train", lambda domains, settings, *args, **kwargs: (
        seen.append((settings.method, len(domains.source_train))),
        real_train(domains, settings, *args, **kwargs))[1])
    bench.main(["uda", "--methods", "source,dann", "--steps", "2", "--threads", "1"])
    lines = [line for line in capsys.readouterr().out.splitlines() if " s a step" in line]
    assert seen == [("source", 256), ("dann", 256)]  # 2 steps of 128 images a domain
    assert [line.split(":")[0] for line in lines] == ["source", "dann"]


def test_bench_kid_times_both_ways_to_one_figure(capsys):
    bench.main(["kid", "--real", "30", "--fake", "20"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0].split(", ")[-1] for line in lines] == [
        "kernels of all pairs at once", "each subset's"]
    figures = [[float(word) for word in line.split(" of ")[0].split()[1::2]] for line in lines]
    assert figures[0] == pytest.approx(figures[1], rel=1e-12)  # the same KID both ways


def test_the_gpu_check_says_so_in_one_line_without_a_gpu(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["gpu"]) == 0
    assert capsys.readouterr().out.strip().splitlines() == [
        "bench.py gpu: this machine has no CUDA GPU (torch.cuda.is_available() is False): "
        "nothing to check here"]


def test_every_row_of_the_gpu_check_is_a_command_line_run_py_accepts(tmp_path, monkeypatch):
    """The check cannot run here; its command lines can be parsed and validated."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    rows = bench.gpu_rows(tmp_path, "cuda", str(weights), 1)
    bench.synthetic_data(tmp_path / "data")
    (tmp_path / "out" / "faces").mkdir(parents=True)  # what the rows before make
    names = [name for name, _, _ in rows]
    for wanted in ("gan a", "gan b", "gan acgan", "gan wgan-gp", "gan hacks", "gan --resume",
                   "gan --generate", "facerate", "fid", "vae", "classifier",
                   "ddpm ddim --amp auto", "ddpm ancestral --amp off", "uda source",
                   "uda self-ensembling", "uda --predict", "torchrun, 1 process(es)"):
        assert wanted in names, wanted
    for name, argv, expected in rows:
        args = run.parse(argv[2:] if argv[0] == "torchrun" else argv)
        if expected == 0 and name != "fid":  # fid compares what the rows before wrote
            run.validate(args)
