import pytest
import torch

from infgen.models import InfGen
from infgen.upsample import iterative_decode, iterative_schedule


@pytest.mark.parametrize("latent, target, expected", [
    ((64, 64), (4096, 4096), [(1024, 1024), (2048, 2048), (4096, 4096)]),
    ((64, 64), (3000, 3000), [(1024, 1024), (2048, 2048), (3000, 3000)]),  # last step < 2×
    ((64, 64), (2048, 4096), [(1024, 1024), (2048, 2048), (2048, 4096)]),
    ((64, 64), (1000, 900), [(1000, 900)]),  # within 2×: one direct decode
    ((64, 64), (256, 256), [(256, 256)]),
    ((48, 80), (1500, 2600), [(768, 1280), (1496, 2560), (1500, 2600)]),  # intermediates: multiples of 8
    ((64, 64), (1100, 1030), [(1024, 1024), (1100, 1030)]),
])
def test_schedule(latent, target, expected):
    assert iterative_schedule(latent, 8, target) == expected


def test_iterative_decode_chains_decode_and_reencode(tiny_vae):
    torch.manual_seed(0)
    model = InfGen.from_preset("tiny").eval()
    z = torch.randn(1, 4, 8, 8)
    out = iterative_decode(model, tiny_vae, z, (200, 296))
    assert out.shape == (1, 3, 200, 296)
    # by hand: 64² → 128² → re-encode (16² latent) → 200×256 → re-encode (25×32) → 200×296
    z1 = tiny_vae.encode(model.decode(z, (128, 128)))
    z2 = tiny_vae.encode(model.decode(z1, (200, 256)))
    assert z2.shape == (1, 4, 25, 32)
    assert torch.allclose(out, model.decode(z2, (200, 296)), atol=1e-5)
    # tiling is exact up to float rounding, which each VAE re-encode of the chain amplifies (a wrong tile is off by ~0.1)
    assert torch.allclose(iterative_decode(model, tiny_vae, z, (200, 296), tile=64), out, atol=1e-3)


def test_iterative_decode_rejects_another_latent_space(tiny_vae):
    model = InfGen.from_preset("tiny", latent_channels=16).eval()
    with pytest.raises(ValueError, match="does not match the model's latent space"):
        iterative_decode(model, tiny_vae, torch.randn(1, 16, 8, 8), 256)


def test_iterative_decode_takes_half_precision_latents(tiny_vae):
    """fp16/bf16 pipelines return half latents: iterative upsampling decodes them as it decodes float32 ones."""
    torch.manual_seed(0)
    model = InfGen.from_preset("tiny").eval()
    z = torch.randn(1, 4, 8, 8)
    for dtype in (torch.float16, torch.bfloat16):
        out = iterative_decode(model, tiny_vae, z.to(dtype), (200, 296))
        assert out.dtype == torch.float32 and out.shape == (1, 3, 200, 296)
        assert torch.equal(out, iterative_decode(model, tiny_vae, z.to(dtype).float(), (200, 296)))
