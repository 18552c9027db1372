"""Images/s of the encode stage (Ray Data, actor pool) against a bare loop doing the same work in one process.

Both sides process the same webdataset shards with the same functions (`prepare_batch`: PIL decode, keyed random
crop, resize to input_size², the high-resolution crop as PNG; `EncodeUDF`: the tiny VAE's encoder; `ShardWriter`:
parquet; `read_tar_samples`: the .tar streamed), the same batch size and config; the bare loop runs everything in
this process, one batch after another, with torch's default threads; the stage's actors decode in threads beside
the VAE and write their shards. So the ratio is what Ray costs or gains. Runs are interleaved
(bare, stage, bare, stage, ...) and each side's best time counts, because the machine may be shared; the load
average before each run is recorded. Then the stage runs as its own driver process on 100 and 1,000 images: its
peak RSS must stay flat, as only the plan and the per-shard counts reach the driver. See README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow.fs as pafs  # noqa: E402

from infgen.machine import describe_machine  # noqa: E402
from infgen.vae import materialise_offline_vae  # noqa: E402
from pipelines.encode import (EncodeConfig, EncodeUDF, prepare_batch, read_tar_samples, run_encode,  # noqa: E402
                              sample_batches)
from pipelines.config import dataclass_from  # noqa: E402
from pipelines.shards import ShardWriter  # noqa: E402
from pipelines.sample_data import LARGE_PHOTOS, write_photos  # noqa: E402


def make_shards(directory: Path, images: int, per_shard: int) -> list[Path]:
    """`images` samples (the large photos, replicated under distinct keys, so distinct crops) in .tar shards."""
    import webdataset as wds

    photos = write_photos(directory / "photos")
    names = [f"{n}.jpg" for n in LARGE_PHOTOS]
    assert all(n in photos for n in names)
    data = {n: (directory / "photos" / n).read_bytes() for n in names}
    (directory / "shards").mkdir()
    paths = []
    for s in range(0, images, per_shard):
        path = directory / "shards" / f"{s // per_shard:05d}.tar"
        with wds.TarWriter(str(path)) as tar:
            for i in range(s, min(s + per_shard, images)):
                name = names[i % len(names)]
                tar.write({"__key__": f"{i:09d}", "jpg": data[name], "txt": name,
                           "json": json.dumps({"url": f"http://x/{name}"})})
        paths.append(path)
    return paths


def bare_loop(cfg: EncodeConfig, shards: list[Path], out: Path) -> int:
    """The same work in one process, no Ray, no threads: returns the number of images read."""
    import torch

    udf = EncodeUDF(str(materialise_offline_vae("tiny")), None, cfg.input_size, 0, cfg.precision,
                    threads=torch.get_num_threads())
    shape = (4, cfg.input_size // 8, cfg.input_size // 8)
    fs, total = pafs.LocalFileSystem(), 0
    out.mkdir(parents=True)
    for shard in shards:
        writer = ShardWriter(fs, str(out / f"{shard.stem}.parquet"), shape)
        for batch in sample_batches(read_tar_samples(fs, str(shard)), cfg.batch_size):
            writer.add(udf(prepare_batch(batch, cfg)))  # the same functions the stage's actors run
        total += writer.commit()["images_in"]
    return total


DRIVER = """
import json, os, sys
sys.path.insert(0, os.getcwd())
from pipelines.encode import run_encode
stats = run_encode(json.loads(sys.argv[1])).stats
print(json.dumps({"images_in": stats["images_in"], "writer_processes": stats["last_run"]["writer_processes"],
                  # VmHWM: this process's own peak (ru_maxrss would carry the parent's across fork + exec)
                  "peak_rss_mib": int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1024}))
"""


def driver_rss(base: dict, work: Path, sizes: list[int], per_shard: int, address: str) -> dict:
    """The stage run as its own driver process (joining this Ray) on `sizes` images: the driver's peak RSS, which
    must not grow with the data (only the plan and per-shard counts reach it)."""
    import subprocess

    out = {}
    for n in sizes:
        shards = make_shards(work / f"rss{n}", n, per_shard)
        cfg = {**base, "input": str(shards[0].parent), "output": str(work / f"rss{n}_out"), "input_size": 256,
               "min_side": 256, "hr_max_side": 1024, "hr_format": "jpeg"}
        done = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(cfg)], capture_output=True, text=True,
                              env={**os.environ, "RAY_ADDRESS": address}, cwd=Path(__file__).resolve().parents[1])
        if done.returncode:
            raise RuntimeError(done.stderr[-3000:])
        out[str(n)] = {**json.loads(done.stdout.strip().splitlines()[-1]), "shards": len(shards)}
        print(f"driver on {n} images: {out[str(n)]}")
    return out


def objects(values: list) -> np.ndarray:
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


def timed(fn) -> dict:
    load = os.getloadavg()
    start = time.perf_counter()
    images = fn()
    return {"seconds": round(time.perf_counter() - start, 3), "images": images,
            "loadavg_before": [round(x, 2) for x in load], "loadavg_after": [round(x, 2) for x in os.getloadavg()]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--per-shard", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs per side; the best counts")
    parser.add_argument("--num-actors", type=int, default=2)
    parser.add_argument("--cpus-per-actor", type=float, default=1.0)
    parser.add_argument("--torch-threads", default="1", help="per actor; a comma list runs one stage variant each")
    parser.add_argument("--rss-images", default="100,1000", help="driver peak RSS runs (images each; '' for none)")
    parser.add_argument("--out", default="benchmarks/results/encode_speed.json")
    args = parser.parse_args()

    import ray

    materialise_offline_vae("tiny")  # fitted once, never timed
    work = Path(tempfile.mkdtemp(prefix="encode_speed_"))
    shards = make_shards(work, args.images, args.per_shard)
    base = dict(input=str(work / "shards"), vae="tiny", input_size=512, min_side=512, hr_max_side=2048,
                hr_format="png", batch_size=args.batch_size, num_actors=args.num_actors,
                cpus_per_actor=args.cpus_per_actor, grid_samples=0, mlflow={"enabled": False})
    cfg = dataclass_from(EncodeConfig, {**base, "output": str(work / "unused")})
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=False)  # a cluster exists already

    def stage(threads: int, out: Path):
        return lambda: run_encode({**base, "torch_threads": threads, "output": str(out)}).stats["images_in"]

    variants = {f"stage_threads{t}": int(t) for t in args.torch_threads.split(",")}
    runs: dict[str, list[dict]] = {"bare": [], **{v: [] for v in variants}}
    for r in range(args.repeats):
        runs["bare"].append(timed(lambda: bare_loop(cfg, shards, work / f"bare{r}")))
        for name, threads in variants.items():
            runs[name].append(timed(stage(threads, work / f"{name}_{r}")))
        for name in runs:
            print(f"{name:>16} run {r}: {runs[name][-1]['images']} images in {runs[name][-1]['seconds']:.1f} s")

    sizes = [int(n) for n in args.rss_images.split(",") if n]
    rss = driver_rss(base, work, sizes, 50, ray.get_runtime_context().gcs_address) if sizes else {}
    rss_ratio = (rss[str(sizes[-1])]["peak_rss_mib"] / rss[str(sizes[0])]["peak_rss_mib"]) if len(sizes) > 1 else None

    rate = {name: max(x["images"] / x["seconds"] for x in runs[name]) for name in runs}  # best run per side
    ratios = {name: rate[name] / rate["bare"] for name in variants}
    best = max(ratios, key=ratios.get)
    result = {
        "environment": {"date": datetime.datetime.now().isoformat(timespec="seconds"), **describe_machine(),
                        "ray": ray.__version__},  # torch_threads: the bare loop's
        "setup": {"images": args.images, "shards": len(shards), "batch_size": args.batch_size, "input_size": 512,
                  "vae": "tiny (CPU, float32)", "hr_format": "png", "num_actors": args.num_actors,
                  "cpus_per_actor": args.cpus_per_actor, "repeats": args.repeats,
                  "stage_timing": "run_encode end to end: actor start-up included; ray.init, MLflow, grid not"},
        "runs": runs,
        "images_per_s": {name: round(v, 3) for name, v in rate.items()},
        "ratio_stage_over_bare": {name: round(v, 3) for name, v in ratios.items()},
        "headline": {"variant": best, "value": round(ratios[best], 3), "target": 0.9,
                     "meets_target": ratios[best] >= 0.9},
        "driver_peak_rss": {"runs": rss, "ratio_largest_over_smallest": rss_ratio and round(rss_ratio, 3),
                            "target": "within ±10%", "setup": "input 256, JPEG targets ≤ 1024, 50 images per shard"},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["images_per_s"]), json.dumps(result["ratio_stage_over_bare"]), "→", args.out)
    ray.shutdown()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
