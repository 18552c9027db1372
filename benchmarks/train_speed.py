"""Samples/s of the Ray Train loop (pipelines.train.run_train) against a bare single-process torch loop doing the
same steps on the same data, with 1 and 2 Ray Train workers, in one run (see README.md).

The bare loop builds the model, loss and trainer from the same config sections the Ray loop uses (`build_model`,
`LossConfig`/`OptimConfig` from conf/train/local.yaml), reads the same parquet shards with pyarrow (minus the same
held-out sample rows), decodes and resizes the PNG targets with the same `decode_targets` to the same per-step size
(`TrainLoopConfig.geometry`) and runs `InfGenTrainer.train_step` with the same global batch and torch threads. It
warms up for `log_every` steps and times the rest, i.e. exactly the step indices of the Ray runs' steady-state log
windows, so both sides time the same target sizes and the same discriminator on/off mix.

The Ray side's figure is the loop's own `samples_per_s`, logged to MLflow once per log window by rank 0 and read
back with MlflowClient; the first window (worker start-up, first epoch's read, warm-up) is skipped and the others
are combined as total samples / total window time. The wall time of run_train (fit() and its set-up) is recorded
for reference.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local cluster: no token file in ~/.ray
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tiny VAE and random LPIPS backbone: never touch the hub
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")  # run_train would set 0.5
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# Ray's workers (started by ray.init below, with this environment) import pipelines.train from the checkout
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                         os.environ.get("PYTHONPATH")]))

import numpy as np  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from infgen.machine import describe_machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "conf/train/local.yaml"
NEVER = 10 ** 9  # checkpoint_every / sample_every: only the final step checkpoints and samples


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ---- data ---------------------------------------------------------------------------------------------------


def make_shards(directory: Path, rows: int, shards: int, input_size: int, hr_size: int, seed: int) -> dict:
    """`rows` rows in the encode stage's layout (pipelines.sample_data.write_encoded_shards) from the shipped
    photos; reused when a previous run wrote the same."""
    from infgen.data import photo_pairs
    from infgen.images import shipped_photos
    from infgen.vae import load_vae
    from pipelines.sample_data import write_encoded_shards

    params = {"rows": rows, "shards": shards, "input_size": input_size, "hr_size": hr_size, "seed": seed, "layout": 2}
    stamp = directory / "_params.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == params:
        return {**params, "reused": True, "seconds": 0.0}
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    start = time.perf_counter()
    photos = list(shipped_photos().values())
    latents, hr = photo_pairs(photos, load_vae("tiny"), crops_per_image=math.ceil(rows / len(photos)),
                              input_size=input_size, hr_size=hr_size, seed=seed)
    latents, hr = latents[:rows], hr[:rows]
    write_encoded_shards(directory, latents, hr, shards)
    stamp.write_text(json.dumps(params))
    return {**params, "reused": False, "seconds": round(time.perf_counter() - start, 2)}


# ---- the config both sides use --------------------------------------------------------------------------------


def base_config(args: argparse.Namespace, data: Path) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIG), resolve=True)
    cfg["data"] = str(data)
    cfg["train"].update(steps=args.steps, batch_size=args.batch_size, threads_per_worker=args.threads,
                        log_every=args.log_every, checkpoint_every=NEVER, sample_every=NEVER,
                        max_failures=0)
    if args.disc_start is not None:
        cfg["loss"]["disc_start"] = args.disc_start
    return cfg


# ---- (a) the bare loop ----------------------------------------------------------------------------------------


def bare_loop(cfg: dict, warmup: int, predecoded: bool = False) -> dict:
    """One process, no Ray: the same model/loss/trainer, data, target sizes, windows and steps. Times steps
    [warmup, steps): reading the parquet (every epoch), the PNG decode + resize and train_step; with `predecoded`,
    every step's batch and targets are made before the timer starts and only train_step is timed (what a step
    would cost if the data path were free)."""
    import torch

    from infgen.losses import InfGenLoss
    from infgen.training import InfGenTrainer
    from pipelines import shards
    from pipelines.common import resolve_files
    from pipelines.config import dataclass_from
    from pipelines.train import TrainConfig, build_model, decode_targets

    checked = dataclass_from(TrainConfig, cfg)  # as run_train checks it
    train = checked.train
    torch.set_num_threads(train.threads_per_worker)
    torch.manual_seed(train.seed)  # what rank 0 of the Ray loop seeds: the same initial weights
    trainer = InfGenTrainer(build_model(checked.preset, checked.model, checked.init_from),
                            InfGenLoss(checked.loss), checked.optim)
    fs, paths = resolve_files(checked.data, suffix=".parquet")
    held_out = shards.last_rows(fs, paths, checked.samples.count)[0]
    batch = train.batch_size // train.views  # rows per step

    def batches():
        epoch = 0
        while True:  # like the Ray loop: read the shards again every epoch, new order, drop the last partial batch
            table = shards.read_rows(fs, paths, ["latent", "hr"], exclude=held_out)
            latents = shards.latents(table)
            hr = np.asarray(table.column("hr").to_pylist(), dtype=object)
            order = np.random.default_rng(train.seed + epoch).permutation(len(latents))
            for i in range(0, len(order) - batch + 1, batch):
                index = order[i:i + batch]
                yield latents[index], hr[index]
            epoch += 1

    def step_data(step: int, lat, hr) -> tuple:
        views = [train.geometry(step, trainer.model.config.scale, view) for view in range(train.views)]
        return torch.from_numpy(np.asarray(lat, dtype=np.float32)), decode_targets(hr, None, views=views), views

    data = batches()
    ready = [step_data(step, *next(data)) for step in range(train.steps)] if predecoded else None
    losses = []
    start = time.perf_counter()
    for step in range(train.steps):
        if step == warmup:
            start = time.perf_counter()
        latents, targets, views = ready[step] if predecoded else step_data(step, *next(data))
        losses.append(trainer.train_step(latents, targets, views=views, halo=train.window_halo)["loss"])
    seconds = time.perf_counter() - start
    timed = train.steps - warmup
    return {"timed_steps": timed, "warmup_steps": warmup, "seconds": round(seconds, 3),
            "samples_per_s": round(timed * train.batch_size / seconds, 4), "first_loss": round(losses[0], 4),
            "last_loss": round(losses[-1], 4)}


# ---- (b) run_train --------------------------------------------------------------------------------------------


def ray_run(cfg: dict, workers: int, work: Path, tracking_uri: str) -> dict:
    """run_train with `workers` workers; samples/s from the MLflow log windows after the first."""
    from mlflow.tracking import MlflowClient

    from pipelines.train import run_train

    name = f"train_speed_{workers}w_{uuid.uuid4().hex[:6]}"  # fresh name + output: never a resume
    cfg = json.loads(json.dumps(cfg))
    cfg.update(name=name, output=str(work / "ray" / name))
    cfg["train"]["num_workers"] = workers
    cfg["mlflow"].update(tracking_uri=tracking_uri, experiment="train_speed", registered_model_name=None)
    start = time.perf_counter()
    result = run_train(cfg)
    wall = time.perf_counter() - start

    client = MlflowClient(tracking_uri)
    run_id = result.run_id
    if not run_id:
        experiment = client.get_experiment_by_name("train_speed")
        runs = client.search_runs([experiment.experiment_id], f"tags.`mlflow.runName` = '{name}'")
        run_id = runs[0].info.run_id
    history = sorted(client.get_metric_history(run_id, "samples_per_s"), key=lambda m: m.step)
    batch, windows, previous = cfg["train"]["batch_size"], [], 0
    for metric in history:
        steps = metric.step - previous
        windows.append({"steps": [previous + 1, metric.step], "samples_per_s": round(metric.value, 4),
                        "seconds": round(steps * batch / metric.value, 3)})
        previous = metric.step
    steady = windows[1:]
    seconds = sum(w["seconds"] for w in steady)
    samples = sum((w["steps"][1] - w["steps"][0] + 1) * batch for w in steady)
    losses = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
    return {"name": name, "run_id": run_id, "num_workers": workers,
            "samples_per_s": round(samples / seconds, 4) if seconds else None,
            "timed_steps": samples // batch, "seconds": round(seconds, 3), "windows": windows,
            "run_train_wall_s": round(wall, 2),
            "run_train_samples_per_s": round(cfg["train"]["steps"] * batch / wall, 4),
            "first_window_loss": round(losses[min(losses)], 4) if losses else None,
            "last_window_loss": round(losses[max(losses)], 4) if losses else None}


# ---- report ---------------------------------------------------------------------------------------------------


def best(runs: list[dict]) -> float | None:
    rates = [r["samples_per_s"] for r in runs if r.get("samples_per_s")]
    return max(rates) if rates else None


def derive(rate: dict[str, float | None], sizes: list[int]) -> list[dict]:
    def ratio(name, num, den, target, note):
        if not rate.get(num) or not rate.get(den):
            return None
        value = rate[num] / rate[den]
        return {"name": name, "value": round(value, 4), "target": f">= {target}" if target else None,
                "meets_target": value >= target if target else None, "note": note}

    if sizes:
        derived = [ratio(f"ray_1worker_{s} / bare_predecoded_{s} (samples/s)", f"ray_1worker_{s}",
                         f"bare_predecoded_{s}", round(1 / 1.05, 4),
                         f"{s}² targets: the step time with the real data path (Ray Data, decode and resize of the "
                         "targets ahead of the step) over the step time on tensors decoded beforehand; >= 1/1.05 "
                         "means at most 5% slower") for s in sizes]
        return [d for d in derived if d]
    derived = [
        ratio("ray_1worker / bare (samples/s)", "ray_1worker", "bare", 0.90,
              "Ray Train's overhead with one worker: Ray Data feeding, per-window report barrier, MLflow logging"),
        ratio("ray_2workers / ray_1worker (samples/s)", "ray_2workers", "ray_1worker", None,
              "context, no target: 2 data-parallel workers (gloo DDP) on a 2-core machine share the CPU with each "
              "other, Ray Data's tasks and the driver; 2.0 would be perfect scaling"),
        ratio("ray_2workers / bare (samples/s)", "ray_2workers", "bare", None,
              "context: the bare loop uses the same torch threads as ONE worker"),
    ]
    return [d for d in derived if d]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/train_speed.json")
    ap.add_argument("--steps", type=int, default=200, help="training steps per run (each side)")
    ap.add_argument("--batch-size", type=int, default=4, help="global batch (split over the Ray workers)")
    ap.add_argument("--log-every", type=int, default=10,
                    help="Ray log window = the bare loop's warm-up; lowered to steps//4 for short runs")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of the bare loop and of EACH Ray worker (default: the config's "
                         "threads_per_worker)")
    ap.add_argument("--disc-start", type=int, default=None, help="default: the config's loss.disc_start")
    ap.add_argument("--rows", type=int, default=128, help="training rows (the held-out sample rows come on top)")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="interleaved runs per side; each side's best counts")
    ap.add_argument("--target-sizes", default="", help="e.g. 512,1024: per square size, the Ray loop against the bare "
                    "loop on pre-decoded targets (the data path's cost); default: the config's size range, the bare "
                    "loop against Ray with 1 and 2 workers")
    ap.add_argument("--window", type=int, default=None, help="train.window (px): each step trains on a window")
    ap.add_argument("--workdir", help="data and run outputs here, kept (default: a temp dir, removed)")
    args = ap.parse_args()

    conf = OmegaConf.load(CONFIG)
    args.threads = args.threads or int(conf.train.threads_per_worker or 1)
    if args.steps < 3 * args.log_every:
        args.log_every = max(1, args.steps // 4)
        print(f"[train_speed] short run: log_every lowered to {args.log_every}", file=sys.stderr)
    if args.batch_size % 2:
        ap.error("--batch-size must be even (it is split over 2 workers)")
    if args.repeats < 1 or args.steps < 2:
        ap.error("--repeats must be >= 1 and --steps >= 2")

    import mlflow
    import ray

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(args.workdir).resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="train_speed_"))
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"environment": {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), **describe_machine(),
        "ray": ray.__version__,
        "mlflow": mlflow.__version__, "command": sys.argv, "loadavg_at_start": loadavg()}}

    count = int(conf.samples.count)
    sizes = [int(v) for v in args.target_sizes.split(",") if v]
    hr_size = max(sizes) if sizes else 256
    report["data"] = make_shards(work / "data", args.rows + count, args.shards, input_size=128, hr_size=hr_size,
                                 seed=0)
    report["data"].update(latent=[4, 16, 16], hr=[hr_size, hr_size], held_out_rows=count, training_rows=args.rows)
    cfg = base_config(args, work / "data")
    train = cfg["train"]
    if args.window:
        train["window"] = args.window

    def sized(size: int | None) -> dict:
        if size is None:
            return cfg
        out = json.loads(json.dumps(cfg))
        out["train"].update(sizes=[size, size], aspect_range=[1.0, 1.0])
        return out

    sides = ({f"{kind}_{size}": (kind, size) for size in sizes for kind in ("bare_predecoded", "ray_1worker")}
             if sizes else {name: (name, None) for name in ("bare", "ray_1worker", "ray_2workers")})
    report["setup"] = {
        "config": str(CONFIG.relative_to(ROOT)), "preset": cfg["preset"], "steps": args.steps,
        "global_batch": args.batch_size, "steps_per_epoch_approx": args.rows // args.batch_size,
        "torch_threads_bare_and_per_worker": args.threads, "cpus_per_worker": train["cpus_per_worker"],
        "target_sizes": ({"square": sizes} if sizes else
                         {"long_side": train["sizes"], "multiple": train["multiple"], "aspect": train["aspect_range"]}),
        "window": train.get("window"), "decode_threads": train.get("decode_threads") or "cpus_per_worker",
        "loss": cfg["loss"], "optim": cfg["optim"], "shuffle_buffer": train["shuffle_buffer"],
        "log_every": args.log_every, "bare_warmup_steps": args.log_every,
        "timed_step_indices": [args.log_every, args.steps - 1],
        "ray_measured": "the loop's samples_per_s per log window (MLflow, rank 0), windows after the first; each "
                        "window includes the data feed, the PNG decode, train_step (DDP all-reduce with 2 workers), "
                        "the ray.train.report barrier and the MLflow log_batch of the window before",
        "ray_excluded": "the first window (worker start-up, first read, warm-up); ray.init (cluster started before "
                        "any timing); checkpoints (checkpoint_every=sample_every=1e9: only the final step "
                        "checkpoints and draws a sample grid, both after the last window is logged); the export; "
                        "model registration (registered_model_name null); MLflow sqlite schema creation (done "
                        "before timing); max_failures=0 (a failure aborts instead of restarting)",
        "run_train_wall_s": "everything run_train does, for reference: held-out read, dataset set-up, worker "
                            "start-up, SampleGrid set-up, all steps, final checkpoint + sample grid, export",
        "bare_measured": "steps after the warm-up: parquet read each epoch, shuffle, PNG decode + resize, train_step",
        "repeats": args.repeats}

    from mlflow.tracking import MlflowClient

    tracking_uri = f"sqlite:///{work / 'mlflow.db'}"
    MlflowClient(tracking_uri).search_experiments()  # creates the schema (migrations: seconds) before timing
    start = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=False)
    report["environment"]["ray_start_s"] = round(time.perf_counter() - start, 2)

    runs: dict[str, list[dict]] = {side: [] for side in sides}
    report["runs"] = runs
    for r in range(args.repeats):
        for side, (kind, size) in sides.items():
            load = loadavg()
            print(f"[train_speed] {side} run {r} (load {load}) ...", file=sys.stderr, flush=True)
            try:
                res = (bare_loop(sized(size), args.log_every, predecoded=kind == "bare_predecoded")
                       if kind.startswith("bare") else
                       ray_run(sized(size), 1 if kind == "ray_1worker" else 2, work, tracking_uri))
            except Exception as e:  # keep what the other sides measured
                res = {"error": f"{type(e).__name__}: {e}"[-2000:]}
            runs[side].append({**res, "loadavg_before": load, "loadavg_after": loadavg()})
            print(f"[train_speed] {side} run {r}: {res.get('samples_per_s')} samples/s", file=sys.stderr, flush=True)
            rate = {name: best(v) for name, v in runs.items()}
            report["samples_per_s"] = rate
            report["derived"] = derive(rate, sizes)
            out.write_text(json.dumps(report, indent=2) + "\n")  # after every run: an interrupted run keeps its data

    ray.shutdown()
    for d in report["derived"]:
        mark = "" if d["meets_target"] is None else ("OK" if d["meets_target"] else "MISSED")
        print(f"{d['name']:<42}{d['value']:>8}  {d['target'] or '':<8} {mark}")
    print(json.dumps(report["samples_per_s"]), "→", out)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
