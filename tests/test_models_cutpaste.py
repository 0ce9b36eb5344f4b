import torch

from wsi_anomaly.models.cutpaste import cutpaste_normal, cutpaste_scar, make_cutpaste_batch


def _images(n=2, size=64):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(123))


def test_batch_layout_and_labels():
    images = _images()
    batch, labels = make_cutpaste_batch(images, torch.Generator().manual_seed(0))
    assert batch.shape == (6, 3, 64, 64) and batch.dtype == images.dtype
    assert labels.tolist() == [0, 0, 1, 1, 1, 1] and labels.dtype == torch.long
    assert batch.min() >= 0 and batch.max() <= 1
    # Without whole-image jitter the originals pass through unchanged.
    plain, _ = make_cutpaste_batch(images, torch.Generator().manual_seed(0), image_jitter=0)
    torch.testing.assert_close(plain[:2], images)


def test_deterministic_with_same_generator_and_independent_of_global_rng():
    images = _images()
    state = torch.get_rng_state()
    a, _ = make_cutpaste_batch(images, torch.Generator().manual_seed(7))
    torch.manual_seed(999)
    b, _ = make_cutpaste_batch(images, torch.Generator().manual_seed(7))
    c, _ = make_cutpaste_batch(images, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    torch.set_rng_state(state)


def test_normal_pastes_a_rectangle_of_the_stated_area():
    image = _images(1, 128)[0]
    for seed in range(5):
        out = cutpaste_normal(image, torch.Generator().manual_seed(seed))
        changed = (out != image).any(dim=0)
        assert changed.any(), "the pasted copy must differ from the original"
        ys, xs = changed.nonzero(as_tuple=True)
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        assert box <= 0.15 * 128 * 128 * 1.05  # the changed pixels lie within one patch
        assert changed.sum() >= 0.02 * 128 * 128 * 0.9


def test_scar_is_thin_and_small():
    image = _images(1, 128)[0]
    for seed in range(5):
        out = cutpaste_scar(image, torch.Generator().manual_seed(seed))
        changed = (out != image).any(dim=0).sum().item()
        assert 0 < changed <= 16 * 25
