import pytest
import torch

from wsi_anomaly.models.features import load_vgg19
from wsi_anomaly.models.halo import HaloAttention
from wsi_anomaly.models.haloae import HaloAE
from wsi_anomaly.models.scoring import score_batch

# Blocks C + D + E without the released code's dead stride-2 convs; the spec says "about
# 11.9 M". Pinned so that an accidental architecture change is caught.
TRAINABLE_PARAMETERS = 11_857_337
BACKBONE_PARAMETERS = 2_325_568  # VGG19 conv1_1 … conv3_4


@pytest.fixture(scope="module")
def model() -> HaloAE:
    torch.manual_seed(0)
    return HaloAE(load_vgg19("random")).eval()


def test_parameter_counts(model):
    trainable = list(model.trainable_parameters())
    assert sum(p.numel() for p in trainable) == TRAINABLE_PARAMETERS
    assert sum(p.numel() for p in model.backbone.parameters()) == BACKBONE_PARAMETERS
    # The optimiser's list is exactly the parameters that require grad.
    assert {id(p) for p in trainable} == {id(p) for p in model.parameters() if p.requires_grad}
    assert model.backbone_identity == "vgg19-random"


def test_encoder_decoder_shapes(model):
    with torch.no_grad():
        fm = torch.randn(1, 704, 64, 64)
        z = model.encoder(fm)
        assert z.shape == (1, 29, 60, 60)
        assert model.decoder(z).shape == (1, 704, 64, 64)


def test_full_forward_runs_all_blocks_but_scoring_only_b_and_c(model):
    calls = []
    hooks = [
        model.backbone.register_forward_hook(lambda *a: calls.append("B")),
        model.decoder.register_forward_hook(lambda *a: calls.append("C")),
        model.image_reconstructor.register_forward_hook(lambda *a: calls.append("D")),
        model.classifier.register_forward_hook(lambda *a: calls.append("E")),
    ]
    try:
        # 64×64 inputs give a 16×16 fm, the smallest size the 12-pixel blocks allow.
        result = score_batch(model, torch.randn(2, 3, 64, 64), mean_map=torch.zeros(16, 16))
        assert calls == ["B", "C"]
        calls.clear()
        with torch.no_grad():
            out = model(torch.randn(1, 3, 256, 256))
        assert calls == ["B", "C", "D", "E"]
    finally:
        for hook in hooks:
            hook.remove()
    assert result["map"].shape == (2, 16, 16) and result["mean"].shape == (2,)
    assert out["fm"].shape == out["fm_hat"].shape == (1, 704, 64, 64)
    assert out["im_hat"].shape == (1, 3, 256, 256)
    assert out["logits"].shape == (1, 2)


def test_train_mode_keeps_backbone_frozen(model):
    model.train()
    try:
        assert not model.backbone.training and model.encoder.training
        fm = model.features(torch.randn(2, 3, 64, 64))
        model.reconstruct_features(fm).square().mean().backward()
    finally:
        model.eval()
    assert model.encoder.head[0].weight.grad is not None
    assert model.decoder.stages[-1].attention.rel_height.grad is not None
    assert all(p.grad is None for p in model.backbone.parameters())
    model.zero_grad(set_to_none=True)


def test_attention_options():
    released = HaloAE(load_vgg19("random"), released_mask=True)
    layers = [m for m in released.modules() if isinstance(m, HaloAttention)]
    assert len(layers) == 9 and all(m.released_mask for m in layers)

    conv = HaloAE(load_vgg19("random"), attention="conv").eval()
    assert not any(isinstance(m, HaloAttention) for m in conv.modules())
    with torch.no_grad():
        fm = torch.randn(1, 704, 16, 16)
        assert conv.reconstruct_features(fm).shape == fm.shape
    with pytest.raises(ValueError, match="attention"):
        HaloAE(load_vgg19("random"), attention="swin")


def test_blocks_c_d_e_can_start_from_the_released_codes_kaiming_initialisation():
    torch.manual_seed(0)
    backbone = load_vgg19("random")
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    default = HaloAE(load_vgg19("random"))
    default_fan_in = default.encoder.head[0].weight[0].numel()
    # PyTorch's default (kaiming_uniform with a=√5): std √(1 / (3·fan_in)).
    assert float(default.encoder.head[0].weight.std()) == pytest.approx(
        (1 / (3 * default_fan_in)) ** 0.5, rel=0.05
    )
    model = HaloAE(backbone, released_init=True)
    layers = [
        m
        for name, m in model.named_modules()
        if not name.startswith("backbone") and isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    ]
    assert len(layers) > 40
    for layer in layers:
        if layer.bias is not None:
            assert not layer.bias.any()
    # Kaiming-normal, fan-in: std √(2 / fan_in). PyTorch's default would give √(1 / (3·fan_in)).
    head = model.encoder.head[0]
    fan_in = head.weight[0].numel()
    assert float(head.weight.std()) == pytest.approx((2 / fan_in) ** 0.5, rel=0.05)
    fc = model.classifier.fc
    assert float(fc.weight.std()) == pytest.approx((2 / fc.in_features) ** 0.5, rel=0.05)
    # The frozen backbone is left alone.
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_recomputed_blocks_give_the_plain_gradients(monkeypatch):
    # Activation checkpointing must not change the maths: a bottleneck (batch norms included,
    # recomputed whole), the encoder's head and block D give the gradients of plain calls, and
    # the batch norms' running statistics are updated once, as by a plain call.
    import copy

    from wsi_anomaly.models import haloae as haloae_module
    from wsi_anomaly.models.haloae import Bottleneck, HaloEncoder, ImageReconstructor

    torch.manual_seed(0)
    calls = []

    def counting_checkpoint(fn, *args, **kwargs):
        calls.append(fn)
        return torch.utils.checkpoint.checkpoint(fn, *args, **kwargs)

    def gradients(block, x, recomputed: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        block = copy.deepcopy(block).train()
        x = x.clone().requires_grad_(x.shape[1] != 704)  # the encoder's input: no gradient
        with monkeypatch.context() as patch:
            if recomputed:
                patch.setattr(haloae_module, "checkpoint", counting_checkpoint)
            else:
                patch.setattr(haloae_module, "recompute", lambda m, t: m(t))
            run = block if isinstance(block, HaloEncoder) else haloae_module.recompute
            out = run(x) if run is block else run(block, x)
            (out**2).mean().backward()
        grads = [p.grad for p in block.parameters()] + ([x.grad] if x.requires_grad else [])
        return grads, [b.clone() for b in block.buffers()]

    encoder = HaloEncoder()
    for block, x in (
        (Bottleneck(29, 29, 59, 4, 3), torch.randn(2, 29, 24, 24)),
        (ImageReconstructor(), torch.randn(1, 704, 8, 8)),
        (encoder, torch.randn(1, 704, 16, 16)),
    ):
        (grads, stats), (plain_grads, plain_stats) = (
            gradients(block, x, True),
            gradients(block, x, False),
        )
        for a, b in zip(grads, plain_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        for a, b in zip(stats, plain_stats, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        if isinstance(block, Bottleneck):  # the statistics did move: the check can fail
            assert not torch.equal(stats[0], next(block.buffers()))
    # every block really went through the checkpoint: the bottleneck, block D, and the
    # encoder's head and four stages
    assert len(calls) == 2 + 1 + len(encoder.stages)


def test_a_few_bf16_steps_lower_the_loss():
    # Training under bf16 autocast on the CPU (the default where the CPU has native bf16),
    # with the recomputed blocks: Adam steps on one Cut&Paste batch lower its loss.
    from wsi_anomaly.models import ews_weights, haloae_loss, make_cutpaste_batch, normalise

    torch.manual_seed(0)
    model = HaloAE(load_vgg19("random")).train()
    optimiser = torch.optim.Adam(model.trainable_parameters(), lr=3e-4)
    g = torch.Generator().manual_seed(0)
    images, labels = make_cutpaste_batch(torch.rand(1, 3, 256, 256, generator=g), g)
    x = normalise(images)
    weights = ews_weights(125)
    losses = []
    for _ in range(4):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = haloae_loss(model(x), x, labels, weights)
        assert torch.isfinite(loss)
        losses.append(float(loss.detach()))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        assert all(p.grad is not None for p in model.encoder.parameters())
        optimiser.step()
    assert losses[-1] < losses[0], losses


def test_training_pass_takes_the_backbone_a_few_images_at_a_time(monkeypatch):
    # Each image's features are its own: the backbone in chunks gives the whole batch's.
    from wsi_anomaly.models import haloae as haloae_module

    torch.manual_seed(0)
    model = HaloAE(load_vgg19("random")).train()
    x = torch.randn(3, 3, 256, 256)
    seen = []
    features = model.features
    monkeypatch.setattr(haloae_module, "BACKBONE_CHUNK", 2)
    monkeypatch.setattr(model, "features", lambda t: seen.append(len(t)) or features(t))
    fm = model(x)["fm"]
    assert seen == [2, 1]
    with torch.no_grad():
        torch.testing.assert_close(fm, features(x), rtol=1e-4, atol=1e-5)
