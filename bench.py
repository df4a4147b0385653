"""Benchmarks behind the figures in RESULTS.md (speed is measured here, not in the tests).

    python bench.py data --data-root DIR [--cache DIR]
    python bench.py tsne --data-root DIR [--sizes 2000,5000] [--sklearn]
    python bench.py fid [--images 100] [--threads 2] [--batch-size 50] [--device cpu]
                         [--weights FILE]
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
`ddp`: GAN training steps per second in one process (`python run.py gan ...`) and in
--nproc processes (`torchrun --nproc_per_node N run.py gan ...`), the same flags and global
batch, no FID; the seconds per step come from each run's results.json.
`uda`: seconds per training step of each domain-adaptation method, one after another in
one process, on random 28x28 digits in batches of 128 a domain as in RESULTS.md's table:
the steps' own time (training.Run's clock, without evaluation and pictures).
"""
import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import data
import metrics
import tsne
import uda
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
    args = parser.parse_args(argv)
    {"data": bench_data, "tsne": bench_tsne, "fid": bench_fid, "ddp": bench_ddp,
     "uda": bench_uda}[args.command](args)


if __name__ == "__main__":
    main()
