import io
import random

import pytest
import torch

from infgen.data import random_target_size, targets_at
from infgen.losses import InfGenLoss, LossConfig
from infgen.metrics import psnr
from infgen.models import InfGen
from infgen.training import InfGenTrainer, OptimConfig, warmup_cosine

pytestmark = pytest.mark.filterwarnings("ignore:LPIPS with a RANDOM")


def make_trainer(disc_start=10**9):
    torch.manual_seed(0)  # the same random LPIPS backbone and init for every trainer
    model = InfGen.from_preset("tiny")
    loss = InfGenLoss(LossConfig(lpips_random_backbone=True, disc_channels=16, disc_start=disc_start))
    return InfGenTrainer(model, loss, OptimConfig(lr=2e-3, warmup_steps=10, total_steps=120, ema_decay=0.99))


def mean_psnr(model, latents, hr, size):
    return psnr(model.eval().decode(latents, size), targets_at(hr, size)).mean().item()


def test_short_training_on_real_photo_latents_learns_at_two_sizes(photo_latents):
    latents, hr = photo_latents
    held_out = torch.arange(len(latents)) % 8 == 0  # one crop of each photo never trained on
    train_lat, train_hr = latents[~held_out], hr[~held_out]
    trainer = make_trainer()
    sizes = [(96, 96), (192, 192)]
    before = {s: mean_psnr(trainer.model, latents[held_out], hr[held_out], s) for s in sizes}
    g = torch.Generator().manual_seed(0)
    losses = []
    for step in range(120):
        idx = torch.randint(0, len(train_lat), (6,), generator=g)
        size = sizes[step % 2]
        losses.append(trainer.train_step(train_lat[idx], targets_at(train_hr[idx], size))["loss"])
    after = {s: mean_psnr(trainer.model, latents[held_out], hr[held_out], s) for s in sizes}
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.7 * first, (first, last)  # measured: 0.46 → 0.27
    for s in sizes:  # on crops it never saw: it decodes the latent, it does not memorise
        assert after[s] > before[s] + 4.0, (s, before, after)  # measured: 9.0 → 16.0 dB
    assert mean_psnr(trainer.ema, latents[held_out], hr[held_out], sizes[1]) > before[sizes[1]] + 3.0


def test_checkpoint_resume_is_exact(photo_latents):
    latents, hr = photo_latents
    batches = [(latents[i:i + 2], targets_at(hr[i:i + 2], (64, 64))) for i in range(0, 8, 2)]
    a = make_trainer(disc_start=2)
    for lat, tgt in batches[:2]:
        a.train_step(lat, tgt)
    checkpoint = io.BytesIO()  # through bytes, as a checkpoint on disk: no tensor shared with `a`
    torch.save(a.state_dict(), checkpoint)
    checkpoint.seek(0)
    b = make_trainer(disc_start=2)
    b.load_state_dict(torch.load(checkpoint, weights_only=True))
    for lat, tgt in batches[2:]:
        log_a, log_b = a.train_step(lat, tgt), b.train_step(lat, tgt)
        assert log_a == log_b and "d_loss" in log_a and log_a["d_loss"] != 0.0
    assert a.step == b.step == 4
    for (k, va), vb in zip(a.state_dict()["model"].items(), b.state_dict()["model"].values()):
        assert torch.equal(va, vb), k


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100, 0.1) == pytest.approx(0.55)
    assert warmup_cosine(100, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(500, 10, 100, 0.1) == pytest.approx(0.1)


def test_random_target_sizes_stay_in_range():
    rng = random.Random(0)
    for _ in range(200):
        h, w = random_target_size(rng, (512, 1024), multiple=64, aspect_range=(0.5, 2.0))
        assert 512 <= max(h, w) <= 1024 and h % 64 == 0 and w % 64 == 0
        assert 0.45 <= w / h <= 2.2


def test_window_training_learns_the_whole_image(photo_latents):
    """Steps on 64-px windows of 192² outputs (a ninth of the pixels each) still teach the whole image."""
    latents, hr = photo_latents
    held_out = torch.arange(len(latents)) % 8 == 0
    train_lat, train_hr = latents[~held_out], hr[~held_out]
    trainer = make_trainer()
    size = (192, 192)
    before = mean_psnr(trainer.model, latents[held_out], hr[held_out], size)
    g = torch.Generator().manual_seed(0)
    for _ in range(120):
        idx = torch.randint(0, len(train_lat), (6,), generator=g)
        top, left = (int(v) * 8 for v in torch.randint(0, 17, (2,), generator=g))
        target = targets_at(train_hr[idx], size)[..., top:top + 64, left:left + 64]
        trainer.train_step(train_lat[idx], target, size=size, region=(top, left, 64, 64), halo=2)
    assert mean_psnr(trainer.model, latents[held_out], hr[held_out], size) > before + 4.0
    with pytest.raises(ValueError, match="do not match"):
        trainer.train_step(train_lat[:2], targets_at(train_hr[:2], size), size=size, region=(0, 0, 64, 64))


def test_random_regions_cover_every_scale():
    from infgen.images import random_region

    rng = random.Random(0)
    sides = []
    for _ in range(2000):
        left, top, right, bottom = random_region(3000, 2000, rng, min_side=100)
        assert right - left == bottom - top and 0 <= left < right <= 3000 and 0 <= top < bottom <= 2000
        sides.append(right - left)
    assert min(sides) < 120 and max(sides) > 1800
    # log-uniform: as many regions between 100 and 447 px as between 447 and 2000 (√(100·2000) ≈ 447)
    assert 0.4 < sum(s < 447 for s in sides) / len(sides) < 0.6
    with pytest.raises(ValueError, match="too small"):
        random_region(90, 400, rng, min_side=100)


def test_bf16_autocast_only_where_it_is_native():
    from infgen.training import autocast_bf16

    assert not autocast_bf16(torch.device("cpu"), False) and not autocast_bf16(torch.device("cuda"), False)
    assert autocast_bf16(torch.device("cuda"), True)
    assert autocast_bf16(torch.device("cpu"), True) == torch.ops.mkldnn._is_mkldnn_bf16_supported()


def test_machine_record_states_what_timings_depend_on():
    """Benchmarks and the VAE fit record the CPU, its SIMD level and whether training may autocast to bf16 (on x86
    oneDNN runs bf16 only with AVX-512), as JSON."""
    import json
    import os
    import platform

    from infgen.machine import describe_machine
    from infgen.training import autocast_bf16

    machine = describe_machine()
    assert json.loads(json.dumps(machine)) == machine
    assert set(machine) == {"cpu", "cpus", "cpu_capability", "onednn_bf16", "torch_threads", "torch", "python",
                            "platform"}
    assert machine["cpu"] and machine["cpus"] == os.cpu_count() and machine["torch"] == torch.__version__
    assert machine["cpu_capability"] == torch.backends.cpu.get_cpu_capability() != ""
    assert machine["onednn_bf16"] == autocast_bf16(torch.device("cpu"), True)
    assert machine["torch_threads"] == torch.get_num_threads()
    if platform.machine() in ("x86_64", "AMD64"):
        assert machine["cpu_capability"] in ("DEFAULT", "AVX2", "AVX512")
        assert not machine["onednn_bf16"] or machine["cpu_capability"] == "AVX512"
