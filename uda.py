"""Unsupervised domain adaptation for digits: source-only, DANN, DANN + entropy, ADDA,
GTA, self-ensembling and target-only, with the usual protocol (labelled source train
images, unlabelled target train images, accuracy on the target test split).

A feature extractor F, a label classifier C and a domain classifier D (nets.py).

Source only (lower bound):  min_{F,C} E_s[ CE(C(F(x_s)), y_s) ].
Target only (upper bound):  the same on labelled target images.

DANN (Ganin et al. 2016, "Domain-Adversarial Training of Neural Networks", JMLR):
    min_{F,C} max_D  CE(C(F(x_s)), y_s) - lambda L_dom,
    L_dom = mean_s BCE(D(F(x_s)), 1) + mean_t BCE(D(F(x_t)), 0)   (a mean per domain;
the paper calls the source 0 and the target 1: the loss is the same either way).
One backward pass does both: a gradient reversal layer between F and D is the identity
forward and multiplies the gradient by -lambda backward, so D descends L_dom while F
ascends it. lambda grows as lambda(p) = 2 / (1 + exp(-10 p)) - 1 over the training
progress p in [0, 1], keeping the noisy early domain signal away from F; the paper also
anneals the learning rate, lr(p) = lr / (1 + 10 p)^0.75 (--anneal), of SGD with momentum
0.9 from 0.01, where this code anneals Adam from 1e-3 (RESULTS.md, "Tried and
rejected", UDA).

DANN + entropy: the same, plus w * H(C(F(x_t))), the mean entropy of the target
predictions (Grandvalet & Bengio 2005, "Semi-supervised Learning by Entropy
Minimization"; added to domain adaptation by Long et al. 2016, "RTN"). Aligning the
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
They report MNIST -> USPS 92.8 and USPS -> MNIST 90.8 (their Table 1); RESULTS.md has
what this code reaches, and how much the target term adds.

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
order and step count (ADDA: the source-only run, then adapt_epochs more), so the table
compares methods and nothing else. Every method is evaluated with an exponential moving
average of its weights (nets.update_ema): the adversarial methods' last weights swing by
a few points of target accuracy from one epoch to the next, their average much less. After each epoch the average gets
batch-norm statistics of its own (refresh_statistics), since the ones it copies belong
to the last weights. An epoch is max(|source|, |target|) / batch steps; the smaller set
is cycled.
"""
import copy
import itertools
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import classifier
import data
import nets
import parallel
import reports
import training
import util
from parallel import Random
from util import UserError

METHODS = ("source", "dann", "dann-ent", "adda", "gta", "self-ensembling", "target")
SCENARIOS = (("mnistm", "svhn"), ("mnistm", "usps"), ("usps", "mnistm"), ("svhn", "usps"))
STATISTICS_IMAGES = 4096  # per domain, for the batch-norm statistics of the average
GTA_NOISE = 100  # the size of GTA's z
GTA_WIDTH = 32  # G's and D's channels: the authors' 64 made a step 11 times DANN's on a CPU


# Named settings (run.py --preset NAME). gpu: three times the CPU table's epochs, about
# 30 minutes for the seven methods of one scenario on one GPU; its accuracies were
# measured on the CPU, where a method took 7 to 29 minutes at one thread (RESULTS.md).
PRESETS = {"gpu": {"epochs": 30, "adapt_epochs": 30}}


@dataclass
class UDASettings:
    """Flags of `run.py uda`."""
    method: str = field(default="dann", metadata={
        "help": "source, dann, dann-ent, adda, gta, self-ensembling, target, or all (the whole "
                "table row set)",
        "choices": METHODS + ("all",)})
    src: str = field(default="mnistm", metadata={"help": "labelled source digits"})
    tgt: str = field(default="usps", metadata={"help": "unlabelled target digits"})
    image_size: int = field(default=28, metadata={"help": "every domain resized to it"})
    epochs: int = field(default=10, metadata={"help": "training epochs (ADDA: pre-training)"})
    adapt_epochs: int = field(default=10, metadata={"help": "ADDA adversarial epochs"})
    batch_size: int = field(default=128, metadata={"help": "images per domain per step"})
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate"})
    adda_lr: float = field(default=2e-4, metadata={"help": "ADDA adversarial learning rate"})
    anneal: bool = field(default=True, metadata={
        "help": "DANN paper's annealing lr / (1 + 10 p)^0.75 (--no-anneal: a constant lr); "
                "self-ensembling keeps its paper's constant lr, GTA its authors' decay"})
    entropy_weight: float = field(default=0.1, metadata={
        "help": "dann-ent: the weight of the target's entropy"})
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
        "help": "decay of the weight average that is evaluated (self-ensembling's teacher)"})
    limit: int = field(default=0, metadata={"help": "the first N images of each split only"})
    tsne_points: int = field(default=1000, metadata={"help": "t-SNE: test images a domain"})
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
        self.batch_mean = nets.BatchMean()  # self-ensembling's class balance: no weights

    def target_encoder(self) -> nn.Module:
        """What embeds target images: ADDA's F_t, else F."""
        return self.features if self.target_features is None else self.target_features


# ============================================================================ the steps
def classify_step(networks: Networks, images, labels, optimizer) -> dict:
    """Source-only (or target-only): CE(C(F(x)), y)."""
    loss = F.cross_entropy(networks.classifier(networks.features(images)), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"class": loss}


def dann_step(networks: Networks, source, labels, target, optimizer, reversal: float,
              entropy_weight: float = 0.0) -> dict:
    """One DANN step on a source batch and a target batch; `reversal` is this step's GRL
    strength lambda, so F descends  L_class - lambda L_domain  while D descends L_domain.
    With entropy_weight w > 0 (DANN + entropy), F and C also descend w H(C(F(x_t))).

    The domains go through F one after the other, so batch norm normalises each with its
    own batch statistics (one joint batch scored the same and ran slower on a CPU)."""
    source_features, target_features = networks.features(source), networks.features(target)
    both = torch.cat([source_features, target_features])               # (2B, 800)
    # L_class = CE(C(F(x_s)), y_s): labels exist for the source only
    class_loss = F.cross_entropy(networks.classifier(source_features), labels)
    # L_domain = mean_s BCE(D(R_lambda(F(x_s))), 1) + mean_t BCE(D(R_lambda(F(x_t))), 0);
    # R_lambda is the identity forward and -lambda backward, so F receives -lambda dL/dF
    domain_logits = networks.domain(nets.grad_reverse(both, reversal)).squeeze(1)
    domain_loss = domain_classification_loss(*domain_logits.split([len(source), len(target)]))
    losses = {"class": class_loss, "domain": domain_loss}
    if entropy_weight:  # H(C(F(x_t))) = -sum_k p_k log p_k on the unlabelled target
        losses["entropy"] = entropy(networks.classifier(target_features))
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


def adda_step(networks: Networks, source, target, optimizers) -> dict:
    """One ADDA step: the discriminator, then the target encoder with inverted labels."""
    with torch.no_grad():
        source_features = networks.features(source)                      # F_s: frozen, eval mode
    target_features = networks.target_features(target)                   # F_t(x_t), (B, 800)
    # D: min BCE(D(F_s(x_s)), 1) + BCE(D(F_t(x_t)), 0); detach keeps F_t out of this step
    both = torch.cat([source_features, target_features.detach()])
    domain_loss = domain_classification_loss(
        *networks.domain(both).squeeze(1).split([len(source), len(target)]))
    optimizers["domain"].zero_grad(set_to_none=True)
    domain_loss.backward()
    optimizers["domain"].step()
    # F_t: min BCE(D(F_t(x_t)), 1), D says "source" for target features (inverted labels);
    # the gradient goes into F_t alone, D stays as its own step left it
    encoder_loss = bce_toward(networks.domain(target_features).squeeze(1), 1.0)
    optimizers["target"].zero_grad(set_to_none=True)
    encoder_loss.backward(inputs=list(networks.target_features.parameters()))
    optimizers["target"].step()
    return {"domain": domain_loss, "encoder": encoder_loss}


def gta_step(networks: Networks, source, labels, target, noise, optimizers: dict,
             adversarial_weight: float, target_weight: float) -> dict:
    """One GTA step in the authors' order: D learns on real source images and on both
    domains' generated images; then G, and F and C, learn against the updated D, which
    does not learn there (their losses reach their own weights only).
    noise: z (B_s + B_t, GTA_NOISE), the source rows first."""
    F_, C, G, D = (networks.features, networks.classifier, networks.generator,
                   networks.discriminator)
    source_features, target_features = F_(source), F_(target)          # (B, 800) each
    # G's condition: the source label, or for a target image the extra label K
    unknown = torch.full((len(target),), networks.classes, device=target.device)
    generated = generate(G, torch.cat([source_features, target_features]),
                         torch.cat([labels, unknown]), noise, networks.classes)  # (2B, 3, 28, 28)
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

    # 2. G, F and C against the updated D
    source_data, source_classes = D(generated_source)
    target_data, _ = D(generated_target)
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
                         optimizer, augmentation: Random, consistency_weight: float,
                         confidence: float, balance_weight: float) -> dict:
    """One self-ensembling step: the student learns the source labels and to agree with
    its teacher (the weight average) on target images the teacher is sure of; only the
    student's optimiser steps (the teacher follows as the average, in the loop)."""
    def logits(networks, images):
        return networks.classifier(networks.features(images))
    class_loss = F.cross_entropy(logits(student, augment(source, augmentation)), labels)
    # S(a(x_t)), (B, K)
    student_probs = logits(student, augment(target, augmentation)).softmax(dim=1)
    teacher.train()  # like the student: batch statistics of the target batch, dropout
    with torch.no_grad():
        # T(a'(x_t)), (B, K): another augmentation of the same images
        teacher_probs = logits(teacher, augment(target, augmentation)).softmax(dim=1)
    # m_t = [max_k T(a'(x_t))_k > threshold], (B,)
    confident = (teacher_probs.max(dim=1).values > confidence).float()
    # consistency: mean_t m_t |S - T|^2 / K
    consistency = (((student_probs - teacher_probs) ** 2).mean(dim=1) * confident).mean()
    # class balance: K BCE(mean_t S, 1/K) averaged over k, i.e. summed over the K classes,
    # weighted by the share of confident images (as in the authors' code); both means
    # over the batch
    mean_probs = student.batch_mean(student_probs)                     # (K,)
    balance = (F.binary_cross_entropy(mean_probs, torch.full_like(mean_probs, 1 / len(
        mean_probs)), reduction="sum") * student.batch_mean(confident))
    loss = class_loss + consistency_weight * (consistency + balance_weight * balance)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"class": class_loss, "consistency": consistency, "balance": balance,
            "confident": confident.mean()}


def augment(images: torch.Tensor, rng: Random, shift: float = 2.0, deform: float = 0.1,
            noise: float = 0.1) -> torch.Tensor:
    """French et al.'s augmentation of a batch (B, C, H, W), a draw of its own per image:
    the pixel grid mapped by x -> (I + E) x + t about the centre, E ~ N(0, deform^2) per
    entry and t ~ U(-shift, shift) pixels (outside pixels repeat the border); the
    intensity flipped, x -> -x, for half the images; Gaussian noise of `noise` image
    standard deviations (the paper adds 0.1 to standardised images) per pixel."""
    count, _, height, width = images.shape
    device = images.device
    matrix = torch.eye(2, device=device) + deform * rng.randn(count, 2, 2)   # (B, 2, 2)
    # affine_grid's coordinates run over [-1, 1]: a pixel is 2 / width of them
    offset = shift * (2 * rng.rand(count, 2) - 1)
    offset = torch.stack([offset[:, 0] * 2 / width, offset[:, 1] * 2 / height], dim=1)
    grid = F.affine_grid(torch.cat([matrix, offset[..., None]], dim=2), list(images.shape),
                         align_corners=False)                          # (B, H, W, 2)
    moved = F.grid_sample(images, grid, padding_mode="border", align_corners=False)
    flips = rng.rand(count, 1, 1, 1) < 0.5
    moved = torch.where(flips, -moved, moved)
    spread = moved.std(dim=(1, 2, 3), keepdim=True)
    return moved + noise * spread * rng.randn(*images.shape)


# ============================================================================ optimisers
def make_optimizers(networks: Networks, settings: UDASettings) -> dict:
    """GTA: one Adam per player (D; G; F with C), the authors' settings. Source, target,
    DANN and self-ensembling: one Adam over F and C, and D for DANN, which learns in the
    same step as F and C (the reversal layer makes F ascend D's loss). (ADDA's two are
    made in adda.)"""
    if settings.method == "gta":
        def adam(parameters):
            return torch.optim.Adam(parameters, settings.gta_lr, betas=(0.8, 0.999))
        return {"discriminator": adam(networks.discriminator.parameters()),
                "generator": adam(networks.generator.parameters()),
                "embedding": adam([*networks.features.parameters(),
                                   *networks.classifier.parameters()])}
    domain = networks.domain.parameters() if settings.method.startswith("dann") else []
    return {"optimizer": torch.optim.Adam([*networks.features.parameters(),
                                           *networks.classifier.parameters(), *domain],
                                          settings.lr)}


def set_learning_rates(optimizers: dict, settings: UDASettings, step: int, steps: int):
    """The learning rates of step t of `steps`. GTA: the authors' lr / (1 + 1e-4 t) for D,
    F and C, G's rate constant. Self-ensembling: the paper's constant rate, whatever
    --anneal says (annealed, its student learnt more slowly: RESULTS.md). The others:
    DANN's annealing lr / (1 + 10 p)^0.75 of the progress p = t / steps (--anneal), or a
    constant rate."""
    if settings.method == "gta":
        for name in ("discriminator", "embedding"):
            for group in optimizers[name].param_groups:
                group["lr"] = settings.gta_lr / (1 + 1e-4 * step)
    else:
        anneal = settings.anneal and settings.method != "self-ensembling"
        for group in optimizers["optimizer"].param_groups:
            group["lr"] = annealed_lr(settings.lr, step / steps) if anneal else settings.lr


# ============================================================================ training
def train(domains: "Domains", settings: UDASettings, out: Path, device, seed: int,
          pretrained: Path | None = None) -> dict:
    """Train one method for settings.epochs epochs of paired source and target batches,
    keeping the weight average that is evaluated and saved; accuracies, curves and a
    checkpoint after every epoch; then predictions, t-SNE and results.json. ADDA has
    two phases of its own (adda), the first of which may be a source-only run already
    made (pretrained: its checkpoint)."""
    if settings.method == "adda":
        return adda(domains, settings, out, device, seed, pretrained)
    if settings.method == "target" and domains.target_train.labels is None:
        raise UserError(f"target {settings.tgt} has no labels, so 'target' (train on the "
                        "target) cannot run: give a labelled target or another --method")
    domains, method = domains.to(device), settings.method
    training.seed_weights(seed)
    networks = Networks(method).to(device, memory_format=torch.channels_last)
    parallel.distribute(networks)  # under torchrun: gradients averaged in backward
    average = copy.deepcopy(networks).requires_grad_(False)  # evaluated; the teacher
    optimizers = make_optimizers(networks, settings)
    epochs = Epochs(domains, settings.batch_size)
    # with --resume, every part of `state` comes back from the checkpoint here
    run = training.Run(out, "uda", settings, seed, device, desc=method,
                       state={"networks": networks, "average": average, **optimizers},
                       steps=settings.epochs * epochs.steps, every=epochs.steps,
                       may_change=("tsne_points",))
    # the training streams (training.py; dropout draws from torch's own)
    data_order = run.random("data")        # each epoch's batches
    noise = run.random("noise")            # GTA's z
    augmentation = run.random("augment")   # self-ensembling's augmentations
    for step in run:
        (xs, ys), (xt, yt) = epochs.batch(step, data_order)
        set_learning_rates(optimizers, settings, step, run.steps)
        networks.train()
        if method in ("source", "target"):
            numbers = classify_step(networks, *((xs, ys) if method == "source" else (xt, yt)),
                                    optimizers["optimizer"])
        elif method == "gta":  # z for the source rows, then for the target rows
            z = torch.cat([noise.randn(len(x), GTA_NOISE) for x in (xs, xt)])
            numbers = gta_step(networks, xs, ys, xt, z, optimizers,
                               settings.adversarial_weight, settings.target_weight)
        elif method == "self-ensembling":
            numbers = self_ensembling_step(networks, average, xs, ys, xt,
                                           optimizers["optimizer"], augmentation,
                                           settings.consistency_weight, settings.confidence,
                                           settings.balance_weight)
        else:
            numbers = dann_step(networks, xs, ys, xt, optimizers["optimizer"],
                                grl_lambda(step / run.steps),  # lambda(p), p in [0, 1)
                                settings.entropy_weight if method == "dann-ent" else 0.0)
        nets.update_ema(average, networks, step, settings.ema_decay)
        run.log(numbers)
        if run.at_checkpoint:  # the end of an epoch: the average, evaluated
            refresh_statistics(nn.Sequential(average.features, average.classifier),
                               statistics_sources(domains, method), settings.batch_size)
            end_epoch(run, average.features, average, domains, settings, out)
    return finish(run, average, domains, settings, out)


def set_adaptation_modes(networks: Networks):
    """ADDA's modes while F_t adapts: F_s and C are frozen (eval mode, running statistics);
    F_t keeps batch norm in train mode but drops no features, since the discriminator
    would tell dropout-masked target features from clean source ones at once (with
    dropout on, D wins outright and F_t learns nothing useful)."""
    networks.train()
    networks.features.eval()
    networks.classifier.eval()
    for module in networks.target_features.modules():
        if isinstance(module, (nn.Dropout, nn.Dropout2d)):
            module.eval()


def adda(domains: "Domains", settings: UDASettings, out: Path, device, seed: int,
         pretrained: Path | None = None) -> dict:
    """ADDA (Tzeng et al. 2017) in its two phases.

    1. Pre-train F_s and C on the labelled source: this is exactly the source-only run,
       so it is that run (in OUT/pretrain), or the checkpoint of a finished one.
    2. F_t starts as a copy of F_s; F_s and C are frozen; then D and F_t alternate
       (adda_step) for adapt_epochs epochs, and target images are classified by C(F_t(x))."""
    out, domains = Path(out), domains.to(device)
    # 1. F_s and C: the source-only run's weight average
    source_settings = replace(settings, method="source")
    if pretrained is None:
        pretrained = out / "pretrain" / "checkpoint.pt"
        train(domains, replace(source_settings, tsne_points=0), pretrained.parent, device,
              seed)
    # the source-only run's checkpoint, checked to be this run's (seed, settings)
    pre = util.resume_state(pretrained, device, "uda", source_settings, seed,
                            may_change=("adapt_epochs", "adda_lr", "entropy_weight",
                                        "tsne_points"))
    training.seed_weights(seed)  # D's initial weights (F_t is F_s's copy)
    networks = Networks("adda").to(device, memory_format=torch.channels_last)
    source_only = Networks("source")
    source_only.load_state_dict(pre["average"])
    networks.features.load_state_dict(source_only.features.state_dict())     # F_s
    networks.classifier.load_state_dict(source_only.classifier.state_dict())  # C
    # 2. F_t <- F_s; F_s and C frozen; D and F_t alternate
    networks.target_features.load_state_dict(networks.features.state_dict())
    networks.features.requires_grad_(False)
    networks.classifier.requires_grad_(False)
    parallel.distribute(networks)  # F_t's and D's gradients averaged (F_s, C frozen)
    average = copy.deepcopy(networks).requires_grad_(False)
    optimizers = {"domain": torch.optim.Adam(networks.domain.parameters(), settings.adda_lr,
                                             betas=(0.5, 0.999)),
                  "target": torch.optim.Adam(networks.target_features.parameters(),
                                             settings.adda_lr, betas=(0.5, 0.999))}
    epochs = Epochs(domains, settings.batch_size)
    # with --resume, every part of `state` comes back from the checkpoint here
    run = training.Run(out, "uda", settings, seed, device, desc="adapt",
                       state={"networks": networks, "average": average, **optimizers},
                       steps=settings.adapt_epochs * epochs.steps, every=epochs.steps,
                       may_change=("tsne_points",))
    # a stream of its own: the batches differ from the pre-training's
    data_order = run.random("adaptation data")
    for step in run:
        (xs, _), (xt, _) = epochs.batch(step, data_order)
        set_adaptation_modes(networks)
        numbers = adda_step(networks, xs, xt, optimizers)
        nets.update_ema(average, networks, step, settings.ema_decay)
        run.log(numbers)
        if run.at_checkpoint:  # the end of an epoch: the average of F_t, evaluated
            refresh_statistics(average.target_features, [domains.target_train],
                               settings.batch_size)
            end_epoch(run, average.target_features, average, domains, settings, out)
    return finish(run, average, domains, settings, out, pretrain_seconds=pre["seconds"])


# ============================================================================ evaluation
def statistics_sources(domains: "Domains", method: str) -> list:
    """The train sets whose batches give the average its batch-norm statistics: the
    source for source-only (and so ADDA's pre-training), the target for target-only and
    for self-ensembling (whose teacher normalises target batches only), both pooled for
    DANN and GTA. In training, DANN and GTA normalise each domain by its own batch: the
    pooled statistics are a choice (RESULTS.md, "Tried and rejected", UDA: the
    target's statistics alone gave no clear gain)."""
    return {"source": [domains.source_train], "target": [domains.target_train],
            "self-ensembling": [domains.target_train]}.get(
        method, [domains.source_train, domains.target_train])


def refresh_statistics(network: nn.Module, sources: list, batch_size: int):
    """Batch-norm statistics that fit the averaged weights (nets.recompute_batch_norm),
    from the first STATISTICS_IMAGES train images of each set in `sources`, in batches
    of one domain as in training. The copied statistics of the last weights cost
    USPS -> MNIST-M DANN 8.6 points of accuracy (RESULTS.md)."""
    def batches(images):  # full batches only: batch norm fails on a batch of one
        size = min(batch_size, len(images))
        count = min(STATISTICS_IMAGES, len(images)) // size
        return [batch for batch, _ in itertools.islice(
            images.batches(size, drop_last=True), count)]
    nets.recompute_batch_norm(network, [parallel.rows(batch) for images in sources
                                        for batch in batches(images)])  # this process's


@torch.no_grad()
def predict(encoder: nn.Module, label_classifier: nn.Module, images: data.ImageSet,
            batch_size: int = 500) -> torch.Tensor:
    """Predicted digits of every image, in order (eval mode), by C(encoder(x))."""
    return classifier.predict(nn.Sequential(encoder, label_classifier), images, batch_size,
                              images.pixels.device)


def end_epoch(run, target_encoder: nn.Module, average: Networks, domains: "Domains",
              settings: UDASettings, out: Path):
    """The average's accuracy on the target test split (nan when it has no labels) and
    the source one into the history; the checkpoint; the curves."""
    for split, encoder, images in (("target", target_encoder, domains.target_test),
                                   ("source", average.features, domains.source_test)):
        accuracy = (float("nan") if images.labels is None else classifier.accuracy(
            predict(encoder, average.classifier, images), images.labels)[0])
        run.history.setdefault(f"{split}_accuracy", []).append(accuracy)
    run.save_checkpoint()
    reports.uda_curves(out, settings, run.history)


def finish(run, average: Networks, domains: "Domains", settings: UDASettings, out: Path,
           **extra) -> dict:
    """Predictions of the target test images, the t-SNE of the features, GTA's drawings
    and results.json, all from the average."""
    test = domains.target_test
    predictions = predict(average.target_encoder(), average.classifier, test)
    accuracy = None if test.labels is None else classifier.accuracy(predictions, test.labels)
    return reports.uda_results(
        out, settings, run, domains, predictions, accuracy, average.features,
        average.target_encoder(),
        gta_drawings(average, domains, run.seed) if settings.method == "gta" else None,
        **extra)


@torch.no_grad()
def gta_drawings(average: Networks, domains: "Domains", seed: int, count: int = 10) -> list:
    """GTA's picture: `count` source and target test images, each followed by what G draws
    from their embeddings (a source image with its label, a target image as "unknown").
    G runs on a copy in train mode: batch statistics, since the averaged G has none of
    its own."""
    count = min(count, len(domains.source_test), len(domains.target_test))  # a row each
    images = [split.images(torch.arange(count))
              for split in (domains.source_test, domains.target_test)]
    average.eval()
    features = average.features(torch.cat(images))
    unknown = torch.full((count,), average.classes)
    labels = torch.cat([domains.source_test.labels[:count].cpu(), unknown])
    noise = training.fixed_random(seed, "drawings").randn(len(labels), GTA_NOISE)
    generated = generate(copy.deepcopy(average.generator).train(), features,
                         labels.to(features.device), noise.to(features.device),
                         average.classes)
    source_fakes, target_fakes = generated.split([count, count])
    return [images[0], source_fakes, images[1], target_fakes]


# ============================================================================ data
@dataclass
class Domains:
    """The four splits one scenario needs, resized to one size."""
    source_train: data.ImageSet
    target_train: data.ImageSet
    source_test: data.ImageSet
    target_test: data.ImageSet

    def to(self, device) -> "Domains":
        return Domains(*(split.to(device) for split in (
            self.source_train, self.target_train, self.source_test, self.target_test)))


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
                   data_order: Random):
    """Per step a source and a target index batch; an epoch covers the larger set once,
    the smaller one is cycled through fresh permutations."""
    steps, batch_size = epoch_shape(source_count, target_count, batch_size)
    needed = steps * batch_size

    def cycled(count):
        rounds = -(-needed // count)
        return torch.cat([data_order.permutation(count)
                          for _ in range(rounds)])[:needed].view(steps, batch_size)
    return cycled(source_count), cycled(target_count)


class Epochs:
    """The paired source and target batches of each step, epoch by epoch: (x_s, y_s) and
    (x_t, y_t) (y_t None for an unlabelled target), this process's rows of the global
    batch. Each epoch draws its order from the run's data stream when it starts
    (checkpoints end epochs, so a resumed run draws what the uninterrupted one would)."""

    def __init__(self, domains: Domains, batch_size: int):
        self.source, self.target = domains.source_train, domains.target_train
        self.batch_size = batch_size
        self.steps = epoch_shape(len(self.source), len(self.target), batch_size)[0]
        self.indices = None

    def batch(self, step: int, data_order: Random):
        position = step % self.steps
        if position == 0:  # the epoch's batches
            self.indices = paired_indices(len(self.source), len(self.target),
                                          self.batch_size, data_order)
        source_index, target_index = (parallel.rows(indices[position])
                                      for indices in self.indices)
        return ((self.source.images(source_index), self.source.labels[source_index]),
                (self.target.images(target_index), None if self.target.labels is None
                 else self.target.labels[target_index]))


# ============================================================================ using it
def load_for_prediction(path, device) -> tuple[nn.Module, UDASettings]:
    """The target encoder and classifier of a checkpoint, ready to predict."""
    networks, settings = util.load_trained(path, device, UDASettings,
                                        lambda s: Networks(s.method), "average", "uda")
    return nn.Sequential(networks.target_encoder(), networks.classifier).eval(), settings


def summary() -> str:
    """The layer tables of every UDA network, as `run.py summary uda` prints them."""
    side, gta = UDASettings().image_size, Networks("gta")
    tables = [("feature extractor", nets.digit_features(), (3, side, side)),
              ("label classifier", nets.label_classifier(), (800,)),
              ("DANN domain classifier", nets.domain_classifier(), (800,)),
              ("ADDA discriminator",
               nets.domain_classifier(hidden=500, layers=2, batch_norm=False), (800,)),
              ("GTA generator G(F(x), label, z)", gta.generator,
               (800 + gta.classes + 1 + GTA_NOISE, 1, 1)),
              ("GTA discriminator (data and class heads)", gta.discriminator, (3, side, side))]
    return "\n".join(f"uda: {title}\n" + nets.summary(network, size)
                     for title, network, size in tables)
