import torch

from dfkd.augment import random_translate
from dfkd.replay import ReplayMemory


def test_ring_buffer_keeps_the_newest_and_round_trips():
    memory = ReplayMemory(capacity=5)
    for i in range(3):  # batches of 2: values 0..5, the oldest (0) is overwritten
        memory.add(torch.full((2, 1), float(2 * i)) + torch.tensor([[0.0], [1.0]]), torch.zeros(2, 3))
    assert memory.size == 5
    assert sorted(memory.images.flatten().tolist()) == [1.0, 2.0, 3.0, 4.0, 5.0]
    restored = ReplayMemory(capacity=5)
    restored.load_state_dict(memory.state_dict())
    assert torch.equal(restored.images, memory.images) and restored.cursor == memory.cursor
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert torch.equal(memory.sample(4, g1)[0], restored.sample(4, g2)[0])


def test_dropping_a_generator_keeps_the_others_entries_oldest_first():
    memory = ReplayMemory(capacity=6)
    for i, owner in enumerate([0, 1, 0, 0]):  # 0..7 in batches of 2; 6, 7 overwrite 0, 1
        memory.add(torch.tensor([[2.0 * i], [2.0 * i + 1]]), torch.zeros(2, 3), owner=owner)
    assert memory.images.flatten().tolist() == [6.0, 7.0, 2.0, 3.0, 4.0, 5.0] and memory.cursor == 2
    memory.drop(1)
    assert memory.size == 4 and memory.images[:4].flatten().tolist() == [4.0, 5.0, 6.0, 7.0]
    assert memory.cursor == 4, "the ring goes on after the kept entries"
    memory.add(torch.tensor([[8.0], [9.0], [10.0]]), torch.zeros(3, 3), owner=1)
    assert memory.images.flatten().tolist() == [10.0, 5.0, 6.0, 7.0, 8.0, 9.0], "4, the oldest, went first"
    restored = ReplayMemory(capacity=6)
    restored.load_state_dict(memory.state_dict())
    restored.drop(0)
    assert restored.images[: restored.size].flatten().tolist() == [8.0, 9.0, 10.0]
    older = {k: v for k, v in memory.state_dict().items() if k != "owners"}  # before owners were kept
    restored.load_state_dict(older)
    restored.drop(0)
    assert restored.size == 0, "an older memory is all one generator's"


def test_samples_come_with_their_own_logits():
    memory = ReplayMemory(capacity=100)
    images = torch.arange(10.0).view(10, 1)
    memory.add(images, images * 10)
    x, t = memory.sample(50, torch.Generator().manual_seed(1))
    assert torch.equal(t, x * 10)


def test_random_translate_moves_each_image_by_whole_pixels():
    x = torch.zeros(64, 1, 9, 9)
    x[:, :, 4, 4] = 1.0  # a single bright pixel in the centre
    out = random_translate(x, 2, torch.Generator().manual_seed(0))
    positions = [divmod(int(img.flatten().argmax()), 9) for img in out]
    offsets = {(r - 4, c - 4) for r, c in positions}
    assert all(abs(dr) <= 2 and abs(dc) <= 2 for dr, dc in offsets)
    assert len(offsets) > 10, "offsets are drawn per image"
    assert torch.equal(out.sum(dim=(1, 2, 3)), x.sum(dim=(1, 2, 3)))


def test_random_rotate_scale_turns_and_scales_each_image_about_its_centre():
    from dfkd.augment import random_rotate_scale

    x = torch.zeros(64, 1, 33, 33)
    x[:, :, 16, 4:29] = 1.0  # a horizontal bar through the centre
    same = random_rotate_scale(x, 0.0, 0.0, torch.Generator().manual_seed(0))
    assert torch.allclose(same, x, atol=1e-6), "no turn and no scaling leaves the images as they are"
    out = random_rotate_scale(x, 30.0, 0.2, torch.Generator().manual_seed(0))
    assert out[:, :, 16, 16].min() > 0.9, "the centre stays where it is"
    rows, cols = torch.meshgrid(torch.arange(33.0) - 16, torch.arange(33.0) - 16, indexing="ij")
    mass = out[:, 0].sum(dim=(1, 2))

    def moment(a, b):  # second moments of each image's brightness about the centre
        return (out[:, 0] * a * b).sum(dim=(1, 2))

    # the bar's orientation from the second moments (0 for the bar as drawn)
    angles = torch.rad2deg(0.5 * torch.atan2(2 * moment(rows, cols), moment(cols, cols) - moment(rows, rows)))
    factors = (mass / 25).sqrt()  # a bar's area grows with the square of the scale
    assert angles.abs().max() <= 30.5 and angles.std() > 10, (
        "each image turns by its own angle within 30 degrees"
    )
    assert 0.77 < factors.min() and factors.max() < 1.23 and factors.std() > 0.03, (
        "and scales by its own factor"
    )
    grad = torch.autograd.grad(
        random_rotate_scale(x.requires_grad_(), 30.0, 0.2, torch.Generator()).sum(), x
    )[0]
    assert grad.abs().sum() > 0, "differentiable in the images"


def test_random_hflip_mirrors_about_half_the_images():
    from dfkd.augment import random_hflip

    x = torch.randn(200, 1, 4, 4)
    out = random_hflip(x, torch.Generator().manual_seed(0))
    mirrored = torch.tensor([torch.equal(o, i.flip(2)) for o, i in zip(out, x)])
    kept = torch.tensor([torch.equal(o, i) for o, i in zip(out, x)])
    assert bool((mirrored | kept).all()) and 70 < int(mirrored.sum()) < 130


def test_random_mixup_blends_the_chosen_fraction_with_partners_from_the_batch():
    from dfkd.augment import random_mixup

    n = 400
    # image i is all i
    x = torch.arange(n, dtype=torch.float).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    out = random_mixup(x, 0.25, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and bool((out == out[:, :, :1, :1]).all()), "one weight per image"
    changed = (out != x).flatten(1).any(1)
    assert 70 < int(changed.sum()) < 130  # about a quarter (a partner may be the image itself)
    assert bool((out >= 0).all() and (out <= n - 1).all()), "convex blends of two images of the batch"
    assert torch.equal(random_mixup(x, 0.0, torch.Generator().manual_seed(0)), x)


def test_random_pen_width_blends_each_image_toward_its_dilation_or_erosion():
    from dfkd.augment import random_pen_width

    # a one-pixel stroke (1) on a dark ground (-1): its 3×3 dilation is a 3×3 blob, its erosion
    # the empty ground
    x = torch.full((400, 1, 5, 5), -1.0)
    x[:, :, 2, 2] = 1.0
    out = random_pen_width(x, 1.0, torch.Generator().manual_seed(0))
    centre, ring, corner = out[:, 0, 2, 2], out[:, 0, 1, 1], out[:, 0, 0, 0]
    assert torch.equal(corner, x[:, 0, 0, 0]), "pixels no stroke reaches stay"
    wider, narrower = ring > -1, centre < 1
    assert not bool((wider & narrower).any()), "one pen per image: wider or narrower"
    assert 150 < int(wider.sum()) < 250 and 150 < int(narrower.sum()) < 250
    assert bool((centre[wider] == 1).all() and (ring[narrower] == -1).all())
    assert bool((ring <= 1).all() and (centre >= -1).all()), "blends, not beyond the extremes"
    # at full strength the extremes are the dilation and the erosion themselves
    assert float(ring.max()) > 0.99 and float(centre.min()) < -0.99
    assert torch.equal(random_pen_width(x, 0.0, torch.Generator().manual_seed(0)), x)


def test_gaussian_blur_is_a_normalized_gaussian_per_channel():
    from dfkd.augment import gaussian_blur

    x = torch.zeros(1, 2, 21, 21)
    x[0, 0, 10, 10] = 1.0  # an impulse in the first channel, the second dark
    out = gaussian_blur(x, 2.0)
    t = torch.arange(-4, 5, dtype=torch.float32)
    k = torch.exp(-(t**2) / 8)
    k = k / k.sum()
    assert torch.allclose(out[0, 0, 6:15, 6:15], k[:, None] * k[None, :], atol=1e-7)
    assert torch.allclose(out[0, 0].sum(), torch.tensor(1.0)) and bool((out[0, 1] == 0).all())
    noise = 2 * torch.rand(200, 1, 16, 16, generator=torch.Generator().manual_seed(0)) - 1
    blurred = gaussian_blur(noise, 2.0)
    assert float(blurred[:, :, 0].std()) < float(blurred[:, :, 8].std()), "zeros beyond the border"


def test_random_elastic_moves_each_pixel_by_its_images_own_blurred_noise():
    from dfkd.augment import gaussian_blur, random_elastic

    # on a ramp that rises one per column, bilinear sampling reads back the horizontal shift itself
    n, h, w, alpha = 6, 24, 24, 34.0
    ramp = torch.arange(w, dtype=torch.float32).expand(n, 1, h, w).contiguous()
    out = random_elastic(ramp, alpha, torch.Generator().manual_seed(5))
    noise = 2 * torch.rand(n, 2, h, w, generator=torch.Generator().manual_seed(5)) - 1
    dx = alpha * gaussian_blur(noise, 4.0)[:, 0]
    inside = (slice(None), slice(3, -3), slice(3, -3))  # where no shift reaches past a border
    assert torch.allclose((out[:, 0] - ramp[:, 0])[inside], dx[inside], atol=1e-4)
    assert 0.6 < float(dx.abs().mean()) < 1.8, "34 moves a pixel by about one"
    assert not torch.allclose(dx[0], dx[1]), "each image its own field"
    assert float((dx[:, :, 1:] - dx[:, :, :-1]).abs().mean()) < 0.2 * float(dx.abs().mean()), "smooth"
    x = torch.rand(3, 1, 8, 8)
    assert torch.allclose(random_elastic(x, 0.0, torch.Generator().manual_seed(0)), x, atol=1e-6)
    flat = torch.full((3, 1, 8, 8), -0.4)
    assert torch.allclose(random_elastic(flat, alpha, torch.Generator().manual_seed(0)), flat)


def test_a_memory_restored_onto_a_device_lives_there():
    # a checkpoint is read onto the CPU; a run on an accelerator restores its memory onto its own
    # device ("meta" stands in for one here)
    memory = ReplayMemory(capacity=4)
    memory.add(torch.zeros(3, 1, 2, 2), torch.zeros(3, 5), owner=1)
    restored = ReplayMemory(capacity=4)
    restored.load_state_dict(memory.state_dict(), torch.device("meta"))
    assert {t.device.type for t in (restored.images, restored.logits, restored.owners)} == {"meta"}
    assert restored.size == 3 and restored.cursor == memory.cursor
