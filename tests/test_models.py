import json

import pytest
import torch

from infgen.models import INPE, InfGen, InfGenConfig, LocalAttention, sphere, token_centres

SMALL = dict(width=32, num_heads=2, latent_depth=1, query_depth=1, fourier_features=16,
             decoder_channels=(32, 16, 16, 8), decoder_blocks=2)


@pytest.fixture(scope="module")
def tiny():
    return InfGen.from_preset("tiny").eval()


@pytest.mark.parametrize("latent_hw", [(32, 32), (64, 64), (48, 80), (128, 128)])
@pytest.mark.parametrize("size", [(64, 64), (67, 93), (135, 240), (257, 129)])
def test_output_shapes_for_any_grid_and_size(tiny, latent_hw, size):
    out = tiny.decode(torch.randn(1, 4, *latent_hw), size)
    assert out.shape == (1, 3, *size)
    assert out.min() >= -1 and out.max() <= 1


def test_batch_and_int_size(tiny):
    assert tiny.decode(torch.randn(3, 4, 16, 24), 72).shape == (3, 3, 72, 72)


def test_inpe_same_position_same_embedding_across_grids(tiny):
    # token j of a 32-grid sits at (j+.5)/32 = (3j+1.5)/96: token 3j+1 of a 96-grid
    coarse = token_centres(32, 8, 256)
    fine = token_centres(96, 8, 768)
    assert torch.allclose(coarse, fine[1::3], atol=0, rtol=0)
    inpe = tiny.pos_embed
    a = inpe.grid(coarse, coarse)
    b = inpe.grid(fine, fine)[1::3, 1::3]
    assert torch.equal(a, b)
    # a latent grid (stride 8) and the mask grid of its native-size image share positions too
    assert torch.equal(token_centres(64, 8, 512), token_centres(-(-512 // 8), 8, 512))


def test_inpe_separates_neighbours_at_4k():
    inpe = INPE(64, 64, 8.0, seed=0)
    centres = token_centres(512, 8, 4096)  # the mask grid of a 4096-pixel side
    emb = inpe.grid(centres[:4], centres[:4]).reshape(16, 64)
    dist = torch.cdist(emb, emb) + torch.eye(16) * 1e9
    assert dist.min() > 1e-3


def test_sphere_mapping_is_on_unit_sphere_and_one_to_one():
    uv = torch.rand(2000, 2, dtype=torch.float64)
    p = sphere(uv)
    assert torch.allclose(p.norm(dim=-1), torch.ones(2000, dtype=torch.float64))
    exact = "donot_use_mm_for_euclid_dist"
    d_uv, d_p = torch.cdist(uv, uv, compute_mode=exact), torch.cdist(p, p, compute_mode=exact)
    off_diagonal = ~torch.eye(2000, dtype=torch.bool)
    # distinct positions stay apart on the sphere (conformal, no pole in the square): |Δp| >= 0.5·|Δuv|
    assert (d_p[off_diagonal] >= 0.5 * d_uv[off_diagonal]).all()


def test_local_attention_matches_dense_masked_reference():
    torch.manual_seed(1)
    attn = LocalAttention(16, 2, radius=1.5, block=4)
    context, queries = torch.randn(1, 6, 7, 16), torch.randn(1, 9, 11, 16)
    pos_y, pos_x = torch.linspace(-0.5, 5.5, 9, dtype=torch.float64), torch.linspace(-0.5, 6.5, 11, dtype=torch.float64)
    out = attn(queries, pos_y, pos_x, context)
    # reference: every query against every key, masked to its radius
    q = attn.to_q(queries).view(1, 99, 2, 8).transpose(1, 2)
    k, v = attn.to_kv(context).view(1, 42, 2, 2, 8).permute(2, 0, 3, 1, 4)
    ky, kx = torch.meshgrid(torch.arange(6.0), torch.arange(7.0), indexing="ij")
    qy, qx = torch.meshgrid(pos_y.float(), pos_x.float(), indexing="ij")
    mask = ((qy.reshape(-1, 1) - ky.reshape(1, -1)).abs() <= 1.5) & ((qx.reshape(-1, 1) - kx.reshape(1, -1)).abs() <= 1.5)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    ref = attn.proj(ref.transpose(1, 2).reshape(1, 9, 11, 16))
    assert torch.allclose(out, ref, atol=1e-5)


def test_attention_blocking_never_changes_results():
    torch.manual_seed(2)
    z = torch.randn(1, 4, 20, 28)
    a = InfGen(InfGenConfig(**SMALL, attn_block=4)).eval()
    b = InfGen(InfGenConfig(**SMALL, attn_block=16)).eval()
    b.load_state_dict(a.state_dict())
    assert torch.allclose(a.decode(z, (200, 300)), b.decode(z, (200, 300)), atol=1e-5)


def test_output_is_local_in_the_latent():
    # no global attention anywhere: without the latent's GroupNorm (its only image-level statistics), changing
    # a far-away latent token leaves distant pixels unchanged
    local = InfGen.from_preset("tiny", latent_res_blocks=0).eval()
    z = torch.randn(1, 4, 32, 32)
    z2 = z.clone()
    z2[..., 31, 31] += 5.0
    a, b = local.decode(z, 256), local.decode(z2, 256)
    assert torch.equal(a[..., :128, :128], b[..., :128, :128])
    assert not torch.equal(a[..., 200:, 200:], b[..., 200:, 200:])


def test_models_saved_before_new_fields_load_as_they_were(tmp_path):
    # a config.json without latent_res_blocks / upsampler_norm is a model from before them: no GroupNorm
    # blocks, per-pixel norm in the upsampler; its weights load exactly
    import json

    from infgen.models import LEGACY_DEFAULTS

    old = InfGen.from_preset("tiny", **LEGACY_DEFAULTS).eval()
    old.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key in LEGACY_DEFAULTS:
        del config[key]
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = InfGen.from_pretrained(tmp_path)
    assert loaded.config.latent_res_blocks == 0 and loaded.config.upsampler_norm == "pixel"
    z = torch.randn(1, 4, 8, 8)
    assert torch.equal(loaded.decode(z, 64), old.decode(z, 64))


@pytest.mark.parametrize("config", [dict(), SMALL], ids=["tiny", "two-blocks-per-level"])
def test_tiled_equals_untiled(config):
    model = InfGen(InfGenConfig(**{**__import__("infgen.models").models.INFGEN_PRESETS["tiny"], **config})).eval()
    z = torch.randn(1, 4, 24, 40)
    full = model.decode(z, (333, 517))
    for tile in (64, 128):
        assert torch.allclose(model.decode(z, (333, 517), tile=tile), full, atol=1e-4), tile


def test_window_with_full_halo_equals_the_full_decode():
    model = InfGen.from_preset("tiny").eval()
    z = torch.randn(2, 4, 12, 20)
    with torch.no_grad():
        full = model(z, (200, 328))
        window = model(z, (200, 328), region=(64, 96, 80, 128), halo=model.upsampler.halo)
        edge = model(z, (200, 328), region=(160, 296, 64, 64), halo=model.upsampler.halo)  # clipped at the edge
        no_halo = model(z, (200, 328), region=(64, 96, 80, 128))
    assert window.shape == (2, 3, 80, 128) and edge.shape == (2, 3, 40, 32)
    assert torch.allclose(window, full[..., 64:144, 96:224], atol=1e-5)
    assert torch.allclose(edge, full[..., 160:, 296:], atol=1e-5)
    # without a halo only the window's centre is exact: its rim sees the window's edge
    assert not torch.allclose(no_halo, full[..., 64:144, 96:224], atol=1e-5)
    with pytest.raises(ValueError, match="region"):
        model(z, (200, 328), region=(4, 0, 64, 64))


def test_views_decode_each_window_as_its_own_forward_would():
    model = InfGen.from_preset("tiny").eval()
    z = torch.randn(2, 4, 12, 20)
    views = [((200, 328), (64, 96, 64, 64)), ((96, 160), (32, 0, 64, 64)), ((400, 656), (0, 592, 64, 64))]
    with torch.no_grad():
        together = model(z, views=views, halo=2)
        alone = [model(z, size, region=region, halo=2) for size, region in views]
    assert together.shape == (6, 3, 64, 64)  # view-major: view v of latent b at v·2 + b
    assert torch.allclose(together, torch.cat(alone), atol=1e-5)
    with pytest.raises(ValueError, match="different shapes"):
        model(z, views=[((200, 328), (0, 0, 64, 64)), ((200, 328), (0, 0, 32, 64))])
    with pytest.raises(ValueError, match="not both"):
        model(z, (200, 328), views=views)


def test_context_queries_start_from_the_interpolated_latent():
    from infgen.models import interpolate_context

    context = torch.arange(12.0).view(1, 3, 4, 1)  # value = 4·row + column
    out = interpolate_context(context, torch.tensor([0.0, 0.5, 2.0, 2.5]), torch.tensor([-0.5, 1.25, 3.0]))
    expected = torch.tensor([[0.0, 1.25, 3.0], [2.0, 3.25, 5.0], [8.0, 9.25, 11.0], [8.0, 9.25, 11.0]])
    assert torch.allclose(out[0, ..., 0], expected)


def test_gradients_reach_every_trainable_parameter():
    model = InfGen.from_preset("tiny", grad_checkpointing=True).train()
    z = torch.randn(2, 4, 12, 16)
    # the upsampler's output layer starts at zero (the RGB base alone): one step opens the path behind it
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        out = model(z, (72, 104))
        (out.square().mean() + out.mean()).backward()
        optimizer.step()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing


def test_save_load_round_trip_is_exact(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "m")
    loaded = InfGen.from_pretrained(tmp_path / "m").eval()
    assert loaded.config == tiny.config
    for (k, v), (k2, v2) in zip(tiny.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    z = torch.randn(1, 4, 16, 16)
    assert torch.equal(tiny.decode(z, 96), loaded.decode(z, 96))


def test_presets_and_unknown_preset():
    assert InfGen.from_preset("tiny").num_params() < 1_000_000
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        InfGen.from_preset("huge")


@pytest.mark.parametrize("latents, size, message", [
    (torch.randn(4, 16, 16), 64, r"shape \(batch, 4, h, w\)"),
    (torch.randn(1, 3, 16, 16), 64, "3 channels"),
    (torch.full((1, 4, 16, 16), float("nan")), 64, "NaN/inf"),
    (torch.tensor([[[[float("inf")]]]]).expand(1, 4, 2, 2), 64, "NaN/inf"),
    (torch.randint(0, 5, (1, 4, 8, 8)), 64, "floating point"),
    (torch.randn(1, 4, 16, 16), 0, "positive"),
    (torch.randn(1, 4, 16, 16), (-8, 64), "positive"),
    (torch.randn(1, 4, 16, 16), 64.0, "integers"),
    (torch.randn(1, 4, 16, 16), (64, True), "integers"),
    (torch.randn(1, 4, 16, 16), (64, 64, 3), "int or"),
    (torch.randn(1, 4, 16, 16), 5, "below the minimum"),
    (torch.randn(1, 4, 16, 16), 9000, "above this model's maximum"),
    ("not a tensor", 64, "torch.Tensor"),
])
def test_bad_inputs_raise_clear_errors(tiny, latents, size, message):
    with pytest.raises(ValueError, match=message):
        tiny.decode(latents, size)


def test_bad_tile_raises(tiny):
    with pytest.raises(ValueError, match="tile must be a positive multiple of 8"):
        tiny.decode(torch.randn(1, 4, 8, 8), 64, tile=60)


def test_bad_checkpoints_raise_clear_errors(tiny, tmp_path):
    good = tiny.save_pretrained(tmp_path / "good")
    with pytest.raises(ValueError, match="not found"):
        InfGen.from_pretrained(tmp_path / "nothing")

    not_safetensors = tiny.save_pretrained(tmp_path / "pickle")
    torch.save(tiny.state_dict(), not_safetensors / "model.safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        InfGen.from_pretrained(not_safetensors)

    mismatch = tiny.save_pretrained(tmp_path / "mismatch")
    config = json.loads((mismatch / "config.json").read_text())
    (mismatch / "config.json").write_text(json.dumps({**config, "width": 96, "num_heads": 2}))
    with pytest.raises(ValueError, match="does not match.*shape mismatches"):
        InfGen.from_pretrained(mismatch)

    deeper = tiny.save_pretrained(tmp_path / "deeper")
    (deeper / "config.json").write_text(json.dumps({**config, "query_depth": 3}))
    with pytest.raises(ValueError, match=r"missing \['query_blocks.2"):
        InfGen.from_pretrained(deeper)

    unknown = tiny.save_pretrained(tmp_path / "unknown")
    (unknown / "config.json").write_text(json.dumps({**config, "colour": "blue"}))
    with pytest.raises(ValueError, match=r"unknown config fields \['colour'\]"):
        InfGen.from_pretrained(unknown)
    assert InfGen.from_pretrained(good).config == tiny.config


def test_config_validation():
    with pytest.raises(ValueError, match="not divisible"):
        InfGenConfig(width=30, num_heads=4)
    with pytest.raises(ValueError, match="radii"):
        InfGenConfig(cross_attn_radius=0.5)
    with pytest.raises(ValueError, match="latent_kernel must be a positive odd number, got 2"):
        InfGenConfig(latent_kernel=2)
    with pytest.raises(ValueError, match="upsampler_norm must be one of .*got 'batch'"):
        InfGenConfig(upsampler_norm="batch")
    with pytest.raises(ValueError, match="latent_res_blocks must be >= 0, got -1"):
        InfGenConfig(latent_res_blocks=-1)


def test_half_precision_latents_decode_like_float32(tiny):
    """fp16 and bf16 pipelines return half latents: they decode (computed in the weights' dtype)."""
    latents = torch.randn(1, 4, 8, 8)
    reference = tiny.decode(latents, (64, 48))
    for dtype in (torch.float16, torch.bfloat16):
        images = tiny.decode(latents.to(dtype), (64, 48))
        assert images.dtype == torch.float32
        assert torch.equal(images, tiny.decode(latents.to(dtype).float(), (64, 48)))
        assert (images - reference).abs().max() < 0.05


def test_from_pretrained_takes_a_hub_repo_id_through_the_hub_cache(tiny, tmp_path, monkeypatch):
    """Offline (HF_HUB_OFFLINE=1, as the tests run): a repo id loads from huggingface_hub's cache, an uncached one
    is a ValueError saying so. The cache is laid out as huggingface_hub writes it."""
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    repo = tmp_path / "hub" / "models--someorg--infgen-tiny"
    tiny.save_pretrained(repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    loaded = InfGen.from_pretrained("someorg/infgen-tiny")
    latents = torch.randn(1, 4, 8, 8)
    assert torch.equal(loaded.eval().decode(latents, 48), tiny.decode(latents, 48))
    with pytest.raises(ValueError, match="someorg/other: not a local directory, and the Hugging Face Hub repo"):
        InfGen.from_pretrained("someorg/other")
