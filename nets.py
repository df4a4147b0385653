"""Building blocks and architectures shared by the models, and a torchsummary-style table.

Architectures:
- The digit CNN of domain adaptation (Ganin et al. 2016's MNIST network): a feature
  extractor (two 5x5 convolutions, batch norm, max pools -> 800 features), a label
  classifier (800 -> 100 -> 100 -> 10) and a domain classifier (800 -> 100 -> 1), with
  gradient reversal (`grad_reverse`) between the features and the domain classifier.
- A digit classifier (two VGG-style stages of 3x3 convolutions with batch norm, then a
  dropout MLP) for 28x28 RGB digits: the evaluator that grades generated digits.
- DCGAN generator / discriminator (Radford, Metz & Chintala 2016, "Unsupervised
  Representation Learning with Deep Convolutional Generative Adversarial Networks"):
  z (100) -> 4x4x512 -> 8x8x256 -> 16x16x128 -> 32x32x64 -> 64x64x3 by 4x4 transposed
  convolutions of stride 2, batch norm + ReLU, Tanh out; the discriminator mirrors it with
  strided convolutions and LeakyReLU(0.2). No biases (batch norm makes them redundant).

`summary(model, input_size)` prints what torchsummary prints: every leaf layer with its
output shape and parameter count, then totals and memory estimates.
"""
import torch
import torch.nn as nn


# ============================================================================ gradient reversal
class GradientReversal(torch.autograd.Function):
    """Identity on the way forward, -lambda times the gradient on the way back
    (Ganin & Lempitsky 2015): the features *maximise* the domain loss that the domain
    classifier minimises, in one backward pass."""

    @staticmethod
    def forward(ctx, x, lambd):
        ctx.lambd = lambd
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output):
        return -ctx.lambd * grad_output, None  # no gradient for lambda


def grad_reverse(x: torch.Tensor, lambd: float = 1.0) -> torch.Tensor:
    return GradientReversal.apply(x, lambd)


# ============================================================================ digits
def digit_classifier(classes: int = 10, width: int = 32) -> nn.Sequential:
    """image (B, 3, 28, 28) in [-1, 1] -> class logits (B, classes)."""
    def stage(c_in, c_out):
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                nn.ReLU(True), nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out), nn.ReLU(True), nn.MaxPool2d(2)]
    return nn.Sequential(
        *stage(3, width),                                     # (B, 32, 14, 14)
        *stage(width, 2 * width),                             # (B, 64, 7, 7)
        nn.Flatten(), nn.Dropout(0.3),
        nn.Linear(2 * width * 7 * 7, 256), nn.ReLU(True), nn.Dropout(0.3),
        nn.Linear(256, classes))


def digit_features(channels: int = 3) -> nn.Sequential:
    """image (B, 3, 28, 28) -> features (B, 800), the DANN paper's MNIST extractor."""
    return nn.Sequential(
        nn.Conv2d(channels, 64, 5), nn.BatchNorm2d(64), nn.MaxPool2d(2), nn.ReLU(True),
        nn.Conv2d(64, 50, 5), nn.BatchNorm2d(50), nn.Dropout2d(0.5), nn.MaxPool2d(2),
        nn.ReLU(True),                                        # (B, 50, 4, 4)
        nn.Flatten())                                         # (B, 800)


def label_classifier(features: int = 800, classes: int = 10) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(features, 100), nn.BatchNorm1d(100), nn.ReLU(True), nn.Dropout(0.5),
        nn.Linear(100, 100), nn.BatchNorm1d(100), nn.ReLU(True),
        nn.Linear(100, classes))


def domain_classifier(features: int = 800, hidden: int = 100, layers: int = 1,
                      batch_norm: bool = True) -> nn.Sequential:
    """features -> one logit, "this came from the source". DANN uses one hidden layer of
    100; ADDA's discriminator has two of 500 and no batch norm (it also judges batches of
    target features alone, whose batch statistics would give the domain away)."""
    sizes = [features] + [hidden] * layers
    body = [module for c_in, c_out in zip(sizes, sizes[1:])
            for module in (nn.Linear(c_in, c_out),
                           *([nn.BatchNorm1d(c_out)] if batch_norm else []), nn.ReLU(True))]
    return nn.Sequential(*body, nn.Linear(sizes[-1], 1))


# ============================================================================ DCGAN
def dcgan_generator(latent_dim: int = 100, width: int = 64, channels: int = 3) -> nn.Sequential:
    """z (B, latent_dim, 1, 1) -> image (B, channels, 64, 64) in [-1, 1]."""
    def up(c_in, c_out, stride, padding):
        return [nn.ConvTranspose2d(c_in, c_out, 4, stride, padding, bias=False),
                nn.BatchNorm2d(c_out), nn.ReLU(True)]
    return nn.Sequential(
        *up(latent_dim, width * 8, 1, 0),                     # (B, 512, 4, 4)
        *up(width * 8, width * 4, 2, 1),                      # (B, 256, 8, 8)
        *up(width * 4, width * 2, 2, 1),                      # (B, 128, 16, 16)
        *up(width * 2, width, 2, 1),                          # (B, 64, 32, 32)
        nn.ConvTranspose2d(width, channels, 4, 2, 1, bias=False), nn.Tanh())


def dcgan_discriminator(width: int = 64, channels: int = 3) -> nn.Sequential:
    """image (B, channels, 64, 64) -> real/fake logit (B, 1, 1, 1).

    It ends in a logit, not a sigmoid: the loss applies the sigmoid inside
    `binary_cross_entropy_with_logits`, which is stable where a separate sigmoid saturates."""
    def down(c_in, c_out, norm):
        return [nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False),
                *([nn.BatchNorm2d(c_out)] if norm else []), nn.LeakyReLU(0.2, True)]
    return nn.Sequential(
        *down(channels, width, norm=False),                   # (B, 64, 32, 32)
        *down(width, width * 2, norm=True),                   # (B, 128, 16, 16)
        *down(width * 2, width * 4, norm=True),               # (B, 256, 8, 8)
        *down(width * 4, width * 8, norm=True),               # (B, 512, 4, 4)
        nn.Conv2d(width * 8, 1, 4, 1, 0, bias=False))         # (B, 1, 1, 1)


def dcgan_init_(module: nn.Module) -> nn.Module:
    """DCGAN paper: all weights from N(0, 0.02); batch-norm scale from N(1, 0.02), shift 0."""
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(layer.weight, 0.0, 0.02)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.normal_(layer.weight, 1.0, 0.02)
            nn.init.zeros_(layer.bias)
    return module


# ============================================================================ summary
def summary(model: nn.Module, input_size: tuple, device="cpu") -> str:
    """torchsummary's table for one input of shape input_size (without the batch axis)."""
    rows, hooks = [], []
    leaves = [m for m in model.modules() if not list(m.children())]

    def record(layer, _inputs, output):
        shape = list(output.shape) if torch.is_tensor(output) else list(output[0].shape)
        params = sum(p.numel() for p in layer.parameters(recurse=False))
        trainable = sum(p.numel() for p in layer.parameters(recurse=False) if p.requires_grad)
        rows.append((f"{type(layer).__name__}-{len(rows) + 1}", [-1] + shape[1:],
                     params, trainable))

    hooks = [leaf.register_forward_hook(record) for leaf in leaves]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(2, *input_size, device=device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)

    total = sum(r[2] for r in rows)
    trainable = sum(r[3] for r in rows)
    megabytes = 4 / 2**20  # float32 bytes -> MB
    input_mb = abs(torch.tensor(input_size).prod().item()) * megabytes
    activations_mb = 2 * sum(abs(torch.tensor(r[1]).prod().item()) for r in rows) * megabytes
    params_mb = total * megabytes
    rule, double = "-" * 64, "=" * 64
    lines = [rule, f"{'Layer (type)':>20}  {'Output Shape':>25} {'Param #':>15}", double]
    lines += [f"{name:>20}  {str(shape):>25} {params:>15,}" for name, shape, params, _ in rows]
    lines += [double, f"Total params: {total:,}", f"Trainable params: {trainable:,}",
              f"Non-trainable params: {total - trainable:,}", rule,
              f"Input size (MB): {input_mb:.2f}",
              f"Forward/backward pass size (MB): {activations_mb:.2f}",
              f"Params size (MB): {params_mb:.2f}",
              f"Estimated Total Size (MB): {input_mb + activations_mb + params_mb:.2f}", rule]
    return "\n".join(lines)
