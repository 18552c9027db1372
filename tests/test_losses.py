import pytest
import torch
import torchvision

from infgen.losses import InfGenLoss, LossConfig, PatchDiscriminator
from infgen.metrics import LPIPSUnavailable, load_lpips


def make_loss(**overrides):
    return InfGenLoss(LossConfig(**{"lpips_random_backbone": True, "disc_channels": 16, "disc_start": 5, **overrides}))


@pytest.mark.filterwarnings("ignore:LPIPS with a RANDOM")
def test_warm_up_then_adversarial():
    loss = make_loss()
    images = torch.rand(2, 3, 64, 64, requires_grad=True) * 2 - 1
    targets = torch.rand(2, 3, 64, 64) * 2 - 1
    total, log = loss.generator_loss(images, targets, step=0)
    assert set(log) == {"l1", "l2", "perceptual_random_backbone", "rec_loss", "loss"}  # random: never "lpips"
    assert total.item() == pytest.approx(log["l1"] + 0.1 * log["perceptual_random_backbone"], rel=1e-5)
    d_loss, d_log = loss.discriminator_loss(images, targets, step=0)
    assert not d_loss.requires_grad and d_log == {"d_loss": 0.0}

    total, log = loss.generator_loss(images, targets, step=5)
    assert total.item() == pytest.approx(log["rec_loss"] + 0.1 * log["g_adv"], rel=1e-5)
    total.backward()
    # the generator's loss trains the generator, never the discriminator
    assert all(p.grad is None for p in loss.discriminator.parameters())
    d_loss, d_log = loss.discriminator_loss(images, targets, step=5)
    d_loss.backward()
    assert all(p.grad is not None for p in loss.discriminator.parameters())
    assert {"logits_real", "logits_fake"} <= set(d_log)


def test_l2_term_is_the_mean_squared_error():
    loss = InfGenLoss(LossConfig(l1_weight=0.5, l2_weight=2.0, lpips_weight=0.0, adv_weight=0.0))
    images, targets = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    total, log = loss.generator_loss(images, targets, step=0)
    mse = torch.nn.functional.mse_loss(images, targets).item()
    assert log["l2"] == pytest.approx(mse, rel=1e-6)
    assert total.item() == pytest.approx(0.5 * log["l1"] + 2.0 * mse, rel=1e-6)


@pytest.mark.filterwarnings("ignore:LPIPS with a RANDOM")
@pytest.mark.parametrize("kind", ["hinge", "non_saturating"])
def test_discriminator_losses(kind):
    loss = make_loss(disc_loss=kind, disc_start=0)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    d_loss, _ = loss.discriminator_loss(x, x, step=0)
    expected = 1.0 if kind == "hinge" else torch.log(torch.tensor(2.0)).item()  # logits ≈ 0 at init
    assert d_loss.item() == pytest.approx(expected, abs=0.1)


@pytest.mark.filterwarnings("ignore:LPIPS with a RANDOM")
def test_adaptive_weight():
    loss = make_loss(adaptive_weight=True, disc_start=0)
    last = torch.nn.Conv2d(4, 3, 3, padding=1)
    images = last(torch.randn(1, 4, 64, 64))
    total, log = loss.generator_loss(images, torch.zeros_like(images), step=0, last_layer=last.weight)
    assert 0 < log["adv_weight"] < 0.1 * 1e4 and torch.isfinite(total)
    with pytest.raises(ValueError, match="last layer"):
        loss.generator_loss(images, torch.zeros_like(images), step=0)


def test_random_backbone_is_loud():
    with pytest.warns(UserWarning, match="RANDOM alex backbone"):
        load_lpips("alex", random_backbone=True)


def test_lpips_backbone_from_a_local_torchvision_state_dict(tmp_path):
    alexnet = torchvision.models.alexnet()
    torch.save(alexnet.state_dict(), tmp_path / "alexnet.pth")
    model = load_lpips("alex", tmp_path / "alexnet.pth")
    assert torch.equal(model.net.slice1[0].weight, alexnet.features[0].weight)
    assert torch.equal(getattr(model.net.slice5, "10").weight, alexnet.features[10].weight)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    assert model(x, x).item() == pytest.approx(0.0, abs=1e-6)


def test_missing_lpips_weights_are_a_clear_error(tmp_path):
    with pytest.raises(LPIPSUnavailable, match="no such file"):
        load_lpips("alex", tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a torchvision alex state dict"):
        load_lpips("alex", tmp_path / "junk.pth")


def test_patch_discriminator_gives_a_grid_of_logits():
    logits = PatchDiscriminator(16, 3)(torch.randn(2, 3, 256, 256))
    assert logits.shape == (2, 1, 30, 30)


def test_bad_loss_config():
    with pytest.raises(ValueError, match="disc_loss"):
        LossConfig(disc_loss="wasserstein")
