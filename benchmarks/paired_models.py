"""Paired comparison of trained infgen models on every held-out crop of an encode stage's output (issue 10).

The demo's evaluation scores 12 crops per resolution, and its PSNR margin over VAE decode + bicubic moves by
about ±0.4 dB with the crops drawn: too coarse to tell two training recipes apart. This scores each model on
the same crops, every held-out crop of the shards whose ground truth reaches the resolution, and reports:

- per model, the mean PSNR (dB) and the mean per-crop margin over VAE decode + bicubic;
- against the first model, the mean per-crop PSNR difference;
each with its standard error over the crops (std / sqrt(n); paired, so the crops' own spread cancels). Two
training runs of one recipe differ too (seed, data order): compare recipes over more than one seed.

Decoding and ground truth are the evaluation's (infgen.evaluation.Decoders, one pass; the crop resized to long
side R at its own aspect, crops under R left out as with upsample_truth: false). The held-out rows are those the
first model's holdout.json lists (every model must list the same URLs); the VAE is the one the shards record.

    python benchmarks/paired_models.py --shards outputs/demo/encode/<fingerprint> --resolutions 512 1024 \\
        --models outputs/demo/train/train-small outputs/other/train/train-small --out /tmp/paired.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pyarrow.fs as pafs
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from infgen.evaluation import Decoders  # noqa: E402
from infgen.images import output_size, resize, to_tensor  # noqa: E402
from infgen.machine import describe_machine  # noqa: E402
from infgen.metrics import psnr  # noqa: E402
from infgen.vae import load_vae  # noqa: E402
from pipelines import shards  # noqa: E402
from pipelines.common import resolve_files  # noqa: E402
from pipelines.evaluate.model import holdout_record, load_model  # noqa: E402


def held_out_rows(fs: pafs.FileSystem, paths: list[str],
                  models: list[str]) -> tuple[list[str], np.ndarray, list[bytes]]:
    """(keys, latents (N, C, h, w) float32, encoded crops) of the rows of the shards at `paths` that the models'
    recorded split holds out. Raises ValueError when a model records no split, when the models hold out different
    rows, or when the split holds out none of these."""
    records = [holdout_record(m) for m in models]
    for model, record in zip(models, records):
        if record is None:
            raise ValueError(f"{model}: no holdout record (pipelines.holdout.RECORD): its held-out rows are unknown")
    first = records[0].holdout
    for model, record in zip(models[1:], records[1:]):
        h = record.holdout  # the list file's path may differ, not what it lists
        if (h.fraction, h.seed, h.listed) != (first.fraction, first.seed, first.listed):
            raise ValueError(f"{model}: holds out other rows than {models[0]}: not comparable crop by crop")
    keys = first.keys_in(shards.key_urls(fs, paths))
    if not keys:
        raise ValueError(f"no row of {len(paths)} shards is held out by the split {models[0]} records")
    table = shards.read_rows(fs, paths, ["key", "latent", "hr"], keys=keys)
    return table.column("key").to_pylist(), shards.latents(table), table.column("hr").to_pylist()


def mean_se(values: np.ndarray) -> dict:
    """{"mean", "se"} of per-crop values (standard error of the mean, ddof=1), rounded to 0.001 dB."""
    return {"mean": round(float(values.mean()), 3), "se": round(float(values.std(ddof=1) / len(values) ** 0.5), 3)}


def plus_minus(value: dict) -> str:
    return f"{value['mean']:+.3f} ± {value['se']:.3f} dB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", required=True, help="an encode stage's output (directory, glob or URI)")
    ap.add_argument("--models", type=Path, nargs="+", required=True,
                    help="training run directories (their exported model/), or what jobs.evaluate's `model` takes; "
                         "the first is the base")
    ap.add_argument("--resolutions", type=int, nargs="+", default=[1024], help="long sides in pixels")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    start = time.time()
    torch.set_grad_enabled(False)
    models = [str(m / "model" if (m / "model").is_dir() else m) for m in args.models]
    fs, paths = resolve_files(args.shards, key="--shards")
    keys, latents, hr = held_out_rows(fs, paths, models)
    space = shards.recorded_latent_space(fs, paths)
    if space is None:
        raise SystemExit(f"--shards {args.shards}: not one encode stage's output with its latent space recorded")
    vae = load_vae(space["vae"])
    baseline = Decoders(["vae_bicubic"], None, vae, None, 0)
    decoders = [Decoders(["infgen"], load_model(m).eval(), vae, None, 0) for m in models]
    results = {}
    for res in args.resolutions:
        rows = []  # per crop: VAE + bicubic, then each model (PSNR dB)
        for i, data in enumerate(hr):
            truth = to_tensor(shards.hr_image(data))  # one at a time: 2048-px crops take 50 MB each as float
            if max(truth.shape[1:]) < res:
                continue
            size = output_size(truth.shape[2] / truth.shape[1], res)
            target = resize(truth[None], size)
            latent = torch.from_numpy(latents[i:i + 1])
            row = [float(psnr(baseline.decode("vae_bicubic", latent, [0], size)[0], target)[0])]
            row += [float(psnr(d.decode("infgen", latent, [0], size)[0], target)[0]) for d in decoders]
            rows.append(row)
        r = np.array(rows)
        results[str(res)] = {
            "crops": len(r), "vae_bicubic_psnr_db": round(float(r[:, 0].mean()), 3),
            "models": [{"model": str(m), "psnr_db": round(float(r[:, j + 1].mean()), 3),
                        "margin_over_vae_bicubic_db": mean_se(r[:, j + 1] - r[:, 0]),
                        **({"minus_first_model_db": mean_se(r[:, j + 1] - r[:, 1])} if j else {})}
                       for j, m in enumerate(args.models)]}
        print(f"{res} px: {len(r)} held-out crops, VAE + bicubic {r[:, 0].mean():.2f} dB")
        for m in results[str(res)]["models"]:
            print(f"  {m['model']}: {m['psnr_db']:.2f} dB, margin {plus_minus(m['margin_over_vae_bicubic_db'])}"
                  + (f", minus the first {plus_minus(m['minus_first_model_db'])}" if len(m) > 3 else ""))
    out = {"what": "paired PSNR of trained infgen models on every held-out crop (benchmarks/paired_models.py)",
           "date": datetime.date.today().isoformat(), "machine": describe_machine(), "shards": str(args.shards),
           "held_out_rows": len(keys), "vae": space["vae"], "seconds": round(time.time() - start),
           "resolutions": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
