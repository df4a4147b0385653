"""Benchmarks behind the figures in RESULTS.md (speed is measured here, not in the tests).

    python bench.py data --data-root DIR [--cache DIR]
    python bench.py tsne --data-root DIR [--sizes 2000,5000] [--sklearn]
    python bench.py fid [--images 100] [--threads 2] [--batch-size 50] [--device cpu]
                         [--weights FILE]
    python bench.py kid [--real 2000] [--fake 1000] [--threads 1]
    python bench.py ddp --data-root DIR [--nproc 2] [--variant b] [--image-size 32]
                         [--steps 40] [--batch-size 64]
    python bench.py uda [--methods source,dann,gta,self-ensembling] [--steps 20]
                         [--threads 2]

`data`: seconds to load each data set found under DIR, first (decode, or from an existing
cache) and second time (from the cache).
`tsne`: MNIST test digits projected to 50 PCA dimensions, embedded by tsne.tsne; time,
KL and trustworthiness at k = 12. With --sklearn (scikit-learn installed separately, it is
not a dependency) the same input goes through sklearn.manifold.TSNE's defaults.
`fid`: images per second of FID feature extraction on 64x64 inputs: ours, and pytorch-fid's
network when `pytorch_fid` can be imported (random weights unless --weights: the speed is
the same).
`kid`: seconds for KID of --fake against --real random 2048-d features (pool3's size),
the kernels of all pairs computed once against each subset's own (metrics.kid).
`ddp`: GAN training steps per second in one process (`python run.py gan ...`) and in
--nproc processes (`torchrun --nproc_per_node N run.py gan ...`), the same flags and global
batch, no FID; the seconds per step come from each run's results.json.
`uda`: seconds per training step of each domain-adaptation method, one after another in
one process, on random 28x28 digits in batches of 128 a domain as in RESULTS.md's table:
the steps' own time (training.Run's clock, without evaluation and pictures).
"""
import argparse
import copy
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import data
import ddpm
import gan
import metrics
import nets
import parallel
import tsne
import uda
import vae
from util import UserError


def mnist_pca50(data_root: str, count: int) -> tuple[np.ndarray, np.ndarray]:
    digits = data.load("mnist", "test", data_root, download=False, limit=count)
    pixels = digits.pixels[:, 0].reshape(count, -1).double().numpy() / 255
    return tsne.pca(pixels, 50), digits.labels.numpy()


def bench_tsne(args):
    for count in (int(s) for s in args.sizes.split(",")):
        features, labels = mnist_pca50(args.data_root, count)
        runs = [("tsne.tsne", lambda: tsne.tsne(features, seed=args.seed, return_kl=True))]
        if args.sklearn:
            from sklearn.manifold import TSNE

            def sklearn_run():
                model = TSNE(random_state=args.seed)
                return model.fit_transform(features), model.kl_divergence_
            runs.append(("sklearn TSNE", sklearn_run))
        for name, embed in runs:
            start = time.perf_counter()
            embedding, kl = embed()
            seconds = time.perf_counter() - start
            trust = tsne.trustworthiness(features, embedding, k=12)
            knn = tsne.knn_accuracy(embedding, labels, k=10)
            print(f"N={count} {name}: {seconds:.1f} s, KL {kl:.3f}, trustworthiness(k=12) "
                  f"{trust:.4f}, 10-NN accuracy {knn:.3f}", flush=True)


def bench_data(args):
    for name in ("mnist", "usps", "mnistm", "svhn", "celeba"):
        for split in ("train", "test"):
            seconds = []
            for _ in range(2):
                start = time.perf_counter()
                try:
                    images = data.load(name, split, args.data_root, download=False,
                                       cache_dir=args.cache)
                except UserError as error:
                    print(f"{name} {split}: skipped ({error})")
                    break
                seconds.append(time.perf_counter() - start)
            else:
                print(f"{name} {split}: {len(images)} images, first load {seconds[0]:.2f} s, "
                      f"second load {seconds[1]:.2f} s", flush=True)


def bench_fid(args):
    """Ours as FID runs it, and pytorch-fid's InceptionV3 where it can be imported, on the
    same images, batch size and threads, one after the other."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    images = torch.rand(args.images, 3, 64, 64) * 2 - 1
    ours = (metrics.load_fid_inception(device=device, weights=args.weights) if args.weights
            else metrics.for_inference(metrics.FIDInception(), device))
    nchw = copy.deepcopy(ours).to(memory_format=torch.contiguous_format)
    # ours as it runs (channels-last), and in torch's default layout, which pytorch-fid uses
    networks = {"ours": ours, "ours in NCHW": lambda x: nchw(x.contiguous())}
    try:
        import pytorch_fid.inception as reference
        # its FID network, the same weights, no download
        reference.load_state_dict_from_url = lambda *a, **k: (
            torch.load(args.weights, weights_only=True) if args.weights
            else metrics.FIDInception().state_dict())
        pytorch_fid = reference.InceptionV3([3]).eval().to(device)
        networks["pytorch-fid"] = lambda x: pytorch_fid(x)[0].flatten(1)
    except Exception as error:  # not installed, or its torchvision does not fit this torch
        print(f"pytorch-fid not timed: {type(error).__name__}: {error}")
    for name, network in networks.items():
        metrics.inception_features(network, images[:2], batch_size=2, device=device)  # warm-up
        start = time.perf_counter()
        metrics.inception_features(network, images, batch_size=args.batch_size, device=device)
        seconds = time.perf_counter() - start
        print(f"{name}: FID features of {args.images} images 64x64, batch {args.batch_size}, "
              f"{args.threads} threads, {device}: {args.images / seconds:.2f} images/s")


def bench_kid(args):
    """KID of `fake` generated against `real` held-out features (2048 numbers each, as
    pool3 gives), with the kernels of all pairs computed once and with each subset's own,
    one after the other in one run: the same figure, and the time of each."""
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(args.real, 2048, generator=generator).numpy()
    fake = (torch.randn(args.fake, 2048, generator=generator) + 0.1).numpy()
    for name, entries in (("kernels of all pairs at once", metrics.KID_KERNEL_ENTRIES),
                          ("each subset's", 0)):
        start = time.perf_counter()
        mean, std = metrics.kid(real, fake, torch.Generator().manual_seed(metrics.KID_SEED),
                                kernel_entries=entries)
        print(f"KID {mean:.15f} +- {std:.15f} of {args.fake} against {args.real} features, "
              f"{name}: {time.perf_counter() - start:.1f} s, {args.threads} threads")


def bench_ddp(args):
    """The same GAN run in 1 and in --nproc processes, one after the other."""
    flags = ["gan", "--variant", args.variant, "--data-root", args.data_root, "--image-size",
             str(args.image_size), "--steps", str(args.steps), "--batch-size",
             str(args.batch_size), "--sample-every", str(args.steps), "--fid-images", "0"]
    launchers = {1: [sys.executable, "run.py"],
                 args.nproc: [sys.executable, "-m", "torch.distributed.run", "--standalone",
                              "--nproc_per_node", str(args.nproc), "run.py"]}
    for processes, launcher in launchers.items():
        with tempfile.TemporaryDirectory() as out:
            # torchrun gives each process 1 thread; one process gets what torch picks
            finished = subprocess.run(launcher + flags + ["--out", out],
                                      cwd=Path(__file__).resolve().parent,
                                      env=os.environ.copy(), capture_output=True, text=True)
            if finished.returncode:
                raise SystemExit(f"{' '.join(launcher)} failed:\n{finished.stderr[-2000:]}")
            results = json.loads((Path(out) / f"gan_{args.variant}" / "results.json")
                                 .read_text())
        print(f"GAN {args.variant} {args.image_size}x{args.image_size}, global batch "
              f"{args.batch_size}, {processes} process{'es' if processes > 1 else ''}: "
              f"{1 / results['seconds_per_step']:.3f} steps/s", flush=True)


def bench_uda(args):
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)

    def digits(count):
        return data.ImageSet(torch.randint(0, 256, (count, 3, 28, 28), dtype=torch.uint8,
                                           generator=generator),
                             torch.randint(0, 10, (count,), generator=generator))
    batch = uda.UDASettings().batch_size
    domains = uda.Domains(digits(batch * args.steps), digits(batch * args.steps),
                          digits(batch), digits(batch))
    for method in args.methods.split(","):
        settings = uda.UDASettings(method=method, epochs=1, adapt_epochs=1, tsne_points=0)
        with tempfile.TemporaryDirectory() as out:
            results = uda.train(domains, settings, out, "cpu", seed=0)
        print(f"{method}: {results['train_seconds'] / args.steps:.3f} s a step (batch {batch} "
              f"a domain, {args.threads} threads)", flush=True)


# ============================================================================ the GPU check
def synthetic_data(root: Path) -> Path:
    """Tiny stand-ins laid out as the real downloads are, so every command runs where
    nothing can be downloaded: 96 CelebA-style faces (64 for training) in a zip with their
    annotation files, 40 MNIST-M-style digits a split in the original tar.gz, and two
    folders of course-layout digits (src; tgt, the colours inverted), 80 each."""
    rng = np.random.default_rng(0)
    (root / "celeba").mkdir(parents=True)
    names = [f"{i:06d}.jpg" for i in range(1, 97)]
    (root / "celeba" / "list_attr_celeba.txt").write_text(
        "96\nMale Smiling\n" + "".join(f"{n} {1 if i % 2 else -1} {1 if i // 2 % 2 else -1}\n"
                                       for i, n in enumerate(names)))
    (root / "celeba" / "list_eval_partition.txt").write_text(
        "".join(f"{n} {0 if i < 64 else 2}\n" for i, n in enumerate(names)))
    with zipfile.ZipFile(root / "celeba" / "img_align_celeba.zip", "w") as bundle:
        for name in names:
            face = rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)
            face[60:160, 50:130] = (200, 160, 140)
            bundle.writestr(f"img_align_celeba/{name}", encoded(face, "JPEG"))
    (root / "mnist_m").mkdir()
    with tarfile.open(root / "mnist_m" / "mnist_m.tar.gz", "w:gz") as bundle:
        for part in ("train", "test"):
            members = {f"mnist_m/mnist_m_{part}/{i:08d}.png": encoded(
                rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), "PNG") for i in range(40)}
            members[f"mnist_m/mnist_m_{part}_labels.txt"] = "".join(
                f"{i:08d}.png {i % 10}\n" for i in range(40)).encode()
            for name, blob in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                bundle.addfile(info, io.BytesIO(blob))
    for folder, inverted in (("src", False), ("tgt", True)):
        labels = np.arange(80) % 10
        digits = rng.integers(0, 60, (80, 28, 28, 3), dtype=np.uint8)
        digits[np.arange(80), 2 * labels + 4] = 255  # class k: a bright band at row 2k + 4
        (root / folder / "data").mkdir(parents=True)
        for i, digit in enumerate(255 - digits if inverted else digits):
            Image.fromarray(digit).save(root / folder / "data" / f"{i:05d}.png")
        rows = "".join(f"{i:05d}.png,{label}\n" for i, label in enumerate(labels))
        for split in ("train", "val"):
            (root / folder / f"{split}.csv").write_text("image_name,label\n" + rows)
    return root


def encoded(array: np.ndarray, kind: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=kind)
    return buffer.getvalue()


def gpu_rows(work: Path, device: str, weights: str, processes: int) -> list:
    """(name, command line, expected exit status) of each row: a tiny run of every
    command, a resume, torchrun, and the bad inputs a GPU machine meets."""
    root, out = work / "data", work / "out"
    common = ["--data-root", str(root), "--cache", str(work / "cache"), "--no-download",
              "--device", device]
    src, tgt = str(root / "src"), str(root / "tgt")
    fid = ["--weights", weights]
    gan = ["--image-size", "64", "--batch-size", "32", "--sample-every", "10",
           "--fid-images", "64", *fid]
    ddpm = ["--data", src, "--width", "32", "--batch-size", "32", "--sample-every", "10",
            "--timesteps", "100", "--sampling-steps", "10",
            "--classifier", str(out / "classifier" / "checkpoint.pt")]
    rows = [(f"gan {variant}", ["gan", "--variant", variant, "--steps", "20", *gan,
                                "--out", str(out / variant)], 0)
            for variant in ("a", "b", "acgan", "wgan-gp", "hacks")]
    rows += [
        ("gan --resume", ["gan", "--steps", "30", "--resume", *gan, "--out", str(out / "b")],
         0),
        ("gan --generate", ["gan", "--generate", "64", "--ckpt",
                            str(out / "b" / "gan_b" / "checkpoint.pt"),
                            "--out", str(out / "faces")], 0),
        ("facerate", ["facerate", "--folder", str(out / "faces"), "--out", str(out)], 0),
        ("fid --save-stats", ["fid", "--save-stats", str(out / "faces"),
                              str(out / "faces.npz"), *fid], 0),
        ("fid", ["fid", str(out / "faces"), str(out / "faces.npz"), *fid], 0),
        ("vae", ["vae", "--epochs", "2", "--batch-size", "16", "--latent-dim", "32",
                 "--tsne-points", "40", "--fid-images", "32", "--fid-every", "1", *fid,
                 "--out", str(out)], 0),
        ("classifier", ["classifier", "--data", src, "--epochs", "2", "--batch-size", "16",
                        "--out", str(out)], 0),
        ("ddpm ddim --amp auto", ["ddpm", *ddpm, "--steps", "20", "--fid-images", "20",
                                  *fid, "--out", str(out / "ddim")], 0),
        ("ddpm ancestral --amp off", ["ddpm", *ddpm, "--steps", "10", "--sampler", "ddpm",
                                      "--amp", "off", "--fid-images", "0",
                                      "--out", str(out / "ancestral")], 0),
    ]
    rows += [(f"ddpm --generate {sampler} --amp {amp}", [
        "ddpm", "--generate", "--ckpt", str(out / "ddim" / "ddpm" / "checkpoint.pt"),
        "--per-digit", "10", "--sampler", sampler, "--amp", amp, "--out",
        str(out / f"digits_{sampler}_{amp}")], 0) for sampler, amp in (("ddim", "off"),
                                                                      ("ddpm", "auto"))]
    rows += [(f"uda {method}", ["uda", "--method", method, "--src", src, "--tgt", tgt,
                                "--epochs", "1", "--adapt-epochs", "1", "--batch-size", "32",
                                "--tsne-points", "60", "--out", str(out / method)], 0)
             for method in ("source", "dann", "dann-ent", "adda", "gta", "self-ensembling",
                            "target")]
    rows += [
        ("uda --predict", ["uda", "--predict", str(root / "tgt" / "data"), "--ckpt",
                           str(out / "dann" / "uda" / "src-tgt" / "dann" / "checkpoint.pt"),
                           "--csv", str(out / "predictions.csv")], 0),
        (f"torchrun, {processes} process(es)",
         ["torchrun", str(processes), "gan", "--steps", "10", *gan, "--out",
          str(out / "torchrun")], 0),
    ]
    if device == "cuda":  # what a GPU machine refuses (a CPU would try to hold the batch)
        rows += [
            ("bad: --device cuda:N past the last GPU",
             ["gan", "--device", f"cuda:{torch.cuda.device_count()}"], 2),
            ("bad: a batch the GPU cannot hold", ["gan", "--steps", "1", "--batch-size",
                                                  "4000000", "--fid-images", "0",
                                                  "--out", str(out / "huge")], 2),
            ("bad: torchrun with more processes than GPUs",
             ["torchrun", str(torch.cuda.device_count() + 1), "gan", "--steps", "1",
              "--out", str(out / "too_many")], 2)]
    return [(name, argv if argv[0] == "torchrun" or "--device" in argv else argv + common,
             expected) for name, argv, expected in rows]


def run_row(argv: list, work: Path, device: str,
            seconds_left: float) -> tuple[int, str, float]:
    """One command line in a process of its own: (exit status, its last line, seconds)."""
    if argv[0] == "torchrun":  # ["torchrun", N, command...]: the same flags, N processes
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node", argv[1], "run.py"]
        argv = argv[2:] + ["--data-root", str(work / "data"), "--cache", str(work / "cache"),
                           "--no-download", "--device", device]
    else:
        launcher = [sys.executable, "run.py"]
    start = time.perf_counter()
    try:
        done = subprocess.run(launcher + argv, cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, timeout=max(seconds_left, 1))
    except subprocess.TimeoutExpired:
        return -1, "stopped: the check's ten minutes ran out", time.perf_counter() - start
    lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
    said = next((line for line in reversed(lines) if line.startswith("error:")), "") or next(
        (line for line in reversed(lines) if line.startswith("Traceback")), "")
    return done.returncode, said or (lines[-1] if lines else ""), time.perf_counter() - start


def step_speeds(device: torch.device, cpu_steps: int = 2, gpu_steps: int = 20) -> list:
    """Images per second of one training step of each model, on the device and on the
    CPU, at the batch size its command trains with (synthetic images, no data loading)."""
    rows = []
    for name, make_step, batch in SPEED_MODELS:
        speeds = {}
        for where, steps in ((device, gpu_steps if device.type == "cuda" else cpu_steps),
                             (torch.device("cpu"), cpu_steps)):
            step = make_step(where, batch)
            step()  # warm-up: cuDNN's choice of algorithms, allocations
            synchronize(where)
            start = time.perf_counter()
            for _ in range(steps):
                step()
            synchronize(where)
            speeds[where.type] = steps * batch / (time.perf_counter() - start)
        rows.append((f"speed: {name} step, batch {batch}", speeds))
    return rows


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gan_step(device, batch):
    settings = gan.GANSettings(variant="b", batch_size=batch)
    model = gan.GAN(settings).to(device)
    optimizers = gan.build_optimizers(model, settings)
    rng, real = parallel.Random(0, device), torch.rand(batch, 3, 64, 64, device=device) * 2 - 1
    return lambda: (model.train(), gan.train_step(model, optimizers, real, None, settings, rng,
                                                  rng), model.update_ema(100, settings.ema_decay))


def vae_step(device, batch):
    model = vae.VAE(512).to(device)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    rng, faces = parallel.Random(0, device), torch.rand(batch, 3, 64, 64, device=device) * 2 - 1

    def step():
        terms = vae.losses(model.train(), faces, rng.randn(batch, 512))
        optimizer.zero_grad(set_to_none=True)
        (terms["reconstruction"] + terms["kl"]).backward()
        optimizer.step()
    return step


def ddpm_step(device, batch, amp="auto"):
    model = ddpm.Diffusion(ddpm.DDPMSettings(amp=amp)).to(device)
    optimizer = torch.optim.Adam(model.network.parameters(), 2e-4)
    rng = parallel.Random(0, device)
    digits, labels = torch.rand(batch, 3, 28, 28, device=device) * 2 - 1, rng.randint(0, 10, (batch,))

    def step():
        model.network.train()
        loss = model.loss(digits, labels, rng)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.update_ema(100)
    return step


def dann_step(device, batch):
    networks = uda.Networks("dann").to(device, memory_format=torch.channels_last)
    settings = uda.UDASettings(method="dann")
    optimizer = uda.make_optimizers(networks, settings)["optimizer"]
    source, target = (torch.rand(batch, 3, 28, 28, device=device) * 2 - 1 for _ in "st")
    labels = torch.arange(batch, device=device) % 10
    return lambda: uda.dann_step(networks.train(), source, labels, target, optimizer, 0.5)


SPEED_MODELS = [("GAN b 64x64", gan_step, 128), ("VAE 64x64", vae_step, 64),
                ("DDPM width 64, --amp auto", ddpm_step, 128),
                ("DDPM width 64, --amp off",
                 lambda device, batch: ddpm_step(device, batch, "off"), 128),
                ("UDA DANN", dann_step, 128)]


def lively_inception(path: Path) -> str:
    """Inception weights for a machine that cannot download the real ones: He-initialised
    convolutions, batch norm as the identity, so that activations neither vanish nor
    explode through the 94 layers. FID's numbers then mean nothing, but every line of it
    runs, and a GPU's features must still match the CPU's."""
    torch.manual_seed(0)
    network = metrics.FIDInception()
    for module in network.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.save(network.state_dict(), path)
    return str(path)


def fid_features_agree(device: torch.device, weights: str) -> str:
    """The largest difference between the pool3 features of 8 images on the device and
    on the CPU, against the features' own spread."""
    images = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    features = [metrics.inception_features(metrics.load_fid_inception(device=where,
                                                                      weights=weights),
                                           images, device=where)
                for where in (device, torch.device("cpu"))]
    difference = np.abs(features[0] - features[1]).max() / features[1].std()
    return f"FID features, {device.type} against cpu: largest difference {difference:.1e} " \
           "of their spread"


def fid_speeds(device: torch.device, weights) -> tuple:
    """FID feature extraction, images per second, on the device and on the CPU."""
    network = metrics.load_fid_inception(device=device, weights=weights)
    speeds = {}
    for where, count in ((device, 2000 if device.type == "cuda" else 50),
                         (torch.device("cpu"), 50)):
        network = metrics.for_inference(network, where)
        images = torch.rand(count, 3, 64, 64) * 2 - 1
        metrics.inception_features(network, images[:50], device=where)  # warm-up
        synchronize(where)
        start = time.perf_counter()
        metrics.inception_features(network, images, batch_size=250 if where.type == "cuda"
                                   else 50, device=where)
        speeds[where.type] = count / (time.perf_counter() - start)
    return "speed: FID features, 64x64 images", speeds


def bench_gpu(args) -> int:
    """Every command, tiny, on the GPU, within ten minutes: one row each, and the speed of
    each model's training step and of FID's features against the CPU. Exit 1 if a row
    failed; without a CUDA GPU, one line and nothing run."""
    if not torch.cuda.is_available() and args.device == "cuda":
        print("bench.py gpu: this machine has no CUDA GPU (torch.cuda.is_available() is "
              "False): nothing to check here")
        return 0
    deadline = time.perf_counter() + args.minutes * 60
    failures = 0
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        synthetic_data(work / "data")
        weights = args.weights or lively_inception(work / "inception.pth")
        processes = min(2, max(torch.cuda.device_count(), 1))
        print(f"{'row':<48} {'status':<6} {'seconds':>7}  what it said")
        for name, argv, expected in gpu_rows(work, args.device, weights, processes):
            if args.only and not any(part in name for part in args.only.split(",")):
                continue
            left = deadline - time.perf_counter()
            code, said, seconds = run_row(argv, work, args.device, left) if left > 0 else (
                -1, "not run: the check's ten minutes ran out", 0.0)
            # a refusal: one error line and a failed exit (torchrun's own status is 1)
            failed = (code != 0 or not said or said.startswith("Traceback") if expected == 0
                      else code in (0, -1) or not said.startswith("error:"))
            failures += failed
            print(f"{name:<48} {'FAIL' if failed else 'ok':<6} {seconds:7.1f}  {said[:110]}",
                  flush=True)
        device = torch.device(args.device)
        print(fid_features_agree(device, weights), flush=True)
        for name, speeds in step_speeds(device) + [fid_speeds(device, weights)]:
            ratio = speeds[device.type] / speeds["cpu"]
            print(f"{name:<48} {device.type}: {speeds[device.type]:.1f} images/s, cpu: "
                  f"{speeds['cpu']:.1f} images/s, {ratio:.1f} times", flush=True)
    print(f"{failures} row(s) failed" if failures else "every row ran as expected")
    return 1 if failures else 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    tsne_parser = commands.add_parser("tsne")
    tsne_parser.add_argument("--data-root", default="data")
    tsne_parser.add_argument("--sizes", default="2000,5000")
    tsne_parser.add_argument("--seed", type=int, default=0)
    tsne_parser.add_argument("--sklearn", action="store_true")
    data_parser = commands.add_parser("data")
    data_parser.add_argument("--data-root", default="data")
    data_parser.add_argument("--cache", default=None,
                             help="cache folder (default: $DLCV_CACHE or ~/.cache/...)")
    fid_parser = commands.add_parser("fid")
    fid_parser.add_argument("--images", type=int, default=100)
    fid_parser.add_argument("--threads", type=int, default=2)
    fid_parser.add_argument("--batch-size", type=int, default=50)
    fid_parser.add_argument("--weights", default=None, help="the FID weights (default: random)")
    fid_parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    kid_parser = commands.add_parser("kid")
    kid_parser.add_argument("--real", type=int, default=2000)
    kid_parser.add_argument("--fake", type=int, default=1000)
    kid_parser.add_argument("--threads", type=int, default=1)
    ddp_parser = commands.add_parser("ddp")
    ddp_parser.add_argument("--data-root", default="data")
    ddp_parser.add_argument("--nproc", type=int, default=2)
    ddp_parser.add_argument("--variant", default="b")
    ddp_parser.add_argument("--image-size", type=int, default=32)
    ddp_parser.add_argument("--steps", type=int, default=40)
    ddp_parser.add_argument("--batch-size", type=int, default=64)
    uda_parser = commands.add_parser("uda")
    uda_parser.add_argument("--methods", default="source,dann,gta,self-ensembling")
    uda_parser.add_argument("--steps", type=int, default=20)
    uda_parser.add_argument("--threads", type=int, default=2)
    gpu_parser = commands.add_parser("gpu")
    gpu_parser.add_argument("--device", default="cuda", help="cpu: the same rows on the "
                            "CPU, to check the check itself (slow)")
    gpu_parser.add_argument("--weights", default=None, help="the FID weights (default: "
                            "made up, which exercise FID without meaning)")
    gpu_parser.add_argument("--minutes", type=float, default=10.0)
    gpu_parser.add_argument("--only", default="", help="the rows whose names hold one of "
                            "these comma-separated words (a rerun; rows use earlier ones' "
                            "outputs)")
    args = parser.parse_args(argv)
    return {"data": bench_data, "tsne": bench_tsne, "fid": bench_fid, "kid": bench_kid,
            "ddp": bench_ddp, "uda": bench_uda, "gpu": bench_gpu}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
