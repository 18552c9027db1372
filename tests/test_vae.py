import json

import pytest
import torch

from infgen.images import center_crop, to_tensor
from infgen.metrics import psnr
from infgen.vae import FrozenVAE, load_vae, materialise_offline_vae, vae_config


def test_tiny_vae_goes_through_from_pretrained(tiny_vae):
    directory = materialise_offline_vae("tiny")
    assert (directory / "config.json").is_file() and (directory / "diffusion_pytorch_model.safetensors").is_file()
    config = json.loads((directory / "config.json").read_text())
    assert tiny_vae.scaling_factor == config["scaling_factor"] != 1.0
    assert not any(p.requires_grad for p in tiny_vae.parameters())


def test_fit_logs_its_progress_and_sets_the_scaling_factor(caplog):
    """A fit takes minutes on 2 cores: ten progress lines with the loss and an ETA, the last one at ETA 0; the
    scaling factor is 1/std of the fitted latents."""
    import logging
    import re

    from infgen.vae import build_offline_vae, fit_vae

    with caplog.at_level(logging.INFO, logger="infgen.vae"), torch.random.fork_rng():  # it seeds torch
        autoencoder = fit_vae(build_offline_vae("tiny"), seed=0, photos="shipped", phases=[[32, 2, 15], [64, 1, 5]],
                              lr=1e-3, kl_weight=1e-4, logvar_init=None)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("VAE fit:")]
    assert [int(re.search(r"step (\d+)/20", line).group(1)) for line in lines] == list(range(2, 21, 2))
    assert lines[-1].endswith("ETA 0 s") and all(re.search(r"loss \d+\.\d{4}", line) for line in lines)
    assert 0 < autoencoder.config.scaling_factor != 1.0 and not autoencoder.training


def test_vae_config_reads_the_latent_space_without_weights(tiny_vae, tmp_path):
    """What the driver needs of a VAE (scaling factor, channels, scale) comes from its config file alone; a config
    without a scaling factor means SD's 0.18215 (as diffusers assumes); a source that is not a VAE is named."""
    source, config = vae_config("tiny")
    assert source == str(materialise_offline_vae("tiny")) and config["scaling_factor"] == tiny_vae.scaling_factor
    assert config["latent_channels"] == 4 and len(config["block_out_channels"]) == 4
    old = json.loads((materialise_offline_vae("tiny") / "config.json").read_text())
    del old["scaling_factor"]
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps(old))  # a config only: no weights anywhere
    assert vae_config(tmp_path / "vae")[1]["scaling_factor"] == 0.18215
    with pytest.raises(ValueError, match="vae='.*nowhere' could not be loaded"):
        vae_config(tmp_path / "nowhere")


def test_tiny_vae_encodes_and_reconstructs_real_photos(tiny_vae, photos):
    x = torch.stack([to_tensor(center_crop(p).resize((128, 128))) for p in photos.values()])
    z = tiny_vae.encode(x)
    assert z.shape == (len(x), 4, 16, 16) and z.dtype == torch.float32
    assert z.is_contiguous()  # computed channels-last, returned in the usual layout (callers .view it)
    assert 0.5 < z.std().item() < 2.0  # the scaling factor makes latents roughly unit-variance
    recon = tiny_vae.decode(z)
    assert recon.shape == x.shape and recon.is_contiguous()
    assert psnr(recon, x).mean() > 17.0  # a real (if weak) autoencoder: not noise
    sampled = tiny_vae.encode(x, sample=True, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(sampled, z)


def test_local_sd_style_vae_honours_its_scaling_factor(tmp_path):
    from diffusers import AutoencoderKL

    ae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                       up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, layers_per_block=1,
                       latent_channels=4, scaling_factor=0.18215)
    ae.save_pretrained(tmp_path / "pipeline" / "vae")
    vae = load_vae(tmp_path / "pipeline", subfolder="vae")
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    raw = ae.eval().encode(x).latent_dist.mode()
    assert torch.allclose(vae.encode(x), raw * 0.18215, atol=1e-5)
    assert torch.allclose(vae.decode(vae.encode(x)), ae.decode(raw).sample.clamp(-1, 1), atol=1e-5)
    assert isinstance(vae, FrozenVAE) and vae.scale == 2


def test_hub_id_fails_fast_offline():
    with pytest.raises(ValueError, match="could not load VAE 'stabilityai/sd-vae-ft-ema'"):
        load_vae("stabilityai/sd-vae-ft-ema")


def test_directory_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not a diffusers VAE directory"):
        load_vae(tmp_path)


def test_a_mistyped_name_fails_at_once_without_asking_the_hub(monkeypatch):
    # online, as the `infgen` CLI runs outside make: the hub would be retried for ~20 s, then another message
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for load in (load_vae, vae_config):
        with pytest.raises(ValueError, match=r"vae='phot' is not an offline VAE \(photo, tiny\), a local directory "
                                             r"or a hub id \(owner/name\)"):
            load("phot")


def test_encode_rejects_bad_images(tiny_vae):
    with pytest.raises(ValueError, match="not a multiple of 8"):
        tiny_vae.encode(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"shape \(batch, 3, H, W\)"):
        tiny_vae.encode(torch.zeros(3, 32, 32))


def test_photo_vae_is_fitted_on_training_files_and_reconstructs_held_out_ones():
    """The realistic offline VAE (`make setup` fits it): held-out files it never saw, crops of every scale."""
    import random

    from infgen.images import random_region, region_at
    from infgen.photos import load_photos, open_rgb
    from infgen.vae import OFFLINE_VAES

    directory = materialise_offline_vae("photo")
    fit = json.loads((directory / "fit.json").read_text())
    assert fit["fit"]["photos"] == "train" == OFFLINE_VAES["photo"]["fit"]["photos"]
    vae = load_vae("photo")
    rng, crops = random.Random(0), []
    for photo in load_photos("holdout")[:6]:
        image = open_rgb(photo.path, max_side=2048)
        crops += [region_at(image, random_region(*image.size, rng, min_side=128), 128) for _ in range(4)]
    x = torch.stack(crops)
    z = vae.encode(x)
    assert z.shape == (24, 4, 16, 16) and 0.5 < z.std().item() < 2.0
    assert psnr(vae.decode(z), x).mean() > 21.0  # a real autoencoder (23 dB measured), not a colour blur
