"""Discrepancy terms between student and teacher logits, registered by name.

Each is a pure function `(student_logits, teacher_logits, temperature) -> scalar`, differentiable in
both arguments: the generator ascends it through both networks, the student descends it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dfkd.registry import Registry

LOSSES: Registry = Registry("loss")
# Generator priors: `(teacher_logits, **taps) -> scalar` to minimize, weighted in method.priors
# and method.extra_priors.
# Taps are what the method reads from inside the teacher, only for the priors that need them
# (PRIOR_TAPS): `bn_inputs`, (input, running_mean, running_var) per BatchNorm layer;
# `activation`, the output of the layer method.activation_layer; `images`, the synthetic batch;
# `targets`, the classes a conditional generator's latents code for (dfkd.latents); `blurred`, the
# teacher's logits for the synthetic batch under a 3×3 box blur (dfkd.augment.box_blur);
# `memory_classes`, the share of the replay memory's images in each of the teacher's classes.
PRIORS: Registry = Registry("generator prior")
PRIOR_TAPS = {
    "bn": "bn_inputs",
    "bn_kl": "bn_inputs",
    "activation": "activation",
    "tv": "images",
    "input_kl": "images",
    "target": "targets",
    "blur": "blurred",
    "memory_balance": "memory_classes",
}


@LOSSES.register("l1")
def l1(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean absolute logit difference (DFAD): does not saturate when the two networks agree."""
    return (student - teacher).abs().mean()


@LOSSES.register("mse")
def mse(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return (student - teacher).pow(2).mean()


@LOSSES.register("kl")
def kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher ‖ student) on temperature-softened outputs, scaled by τ² (Hinton et al.)."""
    log_s = F.log_softmax(student / temperature, dim=1)
    log_t = F.log_softmax(teacher / temperature, dim=1)
    return (log_t.exp() * (log_t - log_s)).sum(1).mean() * temperature**2


@LOSSES.register("js")
def js(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Jensen–Shannon divergence on temperature-softened outputs, scaled by τ²."""
    p_s = F.softmax(student / temperature, dim=1)
    p_t = F.softmax(teacher / temperature, dim=1)
    log_m = (0.5 * (p_s + p_t)).clamp_min(1e-12).log()
    kl_sm = (p_s * (p_s.clamp_min(1e-12).log() - log_m)).sum(1)
    kl_tm = (p_t * (p_t.clamp_min(1e-12).log() - log_m)).sum(1)
    return 0.5 * (kl_sm + kl_tm).mean() * temperature**2


@PRIORS.register("onehot")
def onehot(teacher: torch.Tensor, **taps) -> torch.Tensor:
    """Cross-entropy of the teacher to its own argmax (DAFL): samples the teacher is sure about."""
    return F.cross_entropy(teacher, teacher.argmax(1))


@PRIORS.register("target")
def target(teacher: torch.Tensor, targets: torch.Tensor | None = None, **taps) -> torch.Tensor:
    """Cross-entropy of the teacher to the class each latent codes for (generator.conditional), as
    DeepInversion, CMI and Fast-DFKD ask of their synthetic images: every class gets samples, and a
    generator cannot settle on the one class where the student is most wrong."""
    return F.cross_entropy(teacher, targets)


@PRIORS.register("balance")
def balance(teacher: torch.Tensor, **taps) -> torch.Tensor:
    """Negative entropy of the batch-mean prediction (DAFL's information entropy), offset so that a
    perfectly class-balanced batch scores 0: every class gets samples."""
    mean = F.softmax(teacher, dim=1).mean(0)
    return (mean * mean.clamp_min(1e-12).log()).sum() + math.log(teacher.shape[1])


# The replay memory's class unevenness (class_unevenness) at which memory_balance takes its full
# weight. Memories of the BatchNorm game on MNIST-5k read 0.007-0.07, on Fashion-MNIST ResNet-8
# 0.15-0.20 (runs/RESULTS.md, "Teacher families").
UNEVEN_AT_FULL_WEIGHT = 0.05


def class_unevenness(shares: torch.Tensor) -> torch.Tensor:
    """KL(shares ‖ uniform) of a vector of class shares: 0 when every class holds the same share,
    log(classes) when one holds all."""
    return (shares * (shares.clamp_min(1e-12) * len(shares)).log()).sum()


@PRIORS.register("memory_balance")
def memory_balance(teacher: torch.Tensor, memory_classes: torch.Tensor | None = None, **taps) -> torch.Tensor:
    """`balance`, weighted by min(1, class_unevenness(memory_classes) / UNEVEN_AT_FULL_WEIGHT): full
    while the replay memory's images crowd into some of the teacher's classes, fading as they even
    out. At 20 in the BatchNorm game it lifts a teacher whose images crowd (Fashion-MNIST ResNet-8) as a fixed
    `balance` 20 does, and costs a teacher whose images are already even (MNIST-5k WRN-16-1) about a
    point where the fixed weight costs 1-2: every memory is uneven while it fills, so every run gets
    the full weight early (runs/RESULTS.md, "Teacher families"). An empty memory (the first
    iteration, or a lone generator's after a reset) reads as even: no weight until it holds a batch."""
    gate = torch.clamp(class_unevenness(memory_classes) / UNEVEN_AT_FULL_WEIGHT, max=1.0)
    return gate * balance(teacher)


@PRIORS.register("bn")
def bn_statistics(teacher: torch.Tensor, bn_inputs=(), **taps) -> torch.Tensor:
    """DeepInversion / DFQ: at each BatchNorm layer of the teacher, the L2 distances between the
    synthetic batch's per-channel mean and variance and the layer's running statistics, summed
    over layers: samples whose statistics look like the training data's."""
    total = teacher.new_zeros(())
    for x, running_mean, running_var in bn_inputs:
        mean, var = batch_moments(x)
        total = total + torch.linalg.vector_norm(mean - running_mean)
        total = total + torch.linalg.vector_norm(var - running_var)
    return total


class _BatchMoments(torch.autograd.Function):
    """Per channel (dim 1) mean and biased variance over every other dim, in float32 at least (a
    bf16 tap's mean loses the digits the priors compare). Two passes and a one-line gradient:
    torch.var's CPU reduction over a batch of feature maps runs 5-10 times slower (WRN-16-1's 13
    BatchNorm inputs took a fifth of each BatchNorm-game iteration)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dims = [0, *range(2, x.dim())]
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        mean = wide.mean(dims, keepdim=True)
        centred = wide - mean
        ctx.save_for_backward(centred)
        ctx.in_dtype = x.dtype
        return mean.flatten(), centred.square().mean(dims)

    @staticmethod
    def backward(ctx, grad_mean: torch.Tensor, grad_var: torch.Tensor) -> torch.Tensor:
        (centred,) = ctx.saved_tensors
        per_channel = [1, -1] + [1] * (centred.dim() - 2)
        n = centred.numel() // centred.shape[1]
        grad = (grad_mean.view(per_channel) + 2 * grad_var.view(per_channel) * centred) / n
        return grad.to(ctx.in_dtype)


def batch_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's per-channel mean and biased variance (as BatchNorm computes them in training)."""
    return _BatchMoments.apply(x)


def _gaussian_kl(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor) -> torch.Tensor:
    """Per channel (dim 1), KL(N(batch mean, batch var) ‖ N(running_mean, running_var))."""
    mean, var = batch_moments(x)
    var = var + 1e-5
    ref = running_var.float() + 1e-5
    mean_gap = (mean - running_mean.float()).pow(2)
    return 0.5 * ((var + mean_gap) / ref - 1 + (ref / var).log())


@PRIORS.register("bn_kl")
def bn_kl(teacher: torch.Tensor, bn_inputs=(), **taps) -> torch.Tensor:
    """The `bn` prior at one scale for every teacher: per channel, the KL divergence from the
    Gaussian of the layer's running statistics to that of the synthetic batch, averaged over the
    channels of a layer and then over layers. Unitless, so one weight fits LeNet-5-BN and a
    ResNet alike, where `bn`'s sum of L2 distances grows with depth, width and activation scale."""
    per_layer = [
        _gaussian_kl(x, running_mean, running_var).mean() for x, running_mean, running_var in bn_inputs
    ]
    return torch.stack(per_layer).mean() if per_layer else teacher.new_zeros(())


@PRIORS.register("input_kl")
def input_kl(teacher: torch.Tensor, images: torch.Tensor | None = None, **taps) -> torch.Tensor:
    """The images' own statistics against the input normalization: per channel, the Gaussian KL
    from N(0, 1) (what normalized real images average to, by the definition of input.mean and
    input.std) to the batch's mean and variance, averaged over channels: the brightness and
    contrast of real images, known without any of them."""
    zeros = images.new_zeros(images.shape[1])
    return _gaussian_kl(images, zeros, zeros + 1).mean()


@PRIORS.register("blur")
def blur_survival(teacher: torch.Tensor, blurred: torch.Tensor | None = None, **taps) -> torch.Tensor:
    """Cross-entropy of the teacher's reading of the blurred batch to the class it reads in the
    sharp one: images whose class survives the loss of the finest detail, so that it shows in
    coarser shapes too, which a student of another family may read more as the teacher does. It
    costs a teacher pass and its backward per generator step, and favours thick strokes over thin
    ones (runs/RESULTS.md: a little on Fashion-MNIST's ResNet-8, five points lost on MNIST's
    WRN-16-1)."""
    return F.cross_entropy(blurred.float(), teacher.argmax(1))


@PRIORS.register("activation")
def activation_norm(teacher: torch.Tensor, activation: torch.Tensor | None = None, **taps) -> torch.Tensor:
    """DAFL's activation loss: minus the mean absolute activation of a teacher layer (the
    penultimate one in the paper): samples that excite the teacher's features strongly."""
    return -activation.abs().mean()


@PRIORS.register("tv")
def total_variation(teacher: torch.Tensor, images: torch.Tensor | None = None, **taps) -> torch.Tensor:
    """DeepInversion's image prior: the mean absolute difference between neighbouring pixels
    (anisotropic total variation): smooth images with flat regions, not high-frequency texture."""
    return (images.diff(dim=-1).abs().mean() + images.diff(dim=-2).abs().mean()) / 2


# Feature terms: `(student_feature, teacher_feature) -> scalar`, for one pair of layers. Terms
# marked `needs_adapter` compare features of one shape: the method passes the student's through
# a learned adapter (dfkd.features.Adapter) when the shapes differ.
FEATURE_LOSSES: Registry = Registry("feature loss")


def _adapted(fn):
    fn.needs_adapter = True
    return fn


def _maps_only(fn):
    fn.needs_maps = True  # spatial maps (N×C×H×W), not flat features
    return fn


def attention_map(feature: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Channel mean of squared activations, pooled to `size`, flattened and L2-normalized per image."""
    amap = feature.pow(2).mean(1, keepdim=True)
    if amap.shape[-2:] != size:
        amap = F.adaptive_avg_pool2d(amap, size)
    return F.normalize(amap.flatten(1), dim=1)


@FEATURE_LOSSES.register("at")
@_maps_only
def attention_transfer(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Attention transfer (Zagoruyko & Komodakis; ZSKT): mean squared difference of the normalized
    attention maps. Maps of different resolutions meet at the smaller one."""
    size = tuple(min(a, b) for a, b in zip(student.shape[-2:], teacher.shape[-2:]))
    return (attention_map(student, size) - attention_map(teacher, size)).pow(2).mean()


@FEATURE_LOSSES.register("hint")
@_adapted
def hint(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """FitNets: mean squared error between the (adapted) student feature and the teacher's."""
    return (student - teacher).pow(2).mean()


def _pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    flat = x.flatten(1)
    return torch.cdist(flat, flat)


@FEATURE_LOSSES.register("rkd_distance")
def rkd_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD-D (Park et al.): Huber loss between the batch's pairwise distance matrices, each divided
    by its mean off-diagonal distance. Widths may differ: only distances are compared."""

    def normalized(x):
        d = _pairwise_distances(x)
        n = d.shape[0]
        return d / (d.sum() / max(n * (n - 1), 1)).clamp_min(1e-12)

    return F.smooth_l1_loss(normalized(student), normalized(teacher))


@FEATURE_LOSSES.register("rkd_angle")
def rkd_angle(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD-A (Park et al.): Huber loss between the cosines of the angles every triplet of the
    batch forms, cos∠(x_i, x_j, x_k) = <(x_i - x_j)/|.|, (x_k - x_j)/|.|>."""

    def cosines(x):
        flat = x.flatten(1)
        e = F.normalize(flat.unsqueeze(0) - flat.unsqueeze(1), dim=2)  # e[j, i] = unit(x_i - x_j)
        return torch.bmm(e, e.transpose(1, 2)).flatten()

    return F.smooth_l1_loss(cosines(student), cosines(teacher))


@FEATURE_LOSSES.register("gram")
@_adapted
def gram(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """FSP-style (Yim et al.) on one layer: squared Frobenius distance between the per-image
    channel Gram matrices F·Fᵀ / (H·W), averaged over the batch."""

    def matrices(x):
        flat = x.flatten(2) if x.dim() > 2 else x.unsqueeze(-1)  # a flat feature is a 1×1 map
        return flat @ flat.transpose(1, 2) / flat.shape[-1]

    return (matrices(student) - matrices(teacher)).pow(2).sum((1, 2)).mean()


# GAN objectives for the discriminator variant: the discriminator's loss on (real, fake) logits,
# the student's (generator-side) loss on fake logits, and the logit above which D says "real".
GAN_LOSSES: Registry = Registry("GAN loss")


class GanLoss:
    threshold = 0.0

    def discriminator(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def student(self, fake: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@GAN_LOSSES.register("bce")
class NonSaturatingBCE(GanLoss):
    """Goodfellow et al.'s cross-entropy; the student maximizes log D(fake) (non-saturating)."""

    def discriminator(self, real, fake):
        return F.softplus(-real).mean() + F.softplus(fake).mean()

    def student(self, fake):
        return F.softplus(-fake).mean()


@GAN_LOSSES.register("lsgan")
class LeastSquares(GanLoss):
    """Mao et al.: targets 1 for real, 0 for fake."""

    threshold = 0.5

    def discriminator(self, real, fake):
        return 0.5 * (real - 1).pow(2).mean() + 0.5 * fake.pow(2).mean()

    def student(self, fake):
        return 0.5 * (fake - 1).pow(2).mean()


@GAN_LOSSES.register("hinge")
class Hinge(GanLoss):
    def discriminator(self, real, fake):
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()

    def student(self, fake):
        return -fake.mean()
