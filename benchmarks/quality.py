"""The CPU quality proxy (issue 10): does infgen beat "VAE decode + upscaling" on photos it never saw?

Data (conf/photos.yaml, split BY FILE):
    a region of a photo, square, side log-uniform between 8×native (training: 4×) and the photo's short
    side, seeded;
    native crop = the region resized (Lanczos) to `native` px → the VAE encodes it (posterior mode) → latent;
    targets = the same region resized to 1×, 2×, 4× and 8× native: real pixels at every scale (the region
    is at least 8×native), never upsampled.
    Training regions come from the training photos, held-out regions from the held-out photos.
Training: infgen from scratch for `--steps` steps on output windows (InfGen.forward's `region`) of outputs
    whose side is drawn from 1×..`--train-scale`× native, L1 + L2 loss (the GAN and LPIPS terms need a
    pretrained backbone and far more steps; see the README), bf16 autocast where oneDNN runs bf16; each
    sample a random one of its crop's 8 flips/rotations, encoded by the VAE (`--augment`): 38 training files
    are few, and the model overfits them (measured, 3,200 steps: +1.3 dB over the VAE on its own training crops,
    +0.4 on held-out ones; with the flips/rotations +0.6 held-out).
Evaluation on every held-out crop at every scale: infgen (one pass), infgen iterative (2× steps with VAE
    re-encoding; at 4× and 8×), VAE decode + bicubic, VAE decode + Lanczos, and bicubic from the TRUE native
    crop (what a perfect VAE would allow: the ceiling of the "decode then upscale" family). PSNR, SSIM,
    MS-SSIM (outputs ≥ 256 px; torchmetrics' 5 scales need more than 160 px), LPIPS when its pretrained
    backbone loads.
Writes the JSON (figures, steps, wall time, threads, photos used) and a side-by-side figure of held-out
crops at 4×: truth | VAE + bicubic | infgen.

    python benchmarks/quality.py --out benchmarks/results/quality.json --figure docs/quality_4x.jpg
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from infgen.evaluation import DECODERS as EVAL_DECODERS, Decoders  # noqa: E402
from infgen.data import target_window  # noqa: E402
from infgen.images import (dihedral, dihedral_region, random_region, region_at, region_image, resize,  # noqa: E402
                           to_tensor)
from infgen.losses import InfGenLoss, LossConfig  # noqa: E402
from infgen.machine import describe_machine  # noqa: E402
from infgen.metrics import LPIPSUnavailable, load_lpips, psnr, ssim  # noqa: E402
from infgen.models import InfGen  # noqa: E402
from infgen.photos import load_photos, open_rgb  # noqa: E402
from infgen.training import InfGenTrainer, OptimConfig, autocast_bf16  # noqa: E402
from infgen.vae import load_vae  # noqa: E402

SCALES = (1, 2, 4, 8)
DECODERS = (*EVAL_DECODERS, "true_bicubic")
FIGURE = {"vae_bicubic": "VAE decode + bicubic", "infgen": "infgen"}  # decoders beside the truth: their labels


def crops(photos, count_per_photo: int, native: int, scales, seed: int) -> tuple[list, dict, list]:
    """Native crops [n×n] and targets {scale: [n·s × n·s]} (Pillow RGB images) of seeded regions of at least
    max(scales)×native px, so every target holds real pixels (a photo too small for that is skipped)."""
    rng = random.Random(seed)
    natives, targets, where = [], {s: [] for s in scales}, []
    for photo in photos:
        image = open_rgb(photo.path)
        if min(image.size) < max(scales) * native:
            print(f"  skipped {photo.name} ({image.size[0]}x{image.size[1]}): under {max(scales) * native} px")
            continue
        for _ in range(count_per_photo):
            box = random_region(*image.size, rng, min_side=max(scales) * native)
            natives.append(region_image(image, box, native))
            for s in scales:
                targets[s].append(region_image(image, box, native * s))
            where.append({"photo": photo.name, "box": list(box)})
    return natives, targets, where


def vae_report(vae, name: str, photos, native: int, seed: int) -> dict:
    """The VAE alone at native size on held-out crops at EVERY scale (regions from native px to the whole short
    side, unlike the ≥8× regions above), and its fit record when it is an offline VAE."""
    from infgen.vae import OFFLINE_VAES, materialise_offline_vae

    rng = random.Random(seed)
    images = []
    for photo in photos:
        image = open_rgb(photo.path)
        images += [region_at(image, random_region(*image.size, rng, min_side=native), native) for _ in range(4)]
    x = torch.stack(images)
    recon = torch.cat([vae.decode(vae.encode(x[i:i + 16])) for i in range(0, len(x), 16)])
    report = {"any_scale_crops": len(x), "any_scale_psnr": psnr(recon, x).mean().item(),
              "any_scale_ssim": ssim(recon, x).mean().item()}
    if name in OFFLINE_VAES:
        fit = materialise_offline_vae(name) / "fit.json"
        report["fit"] = json.loads(fit.read_text()) if fit.is_file() else None
    return report


def release_freed_memory() -> None:
    """Hand the heap's freed memory back to the system (glibc's malloc_trim; elsewhere a no-op). The training
    crops are ~11 GB of 4 MB Pillow images, which glibc keeps in its heap once freed, where the evaluation's
    large tensors (each its own mmap) cannot reuse them: without this a full run was OOM-killed at 8× on 24 GB."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def to_uint8(images: list) -> torch.Tensor:
    """Pillow RGB images of one size → (N, 3, H, W) uint8."""
    return torch.stack([torch.from_numpy(np.array(image)).permute(2, 0, 1) for image in images])


def to_float(image: torch.Tensor) -> torch.Tensor:
    return image.float() / 127.5 - 1


def encode(vae, images: list, g: int = 0, batch: int = 32) -> torch.Tensor:
    """Latents (N, C, n/8, n/8) of Pillow images (n×n) under flip/rotation g (`dihedral`), `batch` at a time."""
    return torch.cat([vae.encode(dihedral(torch.stack([to_tensor(image) for image in images[i:i + batch]]), g))
                      for i in range(0, len(images), batch)])


def train(model: InfGen, latents: torch.Tensor, targets: list, args, log_every: int = 100) -> dict:
    """`args.steps` steps on output windows; the output side is drawn from native..train_scale×native.

    targets: the training crops at train_scale×native (Pillow images), resized to each step's size.
    latents: (N, C, h, w), or (8, N, C, h, w) with the latents of each crop's 8 flips/rotations (`dihedral`):
    each sample then takes a random one, and its target the same transform (the VAE encodes the transformed
    crop, so latent and target stay a true pair)."""
    native, s = args.native, model.config.scale
    loss = InfGenLoss(LossConfig(l2_weight=1.0, lpips_weight=0.0, adv_weight=0.0))
    optim = OptimConfig(lr=args.lr, warmup_steps=min(200, args.steps // 10), total_steps=args.steps,
                        min_lr_ratio=0.02, ema_decay=args.ema, weight_decay=0.0)
    trainer = InfGenTrainer(model, loss, optim)
    rng = random.Random(args.seed)
    start, history = time.time(), []
    augmented = latents.ndim == 5
    for step in range(args.steps):
        idx = rng.sample(range(len(targets)), args.batch_size)
        side = rng.randint(native // s, args.train_scale * native // s) * s
        window = min(side, args.window)
        top, left = (rng.randint(0, (side - window) // s) * s for _ in range(2))
        transforms = [rng.randrange(8) for _ in idx] if augmented else [0] * len(idx)
        batch = latents[transforms, idx] if augmented else latents[idx]
        # the window of the crop resized to this step's size: the true image at this scale, as the full decode
        # would be compared with, resized only under the window (as the training stage's targets are); the
        # window is cut from the untransformed crop and then flipped/rotated (a whole 1024² transpose per
        # sample was 9% of a step; Pillow resamples rows then columns, so a turned window rounds otherwise:
        # at most 2/255, mean 0.04/255 on a photo)
        region = (top, left, window, window)
        windows = torch.stack([dihedral(target_window(targets[i], (side, side), dihedral_region(region, side, g)), g)
                               for i, g in zip(idx, transforms)])
        log = trainer.train_step(batch, windows, size=(side, side), region=region, halo=args.halo)
        history.append(log["l1"])
        if (step + 1) % log_every == 0:
            print(f"  step {step + 1}/{args.steps}  l1 {np.mean(history[-log_every:]):.4f}  "
                  f"{(time.time() - start) / (step + 1):.2f} s/step", flush=True)
    return {"seconds": time.time() - start, "final_l1": float(np.mean(history[-log_every:])),
            "ema": trainer.ema}


@torch.no_grad()
def decode_all(name: str, decoders: Decoders, latents: torch.Tensor, natives: torch.Tensor,
               size: tuple[int, int]) -> torch.Tensor | None:
    """Every held-out crop decoded by `name` at `size` (the evaluation's own decoders, one crop at a time:
    48 outputs of 1024² at once would not fit), or None where the decoder does not apply (iterative within
    one 2× step is the same computation as one pass; bicubic from the truth at 1× is the truth)."""
    if name == "true_bicubic":
        return None if size == tuple(natives.shape[-2:]) else resize(natives, size, "bicubic")
    if not decoders.applies(name, tuple(latents.shape[2:]), size):
        return None
    return torch.cat([decoders.decode(name, latents, [i], size)[0] for i in range(len(latents))])


def metrics(images: torch.Tensor, truth: torch.Tensor, lpips_model, chunk_pixels: int = 8 * 1024 ** 2) -> dict:
    """Means over images, computed a few images (`chunk_pixels` pixels) at a time: SSIM's filtered maps of 48
    images at 1024² take more than 20 GB at once (8 images of 1024² or 2 of 2048² per chunk)."""
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as ms_ssim

    chunk = max(1, chunk_pixels // (images.shape[-2] * images.shape[-1]))
    rows = {"psnr": [], "ssim": [], "ms_ssim": [], "lpips": []}
    for i in range(0, len(images), chunk):
        x, y = images[i:i + chunk].float(), truth[i:i + chunk].float()
        rows["psnr"].append(psnr(x, y))
        rows["ssim"].append(ssim(x, y))
        if min(x.shape[-2:]) >= 256:  # 5 scales of an 11-px window need more than 160 px
            rows["ms_ssim"].append(ms_ssim(x, y, data_range=2.0, reduction="none"))
        if lpips_model is not None:
            with torch.no_grad():
                rows["lpips"].append(lpips_model(x, y).flatten())
    return {k: torch.cat(v).mean().item() if v else None for k, v in rows.items()}


def figure(path: Path, rows: list[list[torch.Tensor]], labels: list[str], credits: list[str]) -> None:
    from PIL import ImageDraw

    from infgen.visualize import image_grid

    grid = image_grid(rows, labels, cell=rows[0][0].shape[-1])
    canvas = grid.crop((0, 0, grid.width, grid.height + 14 * len(credits) + 4))
    canvas.paste((255, 255, 255), (0, grid.height, grid.width, canvas.height))
    draw = ImageDraw.Draw(canvas)
    for i, credit in enumerate(credits):
        draw.text((4, grid.height + 2 + 14 * i), credit, fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, **({"quality": 92, "subsampling": 0} if path.suffix.lower() in (".jpg", ".jpeg") else {}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", default="photo", help="the VAE whose latent space is decoded (default: photo)")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--model", nargs="*", default=[], help="config overrides KEY=VALUE (ints/floats/bools)")
    parser.add_argument("--native", type=int, default=256, help="native crop side (latent = native/8)")
    parser.add_argument("--train-crops", type=int, default=75, help="training crops per training photo")
    parser.add_argument("--holdout-crops", type=int, default=4, help="held-out crops per held-out photo")
    parser.add_argument("--train-scale", type=int, default=4, help="largest training output, × native")
    parser.add_argument("--scales", default="1,2,4,8", help="evaluated output scales, × native")
    parser.add_argument("--steps", type=int, default=4800)
    parser.add_argument("--augment", type=int, default=1, help="1: train on a random flip/rotation of each crop "
                        "(8 per crop, each encoded by the VAE); 0: the crops as cut")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--window", type=int, default=64, help="training window side, px")
    parser.add_argument("--halo", type=int, default=2, help="mask tokens decoded around the window")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/quality.json")
    parser.add_argument("--figure", type=Path, default=None, help="side-by-side image of held-out crops at 4× "
                        "(.jpg: JPEG quality 92, a fifth of the PNG's size at 1024-px cells; .png)")
    parser.add_argument("--save-model", type=Path, default=None, help="write the trained EMA model and its "
                        "training record (training.json) here")
    parser.add_argument("--load-model", type=Path, default=None, help="evaluate a model saved by --save-model "
                        "instead of training one (its training.json goes into the report)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.time()

    vae = load_vae(args.vae)
    train_photos, holdout_photos = load_photos("train"), load_photos("holdout")
    print(f"VAE {args.vae}; {len(train_photos)} training and {len(holdout_photos)} held-out files", flush=True)
    if not args.load_model:
        natives_tr, targets_tr, _ = crops(train_photos, args.train_crops, args.native, (args.train_scale,), args.seed)
        latents_tr = (torch.stack([encode(vae, natives_tr, g) for g in range(8)]) if args.augment
                      else encode(vae, natives_tr))
    scales = tuple(int(v) for v in args.scales.split(","))
    natives, targets, where = crops(holdout_photos, args.holdout_crops, args.native, SCALES, args.seed + 1)
    latents = encode(vae, natives)
    natives = torch.stack([to_tensor(image) for image in natives])
    targets = {scale: to_uint8(images) for scale, images in targets.items()}
    vae_facts = vae_report(vae, args.vae, holdout_photos, args.native, args.seed + 2)
    print(f"VAE at native size on held-out crops of any scale: PSNR {vae_facts['any_scale_psnr']:.2f} dB, "
          f"SSIM {vae_facts['any_scale_ssim']:.3f}", flush=True)
    data_seconds = time.time() - t0
    print(f"{len(latents)} held-out crops ({data_seconds:.0f} s)", flush=True)

    overrides = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.model)}
    model = InfGen.from_preset(args.preset, scaling_factor=vae.scaling_factor, **overrides)
    training = {"steps": args.steps, "batch_size": args.batch_size, "window": args.window, "halo": args.halo,
                "train_scales": [1, args.train_scale], "augment": "8 flips/rotations" if args.augment else None,
                "lr": args.lr, "ema": args.ema, "loss": "L1 + L2",
                "bf16_autocast": autocast_bf16(torch.device("cpu"), True)}
    if args.load_model:
        ema = InfGen.from_pretrained(args.load_model).eval()
        training = json.loads((args.load_model / "training.json").read_text())
        print(f"evaluating {args.load_model} (trained: {training})", flush=True)
    else:
        print(f"infgen {args.preset} {overrides or ''}: {model.num_params() / 1e6:.2f}M parameters; "
              f"{args.steps} steps, batch {args.batch_size}, {args.window}-px windows", flush=True)
        trained = train(model, latents_tr, targets_tr[args.train_scale], args)
        ema = trained.pop("ema").eval()
        training.update(seconds=round(trained["seconds"], 1), final_l1=trained["final_l1"],
                        train_crops=len(targets_tr[args.train_scale]))
        if args.save_model:
            ema.save_pretrained(args.save_model)
            (args.save_model / "training.json").write_text(json.dumps(training, indent=2))
        del natives_tr, targets_tr, latents_tr  # GBs at native 256: the 8× metrics need the room
        release_freed_memory()

    try:
        lpips_model, lpips_note = load_lpips(), "AlexNet LPIPS (pretrained backbone)"
    except LPIPSUnavailable as e:
        lpips_model, lpips_note = None, f"not reported: {e}"
    decoders = Decoders(EVAL_DECODERS, ema, vae, tile=512, tile_above=1024)
    results, decoded_4x = {}, {}
    eval_start = time.time()
    for scale in scales:
        truth = to_float(targets[scale])
        results[f"{scale}x"] = {}
        for name in DECODERS:
            t = time.time()
            images = decode_all(name, decoders, latents, natives, (args.native * scale, args.native * scale))
            if images is None:
                continue
            row = metrics(images, truth, lpips_model)
            row["seconds_per_image"] = (time.time() - t) / len(images)
            results[f"{scale}x"][name] = row
            if scale == 4 and name in FIGURE:
                decoded_4x[name] = images
            print(f"  {scale}x {name:<17} PSNR {row['psnr']:6.2f}  SSIM {row['ssim']:.4f}  "
                  f"MS-SSIM {row['ms_ssim'] if row['ms_ssim'] is None else round(row['ms_ssim'], 4)}", flush=True)
    margins = {k: {"psnr_vs_vae_bicubic_db": round(v["infgen"]["psnr"] - v["vae_bicubic"]["psnr"], 3),
                   "ssim_vs_vae_bicubic": round(v["infgen"]["ssim"] - v["vae_bicubic"]["ssim"], 4)}
               for k, v in results.items()}
    report = {
        "what": "held-out reconstruction at 1x-8x of a fixed native size: infgen vs VAE decode + upscaling",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": describe_machine(),
        "vae": {"name": args.vae, "scaling_factor": vae.scaling_factor, "param_count": sum(p.numel() for p in vae.parameters()),
                "native_psnr": results["1x"]["vae_bicubic"]["psnr"], "native_ssim": results["1x"]["vae_bicubic"]["ssim"],
                **vae_facts},
        "data": {"native": args.native, "latent": [4, args.native // 8, args.native // 8], "scales": list(scales),
                 "region": "square, side log-uniform in [8·native, short side], seeded",
                 "train_photos": [p.name for p in train_photos], "holdout_photos": [p.name for p in holdout_photos],
                 "train_crops": training.get("train_crops"), "holdout_crops": len(latents), "holdout_regions": where,
                 "photo_source": sorted({p.source for p in train_photos + holdout_photos})},
        "model": {"preset": args.preset, "overrides": overrides, "params": ema.num_params(),
                  "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(ema.config).items()}},
        "training": training,
        "lpips": lpips_note,
        "results": results,
        "infgen_margin": margins,
        "seconds": {"data": round(data_seconds, 1), "train": training.get("seconds"),
                    "evaluate": round(time.time() - eval_start, 1), "total": round(time.time() - t0, 1)},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(margins, indent=2))
    print(f"wrote {args.out} ({report['seconds']['total'] / 60:.1f} min)")
    if args.figure and "infgen" in decoded_4x:
        pick = range(0, len(latents), max(1, len(latents) // 4))[:4]
        rows = [[to_float(targets[4][i])] + [decoded_4x[name][i] for name in FIGURE] for i in pick]
        credits = [f"held-out crops at 4x ({args.native}px latent input -> {4 * args.native}px); photos: "]
        credits += [next(p.credit() for p in holdout_photos if p.name == where[i]["photo"]) for i in pick]
        figure(args.figure, rows, ["truth", *FIGURE.values()], credits)
        print(f"wrote {args.figure}")


if __name__ == "__main__":
    main()
