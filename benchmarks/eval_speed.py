"""Evaluation throughput of the Ray job (pipelines.evaluate.run_evaluate, an actor pool) against a bare
single-process loop doing the same work on the same data, in one run (see README.md).

Both sides use the same plan (pipelines.evaluate.plan: units of encoded rows), the same decoders, feature extractor
and patch protocol, and the same per-unit code (read_encoded_unit → EvalAccumulator.add_chunk); the bare loop runs
it in this process with all the torch threads (`--actors × --threads`), the Ray job on `--actors` actors with
`--threads` each, then merges the actors' statistics; both compute the same distances (FID, FIDp, sFIDp, KID,
precision/recall). The Ray job also writes the table, plots, crop grids and the MLflow run. The Ray figure is the wall time of run_evaluate from the
call to the table (actor start-up and model loading included); the bare figure includes loading too.
Driver memory: the RSS growth of this process during run_evaluate (the statistics merge is one D×D matrix at a
time; the patches never reach the driver).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                         os.environ.get("PYTHONPATH")]))

import psutil  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from benchmarks.train_speed import loadavg, make_shards  # noqa: E402
from infgen.machine import describe_machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def config(args: argparse.Namespace, model: Path, data: Path, output: Path) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/eval/local.yaml"), resolve=True)
    cfg.update(model=str(model), data=str(data), output=str(output), resolutions=args.resolutions,
               decoders=args.decoders, lpips=False, limit=None)
    cfg["patches"].update(size=args.patch, shift=args.patch // 2)
    cfg["workers"].update(num_actors=args.actors, cpus_per_actor=1, torch_threads=args.threads,
                          chunk_rows=args.chunk_rows)
    cfg["mlflow"]["tracking_uri"] = f"sqlite:///{output}/mlflow.db"
    cfg["ray"]["num_cpus"] = args.actors
    return cfg


def bare(cfg: dict) -> float:
    """The same units, one process, no Ray."""
    from infgen.evaluation import FEATURES, REFERENCE, Decoders, EvalAccumulator
    from infgen.distribution_metrics import RandomConvFeatures
    from infgen.vae import load_vae
    from pipelines.config import dataclass_from
    from pipelines.evaluate import EvalConfig, distances, load_model, plan, read_encoded_unit

    start = time.perf_counter()
    ecfg = dataclass_from(EvalConfig, cfg)
    model = load_model(ecfg.model).eval()
    decoders = Decoders(ecfg.decoders, model, load_vae(ecfg.vae), ecfg.tile, ecfg.tile_above)
    acc = EvalAccumulator(RandomConvFeatures(), ecfg.patches, ecfg.resolutions, ecfg.pr_samples,
                          None, ecfg.feature_batch, ecfg.workers.max_batch_pixels)
    for unit in plan(ecfg).units:
        for chunk in read_encoded_unit(unit):
            acc.add_chunk(chunk, decoders)
    for res in ecfg.resolutions:  # the same distances the Ray job computes (sFID's 2023² sqrtm dominates)
        real = {f: acc.stats[(REFERENCE, res, f)] for f in FEATURES}
        for decoder in ecfg.decoders:
            distances(ecfg, {f: acc.stats[(decoder, res, f)] for f in FEATURES}, real,
                      acc.samples[(decoder, res)], acc.samples[(REFERENCE, res)])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--decoders", nargs="+", default=["infgen", "vae_bicubic"])
    parser.add_argument("--patch", type=int, default=128)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--chunk-rows", type=int, default=4)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/eval_speed.json"))
    args = parser.parse_args()

    from infgen.models import InfGen
    from infgen.vae import load_vae
    from pipelines.common import init_ray
    from pipelines.evaluate import run_evaluate

    work = Path(tempfile.mkdtemp(prefix="eval_speed_"))
    data = make_shards(work / "data", args.rows, shards=4, input_size=256, hr_size=512, seed=0)
    model = work / "model"
    InfGen.from_preset("tiny", scaling_factor=load_vae("tiny").scaling_factor).save_pretrained(model)

    torch.set_num_threads(args.actors * args.threads)
    bare_s = bare(config(args, model, work / "data", work / "bare"))
    init_ray(None, args.actors)
    rss_before = psutil.Process().memory_info().rss
    start = time.perf_counter()
    result = run_evaluate(config(args, model, work / "data", work / "ray"))
    ray_s = time.perf_counter() - start
    rss_growth = psutil.Process().memory_info().rss - rss_before
    patches = sum(r["patches"] + r["reference_patches"] for r in result.stats["rows"])
    out = {
        "benchmark": "eval_speed", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {**describe_machine(), "loadavg_after": loadavg()},
        "params": vars(args), "data": data,
        "bare_s": round(bare_s, 2), "ray_s": round(ray_s, 2),
        "throughput_ratio_ray_over_bare": round(bare_s / ray_s, 3),
        "images_per_s": {"bare": round(args.rows / bare_s, 3), "ray": round(args.rows / ray_s, 3)},
        "patches_featurised": patches, "driver_rss_growth_mib": round(rss_growth / 2 ** 20, 1),
    }
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
