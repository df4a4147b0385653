"""The one command line of the project.

    python run.py data --name usps --data-root DIR      # counts per split and class + preview
    python run.py summary gan --variant a               # layer table and parameter counts
    python run.py uda --method adda --src mnistm --tgt usps   # domain adaptation

Every command takes the common flags --data-root, --cache, --out, --device, --seed.
Each model module keeps its settings in one dataclass; `add_flags` turns its fields into
flags (`batch_size` becomes --batch-size) and `settings_from` turns the parsed flags back
into the dataclass, so a setting is written in exactly one place.

Errors a user can fix (missing data, a bad flag, a damaged file, a diverged loss) end in
one line on stderr and exit status 2, never in a traceback.
"""
import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

import data
import ddpm
import gan
import metrics
import nets
import plots
import tsne
import uda
import util
import vae


# ============================================================================ flags
def add_flags(parser: argparse.ArgumentParser, settings_class) -> None:
    """One --flag per dataclass field, typed by its default, help from its comment."""
    for field in dataclasses.fields(settings_class):
        flag = "--" + field.name.replace("_", "-")
        default = field.default
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=field.metadata.get("help"))
        else:
            kind = type(default) if default is not None else str
            parser.add_argument(flag, type=kind, default=default,
                                help=field.metadata.get("help"))


def settings_from(args: argparse.Namespace, settings_class):
    return settings_class(**{f.name: getattr(args, f.name)
                             for f in dataclasses.fields(settings_class)})


@dataclasses.dataclass
class Common:
    """Flags every command shares."""
    data_root: str = dataclasses.field(default="data", metadata={
        "help": "folder holding (or receiving) mnist/, usps/, mnist_m/, svhn/, celeba/"})
    cache: str = dataclasses.field(default=str(data.DEFAULT_CACHE), metadata={
        "help": "where decoded arrays are cached"})
    download: bool = dataclasses.field(default=True, metadata={
        "help": "download missing data sets (--no-download to forbid)"})
    out: str = dataclasses.field(default="runs", metadata={"help": "output folder"})
    device: str = dataclasses.field(default="auto", metadata={"help": "auto, cpu, cuda or mps"})
    seed: int = dataclasses.field(default=0, metadata={"help": "random seed"})


def load_data(common: Common, name: str, split: str, **options) -> data.ImageSet:
    return data.load(name, split, data_root=common.data_root, cache_dir=common.cache,
                     download=common.download, **options)


# ============================================================================ commands
def command_data(args) -> None:
    """Load both splits of a data set, print counts per class, save a preview grid."""
    common = settings_from(args, Common)
    for split in args.splits.split(","):
        images = load_data(common, args.name, split, image_size=args.image_size,
                           attribute=args.attribute)
        print(f"{args.name} [{split}]: {data.describe(images)}")
        preview = Path(common.out) / "data" / f"{Path(args.name).name}-{split}-preview.png"
        data.save_grid(images.images(slice(0, 64)), preview)
        print(f"  preview: {preview}")


def architectures(name: str, variant: str):
    """(title, network, input size) triples that `summary` can show."""
    if name == "gan" and variant in gan.VARIANTS:
        model = gan.GAN(gan.GANSettings(variant=variant))
        return [("generator", model.generator, (model.generator[0].in_channels, 1, 1)),
                ("discriminator", model.discriminator, (3, 64, 64))]
    raise util.UserError(f"no architecture '{name}' variant '{variant}': try "
                         "'summary gan --variant a' (or b, acgan)")


def command_summary(args) -> None:
    for title, network, input_size in architectures(args.name, args.variant):
        print(f"{args.name} variant {args.variant}: {title}")
        print(nets.summary(network, input_size))


def command_fid(args) -> None:
    """FID between two image folders or saved statistics, like pytorch-fid's command line."""
    common = settings_from(args, Common)
    device = util.choose_device(common.device)

    def network():
        weights = args.weights or metrics.fid_weights(common.cache)
        inception = metrics.FIDInception()
        inception.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        return inception.eval().to(device)

    statistics = [metrics.load_statistics(path, network, args.batch_size, device,
                                          args.image_size, common.cache)
                  for path in args.paths[:1 if args.save_stats else 2]]
    if args.save_stats:
        mu, sigma = statistics[0]
        target = Path(args.paths[1])  # named .npz, as `fid` reads statistics by that suffix
        target = target if target.suffix == ".npz" else target.with_name(target.name + ".npz")
        saved = util.write_arrays({"mu": mu, "sigma": sigma}, target)
        print(f"saved statistics of {args.paths[0]} to {saved}")
    else:
        print(f"FID: {metrics.frechet_distance(*statistics[0], *statistics[1]):.4f}")


def command_tsne(args) -> None:
    """t-SNE of saved features (.npz) or of a data set's pixels (after PCA to 50 dims)."""
    common = settings_from(args, Common)
    if args.source.endswith(".npz"):
        with np.load(args.source) as stored:
            if args.key not in stored:
                raise util.UserError(f"{args.source} has no array '{args.key}' (it has "
                                     f"{', '.join(stored.files)}): pass --key NAME")
            features = stored[args.key].reshape(len(stored[args.key]), -1)
            labels = stored[args.labels_key] if args.labels_key in stored else None
        title = Path(args.source).stem
    else:
        images = load_data(common, args.source, args.split)
        features = images.pixels.reshape(len(images), -1).numpy() / 255.0
        labels = None if images.labels is None else images.labels.numpy()
        title = f"{Path(args.source).name} {args.split}"
    features = features[:args.limit] if args.limit else features
    labels = labels[:len(features)] if labels is not None else None
    if features.shape[1] > 50:
        features = tsne.pca(features.astype(np.float64), 50)
    progress = util.Progress(desc="t-SNE", total=args.iterations)
    embedding, kl = tsne.tsne(features, args.perplexity, common.seed, args.method,
                              args.iterations, return_kl=True,
                              progress=lambda step, kl: progress.update(1, kl=kl))
    progress.close()
    out = Path(common.out) / "tsne"
    results = {"points": len(features), "kl": kl,
               "trustworthiness_k12": tsne.trustworthiness(features, embedding, 12)}
    if labels is not None:
        results["knn10_accuracy"] = tsne.knn_accuracy(embedding, labels, 10)
    plots.scatter_plot(embedding, labels if labels is not None else np.zeros(len(features)),
                       out / "tsne.png", title=f"t-SNE of {title}")
    util.write_arrays({"embedding": embedding, **({} if labels is None else {"labels": labels})},
                      out / "embedding.npz")
    util.write_json(results, out / "results.json")
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                   for k, v in results.items()) + f"\n  wrote {out}/tsne.png, embedding.npz")


def command_classifier(args) -> None:
    """Train the digit classifier that grades generated digits."""
    common, settings = settings_from(args, Common), settings_from(args, metrics.ClassifierSettings)
    device = util.choose_device(common.device)
    util.seed_everything(common.seed)
    train = load_data(common, settings.data, "train")
    test = load_data(common, settings.data, "test")
    if train.labels is None or test.labels is None:
        raise util.UserError(f"{settings.data} has no labels: the classifier needs labelled "
                             "digits (a csv with image_name,label)")
    results = metrics.train_classifier(train, test, settings, Path(common.out) / "classifier",
                                       device, common.seed)
    print(f"test accuracy {results['test_accuracy']:.4f} ({results['correct']}/"
          f"{results['total']}); checkpoint {Path(common.out) / 'classifier' / 'checkpoint.pt'}")


def command_classify(args) -> None:
    """Accuracy of the classifier on a folder whose file names start with their digit."""
    common = settings_from(args, Common)
    device = util.choose_device(common.device)
    checkpoint = args.ckpt or Path(common.out) / "classifier" / "checkpoint.pt"
    network = metrics.load_classifier(checkpoint, device)
    images = data.load(args.folder, "train", image_size=28, cache_dir=None)
    labels = torch.tensor([metrics.label_from_name(name) for name in images.names])
    predictions = metrics.predict(network, images, device=device)
    share, correct, total = metrics.accuracy(predictions, labels)
    print(f"accuracy {share:.4f} ({correct}/{total}) on {args.folder}")
    for digit in range(10):
        mine = labels == digit
        if mine.any():
            print(f"  {digit}: {float((predictions[mine] == digit).float().mean()):.3f} "
                  f"of {int(mine.sum())}")


def command_vae(args) -> None:
    """Train the VAE on faces; outputs go to OUT/vae_lambda{kl_weight}."""
    common, settings = settings_from(args, Common), settings_from(args, vae.VAESettings)
    device = util.choose_device(common.device)
    faces = load_data(common, settings.data, "train", image_size=64,
                      limit=settings.limit or None)
    test = load_data(common, settings.data, "test", image_size=64,
                     attribute=settings.attribute if settings.data == "celeba" else None)
    out = Path(common.out) / f"vae_lambda{settings.kl_weight:g}"
    results = vae.train(faces, test, settings, out, device, common.seed)
    print(f"test MSE {results['test_mse']:.4f}, KL {results['test_kl']:.1f}; outputs in {out}/")


def command_ddpm(args) -> None:
    """Train the conditional DDPM on digits, or (--generate --ckpt C) write the 1000
    course images 0_001.png .. 9_100.png into --out."""
    common, settings = settings_from(args, Common), settings_from(args, ddpm.DDPMSettings)
    device = util.choose_device(common.device)
    if args.generate:
        if not args.ckpt:
            raise util.UserError("--generate needs --ckpt CHECKPOINT (e.g. runs/ddpm/checkpoint.pt)")
        model, trained = ddpm.load(args.ckpt, device)
        sampling = dataclasses.replace(trained, sampler=settings.sampler,
                                       sampling_steps=settings.sampling_steps,
                                       eta=settings.eta, guidance=settings.guidance)
        _, _, seconds = ddpm.generate(model, sampling, Path(common.out), common.seed, device,
                                      per_digit=args.per_digit)
        print(f"wrote {10 * args.per_digit} images to {common.out} in {seconds:.1f} s "
              f"({sampling.sampler}"
              f"{', %d steps' % sampling.sampling_steps if sampling.sampler == 'ddim' else ''})")
        return
    digits = load_data(common, settings.data, "train")
    test = load_data(common, settings.data, "test")
    out = Path(common.out) / "ddpm"
    if not settings.classifier:
        settings.classifier = str(Path(common.out) / "classifier" / "checkpoint.pt")
    results = ddpm.train(digits, test, settings, out, device, common.seed, common.cache)
    print(f"done: digit accuracy {results.get('digit_accuracy')}, FID {results.get('fid')}; "
          f"outputs in {out}/")


def command_uda(args) -> None:
    """Domain adaptation: one method, all methods of a scenario, the course's table, or
    predictions of a trained checkpoint for a folder (the course's csv)."""
    common, settings = settings_from(args, Common), settings_from(args, uda.UDASettings)
    device = util.choose_device(common.device)
    if args.predict:
        return predict_folder(args, common, device)
    if settings.method not in uda.METHODS + ("all",):
        raise util.UserError(f"unknown --method '{settings.method}': use "
                             f"{', '.join(uda.METHODS)} or all")
    methods = uda.METHODS if settings.method == "all" else (settings.method,)

    def load(name, split, image_size):
        return load_data(common, name, split, image_size=image_size)
    out = Path(common.out) / "uda"
    if args.table:
        table = uda.run_table(settings, methods, load, out, device, common.seed)
        print(uda.full_table(table) + f"wrote {out}/results.md and results.json")
        return
    scenario = out / f"{Path(settings.src).name}-{Path(settings.tgt).name}"
    rows = uda.run_methods(settings, methods, load, scenario, device, common.seed)
    print(uda.scenario_table(rows, settings.src, settings.tgt) + f"outputs in {scenario}/")


def predict_folder(args, common: Common, device) -> None:
    if not args.ckpt or not args.csv:
        raise util.UserError("--predict DIR needs --ckpt CHECKPOINT and --csv OUT.csv")
    network, settings = uda.load_for_prediction(args.ckpt, device)
    images = data.load(args.predict, "test", image_size=settings.image_size, cache_dir=None)
    if images.names is None:
        raise util.UserError(f"{args.predict} gives no file names: pass a folder of images")
    predictions = metrics.predict(network, images, device=device)
    uda.write_predictions(images.names, predictions, Path(args.csv))
    print(f"wrote {len(images)} predictions to {args.csv}")


def command_gan(args) -> None:
    """Train a GAN on faces, or (--generate N --ckpt C) write N images to --out."""
    common, settings = settings_from(args, Common), settings_from(args, gan.GANSettings)
    device = util.choose_device(common.device)
    if args.generate:
        return generate_images(args.generate, args.ckpt, Path(common.out), device,
                               common.seed, gan.load, gan.generate)
    attribute = settings.attribute if settings.variant == "acgan" else None
    faces = load_data(common, settings.data, "train", image_size=settings.image_size,
                      attribute=attribute, limit=settings.limit or None)
    held_out = load_data(common, settings.data, "test", image_size=settings.image_size)
    print(f"{len(faces)} training faces, {len(held_out)} held out for FID")
    out = Path(common.out) / f"gan_{settings.variant}"
    results = gan.train(faces, held_out, settings, out, device, common.seed, common.cache)
    print(f"done: {results['steps']} steps, {results['seconds_per_step']:.3f} s/step, "
          f"FID {results.get('fid')}; outputs in {out}/")


def generate_images(count: int, checkpoint, out: Path, device, seed: int, load, generate):
    """The course deliverable: `count` PNGs from a checkpoint, fixed seed, batched."""
    if not checkpoint:
        raise util.UserError("--generate needs --ckpt CHECKPOINT (e.g. runs/gan_b/checkpoint.pt)")
    model, settings = load(checkpoint, device)
    start = time.perf_counter()
    images = generate(model, count, settings, seed, device)
    paths = data.save_images(images, out, [f"{i:04d}.png" for i in range(count)])
    print(f"wrote {len(paths)} images to {out} in {time.perf_counter() - start:.1f} s")


# ============================================================================ parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    sub.add_argument("name", help="which model, e.g. gan")
    sub.add_argument("--variant", default="a", help="model variant")

    sub = command("fid", command_fid, "Frechet Inception Distance of two folders or .npz")
    sub.add_argument("paths", nargs=2, help="image folders or statistics files (.npz)")
    sub.add_argument("--save-stats", action="store_true",
                     help="write the statistics of the first folder to the second path")
    sub.add_argument("--batch-size", type=int, default=50)
    sub.add_argument("--image-size", type=int, default=None,
                     help="resize folder images to this side first (if sizes differ)")
    sub.add_argument("--weights", default=None,
                     help="pytorch-fid weights file (default: download once into --cache)")

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
    add_flags(sub, metrics.ClassifierSettings)

    sub = command("classify", command_classify, "digit accuracy of a folder like 3_042.png")
    sub.add_argument("--folder", required=True, help="images named DIGIT_*.png")
    sub.add_argument("--ckpt", default=None, help="default: OUT/classifier/checkpoint.pt")

    sub = command("gan", command_gan, "GANs on faces: --variant a (DCGAN), b, acgan")
    add_flags(sub, gan.GANSettings)
    sub.add_argument("--generate", type=int, default=0,
                     help="write this many images from --ckpt into --out, then stop")
    sub.add_argument("--ckpt", default=None, help="checkpoint for --generate")

    sub = command("vae", command_vae, "variational autoencoder on faces")
    add_flags(sub, vae.VAESettings)

    sub = command("ddpm", command_ddpm, "conditional diffusion on digits (DDPM / DDIM)")
    add_flags(sub, ddpm.DDPMSettings)
    sub.add_argument("--generate", action="store_true",
                     help="write the 1000 course images from --ckpt into --out, timed")
    sub.add_argument("--per-digit", type=int, default=100,
                     help="images of each digit for --generate (the course wants 100)")
    sub.add_argument("--ckpt", default=None, help="checkpoint for --generate")

    sub = command("uda", command_uda, "domain adaptation: source, dann, dann-ent, adda, target")
    add_flags(sub, uda.UDASettings)
    sub.add_argument("--table", action="store_true",
                     help="run the course's four scenarios and write results.md")
    sub.add_argument("--predict", default=None, help="folder of images to label (with --ckpt)")
    sub.add_argument("--ckpt", default=None, help="checkpoint for --predict")
    sub.add_argument("--csv", default=None, help="predictions file for --predict")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.function(args)
    except util.UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: checkpoints written so far are kept; continue with --resume",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
