"""The one command line of the project.

    python run.py data --name usps --data-root DIR      # counts per split and class + preview
    python run.py summary gan --variant a               # layer table and parameter counts
    python run.py uda --method adda --src mnistm --tgt usps   # domain adaptation
    python run.py report runs                           # runs/report.html, the course's parts

Every command takes the common flags --data-root, --cache, --out, --device, --seed.
Each model module keeps its settings in one dataclass; `add_flags` turns its fields into
flags (`batch_size` becomes --batch-size) and `settings_from` turns the parsed flags back
into the dataclass, so a setting is written in exactly one place.

Errors a user can fix (missing data, a bad flag, a damaged file, a diverged loss, a full
disk) end in one line on stderr and exit status 2, never in a traceback. Flags are checked
in one place, `validate`, before any data is loaded.
"""
import argparse
import contextlib
import dataclasses
import errno
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

import classifier
import data
import ddpm
import gan
import hog
import metrics
import pages
import parallel
import plots
import reports
import tsne
import uda
import util
import vae


# ============================================================================ flags
def add_flags(parser: argparse.ArgumentParser, settings_class, presets=None) -> None:
    """One --flag per dataclass field, typed by its default, help (and the allowed
    values, if any) from its metadata; --preset NAME when the module names settings."""
    if presets:
        parser.add_argument("--preset", choices=sorted(presets), help="named settings, "
                            "flags given beside it win: " + "; ".join(
                                f"{name}: " + " ".join(f"--{key.replace('_', '-')} {value}"
                                                       for key, value in values.items())
                                for name, values in presets.items()))
        parser.set_defaults(presets=presets)
    for field in dataclasses.fields(settings_class):
        flag = "--" + field.name.replace("_", "-")
        default, help_text = field.default, field.metadata.get("help")
        if field.name == "batch_size":
            help_text += ", the global batch: under torchrun each of N processes takes 1/N"
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=help_text)
        else:
            kind = type(default) if default is not None else str
            parser.add_argument(flag, type=kind, default=default,
                                choices=field.metadata.get("choices"), help=help_text)


def add_weights_flag(parser):
    parser.add_argument("--weights", default=None, help="the FID's Inception weights file "
                        f"(default: {Path(metrics.FID_WEIGHTS_URL).name} in --cache, "
                        "downloaded once)")


def settings_from(args: argparse.Namespace, settings_class):
    return settings_class(**{f.name: getattr(args, f.name)
                             for f in dataclasses.fields(settings_class)})


@dataclasses.dataclass
class Common:
    """Flags every command shares."""
    data_root: str = dataclasses.field(default="data", metadata={
        "help": "folder holding (or receiving) mnist/, usps/, mnist_m/, svhn/, celeba/"})
    cache: str = dataclasses.field(default=None, metadata={
        "help": "folder for decoded arrays and the FID weights (default: $DLCV_CACHE, "
                "else ~/.cache/dlcv-from-scratch; '' for no cache)"})
    download: bool = dataclasses.field(default=True, metadata={
        "help": "download missing data sets (--no-download to forbid)"})
    out: str = dataclasses.field(default="runs", metadata={"help": "output folder"})
    device: str = dataclasses.field(default="auto", metadata={"help": "auto, cpu, cuda or mps"})
    seed: int = dataclasses.field(default=0, metadata={"help": "random seed (0 .. 2**32 - 1)"})


# ============================================================================ checks
# Whole-number flags are at least 0 (0 means 'none' or 'all', as each --help says); these
# must be at least 1. Real flags are finite and at least 0, except those named below.
POSITIVE_WHOLE = {"epochs", "adapt_epochs", "steps", "batch_size", "image_size", "latent_dim",
                  "sample_every", "iterations", "timesteps", "width", "sampling_steps",
                  "per_digit", "n_critic"}
POSITIVE_REAL = {"lr", "adda_lr", "gta_lr", "perplexity"}
FRACTIONS = {"ema_decay", "drop_class", "eta", "real_label", "label_noise",  # in [0, 1]
             "label_flip", "dropout", "confidence"}
BELOW_ONE = {"dropout"}                                  # in [0, 1): 1 drops every feature
SIGNED = {"guidance"}                                    # any finite value
IMAGE_SIZES = {"gan": (32, 64), "uda": (28,)}            # what the networks can take
FOLDERS = ("data_root", "out", "cache")
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def validate(args: argparse.Namespace) -> None:
    """Refuse, in one line each, flag values no command can use (before any data is
    loaded or any weights downloaded); warn about odd ones."""
    for name, value in vars(args).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            problem = number_problem(name, value)
            if problem:
                raise util.UserError(f"--{name.replace('_', '-')} {value}: {problem}")
    util.choose_device(args.device)  # every command: a misspelt --device is never ignored
    check_paths(args)
    sizes = IMAGE_SIZES.get(args.command)
    if sizes and args.image_size not in sizes:
        raise util.UserError(f"--image-size {args.image_size}: the {args.command} networks "
                             f"take {' or '.join(map(str, sizes))} pixels a side")
    if getattr(args, "fid_images", 0) == 1:
        raise util.UserError("--fid-images 1: FID fits a covariance, give at least 2 "
                             "(or 0 for no FID)")
    if args.command == "data":
        for split in args.splits.split(","):
            data.check_split(args.name, split)
    if args.command == "gan":
        check_gan(args)
    if args.command == "ddpm" and args.sampling_steps > args.timesteps:
        raise util.UserError(f"--sampling-steps {args.sampling_steps} is more than "
                             f"--timesteps {args.timesteps}: DDIM visits at most T steps")
    if args.command == "uda" and args.batch_size < 2:
        raise util.UserError(f"--batch-size {args.batch_size}: batch norm needs at least 2 "
                             "images of each domain in a batch; give 2 or more")
    if args.command == "uda" and args.src == args.tgt and not args.table:
        print(f"warning: --src and --tgt are both {args.src}: nothing to adapt, every "
              "method should score like source-only", file=sys.stderr)


def check_paths(args: argparse.Namespace) -> None:
    """Folders that are files, inputs that do not exist, outputs whose folder is a file."""
    for name in FOLDERS:
        folder = getattr(args, name, None)
        if folder and Path(folder).exists() and not Path(folder).is_dir():
            raise util.UserError(f"--{name.replace('_', '-')} {folder} is a file: give a "
                                 "folder")
    for name in ("folder", "predict"):
        if getattr(args, name, None) and not Path(getattr(args, name)).is_dir():
            raise util.UserError(f"--{name} {getattr(args, name)} is not a folder: give the "
                                 "folder of images")
    for name in ("csv", "to"):  # files to write
        target = getattr(args, name, None)
        if target and Path(target).is_dir():
            raise util.UserError(f"--{name} {target} is a folder: give a file name")
        blocking = next((folder for folder in Path(target or ".").parents
                         if folder.exists() and not folder.is_dir()), None)
        if target and blocking is not None:
            raise util.UserError(f"--{name} {target}: {blocking} is a file, not a folder; "
                                 "give a path in a folder")
    if getattr(args, "to", None) and Path(args.to).suffix.lower() not in PICTURE_SUFFIXES:
        raise util.UserError(f"--to {args.to}: give a picture file name ending in "
                             f"{', '.join(PICTURE_SUFFIXES)}")
    if getattr(args, "weights", None) and not Path(args.weights).is_file():
        raise util.UserError(f"--weights {args.weights} not found: give the pytorch-fid "
                             f"weights file {Path(metrics.FID_WEIGHTS_URL).name}")
    if args.command == "fid":
        for path in args.paths[:1 if args.save_stats else 2]:
            if not Path(path).exists():
                raise util.UserError(f"{path} not found: give an image folder or a "
                                     "statistics .npz (written by 'run.py fid --save-stats')")


def check_gan(args: argparse.Namespace) -> None:
    if args.real_label - args.label_noise < 0:
        raise util.UserError(f"--label-noise {args.label_noise} with --real-label "
                             f"{args.real_label}: the real targets must lie in [0, 1]")
    unknown = [name for name in filter(None, args.augment.split(","))
               if name not in gan.AUGMENTATIONS]
    if unknown:
        raise util.UserError(f"--augment {args.augment}: no augmentation '{unknown[0]}'; "
                             f"use a comma-separated list of {', '.join(gan.AUGMENTATIONS)}")


def number_problem(name: str, value) -> str | None:
    """What is wrong with a number flag's value, or None."""
    if isinstance(value, int):
        low = 1 if name in POSITIVE_WHOLE else 0
        if value < low:
            return f"give a whole number of at least {low}"
        if name == "seed" and value >= 2**32:
            return "give a seed below 2**32 (NumPy's limit)"
        return None
    if not math.isfinite(value):
        return "give a finite number"
    if name in POSITIVE_REAL and value <= 0:
        return "give a number above 0"
    if name in FRACTIONS and not 0 <= value <= 1:
        return "give a number from 0 to 1"
    if name in BELOW_ONE and value >= 1:
        return "give a rate below 1 (1 drops every feature)"
    if name not in SIGNED and value < 0:
        return "give a number of at least 0"
    return None


def fid_text(results: dict, prefix: str = "") -> str:
    """'FID 41.20, KID 0.0312 +- 0.0021 (500 images against 2,000)' of the results'
    figures named with `prefix`, or 'FID skipped' with the reason, for the closing line
    of a run."""
    if results.get(f"{prefix}fid") is None:
        return "FID skipped (" + results.get("fid_unavailable", "not asked for") + ")"
    images = results[f"{prefix}images" if prefix else "fid_images"]
    return (f"FID {results[prefix + 'fid']:.2f}, KID {results[prefix + 'kid']:.4f} +- "
            f"{results[prefix + 'kid_std']:.4f} ({images:,} images against "
            f"{results['fid_real_images']:,})")


# ============================================================================ CPU cost
# What a training image costs on the 2-core CPU of RESULTS.md: its seconds a step over the
# batch. A GAN step at 64x64 (a, b; ACGAN 1.24) and at 32x32; a WGAN-GP step is 4.6 DCGAN
# steps; a VAE epoch of 8,000 faces; a DDPM step of the U-Net of width 32, whose
# convolutions cost width^2; UDA's steps of 128 images a domain (bench.py uda; ADDA's
# adversarial step from its run's time less the source-only run's).
GAN_SECONDS_PER_IMAGE = {64: 1.21 / 64, 32: 0.30 / 64}
WGAN_GP_STEP_IN_DCGAN_STEPS = 4.6
VAE_SECONDS_PER_IMAGE = 42.5 / 8000
DDPM_SECONDS_PER_IMAGE_AT_WIDTH_32 = 0.65 / 64
UDA_SECONDS_PER_STEP_OF_128 = {"source": 0.077, "dann": 0.120, "dann-ent": 0.120, "adda": 0.03,
                               "gta": 0.500, "self-ensembling": 0.149, "target": 0.077}
LONG_ON_A_CPU = 30 * 60  # seconds: longer runs get the note
PRESETS = {"gan": gan.PRESETS, "vae": vae.PRESETS, "ddpm": ddpm.PRESETS, "uda": uda.PRESETS}


def training_seconds(command: str, settings, images=None) -> tuple[float, str]:
    """About how long `settings` train on that CPU (no FID, no sampling), and what that
    is. images: the training images (vae), or the (source, target) counts (uda)."""
    if command == "gan":
        step = settings.batch_size * GAN_SECONDS_PER_IMAGE[settings.image_size] * (
            WGAN_GP_STEP_IN_DCGAN_STEPS if settings.variant == "wgan-gp" else 1)
        return settings.steps * step, (f"{settings.steps:,} steps of {settings.batch_size} "
                                       f"faces at {settings.image_size}x{settings.image_size}")
    if command == "ddpm":
        step = (settings.batch_size * DDPM_SECONDS_PER_IMAGE_AT_WIDTH_32
                * (settings.width / 32) ** 2)
        return settings.steps * step, (f"{settings.steps:,} steps of {settings.batch_size} "
                                       f"digits, U-Net width {settings.width}")
    if command == "vae":
        return (settings.epochs * images * VAE_SECONDS_PER_IMAGE,
                f"{settings.epochs} epochs of {images:,} faces")
    steps, batch = uda.epoch_shape(*images, settings.batch_size)
    methods = uda.METHODS if settings.method == "all" else (settings.method,)
    epochs = {method: settings.epochs + settings.adapt_epochs * (method == "adda")
              for method in methods}  # ADDA: its pre-training and its adversarial epochs
    seconds = sum(epochs[method] * steps * batch / 128 * UDA_SECONDS_PER_STEP_OF_128[method]
                  for method in methods)
    return seconds, f"{', '.join(methods)}: {settings.epochs} epochs of {steps:,} steps"


def cpu_cost_note(command: str, settings, images=None) -> str | None:
    """One line for a run that is long on a CPU: about how long it trains there, and the
    preset that is shorter; None for a short run."""
    seconds, what = training_seconds(command, settings, images)
    if seconds <= LONG_ON_A_CPU:
        return None
    cpu = PRESETS[command].get("cpu")
    if cpu:
        preset_seconds, _ = training_seconds(command, dataclasses.replace(settings, **cpu),
                                             images)
        shorter = f"--preset cpu trains in about {duration_text(preset_seconds)}"
    else:
        shorter = "no preset is shorter: lower --epochs"
    return (f"note: on a CPU this trains for about {duration_text(seconds)} ({what}, at the "
            f"speed of RESULTS.md's 2-core CPU, before evaluation); {shorter}")


def duration_text(seconds: float) -> str:
    minutes = seconds / 60
    return f"{minutes:.0f} minutes" if minutes < 90 else f"{minutes / 60:.0f} hours"


def print_cpu_cost(args, device: torch.device, settings, images=None) -> None:
    """The note of cpu_cost_note, on a CPU without --preset (from the main process)."""
    note = (cpu_cost_note(args.command, settings, images)
            if device.type == "cpu" and not args.preset and util.main_process() else None)
    if note:
        print(note)


def load_data(common: Common, name: str, split: str, **options) -> data.ImageSet:
    with parallel.main_first():  # under torchrun, rank 0 downloads and caches first
        return data.load(name, split, data_root=common.data_root, cache_dir=common.cache,
                         download=common.download, **options)


def training_device(common: Common, settings) -> torch.device:
    """The device of this process; under torchrun (parallel.py) the process also joins the
    group, and the global batch must split evenly over the processes."""
    device = parallel.start(common.device)
    parallel.check_batch(settings.batch_size)
    if device.type == "cuda":  # the shapes stay the same: let cuDNN time and pick its
        torch.backends.cudnn.benchmark = True  # fastest convolutions once
    return device


# ============================================================================ commands
def run_folder(args) -> Path | None:
    """The folder a training command writes its checkpoint and pictures into; main holds
    its lock for the whole run. None for commands that train nothing."""
    out = Path(args.out)
    if args.command == "gan" and not args.generate:
        return out / f"gan_{args.variant}"
    if args.command == "ddpm" and not args.generate:
        return out / "ddpm"
    if args.command == "uda" and not args.predict:
        return out / "uda"
    if args.command == "vae":
        return out / f"vae_lambda{args.kl_weight:g}"
    return out / args.command if args.command in ("classifier", "tsne") else None


def command_data(args) -> None:
    """Load both splits of a data set, print counts per class, save a preview grid."""
    common = settings_from(args, Common)
    for split in args.splits.split(","):  # each checked by validate
        images = load_data(common, args.name, split, image_size=args.image_size,
                           attribute=args.attribute)
        print(f"{args.name} [{split}]: {data.describe(images)}")
        preview = Path(common.out) / "data" / f"{output_name(args.name)}-{split}-preview.png"
        first = images.images(slice(0, 64))
        reports.save_grid(first, preview, title=f"{args.name} [{split}]: the first "
                          f"{len(first)} of {len(images)} images, {images.image_size}x"
                          f"{images.image_size}")
        print(f"  preview: {preview}")


def output_name(name: str) -> str:
    """The file name of a data set's or a folder's outputs: a data set's name, or the
    folder's last part with 8 digits of the SHA-256 of its full path, so that two folders
    called `samples` write to two files."""
    if name in data.SPLITS:
        return name
    where = hashlib.sha256(str(Path(name).resolve()).encode()).hexdigest()[:8]
    return f"{Path(name).resolve().name}-{where}"


def command_summary(args) -> None:
    """Each network's layers with output shapes and parameter counts, built with the
    defaults of its training command, so the sizes are those it trains."""
    names = ("gan", "vae", "ddpm", "uda", "classifier")
    if args.name not in names:
        raise util.UserError(f"no architecture '{args.name}': give {', '.join(names)}")
    if args.name != "gan" and args.variant is not None:
        raise util.UserError(f"{args.name} has no variants: --variant is for gan "
                             f"({', '.join(gan.VARIANTS)})")
    if args.name == "gan":
        settings = gan.GANSettings(**({} if args.variant is None else {"variant": args.variant}))
        if settings.variant not in gan.VARIANTS:
            raise util.UserError(f"no gan variant '{settings.variant}': give "
                                 f"{', '.join(gan.VARIANTS)}")
        print(gan.summary(settings))
    else:
        print({"vae": lambda: vae.summary(vae.VAESettings()),
               "ddpm": lambda: ddpm.summary(ddpm.DDPMSettings()), "uda": uda.summary,
               "classifier": classifier.summary}[args.name]())


def command_fid(args) -> None:
    """FID, KID and FID_inf of the first of two image folders or saved statistics against
    the second (the reference), like pytorch-fid's command line; or (--save-stats) the
    statistics and features of a folder into a file."""
    common = settings_from(args, Common)
    device = util.choose_device(common.device)

    def network():
        return metrics.load_fid_inception(common.cache, device, args.weights)

    loaded = [metrics.load_statistics(path, network, args.batch_size, device,
                                      args.image_size, common.cache)
              for path in args.paths[:1 if args.save_stats else 2]]
    sizes = {size for _, size in loaded if size is not None}
    if len(sizes) > 1:
        print(f"warning: the folders hold images of {' and '.join(map(str, sorted(sizes)))} "
              "pixels a side; Inception sees both at 299, but the resizing itself moves "
              "FID: pass --image-size to compare at one size", file=sys.stderr)
    if args.save_stats:
        target = Path(args.paths[1])  # named .npz, as `fid` reads statistics by that suffix
        target = target if target.suffix == ".npz" else target.with_name(target.name + ".npz")
        saved = util.write_arrays(metrics.statistics_arrays(loaded[0][0]), target)
        print(f"saved statistics and features of {args.paths[0]} to {saved}")
    else:
        (judged, _), (reference, _) = loaded
        if len(judged.mu) != len(reference.mu):
            raise util.UserError(f"{args.paths[0]} has {len(judged.mu)} features, "
                                 f"{args.paths[1]} {len(reference.mu)}: FID compares statistics "
                                 "of one network (the 2048 pool3 features); compute both with "
                                 "'run.py fid'")
        print("\n".join(comparison_lines(judged, reference, *args.paths, common.seed)))


def comparison_lines(judged: metrics.Statistics, reference: metrics.Statistics,
                     judged_name: str, reference_name: str, seed: int) -> list[str]:
    """FID, KID and FID_inf of `judged` against `reference`, a line each with the image
    counts; where a statistics file lacks the features a figure needs, a line saying so.
    KID's subsets and FID_inf's are drawn by generators seeded with `seed`."""
    def count(side):
        return "an unknown number of images" if side.count is None else f"{side.count:,} images"

    def lacking(*names):
        return (f"not computed: {' and '.join(names)} {'has' if len(names) == 1 else 'have'} "
                "only mu and sigma (written before KID), no features: write it again with "
                "'run.py fid --save-stats FOLDER OUT.npz'")
    compared = f"{count(judged)} of {judged_name} against {count(reference)} of {reference_name}"
    fid = metrics.frechet_distance(judged.mu, judged.sigma, reference.mu, reference.sigma)
    lines = [f"FID: {fid:.4f} ({compared})"]
    missing = [name for name, side in ((judged_name, judged), (reference_name, reference))
               if side.features is None]
    if missing:
        lines.append(f"KID: {lacking(*missing)}")
    else:
        kid, kid_std = metrics.kid(reference.features, judged.features,
                                   torch.Generator().manual_seed(seed))
        subset = min(metrics.KID_SUBSET_SIZE, judged.count, reference.count)
        lines.append(f"KID: {kid:.4f} +- {kid_std:.4f} (mean and std over "
                     f"{metrics.KID_SUBSETS} subsets of {subset:,} images a side; {compared})")
    if judged.features is None:
        lines.append(f"FID_inf: {lacking(judged_name)}")
        return lines
    counts = metrics.fid_infinity_counts(judged.count)
    try:
        fid_inf = metrics.fid_infinity(judged.features, reference.mu, reference.sigma,
                                       torch.Generator().manual_seed(seed))
    except util.UserError as error:  # too few images for a line
        lines.append(f"FID_inf: not computed: {error}")
        return lines
    lines.append(f"FID_inf: {fid_inf:.4f} (FIDs of {len(counts)} subsets of {counts[0]:,} to "
                 f"{counts[-1]:,} of the {compared}, extrapolated linearly in 1/N to "
                 "infinitely many)")
    return lines


def command_tsne(args) -> None:
    """t-SNE of saved features (.npz) or of a data set's pixels (after PCA to 50 dims)."""
    common = settings_from(args, Common)
    if args.source.endswith(".npz"):
        features, labels = saved_features(args.source, args.key, args.labels_key)
        title = Path(args.source).stem
    else:
        images = load_data(common, args.source, args.split)
        features = images.pixels.reshape(len(images), -1).numpy() / 255.0
        labels = None if images.labels is None else images.labels.numpy()
        title = f"{Path(args.source).name} {args.split}"
    features = features[:args.limit] if args.limit else features
    labels = labels[:len(features)] if labels is not None else None
    check_tsne_input(features, args.perplexity)
    if features.shape[1] > 50:
        features = tsne.pca(features.astype(np.float64), 50)
    progress = util.Progress(desc="t-SNE", total=args.iterations)
    embedding, kl = tsne.tsne(features, args.perplexity, common.seed, args.method,
                              args.iterations, return_kl=True,
                              progress=lambda step, kl: progress.update(1, kl=kl))
    progress.close()
    out = run_folder(args)
    k = min(12, tsne.max_trustworthiness_k(len(features)))  # defined for k < N / 2
    results = {"points": len(features), "kl": kl, "trustworthiness_k": k,
               "trustworthiness": tsne.trustworthiness(features, embedding, k)}
    if labels is not None:
        results["knn10_accuracy"] = tsne.knn_accuracy(embedding, labels, 10)
    plots.scatter_plot(embedding, labels if labels is not None else np.zeros(len(features)),
                       out / "tsne.png", title=f"t-SNE of {title}")
    util.write_arrays({"embedding": embedding, **({} if labels is None else {"labels": labels})},
                      out / "embedding.npz")
    util.write_json(results, out / "results.json")
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                   for k, v in results.items()) + f"\n  wrote {out}/tsne.png, embedding.npz")


def saved_features(path: str, key: str, labels_key: str):
    """(features (N, D), labels (N,) or None) from an .npz, checked."""
    stored = util.read_arrays(path, "save it with numpy.savez")
    if key not in stored:
        raise util.UserError(f"{path} has no array '{key}' (it has {', '.join(stored)}): "
                             "pass --key NAME")
    features = stored[key].reshape(len(stored[key]), -1).astype(np.float64)
    labels = stored.get(labels_key)
    if labels is not None and len(labels) != len(features):
        raise util.UserError(f"{path}: '{labels_key}' has {len(labels)} entries for "
                             f"{len(features)} rows of '{key}': give one label per row")
    return features, labels


def check_tsne_input(features: np.ndarray, perplexity: float):
    """t-SNE needs finite features and, for perplexity P, at least 3 P + 1 points: each
    point's Gaussian must spread over about 3 P neighbours."""
    bad = ~np.isfinite(features).all(axis=1)
    if bad.any():
        raise util.UserError(f"{int(bad.sum())} of {len(features)} feature rows hold NaN or "
                             f"infinite values (first: row {int(np.argmax(bad))}): remove them")
    needed = max(4, math.ceil(3 * perplexity + 1))
    if len(features) < needed:
        raise util.UserError(f"{len(features)} points are too few for perplexity "
                             f"{perplexity:g}: t-SNE needs at least {needed}; lower "
                             "--perplexity or give more points (--limit)")


def command_classifier(args) -> None:
    """Train the digit classifier that grades generated digits."""
    common = settings_from(args, Common)
    settings = settings_from(args, classifier.ClassifierSettings)
    device = training_device(common, settings)
    train = load_data(common, settings.data, "train")
    test = load_data(common, settings.data, "test")
    if train.labels is None or test.labels is None:
        raise util.UserError(f"{settings.data} has no labels: the classifier needs labelled "
                             "digits (a csv with image_name,label)")
    out = run_folder(args)
    results = classifier.train(train, test, settings, out, device, common.seed)
    print(f"test accuracy {results['test_accuracy']:.4f} ({results['correct']}/"
          f"{results['total']}); checkpoint {out / 'checkpoint.pt'}")


def command_classify(args) -> None:
    """Accuracy of the classifier on a folder whose file names start with their digit."""
    common = settings_from(args, Common)
    device = util.choose_device(common.device)
    checkpoint = args.ckpt or Path(common.out) / "classifier" / "checkpoint.pt"
    network = classifier.load(checkpoint, device)
    images = data.load(args.folder, "train", image_size=28, cache_dir="")
    labels = torch.tensor([classifier.label_from_name(name) for name in images.names])
    predictions = classifier.predict(network, images, device=device)
    share, correct, total = classifier.accuracy(predictions, labels)
    print(f"accuracy {share:.4f} ({correct}/{total}) on {args.folder}")
    for digit in range(10):
        mine = labels == digit
        if mine.any():
            print(f"  {digit}: {float((predictions[mine] == digit).float().mean()):.3f} "
                  f"of {int(mine.sum())}")


def command_curves(args) -> None:
    """The FID curves of several runs in one picture, from their results.json files, and
    their KID curves in a second (TO_kid.png) when every run measured KID."""
    curves = {}
    names = [Path(folder).resolve().name for folder in args.runs]
    for folder, name in zip(args.runs, names):
        curve = fid_curve_of(Path(folder) / "results.json")
        against = f" against {curve['real_images']:,}" if "real_images" in curve else ""
        if names.count(name) > 1:  # runs/x/gan_b and runs/y/gan_b: x/gan_b and y/gan_b
            name = "/".join(Path(folder).resolve().parts[-2:])
        curves[f"{name} ({curve['images']:,} samples{against})"] = curve
    steps = {name: curve["step"] for name, curve in curves.items()}
    plots.line_plot({name: curve["fid"] for name, curve in curves.items()}, args.to,
                    title=args.title, xlabel="step", ylabel="FID", x=steps)
    print(f"wrote {args.to}")
    if all("kid" in curve for curve in curves.values()):
        to = Path(args.to).with_name(f"{Path(args.to).stem}_kid{Path(args.to).suffix}")
        plots.line_plot({name: [np.nan if kid is None else kid for kid in curve["kid"]]
                         for name, curve in curves.items()}, to,
                        title="KID (mean over subsets) against training step", xlabel="step",
                        ylabel="KID", x=steps)
        print(f"wrote {to}")


def fid_curve_of(path: Path) -> dict:
    """The fid_curve of a run's results.json ({"images": n, "step": [...], "fid": [...]}),
    checked: a damaged or foreign file ends in one line."""
    if not path.is_file():
        raise util.UserError(f"{path} not found: give folders of finished gan, vae or ddpm "
                             "runs")
    try:
        results = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:  # truncated, or not JSON
        raise util.UserError(f"{path} is not readable JSON ({type(error).__name__}): it is "
                             "damaged or truncated; run that training again") from None
    curve = results.get("fid_curve") if isinstance(results, dict) else None
    if not curve:
        raise util.UserError(f"{path} has no FID curve: the run measured no FID (give it "
                             "--weights, and --fid-images above 0), or it is not a run's "
                             "results.json")
    steps, scores, kids = (curve.get(key) if isinstance(curve, dict) else None
                           for key in ("step", "fid", "kid"))
    if (not isinstance(curve, dict) or "images" not in curve or not isinstance(steps, list)
            or not isinstance(scores, list) or len(steps) != len(scores)
            or not all(isinstance(v, (int, float)) for v in steps + scores)
            or kids is not None and (not isinstance(kids, list) or len(kids) != len(steps)
                                     or not all(isinstance(v, (int, float, type(None)))
                                                for v in kids))):
        raise util.UserError(f"{path}: its fid_curve is not {{'images', 'step', 'fid'}} with "
                             "one FID (and KID) per step: the file is damaged; run that "
                             "training again")
    return curve


def command_report(args) -> None:
    """RUNS/report.html, the course's parts filled from the runs under RUNS (pages.py)."""
    path = pages.course_report(Path(args.runs), gan_architecture, reports.TITLES,
                               uda.SCENARIOS)
    print(f"wrote {path}")


def gan_architecture(settings: dict) -> str:
    """The layer tables of the GAN a run's results.json names (settings it knows only)."""
    known = {field.name for field in dataclasses.fields(gan.GANSettings)}
    return gan.summary(gan.GANSettings(**{name: value for name, value in settings.items()
                                          if name in known}))


def command_facerate(args) -> None:
    """Share of the images in --folder in which the HOG face detector finds a face; the
    detector is trained once (CelebA and MNIST-M training images) when there is none."""
    common = settings_from(args, Common)
    detector_path = Path(args.detector or Path(common.out) / "face_detector" / "detector.pt")
    if not detector_path.exists():
        if args.detector:
            raise util.UserError(f"--detector {args.detector} not found: leave it out to "
                                 "train one into OUT/face_detector/")
        train_face_detector(common, detector_path)
    detector = hog.load_face_detector(detector_path)
    images = data.load(args.folder, "train", image_size=64, cache_dir="")
    found = detector.detect(images.images())
    results = {"folder": str(args.folder), "images": len(images), "faces": int(found.sum()),
               "face_rate": found.float().mean().item(), "detector": str(detector_path)}
    path = Path(common.out) / "facerate" / f"{output_name(args.folder)}.json"
    util.write_json(results, path)
    print(f"face rate {results['face_rate']:.4f} ({results['faces']}/{len(images)}) in "
          f"{args.folder}; written to {path}")


def train_face_detector(common: Common, path: Path):
    """The detector from 6,000 CelebA training faces and 6,000 MNIST-M training digits,
    checked on the first 2,000 test faces and the first 2,000 MNIST-M test digits."""
    print(f"training the face detector into {path} (once)")
    faces, backgrounds = (load_data(common, hog.DETECTOR_DATA[kind], split, image_size=size,
                                    limit=count).images()
                          for kind, split, size, count in (("faces", "train", 64, 6000),
                                                            ("non_faces", "train", 28, 6000)))
    detector = hog.train_face_detector(faces, backgrounds, common.seed)
    rates = hog.face_rates(
        detector, load_data(common, hog.DETECTOR_DATA["faces"], "test", image_size=64,
                            limit=2000).images(),
        load_data(common, hog.DETECTOR_DATA["non_faces"], "test", limit=2000).images(),
        common.seed)
    hog.save_face_detector(detector, rates, path)
    util.write_json(rates, path.with_name("results.json"))
    print("held out: faces found in {faces_detected:.4f} of the test faces, in "
          "{backgrounds_detected:.4f} of the MNIST-M digits and {scrambled_detected:.4f} "
          "of the scrambled faces".format(**rates))


def command_vae(args) -> None:
    """Train the VAE on faces; outputs go to OUT/vae_lambda{kl_weight}."""
    common, settings = settings_from(args, Common), settings_from(args, vae.VAESettings)
    device = training_device(common, settings)
    faces = load_data(common, settings.data, "train", image_size=64,
                      limit=settings.limit or None)
    print_cpu_cost(args, device, settings, len(faces))
    test = load_data(common, settings.data, "test", image_size=64,
                     attribute=settings.attribute if settings.data == "celeba" else None)
    out = run_folder(args)
    results = vae.train(faces, test, settings, out, device, common.seed, common.cache,
                        args.weights)
    print(f"test MSE {results['test_mse']:.4f}, KL {results['test_kl']:.1f}; outputs in {out}/")


def command_ddpm(args) -> None:
    """Train the conditional DDPM on digits, or (--generate --ckpt C) write the 1000
    homework images 0_001.png .. 9_100.png into --out."""
    common, settings = settings_from(args, Common), settings_from(args, ddpm.DDPMSettings)
    device = training_device(common, settings)
    if args.generate:
        if not args.ckpt:
            raise util.UserError("--generate needs --ckpt CHECKPOINT (e.g. runs/ddpm/checkpoint.pt)")
        model, trained = ddpm.load(args.ckpt, device)
        sampling = dataclasses.replace(trained, sampler=settings.sampler,
                                       sampling_steps=settings.sampling_steps,
                                       eta=settings.eta, guidance=settings.guidance,
                                       amp=settings.amp)
        _, _, seconds = ddpm.course_digits(model, sampling, common.seed, Path(common.out),
                                           per_digit=args.per_digit)
        print(f"wrote {10 * args.per_digit} images to {common.out} in {seconds:.1f} s "
              f"({sampling.sampler}"
              f"{', %d steps' % sampling.sampling_steps if sampling.sampler == 'ddim' else ''})")
        return
    print_cpu_cost(args, device, settings)
    digits = load_data(common, settings.data, "train")
    test = load_data(common, settings.data, "test")
    out = run_folder(args)
    if not settings.classifier:
        settings.classifier = str(Path(common.out) / "classifier" / "checkpoint.pt")
    results = ddpm.train(digits, test, settings, out, device, common.seed, common.cache,
                         args.weights)
    accuracy = results["digit_accuracy"]
    course_fid = (f"; the 1000 digits' {fid_text(results, 'course_digits_')}"
                  if "course_digits_fid" in results else "")
    print(f"done: digit accuracy {'skipped (no classifier)' if accuracy is None else accuracy}"
          f", {fid_text(results)}{course_fid}; outputs in {out}/")


def command_uda(args) -> None:
    """Domain adaptation: one method, all methods of a scenario, the table of the four
    homework scenarios, or predictions of a trained checkpoint for a folder (as a csv)."""
    common, settings = settings_from(args, Common), settings_from(args, uda.UDASettings)
    device = training_device(common, settings)
    if args.predict:
        return predict_folder(args, common, device)
    methods = uda.METHODS if settings.method == "all" else (settings.method,)

    def load(name, split, image_size):
        return load_data(common, name, split, image_size=image_size)
    out = run_folder(args)

    def note_cost(scenario: uda.UDASettings, counts: tuple[int, int]):
        print_cpu_cost(args, device, scenario, counts)
    if args.table:
        table = uda_table(settings, methods, load, out, device, common.seed, note_cost)
        print(reports.full_table(table) + f"wrote {out}/results.md and results.json")
        return
    scenario = out / f"{Path(settings.src).name}-{Path(settings.tgt).name}"
    rows = uda_methods(settings, methods, load, scenario, device, common.seed, note_cost)
    print(reports.scenario_table(rows, settings.src, settings.tgt) + f"outputs in {scenario}/")


def uda_methods(settings: uda.UDASettings, methods, load, out: Path, device, seed: int,
                note_cost=None) -> dict:
    """Every method on one scenario: {method: results}, and results.md for the row set.
    ADDA starts from the source-only run's checkpoint when that ran first. note_cost:
    called with the settings and the training images' counts once they are loaded."""
    domains = uda.load_domains(settings, load)
    if note_cost:
        note_cost(settings, (len(domains.source_train), len(domains.target_train)))
    rows = {}
    for method in methods:
        if method == "target" and domains.target_train.labels is None:
            print(f"skipping 'target': {settings.tgt} has no labels")
            continue
        print(f"== {reports.TITLES[method]}: {settings.src} -> {settings.tgt}")
        pretrained = out / "source" / "checkpoint.pt" if "source" in rows else None
        rows[method] = uda.train(domains, dataclasses.replace(settings, method=method),
                                 out / method, device, seed, pretrained)
    util.write_json(rows, out / "results.json")
    util.write_text(reports.scenario_table(rows, settings.src, settings.tgt), out / "results.md")
    return rows


def uda_table(settings: uda.UDASettings, methods, load, out: Path, device, seed: int,
              note_cost=None) -> dict:
    """The four digit scenarios of the DLCV homework (uda.SCENARIOS); one whose data is
    missing is reported, not fatal. note_cost: as uda_methods'."""
    table = {}
    for src, tgt in uda.SCENARIOS:
        scenario = f"{src}-{tgt}"
        try:
            table[scenario] = {"rows": uda_methods(
                dataclasses.replace(settings, src=src, tgt=tgt), methods, load,
                out / scenario, device, seed, note_cost)}
        except util.UserError as error:
            print(f"skipping {src} -> {tgt}: {error}")
            table[scenario] = {"error": str(error)}
        util.write_json(table, out / "results.json")
        util.write_text(reports.full_table(table), out / "results.md")
    return table


def predict_folder(args, common: Common, device) -> None:
    if not args.ckpt or not args.csv:
        raise util.UserError("--predict DIR needs --ckpt CHECKPOINT and --csv OUT.csv")
    network, settings = uda.load_for_prediction(args.ckpt, device)
    images = data.load(args.predict, "test", image_size=settings.image_size, cache_dir="")
    if images.names is None:
        raise util.UserError(f"{args.predict} gives no file names: pass a folder of images")
    predictions = classifier.predict(network, images, device=device)
    reports.write_predictions(images.names, predictions, Path(args.csv))
    print(f"wrote {len(images)} predictions to {args.csv}")


def command_gan(args) -> None:
    """Train a GAN on faces, or (--generate N --ckpt C) write N images to --out."""
    common, settings = settings_from(args, Common), settings_from(args, gan.GANSettings)
    device = training_device(common, settings)
    if args.generate:
        return generate_faces(args.generate, args.ckpt, Path(common.out), device, common.seed)
    print_cpu_cost(args, device, settings)
    attribute = settings.attribute if settings.variant == "acgan" else None
    faces = load_data(common, settings.data, "train", image_size=settings.image_size,
                      attribute=attribute, limit=settings.limit or None)
    held_out = load_data(common, settings.data, "test", image_size=settings.image_size)
    print(f"{len(faces)} training faces, {len(held_out)} held out for FID")
    out = run_folder(args)
    results = gan.train(faces, held_out, settings, out, device, common.seed, common.cache,
                        args.weights)
    print(f"done: {results['steps']} steps, {results['seconds_per_step']:.3f} s/step, "
          f"{fid_text(results)}; outputs in {out}/")


def generate_faces(count: int, checkpoint, out: Path, device, seed: int):
    """`count` PNGs from a GAN checkpoint (the homework's deliverable), z from the fixed
    stream "samples" of --seed, in batches split across the processes under torchrun."""
    if not checkpoint:
        raise util.UserError("--generate needs --ckpt CHECKPOINT (e.g. runs/gan_b/checkpoint.pt)")
    model, settings = gan.load(checkpoint, device)
    start = time.perf_counter()
    images = torch.cat(parallel.in_order(lambda batch: model.sample(*batch),
                                         gan.noise_batches(settings, count, seed, "samples")))
    paths = data.save_images(images, out, [f"{i:04d}.png" for i in range(count)])
    print(f"wrote {len(paths)} images to {out} in {time.perf_counter() - start:.1f} s")


# the commands that train, and so may run under torchrun (with their --generate)
DISTRIBUTED = ("gan", "vae", "ddpm", "uda", "classifier")


# ============================================================================ parser
class Parser(argparse.ArgumentParser):
    """argparse, with its errors (unknown flag, 'x' for a number) as one line and exit
    status 2 like every other error here, instead of a usage block."""

    def error(self, message):
        raise util.UserError(f"{message} (see 'python {self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="run.py", description="Generative models and domain adaptation from scratch.")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name, function, help_text):
        sub = commands.add_parser(name, help=help_text,
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        add_flags(sub, Common)
        sub.set_defaults(function=function)
        return sub

    sub = command("data", command_data, "load a data set, print counts, save a preview")
    sub.add_argument("--name", required=True,
                     help="mnist, mnistm, svhn, usps, celeba, or a folder path")
    sub.add_argument("--splits", default="train,test", help="comma-separated splits")
    sub.add_argument("--image-size", type=int, default=None,
                     help="side in pixels (digits 28, faces 64)")
    sub.add_argument("--attribute", default=None, help="CelebA attribute used as label")

    sub = command("summary", command_summary, "print a network's layers and parameters")
    sub.add_argument("name", help="gan, vae, ddpm, uda or classifier")
    sub.add_argument("--variant", default=None,
                     help=f"gan only: {', '.join(gan.VARIANTS)}; if not given, that of 'run.py gan' "
                          f"({gan.GANSettings().variant})")

    sub = command("fid", command_fid, "FID, KID and FID_inf of a folder against another or "
                  "an .npz")
    sub.add_argument("paths", nargs=2, help="the images judged, then the reference: image "
                     "folders or statistics files (.npz)")
    sub.add_argument("--save-stats", action="store_true",
                     help="write the statistics and features of the first folder to the "
                          "second path")
    sub.add_argument("--batch-size", type=int, default=50)
    sub.add_argument("--image-size", type=int, default=None,
                     help="resize folder images to this side first (if sizes differ)")
    add_weights_flag(sub)

    sub = command("tsne", command_tsne, "t-SNE plot of features (.npz) or of a data set")
    sub.add_argument("source", help="an .npz of features, or a data set name / folder")
    sub.add_argument("--key", default="features", help="array of the .npz to embed")
    sub.add_argument("--labels-key", default="labels", help="array of the .npz with labels")
    sub.add_argument("--split", default="test")
    sub.add_argument("--limit", type=int, default=2000, help="embed the first N (0: all)")
    sub.add_argument("--perplexity", type=float, default=30.0)
    sub.add_argument("--method", default="auto", choices=["auto", "exact", "fft"])
    sub.add_argument("--iterations", type=int, default=1000)

    sub = command("classifier", command_classifier, "train the digit classifier (evaluator)")
    add_flags(sub, classifier.ClassifierSettings)

    sub = command("classify", command_classify, "digit accuracy of a folder like 3_042.png")
    sub.add_argument("--folder", required=True, help="images named DIGIT_*.png")
    sub.add_argument("--ckpt", default=None, help="default: OUT/classifier/checkpoint.pt")

    sub = command("gan", command_gan,
                  "GANs on faces: --variant a (DCGAN), b, acgan, wgan-gp, hacks")
    add_flags(sub, gan.GANSettings, gan.PRESETS)
    add_weights_flag(sub)
    sub.add_argument("--generate", type=int, default=0,
                     help="write this many images from --ckpt into --out, then stop")
    sub.add_argument("--ckpt", default=None, help="checkpoint for --generate")

    sub = command("curves", command_curves, "the FID curves of several runs in one picture")
    sub.add_argument("runs", nargs="+", help="run folders with a results.json")
    sub.add_argument("--to", default="fid_curves.png", help="the picture to write")
    sub.add_argument("--title", default="FID against training step")

    sub = command("facerate", command_facerate,
                  "share of a folder's images in which a HOG face detector finds a face")
    sub.add_argument("--folder", required=True, help="images, e.g. from 'gan --generate'")
    sub.add_argument("--detector", default=None,
                     help="detector file (default: OUT/face_detector/detector.pt, trained "
                          "there from CelebA and MNIST-M under --data-root if absent)")

    sub = command("report", command_report, "the course's results from the runs of a "
                  "folder in one page: RUNS/report.html")
    sub.add_argument("runs", nargs="?", default="runs", help="the folder the runs wrote into")

    sub = command("vae", command_vae, "variational autoencoder on faces")
    add_flags(sub, vae.VAESettings, vae.PRESETS)
    add_weights_flag(sub)

    sub = command("ddpm", command_ddpm, "conditional diffusion on digits (DDPM / DDIM)")
    add_flags(sub, ddpm.DDPMSettings, ddpm.PRESETS)
    add_weights_flag(sub)
    sub.add_argument("--generate", action="store_true",
                     help="write the 1000 homework images from --ckpt into --out, timed")
    sub.add_argument("--per-digit", type=int, default=100,
                     help="images of each digit for --generate (the homework asks for 100)")
    sub.add_argument("--ckpt", default=None, help="checkpoint for --generate")

    sub = command("uda", command_uda, "domain adaptation: source, dann, dann-ent, adda, gta, "
                  "self-ensembling, target")
    add_flags(sub, uda.UDASettings, uda.PRESETS)
    sub.add_argument("--table", action="store_true",
                     help="run the homework's four scenarios and write results.md")
    sub.add_argument("--predict", default=None, help="folder of images to label (with --ckpt)")
    sub.add_argument("--ckpt", default=None, help="checkpoint for --predict")
    sub.add_argument("--csv", default=None, help="predictions file for --predict")
    parser.command_parsers = commands.choices  # name -> sub-parser, for --preset
    return parser


def parse(argv=None) -> argparse.Namespace:
    """The flags; with --preset NAME, the preset's values are the defaults that flags given
    beside it override."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "preset", None):
        parser.command_parsers[args.command].set_defaults(**args.presets[args.preset])
        args = parser.parse_args(argv)
    return args


def main(argv=None) -> int:
    try:
        args = parse(argv)
        validate(args)
        folder = run_folder(args)
        if parallel.launched() and args.command not in DISTRIBUTED:
            raise util.UserError(f"'run.py {args.command}' runs in one process: start it "
                                 f"with python, not torchrun (torchrun trains: "
                                 f"{', '.join(DISTRIBUTED)})")
        # under torchrun rank 0 holds the lock for the run's processes
        with util.exclusive(folder) if folder and util.main_process() \
                else contextlib.nullcontext():
            args.function(args)
    except util.UserError as error:
        if util.main_process():  # under torchrun every process meets the same error
            print(f"error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`run.py summary gan | head`): done
        sys.stdout = open(os.devnull, "w")  # so that the final flush cannot fail again
        return 0
    except OSError as error:  # a read-only or full disk, a missing folder, ...
        print(f"error: {os_error_text(error)}", file=sys.stderr)
        return 2
    except torch.cuda.OutOfMemoryError as error:
        print(f"error: {out_of_memory_text(error)}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        if "out of memory" in str(error):  # Apple's MPS says it so
            print(f"error: {out_of_memory_text(error)}", file=sys.stderr)
            return 2
        if not parallel.lost(error):
            raise
        print(f"error: the processes of this torchrun lost each other ({parallel.failure(error)}"
              "): checkpoints written so far are intact; fix the cause (a crashed or "
              "killed process, see its message) and continue with --resume",
              file=sys.stderr)  # a process died, hung or lost its peer
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: checkpoints written so far are kept; continue with --resume",
              file=sys.stderr)
        return 130
    finally:
        parallel.stop()
    return 0


def out_of_memory_text(error: Exception) -> str:
    first = (str(error).strip().splitlines() or [""])[0].split(". ")[0][:120]
    return (f"the device ran out of memory ({first}): start again with a lower "
            "--batch-size (a --resume keeps the batch size of the run it continues); "
            "checkpoints written so far are kept")


def os_error_text(error: OSError) -> str:
    where = f" ({error.filename})" if error.filename else ""
    advice = ("free disk space, or write elsewhere (--out, --cache)"
              if error.errno == errno.ENOSPC else
              "choose folders you can write to (--out, --cache, --data-root)"
              if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else
              "check the paths given (--out, --cache, --data-root)")
    return f"{error.strerror or error}{where}: {advice}"


if __name__ == "__main__":
    sys.exit(main())
