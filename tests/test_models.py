import pytest
import torch

from dfkd.errors import DfkdError
from dfkd.models import CLASSIFIERS, build_classifier
from generators import GENERATORS, build_generator


@pytest.mark.parametrize(
    "name", CLASSIFIERS.names() + ["torchvision.resnet18", "torchvision.mobilenet_v3_small"]
)
@pytest.mark.parametrize("channels", [1, 3])
def test_every_classifier_runs_forward_and_backward(name, channels):
    torch.manual_seed(0)
    model = build_classifier(name, channels, 7, 32)
    out = model(torch.randn(2, channels, 32, 32))
    assert out.shape == (2, 7)
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


def test_lenet_half_is_half_width():
    full = build_classifier("lenet5", 1, 10, 32)
    half = build_classifier("lenet5_half", 1, 10, 32)
    assert [m.out_channels for m in full.features if isinstance(m, torch.nn.Conv2d)] == [6, 16, 120]
    assert [m.out_channels for m in half.features if isinstance(m, torch.nn.Conv2d)] == [3, 8, 60]


def test_bad_classifier_names_and_sizes():
    with pytest.raises(
        DfkdError, match="unknown classifier 'lenet6'; did you mean 'lenet5'\\? known: lenet5"
    ):
        build_classifier("lenet6", 1, 10, 32)
    with pytest.raises(DfkdError, match="unknown torchvision model 'resnet7'"):
        build_classifier("torchvision.resnet7", 1, 10, 32)
    with pytest.raises(DfkdError, match="32×32"):
        build_classifier("lenet5", 1, 10, 28)


@pytest.mark.parametrize("name", GENERATORS.names())
@pytest.mark.parametrize("channels, size", [(1, 32), (3, 32), (3, 16)])
def test_every_generator_runs_forward_and_backward(name, channels, size):
    torch.manual_seed(0)
    gen = build_generator(name, 10, 8, channels, size)
    x = gen(torch.randn(6, 10))
    assert x.shape == (6, channels, size, size)
    # the final non-affine BN standardizes each channel over the batch (normalized-input space)
    assert x.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    x.pow(3).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gen.parameters())


@pytest.mark.parametrize("name", GENERATORS.names())
def test_pixel_output_stays_in_the_valid_pixel_range_of_each_channel(name):
    from generators.registry import PixelsToNormalized

    torch.manual_seed(0)
    mean, std = (0.5, 0.2, 0.1), (0.25, 0.5, 0.3)
    gen = build_generator(name, 10, 8, 3, 32, "pixels", mean, std)
    x = gen(torch.randn(6, 10) * 50)  # large latents saturate the tanh
    pixels = x * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6 and pixels.min() < 0.1 and pixels.max() > 0.9
    assert torch.allclose(
        PixelsToNormalized(mean, std)(torch.tensor([-1.0, 0.0, 1.0]).view(1, 3, 1, 1)).flatten(),
        torch.tensor([(0 - 0.5) / 0.25, (0.5 - 0.2) / 0.5, (1 - 0.1) / 0.3]),
    )
    x.pow(3).mean().backward()
    assert all(p.grad is not None for p in gen.parameters())
    with pytest.raises(DfkdError, match="generator.output must be one of standardized, pixels; got .rgb."):
        build_generator(name, 10, 8, 3, 32, "rgb")


def test_fast_upsample_equals_nearest_interpolation():
    from generators.dfad import upsample2x

    x = torch.randn(3, 4, 5, 6)
    assert torch.equal(upsample2x(x), torch.nn.functional.interpolate(x, scale_factor=2))
    nhwc = x.to(memory_format=torch.channels_last)
    up = upsample2x(nhwc)
    assert up.is_contiguous(memory_format=torch.channels_last)  # perf.channels_last keeps its layout
    assert torch.equal(up, torch.nn.functional.interpolate(x, scale_factor=2))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_fast_upsample_backward_equals_nearest_interpolations(layout):
    from generators.dfad import upsample2x

    x = torch.randn(3, 4, 5, 6, dtype=torch.double).to(memory_format=layout).requires_grad_()
    g = torch.randn(3, 4, 10, 12, dtype=torch.double)
    (mine,) = torch.autograd.grad(upsample2x(x), x, g)
    (theirs,) = torch.autograd.grad(torch.nn.functional.interpolate(x, scale_factor=2), x, g)
    assert torch.allclose(mine, theirs, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(upsample2x, (x,)) and torch.autograd.gradgradcheck(upsample2x, (x,))


@pytest.mark.parametrize("name", ["dfad", "dcgan"])
def test_channels_last_generator_computes_the_same_images(name):
    import copy

    torch.manual_seed(0)
    gen = build_generator(name, 16, 8, 3, 32)
    fast = copy.deepcopy(gen).to(memory_format=torch.channels_last)
    z = torch.randn(8, 16)
    assert torch.allclose(fast(z), gen(z), atol=1e-5)
