import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

from wsi_anomaly.errors import WeightsUnavailableError
from wsi_anomaly.models.atacnet import (
    ATACNet,
    AtacNetConfig,
    ResNet50Trunk,
    SelfAttentionBlock,
    atacnet_loss,
    attention_crop_boxes,
    crop_and_resize,
    deviation_loss,
    load_resnet50,
    make_optimiser,
    make_scheduler,
    topk_count,
    topk_score,
    train_step,
    weighted_ce_loss,
)
from wsi_anomaly.models.atacnet_data import (
    ATACNET_MEAN,
    ATACNET_STD,
    BalancedBatchSampler,
    cutmix,
    cutmix_anomalous_half,
    equalise_contrast,
    preprocess,
    random_rotation,
)
from wsi_anomaly.models.registry import get_family

# ---------------------------------------------------------------------------------------------
# φ: ResNet-50 weights
# ---------------------------------------------------------------------------------------------


def test_random_backbone_warns_and_maps_to_layer4(caplog):
    with caplog.at_level(logging.WARNING):
        trunk = load_resnet50("random")
    assert "RANDOM" in caplog.text
    assert trunk.backbone_identity == "resnet50-random"
    assert all(p.requires_grad for p in trunk.parameters())  # fine-tuned, unlike HaloAE's VGG
    with torch.no_grad():
        assert trunk.eval()(torch.randn(1, 3, 64, 96)).shape == (1, 2048, 2, 3)


def test_checkpoint_backbone_does_not_warn(caplog):
    """A model restored from a checkpoint resolves no weights: no warning, the recorded identity."""
    from wsi_anomaly.config import load_config

    config = load_config("atacnet_fast", {"model": {"backbone_weights": "random"}})
    family = get_family("atacnet")
    with caplog.at_level(logging.WARNING):
        state = ATACNet(backbone=ResNet50Trunk()).state_dict()
        caplog.clear()
        model = family.restore(config, state, "resnet50-imagenet1k-v1")
    assert caplog.text == ""
    assert model.backbone_identity == "resnet50-imagenet1k-v1"


def test_local_state_dict_matches_torchvision(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.resnet50(weights=None).eval()
    path = tmp_path / "resnet50.pth"
    torch.save(reference.state_dict(), path)  # full state dict, fc included
    trunk = load_resnet50(str(path)).eval()
    assert trunk.backbone_identity.startswith("resnet50-file:")
    assert len(trunk.backbone_identity.split(":")[1]) == 12
    x = torch.randn(1, 3, 64, 64)
    expected = torch.nn.Sequential(*list(reference.children())[:-2])(x)
    with torch.no_grad():
        torch.testing.assert_close(trunk(x), expected)


def test_bad_weight_files_raise_clear_errors(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="--backbone-weights"):
        load_resnet50(str(tmp_path / "missing.pth"))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsUnavailableError, match="cannot read"):
        load_resnet50(str(garbage))
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv1.weight": torch.zeros(32, 3, 7, 7)}, wrong)
    with pytest.raises(WeightsUnavailableError, match="expected shape"):
        load_resnet50(str(wrong))


def test_imagenet_download_failure_says_how_to_provide_weights(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    with pytest.raises(WeightsUnavailableError) as info:
        load_resnet50("imagenet")
    message = str(info.value)
    assert "IMAGENET1K_V1" in message and "--backbone-weights random" in message
    assert "\n" not in message


# ---------------------------------------------------------------------------------------------
# σ: self-attention block
# ---------------------------------------------------------------------------------------------


def _small_block() -> SelfAttentionBlock:
    torch.manual_seed(0)
    return SelfAttentionBlock(channels=32, kernel_size=7, width=16, share_channels=8)


@pytest.mark.parametrize("size", [7, 2, 10])
def test_attention_block_keeps_shape_and_starts_as_identity(size):
    block = _small_block().eval()
    x = torch.rand(2, 32, size, size)  # non-negative, like layer4's output
    with torch.no_grad():
        out = block(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, x)  # zero-initialised last BN: identity at start


def test_attention_is_local_to_the_neighbourhood_and_normalised():
    block = _small_block().eval()
    with torch.no_grad():
        block.expand[-1].weight.fill_(1.0)  # leave the identity start
        x = torch.rand(1, 32, 10, 10)
        y = block(x)
        moved = x.clone()
        moved[..., 9, 9] += 5.0  # 6 cells away from (2, 2): outside its 7×7 neighbourhood
        y_moved = block(moved)
        assert not torch.allclose(y, x)
        torch.testing.assert_close(y_moved[..., 2, 2], y[..., 2, 2])
        assert not torch.allclose(y_moved[..., 8, 8], y[..., 8, 8])
        # With identical values everywhere, the softmax-weighted sum of β returns β itself:
        # the weights sum to one over the neighbours inside the map (border ones included).
        reduced = torch.rand(1, 16, 1, 1).expand(1, 16, 5, 5).contiguous()
        attended = block.attend(reduced)
        torch.testing.assert_close(attended, block.value(reduced))


# ---------------------------------------------------------------------------------------------
# τ: top-k score
# ---------------------------------------------------------------------------------------------


def test_topk_score_on_hand_made_cell_maps():
    assert topk_count(49) == 4 and topk_count(4) == 1 and topk_count(100) == 10
    cells = torch.full((1, 7, 7), 0.5)
    cells[0, 0, 0], cells[0, 3, 4], cells[0, 6, 6], cells[0, 2, 1] = -9.0, 8.0, 7.0, 6.0
    cells[0, 5, 5] = -1.0
    torch.testing.assert_close(topk_score(cells), torch.tensor([7.5]))  # (9 + 8 + 7 + 6) / 4
    small = torch.tensor([[[1.0, -3.0], [2.0, 0.0]]])
    torch.testing.assert_close(topk_score(small), torch.tensor([3.0]))  # k = max(⌊0.4⌋, 1) = 1
    torch.testing.assert_close(topk_score(cells, ratio=1.0), cells.abs().mean(dim=(1, 2)))


# ---------------------------------------------------------------------------------------------
# Algorithm 1: attention-guided cropping
# ---------------------------------------------------------------------------------------------


def _blob(row: int, col: int, value: float = 1.0) -> torch.Tensor:
    m = torch.zeros(7, 7)
    m[row, col] = value
    return m


def test_hot_blob_box_covers_its_cell_plus_padding():
    # Bilinear up-sampling ×32 of a single hot cell is ≥ ½ of its peak exactly on that cell.
    boxes = attention_crop_boxes(_blob(2, 3, 4.0)[None], 224, threshold=0.5, min_box=32, pad=8)
    assert boxes.dtype == torch.int64
    assert boxes.tolist() == [[96 - 8, 64 - 8, 128 + 8, 96 + 8]]
    no_pad = attention_crop_boxes(_blob(2, 3)[None], 224, threshold=0.5, min_box=32, pad=0)
    assert no_pad.tolist() == [[96, 64, 128, 96]]


def test_box_is_clamped_at_the_border_and_grown_to_the_minimum_side():
    corner = attention_crop_boxes(_blob(0, 0)[None], 224, threshold=0.5, min_box=32, pad=8)
    assert corner.tolist() == [[0, 0, 40, 40]]
    grown = attention_crop_boxes(_blob(2, 3)[None], 224, threshold=0.5, min_box=64, pad=0)
    assert grown.tolist() == [[80, 48, 144, 112]]  # centred on the 32-px cell
    grown_corner = attention_crop_boxes(_blob(6, 0)[None], 224, threshold=0.5, min_box=64, pad=0)
    assert grown_corner.tolist() == [[0, 160, 64, 224]]  # shifted inside the image


def test_two_blobs_give_their_joint_box_and_non_square_images_work():
    maps = _blob(1, 1) + _blob(4, 5)
    assert attention_crop_boxes(maps[None], 224, 0.5, 32, 0).tolist() == [[32, 32, 192, 160]]
    # Cells of 32×16 px. Bilinear weights multiply, so the ≥ ½ region of a single cell is a
    # little narrower than the cell where the other axis is off-centre.
    ((x0, y0, x1, y1),) = attention_crop_boxes(_blob(2, 3)[None], (112, 224), 0.5, 1, 0).tolist()
    assert (y0, y1) == (32, 48)
    assert 96 <= x0 <= 97 and 127 <= x1 <= 128


def test_degenerate_maps_fall_back_to_the_whole_image():
    whole = [0, 0, 224, 224]
    flat = torch.full((7, 7), 3.0)
    zeros = torch.zeros(7, 7)
    negative = -torch.rand(7, 7)
    high = 0.6 + 0.4 * torch.rand(7, 7)  # every pixel ≥ ½ of the max: everything kept
    nan = _blob(2, 2)
    nan[0, 0] = float("nan")
    maps = torch.stack([flat, zeros, negative, high, nan, _blob(2, 3)])
    boxes = attention_crop_boxes(maps, 224, threshold=0.5, min_box=32, pad=8)
    assert boxes[:5].tolist() == [whole] * 5
    assert boxes[5].tolist() == [88, 56, 136, 104]
    # Nothing kept (ω above the max).
    assert attention_crop_boxes(_blob(2, 3)[None], 224, 1.5, 32, 8).tolist() == [whole]
    # Maps given as B×1×h×w are accepted.
    assert attention_crop_boxes(maps[:, None], 224, 0.5, 32, 8).tolist() == boxes.tolist()


def test_crop_and_resize():
    x = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).view(2, 3, 16, 16)
    boxes = torch.tensor([[0, 0, 16, 16], [4, 2, 12, 10]])
    out = crop_and_resize(x, boxes, size=16)
    assert out.shape == (2, 3, 16, 16)
    torch.testing.assert_close(out[0], x[0])  # the whole image at its own size: unchanged
    expected = F.interpolate(
        x[1:, :, 2:10, 4:12], size=(16, 16), mode="bilinear", align_corners=False
    )
    torch.testing.assert_close(out[1:], expected)
    assert crop_and_resize(x, boxes, size=(8, 4)).shape == (2, 3, 8, 4)


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------


def test_deviation_loss_hand_computed():
    scores = torch.tensor([0.0, 1.0, 6.0, 2.0])
    labels = torch.tensor([0, 0, 1, 1])
    # normals: |0| = 0, |1| = 1; anomalies: max(0, 5 − 6) = 0, max(0, 5 − 2) = 3 → mean 4/4.
    torch.testing.assert_close(deviation_loss(scores, labels), torch.tensor(1.0))
    # margin 2: anomalies give 0 and 0 → (0 + 1 + 0 + 0) / 4.
    torch.testing.assert_close(deviation_loss(scores, labels, margin=2.0), torch.tensor(0.25))
    # Negative scores of normals count by their magnitude.
    torch.testing.assert_close(
        deviation_loss(torch.tensor([-3.0]), torch.tensor([0])), torch.tensor(3.0)
    )


def test_weighted_ce_hand_computed():
    logits = torch.tensor([0.0, 2.0, -1.0])
    labels = torch.tensor([0.0, 1.0, 1.0])
    l0 = math.log(2.0)  # −log(1 − σ(0))
    l1 = math.log(1.0 + math.exp(-2.0))  # −log σ(2)
    l2 = math.log(1.0 + math.exp(1.0))  # −log σ(−1)
    expected = (0.5 * l0 + 20.0 * l1 + 20.0 * l2) / (0.5 + 20.0 + 20.0)
    torch.testing.assert_close(weighted_ce_loss(logits, labels), torch.tensor(expected))
    # Same as torch's two-class CrossEntropyLoss(weight=[0.5, 20]) on logits (0, z).
    two_class = torch.stack([torch.zeros(3), logits], dim=1)
    ce = torch.nn.CrossEntropyLoss(weight=torch.tensor([0.5, 20.0]))(two_class, labels.long())
    torch.testing.assert_close(weighted_ce_loss(logits, labels), ce)


def test_loss_dispatch():
    outputs = {"score": torch.tensor([0.3, 4.0])}
    labels = torch.tensor([0.0, 1.0])
    torch.testing.assert_close(
        atacnet_loss("cutmix_bce", outputs, labels),
        F.binary_cross_entropy_with_logits(outputs["score"], labels),
    )
    torch.testing.assert_close(
        atacnet_loss("weighted_ce", outputs, labels), weighted_ce_loss(outputs["score"], labels)
    )
    for variant in ("devnet", "atacnet"):
        torch.testing.assert_close(atacnet_loss(variant, outputs, labels), torch.tensor(0.65))
    with pytest.raises(ValueError, match="unknown ATAC-Net variant"):
        atacnet_loss("svm", outputs, labels)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["cutmix_bce", "weighted_ce", "devnet", "atacnet"])
def test_every_variant_scores_and_maps_at_224(variant):
    torch.manual_seed(0)
    model = ATACNet(variant, backbone=load_resnet50("random")).eval()
    assert isinstance(model, ATACNet) and model.backbone_identity == "resnet50-random"
    assert (model.attention is not None) == (variant == "atacnet")
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        out = model(x)
        details = model.score_details(x)
        heat = model.anomaly_map(x)
    assert out["cells"].shape == (2, 7, 7) and out["attention"].shape == (2, 7, 7)
    assert out["score"].shape == (2,) and details["score"].shape == (2,)
    assert heat.shape == (2, 224, 224)
    torch.testing.assert_close(details["a1"], out["score"])
    if variant in ("cutmix_bce", "weighted_ce"):
        torch.testing.assert_close(out["score"], out["cells"].mean(dim=(1, 2)))  # the logit
        torch.testing.assert_close(heat.mean(dim=(1, 2)), out["score"], atol=0.05, rtol=0.05)
    else:
        torch.testing.assert_close(out["score"], topk_score(out["cells"]))
        assert (heat >= 0).all()
    if variant == "atacnet":
        assert details["boxes"].shape == (2, 4)
    else:
        assert "boxes" not in details
        torch.testing.assert_close(details["score"], details["a1"])  # devnet etc.: a = a1


def test_atacnet_score_is_mean_of_full_and_cropped_views():
    torch.manual_seed(0)
    # ω = 0.95 keeps the peak of a random-weight attention map only: a real crop.
    model = ATACNet("atacnet", backbone=load_resnet50("random"), crop_threshold=0.95).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        details = model.score_details(x)
        boxes = details["boxes"]
        assert (boxes != torch.tensor([0, 0, 224, 224])).any(dim=1).all()
        a1 = model(x)["score"]
        a2 = model(crop_and_resize(x, boxes, 224))["score"]
        torch.testing.assert_close(details["a2"], a2, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model.score(x), (a1 + a2) / 2, rtol=1e-4, atol=1e-5)
    # A threshold nothing reaches: whole-image boxes, so a2 = a1 and the score is a1.
    model.crop_threshold = 2.0
    with torch.no_grad():
        details = model.score_details(x)
    assert details["boxes"].tolist() == [[0, 0, 224, 224]] * 2
    torch.testing.assert_close(details["score"], details["a1"])


def test_unknown_variant_and_registry():
    with pytest.raises(ValueError, match="unknown ATAC-Net variant"):
        ATACNet("svm")
    with pytest.raises(ValueError, match="unknown model"):
        get_family("atac")


def test_train_step_updates_every_block_and_checks_the_variant():
    torch.manual_seed(0)
    model = ATACNet("atacnet", backbone=load_resnet50("random"))
    settings = AtacNetConfig()
    optimiser = make_optimiser(model, settings)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0.0, 0.0, 1.0, 1.0])
    result = train_step(model, optimiser, x, y)
    assert set(result) == {"loss", "grad_norm", "score_normal", "score_anomalous"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in result.values())
    assert model.training
    for name in ("backbone.conv1.weight", "attention.query.weight", "head.weight"):
        assert not torch.equal(before[name], dict(model.named_parameters())[name]), name
    with pytest.raises(ValueError, match="does not match"):
        train_step(model, optimiser, x, y, variant="devnet")


def test_training_settings_and_step_decay():
    settings = AtacNetConfig()
    assert (settings.lr, settings.weight_decay, settings.batch_size) == (2e-4, 1e-5, 48)
    assert (settings.epochs, settings.steps_per_epoch, settings.grad_clip_norm) == (50, 20, 1.0)
    assert settings.crop_threshold == 0.5
    optimiser = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=settings.lr)
    scheduler = make_scheduler(optimiser, settings)
    lrs = []
    for _ in range(21):
        lrs.append(optimiser.param_groups[0]["lr"])
        optimiser.step()
        scheduler.step()
    assert lrs[9] == pytest.approx(2e-4) and lrs[10] == pytest.approx(2e-5)
    assert lrs[20] == pytest.approx(2e-6)


def _textures(n: int, generator: torch.Generator, size: int) -> torch.Tensor:
    """Smooth random colour textures, roughly standardised."""
    noise = torch.randn(n, 3, size // 8, size // 8, generator=generator)
    return F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False) * 0.5


def _with_square(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    x = x.clone()
    side = x.shape[-1] // 5
    for image in x:
        top, left = torch.randint(0, x.shape[-1] - side, (2,), generator=generator).tolist()
        image[:, top : top + side, left : left + side] = 2.5
    return x


def test_tiny_training_run_separates_synthetic_anomalies():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = ATACNet("atacnet", backbone=load_resnet50("random"))
    optimiser = torch.optim.Adam(model.trainable_parameters(), lr=1e-3, weight_decay=1e-5)
    labels = torch.tensor([0.0] * 3 + [1.0] * 3)
    # 30 small steps rather than fewer large ones: batch-norm running statistics (used in eval
    # mode) must have caught up with the fast-moving random-init weights.
    for _ in range(30):
        normals = _textures(3, generator, 64)
        anomalies = _with_square(_textures(3, generator, 64), generator)
        train_step(model, optimiser, torch.cat([normals, anomalies]), labels)
    model.eval()
    held_out = torch.Generator().manual_seed(1)
    normals = _textures(12, held_out, 64)
    anomalies = _with_square(_textures(12, held_out, 64), held_out)
    with torch.no_grad():
        s_normal, s_anomalous = model.score(normals), model.score(anomalies)
    auroc = (s_anomalous[:, None] > s_normal[None, :]).float().mean().item()
    assert auroc >= 0.9, (auroc, s_normal, s_anomalous)


# ---------------------------------------------------------------------------------------------
# Data: preprocessing, CutMix, balanced batches, rotation
# ---------------------------------------------------------------------------------------------


def test_preprocess_shape_and_standardisation_of_a_flat_image():
    rgb = np.zeros((300, 250, 3), np.uint8)
    rgb[...] = (120, 80, 200)
    x = preprocess(rgb)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    # A flat image has no contrast to equalise: CLAHE leaves it as it is.
    np.testing.assert_array_equal(equalise_contrast(rgb), rgb)
    expected = (torch.tensor([120, 80, 200]) / 255.0 - torch.tensor(ATACNET_MEAN)) / torch.tensor(
        ATACNET_STD
    )
    torch.testing.assert_close(x.mean(dim=(1, 2)), expected)
    torch.testing.assert_close(x.std(dim=(1, 2)), torch.zeros(3), atol=1e-6, rtol=0)


def test_clahe_raises_local_contrast_and_accepts_every_input_form():
    rng = np.random.default_rng(0)
    grey = (110 + 20 * rng.random((96, 96))).astype(np.uint8)  # low-contrast texture
    rgb = np.stack([grey, grey, grey], axis=-1)
    out = equalise_contrast(rgb)
    assert out.shape == rgb.shape and out.dtype == np.uint8
    assert out.astype(float).std() > 2 * rgb.astype(float).std()
    x = preprocess(rgb, size=64)
    assert x.shape == (3, 64, 64)
    torch.testing.assert_close(preprocess(Image.fromarray(rgb), size=64), x)
    torch.testing.assert_close(
        preprocess(torch.from_numpy(rgb).permute(2, 0, 1) / 255.0, size=64), x
    )
    torch.testing.assert_close(preprocess(grey, size=64), x)
    plain = preprocess(rgb, size=96, clahe=False)
    standardised = (torch.from_numpy(grey).float() / 255.0 - ATACNET_MEAN[0]) / ATACNET_STD[0]
    torch.testing.assert_close(plain[0], standardised)
    with pytest.raises(ValueError):
        preprocess(np.zeros((8, 8, 5), np.uint8))


def test_cutmix_pastes_one_box_of_the_second_image():
    a, b = torch.zeros(3, 40, 40), torch.ones(3, 40, 40)
    mixed = cutmix(a, b, torch.Generator().manual_seed(3), area_ratio=(0.1, 0.2))
    pasted = mixed[0] == 1
    rows, cols = pasted.any(dim=1).nonzero().flatten(), pasted.any(dim=0).nonzero().flatten()
    box = pasted[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    assert box.all()  # one solid rectangle
    assert 0.1 * 1600 - 40 <= int(pasted.sum()) <= 0.2 * 1600 + 40
    assert torch.equal(mixed[1], mixed[0]) and torch.equal(a, torch.zeros(3, 40, 40))
    again = cutmix(a, b, torch.Generator().manual_seed(3), area_ratio=(0.1, 0.2))
    assert torch.equal(again, mixed)
    with pytest.raises(ValueError):
        cutmix(a, torch.ones(3, 20, 20), torch.Generator())


def test_balanced_batches_are_half_normal_and_deterministic():
    labels = [0] * 20 + [1] * 3
    sampler = BalancedBatchSampler(labels, 8, steps=5, generator=torch.Generator().manual_seed(0))
    batches = list(sampler)
    assert len(batches) == len(sampler) == 5
    real_seen = 0
    for batch in batches:
        assert len(batch) == 8
        assert all(labels[i] == 0 for i in batch[:4])
        normals = [i for i in batch if labels[i] == 0]
        assert len(set(normals)) == len(normals)  # never a CutMix of an image with itself
        real_seen += sum(labels[i] for i in batch[4:])
    assert 0 < real_seen < 20
    again = list(BalancedBatchSampler(labels, 8, 5, torch.Generator().manual_seed(0)))
    assert again == batches
    only_normals = list(BalancedBatchSampler([0] * 10, 6, 2, torch.Generator().manual_seed(0)))
    assert all(len(set(batch)) == 6 for batch in only_normals)
    with pytest.raises(ValueError):
        BalancedBatchSampler([1, 1], 4, 1, torch.Generator())


def test_cutmix_anomalous_half_makes_targets_and_pseudo_anomalies():
    images = torch.stack([torch.full((3, 16, 16), float(i)) for i in range(6)])
    dataset_labels = torch.tensor([0, 0, 0, 1, 0, 1])
    out, targets = cutmix_anomalous_half(images, dataset_labels, torch.Generator().manual_seed(0))
    assert targets.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.equal(out[:4], images[:4]) and torch.equal(out[5], images[5])
    assert not torch.equal(out[4], images[4])  # normal in the anomalous half: CutMix
    assert set(out[4].unique().tolist()) <= {0.0, 1.0, 2.0, 4.0}
    with pytest.raises(ValueError, match="first half"):
        cutmix_anomalous_half(images, torch.tensor([1, 0, 0, 0, 0, 0]), torch.Generator())


def test_random_rotation_fills_corners_with_standardised_black():
    x = torch.ones(2, 3, 32, 32)
    assert random_rotation(x, torch.Generator(), max_degrees=0) is x
    rotated = random_rotation(x, torch.Generator().manual_seed(0), max_degrees=180)
    assert rotated.shape == x.shape
    black = torch.tensor([-m / s for m, s in zip(ATACNET_MEAN, ATACNET_STD)])
    centre = rotated[..., 16, 16]
    torch.testing.assert_close(centre, torch.ones(2, 3))
    changed = ~torch.isclose(rotated, x).all(dim=1)  # B×H×W pixels that left the image
    assert changed.any(dim=(1, 2)).all()
    corners = rotated[..., 0, 0]
    assert any(torch.allclose(c, black, atol=1e-4) for c in corners)
