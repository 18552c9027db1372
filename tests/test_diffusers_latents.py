"""Latents from a real diffusers pipeline (output_type="latent") are what infgen decodes."""

import pytest
import torch

from infgen.models import InfGen


@pytest.fixture(scope="module")
def pipeline(tiny_vae):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=4)
    # prompt embeddings are passed directly, so no text encoder or tokenizer (which would need a download)
    return StableDiffusionPipeline(vae=tiny_vae.autoencoder, text_encoder=None, tokenizer=None, unet=unet,
                                   scheduler=DDIMScheduler(clip_sample=False), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def generate(pipeline, output_type):
    return pipeline(prompt_embeds=torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(0)),
                    guidance_scale=1.0, num_inference_steps=2, height=64, width=64, output_type=output_type,
                    generator=torch.Generator().manual_seed(1)).images


def test_pipeline_latents_are_scaled_latents(pipeline, tiny_vae):
    latents = generate(pipeline, "latent")
    images = generate(pipeline, "pt")  # the pipeline's own VAE decode of the same latents, in [0, 1]
    assert latents.shape == (1, 4, 8, 8)
    # our wrapper's decode (÷ scaling_factor) is exactly the pipeline's: same latent convention
    assert torch.allclose(tiny_vae.decode(latents), images * 2 - 1, atol=1e-5)


def test_infgen_decodes_pipeline_latents_at_any_size(pipeline, tiny_vae):
    latents = generate(pipeline, "latent")
    model = InfGen.from_preset("tiny", scaling_factor=tiny_vae.scaling_factor).eval()
    out = model.decode(latents, (100, 180))
    assert out.shape == (1, 3, 100, 180)
    unscaled = latents / tiny_vae.scaling_factor  # raw encoder-space latents
    assert torch.allclose(model.decode(unscaled, (100, 180), scaled=False), out, atol=1e-5)


def test_infgen_as_the_pipelines_vae_returns_the_large_image(pipeline, tiny_vae):
    """`pipe.vae = InfGenVAE(...)`: the pipeline's own call returns a 1024² PIL image, the InfGen decode of the
    latents it would have returned; fp16 latents decode; img2img's encode is the original VAE's."""
    from PIL import Image

    from infgen.adapter import InfGenVAE
    from infgen.images import to_pil

    latents = generate(pipeline, "latent")
    model = InfGen.from_preset("tiny", scaling_factor=tiny_vae.scaling_factor).eval()
    original = pipeline.vae
    try:
        pipeline.vae = InfGenVAE(model, original, size=1024)
        image = generate(pipeline, "pil")[0]
        assert isinstance(image, Image.Image) and image.size == (1024, 1024)
        expected = to_pil(model.decode(latents, 1024)[0])
        assert max(abs(a - b) for a, b in zip(image.getdata(0), expected.getdata(0))) <= 1
        half = pipeline.vae.decode(latents.half() / tiny_vae.scaling_factor).sample
        assert half.dtype == torch.float16 and half.shape == (1, 3, 1024, 1024)
        pixels = torch.rand(1, 3, 64, 64) * 2 - 1
        assert torch.equal(pipeline.vae.encode(pixels).latent_dist.mean, original.encode(pixels).latent_dist.mean)
    finally:
        pipeline.vae = original
    with pytest.raises(ValueError, match="another latent space"):
        InfGenVAE(InfGen.from_preset("tiny", scaling_factor=0.5), original)


def test_infgen_as_an_sdxl_pipelines_vae(tiny_vae):
    """SDXL reads more of `vae.config` (force_upcast, latents_mean/std) and upcasts fp16 VAEs: the adapter's
    config keeps the pipeline off that path, and its own call returns the large image."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from PIL import Image

    from infgen.adapter import InfGenVAE

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, norm_num_groups=8, attention_head_dim=4, transformer_layers_per_block=1,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80)
    model = InfGen.from_preset("tiny", scaling_factor=tiny_vae.scaling_factor).eval()
    # prompt embeddings passed directly: no text encoders or tokenizers (they would need a download)
    pipe = StableDiffusionXLPipeline(vae=tiny_vae.autoencoder, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                     tokenizer_2=None, unet=unet, scheduler=EulerDiscreteScheduler())
    pipe.vae = InfGenVAE(model, tiny_vae.autoencoder, size=(512, 768))
    generator = torch.Generator().manual_seed(0)
    image = pipe(prompt_embeds=torch.randn(1, 4, 64, generator=generator),
                 pooled_prompt_embeds=torch.randn(1, 32, generator=generator), guidance_scale=1.0,
                 num_inference_steps=2, height=64, width=64, generator=torch.Generator().manual_seed(1)).images[0]
    assert isinstance(image, Image.Image) and image.size == (768, 512)
