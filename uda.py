"""Unsupervised domain adaptation for digits: source-only, DANN, DANN + entropy, ADDA,
GTA, self-ensembling and target-only, with the usual protocol (labelled source train
images, unlabelled target train images, accuracy on the target test split).

A feature extractor F, a label classifier C and a domain classifier D (nets.py).

Source only (lower bound):  min_{F,C} E_s[ CE(C(F(x_s)), y_s) ].
Target only (upper bound):  the same on labelled target images.

DANN (Ganin et al. 2016, "Domain-Adversarial Training of Neural Networks", JMLR):
    min_{F,C} max_D  CE(C(F(x_s)), y_s) - L_dom,
    L_dom = mean_s BCE(D(F(x_s)), 1) + mean_t BCE(D(F(x_t)), 0)   (a mean per domain).
One backward pass does both: a gradient reversal layer between F and D is the identity
forward and multiplies the gradient by -lambda backward, so D descends L_dom while F
ascends it. lambda grows as lambda(p) = 2 / (1 + exp(-10 p)) - 1 over the training
progress p in [0, 1], keeping the noisy early domain signal away from F; the paper also
anneals the learning rate, lr(p) = lr / (1 + 10 p)^0.75 (--anneal).

DANN + entropy: the same, plus w * H(C(F(x_t))), the mean entropy of the target
predictions (Grandvalet & Bengio 2005; as in Long et al. 2018, "CDAN+E"). Aligning the
feature distributions does not align the classes; pushing target points away from the
decision boundaries, where entropy is high, does help with that.

ADDA (Tzeng et al. 2017, "Adversarial Discriminative Domain Adaptation"):
1. pre-train F_s and C on the source (exactly the source-only run);
2. F_t starts as a copy of F_s; F_s and C stay frozen; then alternate
     D:   min BCE(D(F_s(x_s)), 1) + BCE(D(F_t(x_t)), 0)
     F_t: min BCE(D(F_t(x_t)), 1)          (the GAN loss with inverted labels);
3. classify target images by C(F_t(x)).

GTA (Sankaranarayanan et al. 2018, "Generate To Adapt: Aligning Domains using Generative
Adversarial Networks", CVPR): align the domains in image space through a generator.
A conditional generator G draws an image from an embedding, a label and noise,
g = G(F(x), y, z), where a source image brings its own label and every target image the
extra label K ("unknown"). A discriminator D has two heads: D_data, "a real source
image", and D_cls, the digit. Per step, in the authors' order:
    D:    min  BCE(D_data(x_s), 1) + CE(D_cls(x_s), y_s)
               + BCE(D_data(g_s), 0) + BCE(D_data(g_t), 0),
    G:    min  CE(D_cls(g_s), y_s) + BCE(D_data(g_s), 1),
    F, C: min  CE(C(F(x_s)), y_s) + a CE(D_cls(g_s), y_s) + a alpha BCE(D_data(g_t), 1),
with g_s = G(F(x_s), y_s, z) and g_t = G(F(x_t), K, z). The last term is the adaptation:
F must embed target images so that G, fed them, draws what D takes for real source
digits; the second makes the source embedding carry the class. The authors use
a = 0.1, alpha = 0.3, Adam (lr 5e-4, beta_1 0.8) and lr / (1 + 1e-4 t) for D, F and C.
Here G draws both domains' images in one batch (the authors call it once per domain),
and G and D have 32 channels where the authors' have 64, for a CPU's budget.
They report MNIST -> USPS 92.8 and USPS -> MNIST 90.8 (their Table 1). Here, on
USPS -> MNIST-M, GTA without the target term (alpha = 0) scores about as well as with it
(RESULTS.md): there the gain over source only comes mostly from the source's losses
through G and D, and the alignment adds little.

Self-ensembling (French, Mackiewicz and Fisher 2018, "Self-ensembling for visual domain
adaptation", ICLR), the mean teacher of Tarvainen and Valpola (2017) adapted to domain
shift. Chosen as this project's state-of-the-art method because it is simple (no
adversary; one network and its average) and reaches supervised-level accuracy on
digits: MNIST -> USPS 98.3 and USPS -> MNIST 99.5, SVHN -> MNIST 99.3, in its Table 1,
where ADDA (Tzeng et al. 2017) reports 89.4, 90.1 and 76.0. A student network
S = C o F learns; its teacher T is the exponential moving average of S's weights (the
average every method here keeps). Per step, with two random augmentations a, a' of each
target image,
    min_S  CE(S(a(x_s)), y_s) + w [ mean_t m_t mean_k (S(a(x_t))_k - T(a'(x_t))_k)^2
                                     + b mean_t(m_t) sum_k BCE(mean_t S(a(x_t))_k, 1/K) ],
on softmax outputs: the student must agree with its teacher on target images
(consistency) where the teacher is confident, m_t = [max_k T(a'(x_t))_k > 0.968]
(confidence thresholding), and must not put every target image in a few classes (the
class-balance term). Each image is standardised (zero mean, unit variance) inside F,
and the augmentation is the paper's: random affine deformation (std 0.1), translation
of up to 2 pixels, Gaussian noise (std 0.1), and the intensity flip (half the images)
of its MNIST <-> SVHN runs, since MNIST-M's digits are darker or lighter than their
background; pixels from outside repeat the border (the paper's are 0). The teacher runs
in train mode, like the student: its batch norm sees the target batch; after each epoch
its statistics come from plain target images. w = 3, b = 0.005 and Adam at a constant
1e-3, as in the paper; the teacher's decay is 0.99 after a warm-up (nets.update_ema),
the paper's 0.99 from the start.

Every method uses the same F and C (self-ensembling standardises the images first), data
order and step count, so the table compares methods and nothing else. Every method is
evaluated with an exponential moving average of its weights (nets.update_ema): the
adversarial methods' last weights swing by a few points of target accuracy from one
epoch to the next, their average much less. After each epoch the average gets
batch-norm statistics of its own (refresh_statistics), since the ones it copies belong
to the last weights. An epoch is max(|source|, |target|) / batch steps; the smaller set
is cycled.

Under torchrun (parallel.py) each process trains on its share of the global batch: every
per-image random number is drawn for the whole batch and cut to the process's rows
(parallel.draw, parallel.rows), so N processes train the same weights as one.
"""
import copy
import itertools
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import metrics
import nets
import parallel
import plots
import tsne
import util
from util import UserError

METHODS = ("source", "dann", "dann-ent", "adda", "gta", "self-ensembling", "target")
TITLES = {"source": "Trained on source", "dann": "DANN", "dann-ent": "DANN + entropy",
          "adda": "ADDA", "gta": "GTA", "self-ensembling": "Self-ensembling",
          "target": "Trained on target"}
SCENARIOS = (("mnistm", "svhn"), ("mnistm", "usps"), ("usps", "mnistm"), ("svhn", "usps"))
STATISTICS_IMAGES = 4096  # per domain, for the batch-norm statistics of the average
GTA_NOISE = 100  # the size of GTA's z
GTA_WIDTH = 32  # G's and D's channels: the authors' 64 made a step 11 times DANN's on a CPU


@dataclass
class UDASettings:
    """Flags of `run.py uda`."""
    method: str = field(default="dann", metadata={
        "help": "source, dann, dann-ent, adda, gta, self-ensembling, target, or all (the whole "
                "table row set)",
        "choices": METHODS + ("all",)})
    src: str = field(default="mnistm", metadata={"help": "labelled source digits"})
    tgt: str = field(default="usps", metadata={"help": "unlabelled target digits"})
    image_size: int = field(default=28, metadata={
        "help": "every domain is resized to this (the networks take 28)"})
    epochs: int = field(default=10, metadata={"help": "training epochs (ADDA: pre-training)"})
    adapt_epochs: int = field(default=10, metadata={"help": "ADDA adversarial epochs"})
    batch_size: int = field(default=128, metadata={
        "help": "images per domain per step, the global batch: under torchrun each of N processes "
                "takes 1/N of it"})
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate"})
    adda_lr: float = field(default=2e-4, metadata={"help": "ADDA adversarial learning rate"})
    anneal: bool = field(default=True, metadata={
        "help": "DANN paper's annealing lr / (1 + 10 p)^0.75 (--no-anneal: a constant lr); "
                "self-ensembling keeps its paper's constant lr, GTA its authors' decay"})
    entropy_weight: float = field(default=0.1, metadata={
        "help": "weight of the target entropy (dann-ent)"})
    gta_lr: float = field(default=5e-4, metadata={
        "help": "GTA's Adam learning rate (betas 0.8, 0.999), as lr / (1 + 1e-4 t) for D, F, C"})
    adversarial_weight: float = field(default=0.1, metadata={
        "help": "GTA: a, the weight of F's losses through G and D"})
    target_weight: float = field(default=0.3, metadata={
        "help": "GTA: alpha, the target term's share of a"})
    consistency_weight: float = field(default=3.0, metadata={
        "help": "self-ensembling: w, the weight of the teacher-student consistency"})
    confidence: float = field(default=0.968, metadata={
        "help": "self-ensembling: the teacher confidence below which a target image is ignored"})
    balance_weight: float = field(default=0.005, metadata={
        "help": "self-ensembling: b, the weight of the class-balance loss"})
    ema_decay: float = field(default=0.99, metadata={
        "help": "decay of the weight average that is evaluated and saved (self-ensembling's "
                "teacher)"})
    limit: int = field(default=0, metadata={"help": "use only the first N images of each split"})
    tsne_points: int = field(default=1000, metadata={
        "help": "test images per domain in the t-SNE plots (0: no plots)"})
    resume: bool = field(default=False, metadata={"help": "continue from checkpoint.pt"})


# ============================================================================ schedules
def grl_lambda(progress: float) -> float:
    """DANN's reversal strength: 2 / (1 + exp(-10 p)) - 1, from 0 at p = 0 towards 1."""
    return 2.0 / (1.0 + np.exp(-10.0 * progress)) - 1.0


def annealed_lr(lr: float, progress: float) -> float:
    """DANN's learning-rate annealing: lr / (1 + 10 p)^0.75."""
    return lr / (1.0 + 10.0 * progress) ** 0.75


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy of the softmax of logits (B, K): -sum_k p_k log p_k."""
    log_probs = F.log_softmax(logits, dim=1)
    return -(log_probs.exp() * log_probs).sum(dim=1).mean()


# ============================================================================ data
@dataclass
class Domains:
    """The four splits one scenario needs, resized to one size."""
    source_train: data.ImageSet
    target_train: data.ImageSet
    source_test: data.ImageSet
    target_test: data.ImageSet


def load_domains(settings: UDASettings, load) -> Domains:
    """load(name, split, image_size) -> ImageSet; the source must be labelled."""
    splits = [load(name, split, settings.image_size) for name, split in
              ((settings.src, "train"), (settings.tgt, "train"),
               (settings.src, "test"), (settings.tgt, "test"))]
    if settings.limit:
        splits = [s.subset(torch.arange(min(settings.limit, len(s)))) for s in splits]
    for name, images in ((settings.src, splits[0]), (settings.tgt, splits[1])):
        if len(images) < 2:  # batch norm needs two images in a batch
            raise UserError(f"{name} has {len(images)} training image(s): give at least 2 "
                            "(raise --limit)")
    if splits[0].labels is None:
        raise UserError(f"source {settings.src} has no labels: give a labelled source "
                        "(a data set name, or a folder with train.csv image_name,label)")
    return Domains(*splits)


def epoch_shape(source_count: int, target_count: int, batch_size: int) -> tuple[int, int]:
    """(steps, batch size) of an epoch: the larger set once over. A batch never exceeds
    the larger set, so a quick run on fewer images than --batch-size has one step."""
    batch_size = min(batch_size, max(source_count, target_count))
    return max(source_count, target_count) // batch_size, batch_size


def paired_indices(source_count: int, target_count: int, batch_size: int,
                   generator: torch.Generator):
    """Per step a source and a target index batch; an epoch covers the larger set once,
    the smaller one is cycled through fresh permutations."""
    steps, batch_size = epoch_shape(source_count, target_count, batch_size)
    needed = steps * batch_size

    def cycled(count):
        rounds = -(-needed // count)
        return torch.cat([torch.randperm(count, generator=generator)
                          for _ in range(rounds)])[:needed].view(steps, batch_size)
    return cycled(source_count), cycled(target_count)


# ============================================================================ networks
class Networks(nn.Module):
    """F (features), C (classifier), D (domain); for ADDA F_t (target features); for GTA
    G (generator) and its two-headed discriminator. Self-ensembling's F standardises each
    image first."""

    def __init__(self, method: str, classes: int = 10):
        super().__init__()
        self.classes = classes
        self.features = nets.digit_features()
        if method == "self-ensembling":
            self.features = nn.Sequential(nets.Standardise(), *self.features)
        self.classifier = nets.label_classifier(classes=classes)
        adda, gta = method == "adda", method == "gta"
        self.domain = (nets.domain_classifier(hidden=500, layers=2, batch_norm=False) if adda
                       else nets.domain_classifier())
        self.target_features = nets.digit_features() if adda else None
        self.generator = (nets.gta_generator(classes=classes, noise=GTA_NOISE, width=GTA_WIDTH)
                          if gta else None)
        self.discriminator = nets.GTADiscriminator(classes, GTA_WIDTH) if gta else None

    def target_encoder(self, adapted: bool) -> nn.Module:
        return self.target_features if adapted else self.features


def classify_step(nets_: Networks, images, labels, optimizer) -> dict:
    """Source-only (or target-only): CE(C(F(x)), y)."""
    loss = F.cross_entropy(nets_.classifier(nets_.features(images)), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"class": loss}


def dann_step(nets_: Networks, source, labels, target, optimizer, reversal: float,
              entropy_weight: float = 0.0) -> dict:
    """One DANN step on a source batch and a target batch; `reversal` is this step's GRL
    strength lambda, so F descends  L_class - lambda L_domain  while D descends L_domain.
    With entropy_weight w > 0 (DANN + entropy), F and C also descend w H(C(F(x_t))).

    The domains go through F one after the other, so batch norm normalises each with its
    own batch statistics (one joint batch scored the same and ran slower on a CPU)."""
    source_features, target_features = nets_.features(source), nets_.features(target)
    both = torch.cat([source_features, target_features])               # (2B, 800)
    # L_class = CE(C(F(x_s)), y_s): labels exist for the source only
    class_loss = F.cross_entropy(nets_.classifier(source_features), labels)
    # L_domain = mean_s BCE(D(R_lambda(F(x_s))), 1) + mean_t BCE(D(R_lambda(F(x_t))), 0);
    # R_lambda is the identity forward and -lambda backward, so F receives -lambda dL/dF
    domain_logits = nets_.domain(nets.grad_reverse(both, reversal)).squeeze(1)
    domain_loss = domain_classification_loss(*domain_logits.split([len(source), len(target)]))
    losses = {"class": class_loss, "domain": domain_loss}
    if entropy_weight:  # H(C(F(x_t))) = -sum_k p_k log p_k on the unlabelled target
        losses["entropy"] = entropy(nets_.classifier(target_features))
    optimizer.zero_grad(set_to_none=True)
    (class_loss + domain_loss + entropy_weight * losses.get("entropy", 0.0)).backward()
    optimizer.step()  # F, C and D in one step: the reversal already flipped F's share
    return losses


def bce_toward(logits: torch.Tensor, label: float) -> torch.Tensor:
    """mean BCE(sigmoid(logits), label): a discriminator's answers pushed toward one label
    (1: source for DANN and ADDA, a real source image for GTA; 0: target, generated)."""
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, label))


def domain_classification_loss(source_logits, target_logits) -> torch.Tensor:
    """The domain classifier's loss as in the papers: the mean over the source batch
    (label 1) plus the mean over the target batch (label 0). One mean over the joint
    batch would be half of it, halving DANN's effective lambda."""
    return bce_toward(source_logits, 1.0) + bce_toward(target_logits, 0.0)


def adda_step(nets_: Networks, source, target, optimizers) -> dict:
    """One ADDA step: the discriminator, then the target encoder with inverted labels."""
    with torch.no_grad():
        source_features = nets_.features(source)                      # F_s: frozen, eval mode
    target_features = nets_.target_features(target)                   # F_t(x_t), (B, 800)
    # D: min BCE(D(F_s(x_s)), 1) + BCE(D(F_t(x_t)), 0); detach keeps F_t out of this step
    both = torch.cat([source_features, target_features.detach()])
    domain_loss = domain_classification_loss(
        *nets_.domain(both).squeeze(1).split([len(source), len(target)]))
    optimizers["domain"].zero_grad(set_to_none=True)
    domain_loss.backward()
    optimizers["domain"].step()
    # F_t: min BCE(D(F_t(x_t)), 1), D says "source" for target features (inverted labels);
    # only F_t's optimizer steps, so D's gradients from this loss are discarded
    encoder_loss = bce_toward(nets_.domain(target_features).squeeze(1), 1.0)
    optimizers["target"].zero_grad(set_to_none=True)
    encoder_loss.backward()
    optimizers["target"].step()
    return {"domain": domain_loss, "encoder": encoder_loss}


def gta_step(nets_: Networks, source, labels, target, noise, optimizers: dict,
             adversarial_weight: float, target_weight: float) -> dict:
    """One GTA step in the authors' order: D learns on real source images and on both
    domains' generated images; then G, and F and C, learn against the updated D.
    noise: z (B_s + B_t, GTA_NOISE), the source rows first."""
    F_, C, G, D = nets_.features, nets_.classifier, nets_.generator, nets_.discriminator
    source_features, target_features = F_(source), F_(target)          # (B, 800) each
    # G's condition: the source label, or for a target image the extra label K
    unknown = torch.full((len(target),), nets_.classes, device=target.device)
    generated = generate(G, torch.cat([source_features, target_features]),
                         torch.cat([labels, unknown]), noise, nets_.classes)  # (2B, 3, 28, 28)
    generated_source, generated_target = generated.split([len(source), len(target)])

    # 1. D: min BCE(D_data(x_s), 1) + CE(D_cls(x_s), y_s) + BCE(D_data(g_s), 0)
    #          + BCE(D_data(g_t), 0); each batch through D on its own (batch norm)
    real_data, real_classes = D(source)
    discriminator_loss = (bce_toward(real_data, 1.0) + F.cross_entropy(real_classes, labels)
                          + bce_toward(D(generated_source.detach())[0], 0.0)
                          + bce_toward(D(generated_target.detach())[0], 0.0))
    optimizers["discriminator"].zero_grad(set_to_none=True)
    discriminator_loss.backward()
    optimizers["discriminator"].step()

    # 2. G, F and C against the updated D, which does not learn here (so it runs outside
    #    its replica: no gradient exchange waits for its weights)
    judge = parallel.module_of(D)
    source_data, source_classes = judge(generated_source)
    target_data, _ = judge(generated_target)
    # G: min CE(D_cls(g_s), y_s) + BCE(D_data(g_s), 1), real-looking digits of class y_s
    generator_loss = F.cross_entropy(source_classes, labels) + bce_toward(source_data, 1.0)
    # F, C: min CE(C(F(x_s)), y_s) + a CE(D_cls(g_s), y_s) + a alpha BCE(D_data(g_t), 1)
    class_loss = F.cross_entropy(C(source_features), labels)
    embedding_loss = (class_loss + adversarial_weight * F.cross_entropy(source_classes, labels)
                      + adversarial_weight * target_weight * bce_toward(target_data, 1.0))
    optimizers["generator"].zero_grad(set_to_none=True)
    generator_loss.backward(inputs=list(G.parameters()), retain_graph=True)   # into G only
    optimizers["embedding"].zero_grad(set_to_none=True)
    embedding_loss.backward(inputs=[*F_.parameters(), *C.parameters()])     # F and C only
    optimizers["generator"].step()
    optimizers["embedding"].step()
    return {"class": class_loss, "discriminator": discriminator_loss,
            "generator": generator_loss, "embedding": embedding_loss}


def generate(generator: nn.Module, features, labels, noise, classes: int) -> torch.Tensor:
    """g = G(F(x), onehot(y), z): features (B, E), labels (B,) in 0 .. K (K: "unknown"),
    noise (B, Z) -> images (B, 3, 28, 28)."""
    conditions = F.one_hot(labels, classes + 1).float()                   # (B, K + 1)
    return generator(torch.cat([features, conditions, noise], dim=1)[..., None, None])


def self_ensembling_step(student: Networks, teacher: Networks, source, labels, target,
                         optimizer, consistency_weight: float, confidence: float,
                         balance_weight: float) -> dict:
    """One self-ensembling step: the student learns the source labels and to agree with
    its teacher (the weight average) on target images the teacher is sure of; only the
    student's optimiser steps (the teacher follows as the average, in fit)."""
    def predict(networks, images):
        return networks.classifier(networks.features(images))
    class_loss = F.cross_entropy(predict(student, augment(source)), labels)
    student_probs = predict(student, augment(target)).softmax(dim=1)   # S(a(x_t)), (B, K)
    teacher.train()  # like the student: batch statistics of the target batch, dropout
    with torch.no_grad():
        teacher_probs = predict(teacher, augment(target)).softmax(dim=1)  # T(a'(x_t))
    # m_t = [max_k T(a'(x_t))_k > threshold], (B,)
    confident = (teacher_probs.max(dim=1).values > confidence).float()
    # consistency: mean_t m_t |S - T|^2 / K
    consistency = (((student_probs - teacher_probs) ** 2).mean(dim=1) * confident).mean()
    # class balance: K BCE(mean_t S, 1/K) averaged over k, i.e. summed over the K classes,
    # weighted by the share of confident images (as in the authors' code)
    mean_probs = parallel.batch_mean(student_probs)                    # (K,)
    balance = (F.binary_cross_entropy(mean_probs, torch.full_like(mean_probs, 1 / len(
        mean_probs)), reduction="sum") * parallel.batch_mean(confident))
    loss = class_loss + consistency_weight * (consistency + balance_weight * balance)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"class": class_loss, "consistency": consistency, "balance": balance,
            "confident": confident.mean()}


def augment(images: torch.Tensor, shift: float = 2.0, deform: float = 0.1,
            noise: float = 0.1) -> torch.Tensor:
    """French et al.'s augmentation of a batch (B, C, H, W), a draw of its own per image:
    the pixel grid mapped by x -> (I + E) x + t about the centre, E ~ N(0, deform^2) per
    entry and t ~ U(-shift, shift) pixels (outside pixels repeat the border); the
    intensity flipped, x -> -x, for half the images; Gaussian noise of `noise` image
    standard deviations (the paper adds 0.1 to standardised images) per pixel."""
    count, _, height, width = images.shape
    device = images.device
    matrix = torch.eye(2, device=device) + deform * parallel.draw(
        torch.randn, (count, 2, 2), None, device)                     # (B, 2, 2)
    # affine_grid's coordinates run over [-1, 1]: a pixel is 2 / width of them
    offset = shift * (2 * parallel.draw(torch.rand, (count, 2), None, device) - 1)
    offset = offset * 2 / torch.tensor([width, height], device=device)  # (B, 2)
    grid = F.affine_grid(torch.cat([matrix, offset[..., None]], dim=2), list(images.shape),
                         align_corners=False)                          # (B, H, W, 2)
    moved = F.grid_sample(images, grid, padding_mode="border", align_corners=False)
    flips = parallel.draw(torch.rand, (count, 1, 1, 1), None, device) < 0.5
    moved = torch.where(flips, -moved, moved)
    spread = moved.std(dim=(1, 2, 3), keepdim=True)
    return moved + noise * spread * parallel.draw(torch.randn, images.shape, None, device)


# ============================================================================ training
def train(domains: Domains, settings: UDASettings, out: Path, device, seed: int,
          source_only: Path | None = None) -> dict:
    """Train one method, with a checkpoint per epoch; returns results.json's content.
    ADDA has two phases of its own (adda); the others are one run of their step."""
    if settings.method == "adda":
        return adda(domains, settings, out, device, seed, source_only)
    if settings.method == "target" and domains.target_train.labels is None:
        raise UserError(f"target {settings.tgt} has no labels, so 'target' (train on the "
                        "target) cannot run: give a labelled target or another --method")
    out, domains = Path(out), domains_on(domains, device)
    util.seed_everything(seed)  # the initial weights
    nets_ = networks_on(settings.method, device)
    average = copy.deepcopy(nets_).requires_grad_(False)  # self-ensembling's teacher
    optimizers = make_optimizers(nets_, settings)
    source, target = domains.source_train, domains.target_train
    replicas = parallel.data_parallel(nets_)  # each player a replica under torchrun
    steps = settings.epochs * epoch_shape(len(source), len(target), settings.batch_size)[0]
    method = settings.method

    def step(source_index, target_index, progress: float) -> dict:
        set_learning_rates(optimizers, settings, progress, steps)
        xs, ys = source.images(source_index), source.labels[source_index]
        xt = target.images(target_index)
        if method in ("source", "target"):
            images, labels = (xs, ys) if method == "source" else (
                xt, target.labels[target_index])
            return classify_step(replicas, images, labels, optimizers["optimizer"])
        if method == "gta":  # z for the source rows, then for the target rows
            noise = torch.cat([parallel.draw(torch.randn, (len(x), GTA_NOISE), None, x.device)
                               for x in (xs, xt)])
            return gta_step(replicas, xs, ys, xt, noise, optimizers,
                            settings.adversarial_weight, settings.target_weight)
        if method == "self-ensembling":
            return self_ensembling_step(replicas, average, xs, ys, xt, optimizers["optimizer"],
                                        settings.consistency_weight, settings.confidence,
                                        settings.balance_weight)
        return dann_step(replicas, xs, ys, xt, optimizers["optimizer"], grl_lambda(progress),
                         settings.entropy_weight if method == "dann-ent" else 0.0)

    average, log = fit(nets_, optimizers, step, domains, method, settings.epochs, settings,
                       out, device, seed, average=average)
    return finish(average, domains, log.history, settings, out, seed, log.seconds)


def make_optimizers(nets_: Networks, settings: UDASettings) -> dict:
    """GTA: one Adam per player (D; G; F with C), the authors' settings. The others: one
    Adam over F and C, and D for DANN, which learns in the same step as F and C (the
    reversal layer makes F ascend D's loss)."""
    if settings.method == "gta":
        def adam(parameters):
            return torch.optim.Adam(parameters, settings.gta_lr, betas=(0.8, 0.999))
        return {"discriminator": adam(nets_.discriminator.parameters()),
                "generator": adam(nets_.generator.parameters()),
                "embedding": adam([*nets_.features.parameters(),
                                   *nets_.classifier.parameters()])}
    domain = nets_.domain.parameters() if settings.method.startswith("dann") else []
    return {"optimizer": torch.optim.Adam([*nets_.features.parameters(),
                                           *nets_.classifier.parameters(), *domain],
                                          settings.lr)}


def set_learning_rates(optimizers: dict, settings: UDASettings, progress: float, steps: int):
    """GTA: the authors' lr / (1 + 1e-4 t) at step t for D, F and C, G's rate constant.
    Self-ensembling: the paper's constant rate (annealed, the student learnt more slowly:
    USPS -> MNIST-M 0.7005 instead of 0.7208, seed 0, RESULTS.md). The others: DANN's
    annealing (--anneal) or a constant rate."""
    if settings.method == "gta":
        for name in ("discriminator", "embedding"):
            for group in optimizers[name].param_groups:
                group["lr"] = settings.gta_lr / (1 + 1e-4 * round(progress * steps))
    else:
        anneal = settings.anneal and settings.method != "self-ensembling"
        for group in optimizers["optimizer"].param_groups:
            group["lr"] = annealed_lr(settings.lr, progress) if anneal else settings.lr


def adda(domains: Domains, settings: UDASettings, out: Path, device, seed: int,
         pretrained: Path | None = None) -> dict:
    """ADDA (Tzeng et al. 2017) in its two phases.

    1. Pre-train F_s and C on the labelled source: this is exactly the source-only run,
       so it is that run (in OUT/pretrain), or the checkpoint of a finished one.
    2. F_t starts as a copy of F_s; F_s and C are frozen; then D and F_t alternate
       (adda_step) for adapt_epochs epochs, and target images are classified by C(F_t(x))."""
    out, domains = Path(out), domains_on(domains, device)
    # phase 1
    source_settings = replace(settings, method="source")
    if pretrained is None:
        pretrained = out / "pretrain" / "checkpoint.pt"
        train(domains, replace(source_settings, tsne_points=0), pretrained.parent, device,
              seed)
    pre = util.resume_state(pretrained, device, "uda", source_settings,
                            seed, may_change=("adapt_epochs", "adda_lr", "entropy_weight",
                                              "tsne_points"))
    # phase 2
    util.seed_everything(seed)  # D and F_t start as they would have in one run
    nets_ = networks_on("adda", device)
    source_only = Networks("source")
    source_only.load_state_dict(pre["average"])
    nets_.features.load_state_dict(source_only.features.state_dict())     # F_s, averaged
    nets_.classifier.load_state_dict(source_only.classifier.state_dict())  # C, averaged
    nets_.target_features.load_state_dict(nets_.features.state_dict())     # F_t <- F_s
    nets_.features.requires_grad_(False)
    nets_.classifier.requires_grad_(False)
    optimizers = {"domain": torch.optim.Adam(nets_.domain.parameters(), settings.adda_lr,
                                             betas=(0.5, 0.999)),
                  "target": torch.optim.Adam(nets_.target_features.parameters(),
                                             settings.adda_lr, betas=(0.5, 0.999))}
    source, target = domains.source_train, domains.target_train
    replicas = parallel.data_parallel(nets_)  # F_t and D (F_s and C are frozen)

    def step(source_index, target_index, progress: float) -> dict:
        return adda_step(replicas, source.images(source_index), target.images(target_index),
                         optimizers)

    average, log = fit(nets_, optimizers, step, domains, "adapt", settings.adapt_epochs,
                       settings, out, device, seed, first_epoch=settings.epochs)
    results = finish(average, domains, log.history, settings, out, seed, log.seconds)
    results["pretrain_seconds"] = pre["seconds"]
    util.write_json(results, out / "results.json")
    return results


# ============================================================================ running it
def domains_on(domains: Domains, device) -> Domains:
    return Domains(*(d.to(device) for d in (domains.source_train, domains.target_train,
                                           domains.source_test, domains.target_test)))


def networks_on(method: str, device) -> Networks:
    # channels-last convolutions and pooling: 1.3-1.9 times faster steps on a CPU;
    # batch norm over the global batch under torchrun (parallel.py)
    return parallel.share_batch_layers(Networks(method).to(device,
                                                         memory_format=torch.channels_last))


def fit(nets_: Networks, optimizers: dict, step, domains: Domains, phase: str, epochs: int,
        settings: UDASettings, out: Path, device, seed: int, first_epoch: int = 0,
        average: Networks | None = None):
    """Run step(source_index, target_index, progress) over `epochs` epochs of paired
    source and target batches, keeping a weight average of nets_ (evaluated and saved),
    with per-epoch statistics, accuracies, curves and checkpoint (util.train_loop).
    progress p in [0, 1) drives the schedules over the phase. Epoch e draws its batches
    and dropout from seed and first_epoch + e (ADDA's adaptation continues the epoch
    count of its pre-training). average: the weight average to keep (a copy of nets_ if
    None). Returns (average, log)."""
    average = copy.deepcopy(nets_).requires_grad_(False) if average is None else average
    source, target = domains.source_train, domains.target_train
    steps_per_epoch, _ = epoch_shape(len(source), len(target), settings.batch_size)
    epoch = {}

    def one_step(index: int) -> dict:
        number, position = divmod(index, steps_per_epoch)
        if position == 0:
            epoch_seed = util.stream_seed(seed, first_epoch + number)
            torch.manual_seed(epoch_seed)  # dropout
            epoch["batches"] = paired_indices(len(source), len(target), settings.batch_size,
                                              torch.Generator().manual_seed(epoch_seed))
            set_modes(nets_, phase)
        # under torchrun each process takes its rows of the step's source and target batch
        losses = step(parallel.rows(epoch["batches"][0][position]),
                      parallel.rows(epoch["batches"][1][position]),
                      index / (epochs * steps_per_epoch))
        nets.update_ema(average, nets_, index, settings.ema_decay)
        return losses

    def evaluate(history: dict):
        refresh_statistics(average, domains, phase, settings.batch_size)
        for split, accuracy in split_accuracies(average, domains, phase == "adapt").items():
            history.setdefault(f"{split}_accuracy", []).append(accuracy)

    log = util.train_loop(
        one_step, epochs * steps_per_epoch, steps_per_epoch, out, "uda", settings, seed,
        device, parts={"networks": nets_, "average": average, **optimizers},
        may_change=("tsne_points",), desc=phase, evaluate=evaluate,
        draw=lambda history: save_curves(history, out, settings))
    return average, log


def set_modes(nets_: Networks, phase: str):
    """Train mode, except in ADDA's adaptation: F_s and C are frozen (eval mode, running
    statistics), and F_t keeps batch norm in train mode but drops no features, since the
    discriminator would tell dropout-masked target features from clean source ones at once
    (with dropout on, D wins outright and F_t learns nothing useful)."""
    nets_.train()
    if phase == "adapt":
        nets_.features.eval()
        nets_.classifier.eval()
        for module in nets_.target_features.modules():
            if isinstance(module, (nn.Dropout, nn.Dropout2d)):
                module.eval()


@torch.no_grad()
def evaluate(encoder: nn.Module, classifier: nn.Module, images: data.ImageSet,
             batch_size: int = 500) -> torch.Tensor:
    """Predicted digits of every image, in order."""
    return metrics.predict(nn.Sequential(encoder, classifier), images, batch_size,
                           images.pixels.device)


@torch.no_grad()
def embed(encoder: nn.Module, images: data.ImageSet, batch_size: int = 500) -> np.ndarray:
    """Features (N, 800) of every image, in order; under torchrun the batches are split
    across the processes."""
    encoder.eval()
    return torch.cat(parallel.in_order(lambda batch: encoder(batch[0]),
                                       images.batches(batch_size, shuffle=False))).numpy()


def refresh_statistics(average: Networks, domains: Domains, phase: str, batch_size: int):
    """Batch-norm statistics that fit the averaged weights (nets.recompute_batch_norm),
    from the first STATISTICS_IMAGES train images of each domain the phase learns from,
    in batches of one domain as in training: the source for source-only (and so ADDA's
    pre-training), the target for target-only and for self-ensembling (whose teacher
    normalises target batches only), both for DANN and GTA, and the target through F_t
    alone for ADDA's adaptation (F_s and C are frozen). The copied statistics of the last
    weights cost USPS -> MNIST-M DANN 8.6 points of accuracy (RESULTS.md)."""
    def batches(images):  # full batches only: batch norm fails on a batch of one
        size = min(batch_size, len(images))
        count = min(STATISTICS_IMAGES, len(images)) // size
        return [batch for batch, _ in itertools.islice(
            images.batches(size, shuffle=False, drop_last=True), count)]
    if phase == "adapt":
        nets.recompute_batch_norm(average.target_features, batches(domains.target_train))
        return
    learns_from = {"source": [domains.source_train], "target": [domains.target_train],
                   "self-ensembling": [domains.target_train]}.get(
        phase, [domains.source_train, domains.target_train])
    nets.recompute_batch_norm(nn.Sequential(average.features, average.classifier),
                              [batch for images in learns_from for batch in batches(images)])


def split_accuracies(nets_: Networks, domains: Domains, adapted: bool) -> dict:
    """Accuracy on the target test split (nan when it has no labels) and the source one."""
    def accuracy(encoder, images):
        if images.labels is None:
            return float("nan")
        return metrics.accuracy(evaluate(encoder, nets_.classifier, images), images.labels)[0]
    return {"target": accuracy(nets_.target_encoder(adapted), domains.target_test),
            "source": accuracy(nets_.features, domains.source_test)}


def save_curves(history: dict, out: Path, settings: UDASettings):
    title = f"{TITLES[settings.method]}: {settings.src} -> {settings.tgt}"
    losses = {name: values for name, values in history.items()
              if name != "step" and not name.endswith("_accuracy")}
    plots.line_plot(losses, out / "loss.png", title=f"{title}, mean loss per epoch",
                    xlabel="epoch")
    plots.line_plot({f"target test ({settings.tgt})": history["target_accuracy"],
                     f"source test ({settings.src})": history["source_accuracy"]},
                    out / "accuracy.png", title=f"{title}, accuracy", xlabel="epoch")


def finish(nets_: Networks, domains: Domains, history: dict, settings: UDASettings,
           out: Path, seed: int, seconds: float) -> dict:
    """Final accuracy, predictions csv (for named images), t-SNE plots, results.json, all
    from nets_ (the weight average). ADDA's epochs are those of its adaptation."""
    target_encoder = nets_.target_encoder(adapted=settings.method == "adda")
    predictions = evaluate(target_encoder, nets_.classifier, domains.target_test)
    results = {"method": settings.method, "src": settings.src, "tgt": settings.tgt,
               "seed": seed, "epochs": len(history["step"]), "train_seconds": seconds,
               "source_test_accuracy": history["source_accuracy"][-1]}
    if domains.target_test.labels is not None:
        share, correct, total = metrics.accuracy(predictions, domains.target_test.labels)
        results.update(target_accuracy=share, correct=correct, total=total)
    if domains.target_test.names is not None:
        write_predictions(domains.target_test.names, predictions, out / "predictions.csv")
    if settings.tsne_points:
        plot_features(nets_.features, target_encoder, domains, settings, out, seed)
    if settings.method == "gta":
        draw_generated(nets_, domains, settings, out, seed)
    util.write_json(results, out / "results.json")
    return results


@torch.no_grad()
def draw_generated(nets_: Networks, domains: Domains, settings: UDASettings, out: Path,
                   seed: int, count: int = 10) -> Path:
    """GTA's picture: `count` source and target test images, and what G draws from their
    embeddings (a source image with its label, a target image as "unknown"). G runs on
    a copy in train mode: batch statistics, since the averaged G has none of its own."""
    count = min(count, len(domains.source_test), len(domains.target_test))  # a row each
    images = [split.images(torch.arange(count))
              for split in (domains.source_test, domains.target_test)]
    nets_.eval()
    features = nets_.features(torch.cat(images))
    unknown = torch.full((count,), nets_.classes)
    labels = torch.cat([domains.source_test.labels[:count].cpu(), unknown])
    noise = torch.randn(len(labels), GTA_NOISE, generator=torch.Generator().manual_seed(seed))
    generated = generate(copy.deepcopy(nets_.generator).train(), features,
                         labels.to(features.device), noise.to(features.device), nets_.classes)
    source_fakes, target_fakes = generated.split([count, count])
    path = data.save_grid(torch.cat([images[0], source_fakes, images[1], target_fakes]),
                          out / "generated.png", nrow=count)
    return plots.label_grid(path, images[0].shape[-1], rows=[
        f"{settings.src}", "G(F(x), y, z)", f"{settings.tgt}", "G(F(x), ?, z)"],
        title=f"GTA: {settings.src} -> {settings.tgt}, test images and G's drawings")


def plot_features(source_encoder, target_encoder, domains: Domains, settings: UDASettings,
                  out: Path, seed: int):
    """t-SNE of source and target test features, coloured by digit and by domain."""
    count = settings.tsne_points
    source = domains.source_test.subset(torch.arange(min(count, len(domains.source_test))))
    target = domains.target_test.subset(torch.arange(min(count, len(domains.target_test))))
    features = np.concatenate([embed(source_encoder, source), embed(target_encoder, target)])
    if not parallel.is_main():  # t-SNE and its pictures: rank 0 alone
        return
    progress = util.Progress(desc="t-SNE", total=1000)
    points = tsne.tsne(tsne.pca(features.astype(np.float64), min(50, features.shape[1])),
                       seed=seed, progress=lambda step, kl: progress.update(1))
    progress.close()
    title = f"{TITLES[settings.method]}: {settings.src} -> {settings.tgt}"
    domain = np.repeat([0, 1], [len(source), len(target)])
    plots.scatter_plot(points, domain, out / "tsne_domain.png", title=f"{title}, by domain",
                       names=[f"source ({settings.src})", f"target ({settings.tgt})"])
    if target.labels is not None:
        digits = torch.cat([source.labels, target.labels]).cpu().numpy()
        plots.scatter_plot(points, digits, out / "tsne_class.png", title=f"{title}, by digit")


def write_predictions(names: list[str], predictions: torch.Tensor, path: Path) -> Path:
    """The homework's grading format: a header, then `image_name,label` per image."""
    rows = "".join(f"{name},{int(label)}\n" for name, label in zip(names, predictions))
    return util.write_text("image_name,label\n" + rows, path)


def load_for_prediction(path, device) -> tuple[nn.Module, UDASettings]:
    """The target encoder and classifier of a checkpoint, ready to predict."""
    nets_, settings = util.load_trained(path, device, UDASettings,
                                        lambda s: Networks(s.method), "average", "uda")
    encoder = nets_.target_encoder(adapted=settings.method == "adda")
    return nn.Sequential(encoder, nets_.classifier).eval(), settings


# ============================================================================ tables
def run_methods(settings: UDASettings, methods, load, out: Path, device, seed: int) -> dict:
    """Every method on one scenario: {method: results}, and results.md for the row set."""
    domains = load_domains(settings, load)
    rows = {}
    for method in methods:
        if method == "target" and domains.target_train.labels is None:
            print(f"skipping 'target': {settings.tgt} has no labels")
            continue
        print(f"== {TITLES[method]}: {settings.src} -> {settings.tgt}")
        source_only = out / "source" / "checkpoint.pt" if "source" in rows else None
        rows[method] = train(domains, replace(settings, method=method), out / method,
                             device, seed, source_only)
    util.write_json(rows, out / "results.json")
    util.write_text(scenario_table(rows, settings.src, settings.tgt), out / "results.md")
    return rows


def run_table(settings: UDASettings, methods, load, out: Path, device, seed: int) -> dict:
    """The four digit scenarios of the DLCV homework (SCENARIOS); one whose data is missing
    is reported, not fatal."""
    table = {}
    for src, tgt in SCENARIOS:
        scenario = f"{src}-{tgt}"
        try:
            table[scenario] = {"rows": run_methods(replace(settings, src=src, tgt=tgt),
                                                   methods, load, out / scenario, device, seed)}
        except UserError as error:
            print(f"skipping {src} -> {tgt}: {error}")
            table[scenario] = {"error": str(error)}
        util.write_json(table, out / "results.json")
        util.write_text(full_table(table), out / "results.md")
    return table


def scenario_table(rows: dict, src: str, tgt: str) -> str:
    """One scenario's table: method, accuracy on the target test split (correct/total)."""
    lines = [f"| {src} -> {tgt} | accuracy on {tgt} test |", "|---|---|"]
    lines += [f"| {TITLES[m]} | {cell(r)} |" for m, r in rows.items()]
    return "\n".join(lines) + "\n"


def full_table(table: dict) -> str:
    """Methods down, scenarios across; a missing data set leaves its column explained."""
    scenarios = list(table)
    lines = ["| method | " + " | ".join(s.replace("-", " -> ") for s in scenarios) + " |",
             "|---|" + "---|" * len(scenarios)]
    for method in [m for m in METHODS if any(m in t.get("rows", {}) for t in table.values())]:
        cells = [cell(table[s]["rows"][method]) if method in table[s].get("rows", {})
                 else "not run" for s in scenarios]
        lines.append(f"| {TITLES[method]} | " + " | ".join(cells) + " |")
    lines += [f"\n{s.replace('-', ' -> ')} not run: {table[s]['error']}"
              for s in scenarios if "error" in table[s]]
    return "\n".join(lines) + "\n"


def cell(results: dict) -> str:
    if "target_accuracy" not in results:
        return "(unlabelled target)"
    return f"{results['target_accuracy']:.4f} ({results['correct']}/{results['total']})"
