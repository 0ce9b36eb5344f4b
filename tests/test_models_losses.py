import pytest
import torch
import torch.nn.functional as F

from wsi_anomaly.models.family import Epoch
from wsi_anomaly.models.losses import equal_weights, ews_weights, haloae_loss, loss_weights, ssim


@pytest.mark.parametrize(
    ("epoch", "expected"),
    [(0, (0.971, 0.028, 0.001)), (100, (0.274, 0.625, 0.102)), (250, (0.112, 0.335, 0.554))],
)
def test_ews_matches_spec_table(epoch, expected):
    weights = ews_weights(epoch)
    assert weights == pytest.approx(expected, abs=1e-3)
    assert sum(weights) == pytest.approx(1.0)


def test_short_schedule_follows_the_same_curriculum():
    assert ews_weights(0, total_epochs=11) == pytest.approx(ews_weights(0))
    assert ews_weights(5, total_epochs=11) == pytest.approx(ews_weights(125))
    assert ews_weights(10, total_epochs=11) == pytest.approx(ews_weights(250))
    with pytest.raises(ValueError):
        ews_weights(11, total_epochs=11)


def test_equal_weights_and_dispatch():
    assert equal_weights() == pytest.approx((1 / 3,) * 3)
    assert loss_weights("ews", 3, 10) == ews_weights(3, 10)
    assert loss_weights("equal", 3, 10) == equal_weights()
    with pytest.raises(ValueError, match="ews"):
        loss_weights("kendall", 0, 10)


def _ssim_2d_reference(a, b, window=11, sigma=1.5):
    x = torch.arange(window, dtype=torch.float64) - window // 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = (g / g.sum()).to(a.dtype)
    kernel = torch.outer(g, g).expand(a.shape[1], 1, window, window)

    def blur(t):
        return F.conv2d(t, kernel, padding=window // 2, groups=a.shape[1])

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    return (num / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))).mean()


def test_ssim_properties():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32)
    noisy = x + 0.2 * torch.randn_like(x)
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-5)
    assert ssim(x, noisy).item() < 0.9
    assert ssim(x, noisy).item() == pytest.approx(ssim(noisy, x).item(), abs=1e-6)
    # The separable blur equals the direct 11×11 Gaussian window.
    assert ssim(x, noisy).item() == pytest.approx(_ssim_2d_reference(x, noisy).item(), abs=1e-5)


def _fake_output(n_orig=2, n_total=6):
    torch.manual_seed(0)
    fm = torch.randn(n_total, 4, 8, 8)
    images = torch.randn(n_total, 3, 16, 16)
    out = {
        "fm": fm,
        "fm_hat": fm.clone().requires_grad_(),
        "im_hat": images.clone().requires_grad_(),
        "logits": torch.randn(n_total, 2, requires_grad=True),
    }
    labels = torch.tensor([0] * n_orig + [1] * (n_total - n_orig))
    return out, images, labels


def test_loss_terms_and_weights():
    out, images, labels = _fake_output()
    total, parts = haloae_loss(out, images, labels, (0.5, 0.3, 0.2))
    assert set(parts) == {"cls", "fm", "im"}
    # Perfect reconstructions: MSE 0 and SSIM 1.
    assert parts["fm"].item() == pytest.approx(0.0, abs=1e-5)
    assert parts["im"].item() == pytest.approx(0.0, abs=1e-5)
    ce = F.cross_entropy(out["logits"], labels)
    assert total.item() == pytest.approx(0.5 * ce.item(), abs=1e-5)

    cls_only, _ = haloae_loss(out, images, labels, (0.5, 0.3, 0.2), terms=("cls",))
    assert cls_only.item() == pytest.approx(0.5 * ce.item(), abs=1e-6)
    with pytest.raises(ValueError):
        haloae_loss(out, images, labels, (0.5, 0.3, 0.2), terms=("cls", "perceptual"))


def test_reconstruction_uses_originals_only_and_backpropagates():
    out, images, labels = _fake_output()
    with torch.no_grad():
        out["fm_hat"][2:] += 10.0  # Cut&Paste copies: must not count
        out["im_hat"][2:] -= 10.0
    _, parts = haloae_loss(out, images, labels, (1.0, 1.0, 1.0))
    assert parts["fm"].item() == pytest.approx(0.0, abs=1e-5)
    assert parts["im"].item() == pytest.approx(0.0, abs=1e-5)

    with torch.no_grad():
        out["fm_hat"][:2] += 0.5
    total, parts = haloae_loss(out, images, labels, (0.2, 0.5, 0.3), terms=("fm",))
    assert parts["fm"].item() > 0.2
    total.backward()
    assert out["fm_hat"].grad[:2].abs().sum() > 0 and out["fm_hat"].grad[2:].abs().sum() == 0
    assert out["logits"].grad is None  # a switched-off term takes no part in the gradient


def test_loss_term_subsets_renormalise_the_weights_over_the_active_terms():
    full = ews_weights(40, 100)
    cls_fm = loss_weights("ews", 40, 100, ("cls", "fm"))
    assert cls_fm[2] == 0.0 and sum(cls_fm) == pytest.approx(1.0)
    assert cls_fm[0] / cls_fm[1] == pytest.approx(full[0] / full[1])  # same curriculum
    assert loss_weights("ews", 40, 100, ("im",)) == pytest.approx((0.0, 0.0, 1.0))
    assert loss_weights("ews", 40, 100, ("fm", "cls", "im")) == full
    assert loss_weights("equal", 7, 10, ("fm", "im")) == pytest.approx((0.0, 0.5, 0.5))
    assert loss_weights("equal", 7, 10, ("cls",)) == pytest.approx((1.0, 0.0, 0.0))
    assert loss_weights("equal", 7, 10) == pytest.approx((1 / 3,) * 3)
    with pytest.raises(ValueError, match="subset"):
        loss_weights("ews", 0, 10, ("cls", "texture"))
    with pytest.raises(ValueError, match="subset"):
        loss_weights("equal", 0, 10, ())


def test_training_step_uses_the_renormalised_weights(monkeypatch):
    """The HaloAE family's step weighs a loss ablation by weights summing to 1."""
    from wsi_anomaly.config import load_config
    from wsi_anomaly.models import haloae_family

    seen = []

    def spy(out, images_norm, labels, weights, terms):
        seen.append((tuple(weights), tuple(terms)))
        return torch.zeros((), requires_grad=True), {
            k: torch.zeros(()) for k in "cls fm im".split()
        }

    monkeypatch.setattr(haloae_family, "haloae_loss", spy)
    config = load_config(
        "haloae_fast",
        {
            "model": {"backbone_weights": "random"},
            "haloae": {"loss_terms": ["fm", "im"], "epochs": 4},
        },
    )
    family = haloae_family.HaloAEFamily()

    class Runtime:
        device = torch.device("cpu")

        @staticmethod
        def layout(x):
            return x

        @staticmethod
        def autocast():
            import contextlib

            return contextlib.nullcontext()

    class Model(torch.nn.Module):
        def forward(self, x):
            return {}

    ep = Epoch(
        Model(),
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1),
        config,
        1,
        torch.Generator().manual_seed(0),
        Runtime(),
    )
    family.train_step(ep, torch.rand(1, 3, 256, 256))
    ((weights, terms),) = seen
    assert terms == ("fm", "im") and weights[0] == 0.0 and sum(weights) == pytest.approx(1.0)
    record = family.epoch_record(ep, {"loss": 1.0}, 1)
    assert record["w_cls"] == 0.0 and record["w_fm"] + record["w_im"] == pytest.approx(1.0)


def test_ssim_stays_float32_under_bf16_autocast():
    # Close images: their variances are differences of nearly equal moments, which a bf16 blur
    # rounds to zero or below; computed in fp32 the value is the same inside autocast or not.
    g = torch.Generator().manual_seed(0)
    a = 0.5 + 0.01 * torch.rand(2, 3, 32, 32, generator=g)
    b = a + 1e-3 * torch.randn(2, 3, 32, 32, generator=g)
    reference = ssim(a, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = ssim(a.bfloat16(), b)
    assert inside.dtype == torch.float32
    assert torch.isfinite(inside)
    assert float(inside) == pytest.approx(float(ssim(a.bfloat16().float(), b)), abs=1e-6)
    assert 0.0 < float(reference) <= 1.0
