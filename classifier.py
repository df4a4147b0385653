"""The digit classifier that grades generated digits: the share of generated images it
reads as the digit they were generated for is the "digit accuracy" the DLCV homework
grades the conditional DDPM by.

A small CNN (nets.digit_classifier: two VGG-style stages of 3x3 convolutions with batch
norm, then a dropout MLP) trained on real digits with AdamW, a one-cycle learning rate
(Smith & Topin 2019, "Super-Convergence"), label smoothing 0.1 (Szegedy et al. 2016) and
random shifts of up to a tenth of the side, so that it reads digits drawn a little off
centre as well as the data's own.
"""
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import nets
import pages
import parallel
import plots
import training
import util
from parallel import Random
from util import UserError


@dataclass
class ClassifierSettings:
    """How the digit evaluator is trained (flags of `run.py classifier`)."""
    data: str = field(default="mnistm", metadata={"help": "digits to train on"})
    epochs: int = field(default=12, metadata={"help": "passes over the training set"})
    batch_size: int = field(default=128, metadata={"help": "images per step"})
    lr: float = field(default=2e-3, metadata={"help": "peak AdamW learning rate"})
    weight_decay: float = field(default=5e-4, metadata={"help": "AdamW weight decay"})
    shift: float = field(default=0.1, metadata={
        "help": "random translation, as a fraction of the image side (augmentation)"})
    resume: bool = field(default=False, metadata={"help": "continue from checkpoint.pt"})


def random_shift(images: torch.Tensor, fraction: float, augmentation: Random
                 ) -> torch.Tensor:
    """Translate each image by up to +-fraction of its side (reflecting at the borders).

    affine_grid works in normalised coordinates [-1, 1], where a shift t moves the image
    by t / 2 of its side, hence the factor 2."""
    if fraction <= 0:
        return images
    count = len(images)
    shifts = (augmentation.rand(count, 2) * 2 - 1) * 2 * fraction         # (B, 2)
    theta = torch.zeros(count, 2, 3, device=shifts.device)                # (B, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, :, 2] = shifts
    grid = F.affine_grid(theta.to(images.device), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, padding_mode="reflection", align_corners=False)


@torch.no_grad()
def predict(network: nn.Module, images: data.ImageSet, batch_size: int = 500,
            device="cpu") -> torch.Tensor:
    """Predicted class of every image, in order, in eval mode: batch norm with its running
    statistics and no dropout, so an image's prediction does not depend on its batch."""
    network.eval()
    return torch.cat([network(batch.to(device)).argmax(dim=1).cpu()
                      for batch, _ in images.batches(batch_size)])


def accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> tuple[float, int, int]:
    """(share correct, correct, total)."""
    correct = int((predictions == labels.cpu()).sum())
    return correct / max(len(labels), 1), correct, len(labels)


def train(train_set: data.ImageSet, test: data.ImageSet, settings: ClassifierSettings,
          out: Path, device, seed: int) -> dict:
    """Cross-entropy with label smoothing 0.1 on shifted digits, AdamW under a one-cycle
    learning rate; test accuracy, curves and a checkpoint after every epoch.

    The data order, the shifts and dropout come from the run's streams (training.py),
    saved with each checkpoint, so a run resumed from its checkpoint ends with the same
    weights as an uninterrupted one."""
    training.seed_weights(seed)
    # under torchrun: gradients averaged over the processes in backward
    network = parallel.distribute(nets.digit_classifier(classes=len(train_set.classes))
                                  .to(device))
    optimizer = torch.optim.AdamW(network.parameters(), settings.lr,
                                  weight_decay=settings.weight_decay)
    steps_per_epoch = -(-len(train_set) // settings.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, settings.lr, total_steps=settings.epochs * steps_per_epoch)
    train_set = train_set.to(device)
    run = training.Run(out, "classifier", settings, seed, device, state={
        "network": network, "optimizer": optimizer, "schedule": schedule},
        steps=settings.epochs * steps_per_epoch, every=steps_per_epoch,
        record={"classes": train_set.classes}, desc="classifier")
    data_order, augmentation = run.random("data"), run.random("augment")
    for step in run:
        if step % steps_per_epoch == 0:  # a new epoch (checkpoints end epochs)
            batches = train_set.batches(settings.batch_size,
                                        data_order.permutation(len(train_set)))
        images, labels = next(batches)
        images, labels = parallel.rows(images), parallel.rows(labels)  # this process's share
        network.train()
        images = random_shift(images, settings.shift, augmentation)
        loss = F.cross_entropy(network(images), labels, label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        run.log({"train_loss": loss})
        if run.at_checkpoint:  # the end of an epoch
            run.history.setdefault("test_accuracy", []).append(
                accuracy(predict(network, test, device=device), test.labels)[0])
            run.save_checkpoint()
            plots.line_plot({"train loss": run.history["train_loss"]}, Path(out) / "loss.png",
                            title="digit classifier: training loss", xlabel="epoch",
                            ylabel="smoothed cross-entropy")
            plots.line_plot({"test accuracy": run.history["test_accuracy"]},
                            Path(out) / "accuracy.png", title="digit classifier: test "
                            "accuracy", xlabel="epoch", ylabel="accuracy")
    _, correct, total = accuracy(predict(network, test, device=device), test.labels)
    results = {"data": settings.data, "test_accuracy": correct / total, "correct": correct,
               "total": total, "epochs": settings.epochs, "seed": seed}
    util.write_json(results, Path(out) / "results.json")
    pages.run_page(run, results)  # the run's page, finished
    return results


def load(path, device="cpu", given_by: str = "--ckpt") -> nn.Module:
    """The trained classifier of a checkpoint of `run.py classifier`, in eval mode."""
    state = util.checkpoint_of(path, device, "classifier", given_by)
    network = nets.digit_classifier(classes=len(state["classes"]))
    network.load_state_dict(state["network"])
    return network.to(device).eval()


def grade(images: torch.Tensor, labels: torch.Tensor, checkpoint, device) -> dict:
    """Digit accuracy of images (N, 3, 28, 28) in [-1, 1] by the classifier `checkpoint`,
    when one is trained; else why there is none."""
    path = Path(checkpoint)
    if not path.is_file():
        return {"digit_accuracy": None, "digit_accuracy_unavailable":
                f"no classifier at {path}: train one with 'run.py classifier' or pass "
                "--classifier"}
    predictions = predict(load(path, device, "--classifier"),
                          data.ImageSet(data.to_uint8(images)), device=device)
    share, correct, total = accuracy(predictions, labels)
    return {"digit_accuracy": share, "digit_correct": correct, "digit_total": total}


def label_from_name(name: str) -> int:
    """The homework's naming of generated digits: DIGIT_*.png, digit and underscore first."""
    if not (name[:1].isdigit() and name[1:2] == "_"):
        raise UserError(f"file '{name}' is not named by its digit: name each image "
                        "DIGIT_*.png, e.g. 3_042.png for a 3")
    return int(name[0])


def summary() -> str:
    """The classifier's layer table (nets.summary), as `run.py summary classifier` prints it."""
    return "classifier: digit classifier\n" + nets.summary(nets.digit_classifier(), (3, 28, 28))
