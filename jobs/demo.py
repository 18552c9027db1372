"""Demo: fit the tiny InfGen on latents of real photos, decode unseen latents to several sizes.

    python -m jobs.demo --config conf/demo.yaml [key=value ...]
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm import tqdm

from infgen.cli import parse_cli_size
from infgen.data import photo_pairs, random_target_size, targets_at
from infgen.images import center_crop, resize, shipped_photos, to_pil, to_tensor
from infgen.losses import InfGenLoss, LossConfig
from infgen.metrics import psnr, ssim
from infgen.models import InfGen
from infgen.training import InfGenTrainer, OptimConfig
from infgen.upsample import iterative_decode
from infgen.vae import load_vae
from jobs.config import parse_job_args
from pipelines.common import dataclass_from


def train(cfg: DictConfig, vae, photos: dict) -> InfGen:
    train_photos = [p for name, p in photos.items() if name not in cfg.data.held_out]
    latents, hr = photo_pairs(train_photos, vae, cfg.data.crops_per_image, cfg.data.input_size,
                              cfg.data.hr_size, seed=cfg.seed)
    model = InfGen.from_preset(cfg.preset, scaling_factor=vae.scaling_factor)
    loss = InfGenLoss(dataclass_from(LossConfig, cfg.loss))
    trainer = InfGenTrainer(model, loss, dataclass_from(OptimConfig, cfg.optim, total_steps=cfg.train.steps))
    rng, g = random.Random(cfg.seed), torch.Generator().manual_seed(cfg.seed)
    print(f"training {cfg.preset} ({model.num_params() / 1e6:.2f}M parameters) on {len(latents)} crops of "
          f"{len(train_photos)} photos, latents {tuple(latents.shape[1:])}")
    progress = tqdm(range(cfg.train.steps), desc="train", unit="step")
    for step in progress:
        idx = torch.randint(0, len(latents), (cfg.train.batch_size,), generator=g)
        size = random_target_size(rng, tuple(cfg.train.sizes), cfg.train.multiple, tuple(cfg.train.aspect_range))
        log = trainer.train_step(latents[idx], targets_at(hr[idx], size))
        progress.set_postfix(loss=f"{log['loss']:.3f}", l1=f"{log['l1']:.3f}", size=f"{size[1]}x{size[0]}")
    return trainer.ema


def decode_held_out(cfg: DictConfig, model: InfGen, vae, photos: dict, out: Path) -> list[dict]:
    rows = []
    for name in cfg.data.held_out:
        crop = center_crop(photos[name])
        latent = vae.encode(to_tensor(crop.resize((cfg.data.input_size,) * 2, Image.BICUBIC))[None])
        torch.save({"latents": latent}, out / "latents" / f"{name}.pt")
        native = vae.decode(latent)
        jobs = [(s, False) for s in cfg.decode.sizes] + [(s, True) for s in cfg.decode.iterative]
        for text, iterative in jobs:
            size = parse_cli_size(text)
            tile = cfg.decode.tile if max(size) > cfg.decode.tile_above else None
            start = time.perf_counter()
            image = (iterative_decode(model, vae, latent, size, tile=tile) if iterative
                     else model.decode(latent, size, tile=tile))
            seconds = time.perf_counter() - start
            method = "infgen-iterative" if iterative else "infgen"
            to_pil(image[0]).save(out / "images" / f"{name}_{text}_{method}.png")
            baseline = resize(native, size)
            to_pil(baseline[0]).save(out / "images" / f"{name}_{text}_vae-bicubic.png")
            row = {"image": name, "size": text, "method": method, "seconds": round(seconds, 3), "tile": tile}
            if max(size) <= min(crop.size):  # real ground truth exists only up to the photo's own resolution
                truth = to_tensor(crop.resize((size[1], size[0]), Image.BICUBIC))[None]
                row.update(psnr=psnr(image, truth).item(), ssim=ssim(image, truth).item(),
                           baseline_psnr=psnr(baseline, truth).item(), baseline_ssim=ssim(baseline, truth).item())
            rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    print("\nHeld-out photos: infgen never saw them; the tiny VAE behind the baseline was fitted on them.")
    print(f"{'image':<10} {'size':>10} {'method':<17} {'s':>6} {'PSNR':>6} {'SSIM':>6} {'VAE+bicubic PSNR/SSIM':>22}")
    for r in rows:
        metrics = (f"{r['psnr']:6.2f} {r['ssim']:6.3f} {r['baseline_psnr']:12.2f} / {r['baseline_ssim']:.3f}"
                   if "psnr" in r else f"{'-':>6} {'-':>6} {'(no ground truth)':>22}")
        print(f"{r['image']:<10} {r['size']:>10} {r['method']:<17} {r['seconds']:6.2f} {metrics}")


def main() -> None:
    cfg = parse_job_args(__doc__)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output)
    for sub in ("images", "latents"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    vae = load_vae(cfg.vae)
    photos = shipped_photos()
    model = train(cfg, vae, photos).eval()
    model.save_pretrained(out / "model")
    rows = decode_held_out(cfg, model, vae, photos, out)
    (out / "results.json").write_text(json.dumps({"config": OmegaConf.to_container(cfg), "decodes": rows}, indent=2))
    print_table(rows)
    example = out / "latents" / f"{cfg.data.held_out[0]}.pt"
    print(f"\nmodel: {out / 'model'}\nimages: {out / 'images'}\nresults: {out / 'results.json'}\n"
          f"try: infgen decode --model {out / 'model'} --latent {example} --size 1920x1080 --out {out / 'wide.png'}")


if __name__ == "__main__":
    main()
