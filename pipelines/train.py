"""Training on Ray Train: a TorchTrainer over the encode stage's parquet shards.

The per-step logic (forward, losses, both optimizer steps, EMA, state dicts) is infgen.training.InfGenTrainer,
plain PyTorch; this module is the Ray wiring: datasets, DDP, checkpoints, resume, failures, MLflow.

Resume: Ray Train V2 resumes a run that is started again with the same `output` (storage path) and `name`
from `ray.train.get_checkpoint()`; a worker that dies restarts the group from the last checkpoint, up to
`train.max_failures` times. The MLflow run id travels in the checkpoint, so a resumed run logs on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Mapping, Optional, Sequence

import numpy as np
import torch

from infgen.data import random_target_size, target_window
from infgen.images import output_size, resize
from infgen.losses import InfGenLoss, LossConfig, unwrap
from infgen.models import INFGEN_PRESETS, WEIGHTS_NAME, InfGen, InfGenConfig
from infgen.training import InfGenTrainer, OptimConfig
from infgen.vae import load_vae, vae_config

from pipelines import checkpoint, shards
from pipelines.checkpoint import EXPORTED, RUN_CONFIG
from pipelines.common import resolve_files, verbose
from pipelines.config import KEYS_OF, MlflowConfig, Number, RayConfig, dataclass_from
from pipelines.holdout import RECORD, Holdout
from pipelines.tracking import NEWEST_ALIAS, PARENT_RUN_ENV, Tracker, config_hash

log = logging.getLogger(__name__)


# ---- the config ---------------------------------------------------------------------------------------------


@dataclass
class TrainLoopConfig:
    """The `train` section: steps, batches, target sizes, workers, and how often to log, sample and checkpoint."""

    steps: int = 60
    batch_size: int = 4  # global, in windows (samples): split over the workers
    views: int = 1  # windows per latent per step, each its own output size and position: batch_size / views rows
    sizes: list[int] = field(default_factory=lambda: [128, 256])  # [smallest, largest] long side of a step's target
    multiple: int = 16
    aspect_range: list[Number] = field(default_factory=lambda: [0.75, 1.333])  # width/height
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: Number = 0.5
    threads_per_worker: int = 1
    decode_threads: Optional[int] = None  # per worker, decoding the next steps' targets; null: cpus_per_worker
    max_failures: int = 2
    checkpoint_every: int = 20
    keep_checkpoints: int = 2
    log_every: int = 5
    sample_every: int = 20
    shuffle_buffer: int = 64
    window: Optional[int] = None  # px per side of the output window each step trains on; null: the whole output
    window_halo: int = 2  # mask tokens decoded around the window and cut away
    seed: int = 0

    def __post_init__(self) -> None:
        counts = ("steps", "batch_size", "views", "multiple", "num_workers", "threads_per_worker", "checkpoint_every",
                  "keep_checkpoints", "log_every", "sample_every")
        bad = [k for k in counts if getattr(self, k) < 1]
        bad += [k for k in ("decode_threads", "window") if getattr(self, k) is not None and getattr(self, k) < 1]
        bad += ["cpus_per_worker"] if self.cpus_per_worker <= 0 else []
        if bad:
            raise ValueError(f"training config: {', '.join(f'train.{k}={getattr(self, k)}' for k in bad)} must be "
                             f"positive")
        for key, pair in (("sizes", self.sizes), ("aspect_range", self.aspect_range)):
            if len(pair) != 2 or not 0 < pair[0] <= pair[1]:
                raise ValueError(f"training config: train.{key}={list(pair)} must be two numbers [smallest, largest], "
                                 f"0 < smallest <= largest")
        if self.sizes[0] < self.multiple:
            raise ValueError(f"training config: train.sizes={self.sizes} starts below train.multiple={self.multiple}")
        if self.batch_size % (self.num_workers * self.views):
            raise ValueError(f"train.batch_size {self.batch_size} is not divisible by train.num_workers "
                             f"{self.num_workers} × train.views {self.views}")
        if self.views > 1:  # a step's views are concatenated: each must be a whole window of one shape
            smallest = min(min(output_size(aspect, self.sizes[0], self.multiple)) for aspect in self.aspect_range)
            if not self.window or self.window > smallest:
                raise ValueError(f"train.views={self.views} needs a train.window no larger than the smallest output "
                                 f"side ({smallest} px for sizes {self.sizes}), got {self.window}")

    def geometry(self, step: int, scale: int, view: int = 0) -> tuple[tuple[int, int], Optional[tuple]]:
        """What view `view` (of `views`) of step `step` decodes, the same on every rank and on resume: the output
        size (H, W), drawn from `sizes` / `aspect_range` (multiples of `multiple`), and the window it trains on,
        (top, left, height, width) in pixels (multiples of `scale`), `window` px per side at a seeded position;
        the window is None (the whole output) when `window` is null or covers the output."""
        seed = self.seed * 1_000_003 + step + view * 7_919_000_011
        size = random_target_size(random.Random(seed), tuple(self.sizes), self.multiple, tuple(self.aspect_range))
        side = self.window
        if not side or side >= max(size):
            return size, None
        rng = random.Random(seed * 31 + 7)
        height, width = min(side, size[0]) // scale * scale, min(side, size[1]) // scale * scale
        top = rng.randint(0, (size[0] - height) // scale) * scale
        left = rng.randint(0, (size[1] - width) // scale) * scale
        return size, (top, left, height, width)


@dataclass
class SamplesConfig:
    """The `samples` section: the sample grid's held-out rows and the sizes (H, W) they are decoded at."""

    count: int = 2  # the last rows of the last shard, never trained on
    sizes: list = field(default_factory=lambda: [[128, 128], [256, 256], [192, 320]])


@dataclass
class TrainMlflow(MlflowConfig):
    """The training run's `mlflow` section: the exported model is registered under `registered_model_name`."""

    registered_model_name: Optional[str] = None


@dataclass
class TrainOptim(OptimConfig):
    """The training run's `optim` section: the schedule spans the run, so total_steps is train.steps (left out,
    or set to the same value)."""

    total_steps: Optional[int] = None


@dataclass
class TrainConfig:
    """A training run's config; conf/train/local.yaml documents every key. Checked on construction (the
    `model` overrides by InfGenConfig, on the preset); a ValueError names the key that is wrong."""

    CONFIG_NAME: ClassVar[str] = "training"
    REQUIRED: ClassVar[tuple] = ("data", "output")  # null or "": an error naming them (dataclass_from)
    name: str = "infgen-local"  # the run: the same name and output resume it
    data: Optional[str] = None  # the encode stage's output (parquet shards)
    output: Optional[str] = None  # a shared POSIX path: checkpoints and the model under <output>/<name>/
    vae: str = "tiny"  # the latents' VAE: the sample grid's baseline and the scaling factor the model records
    preset: str = "tiny"
    model: dict = field(default_factory=dict, metadata={KEYS_OF: InfGenConfig})  # InfGenConfig overrides
    init_from: Optional[str] = None  # a checkpoint or exported model to start from (stage 2)
    holdout: Holdout = field(default_factory=Holdout)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    optim: TrainOptim = field(default_factory=TrainOptim)
    loss: LossConfig = field(default_factory=LossConfig)
    samples: SamplesConfig = field(default_factory=SamplesConfig)
    mlflow: TrainMlflow = field(default_factory=lambda: TrainMlflow(experiment="infgen-train"))
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        if self.preset not in INFGEN_PRESETS:
            raise ValueError(f"training config: preset={self.preset!r} is not one of {sorted(INFGEN_PRESETS)}")
        InfGenConfig(**{**INFGEN_PRESETS[self.preset], **self.model})  # the overrides' values, by its own checks
        steps = self.train.steps
        if self.optim.total_steps not in (None, steps):  # never silently replaced by train.steps
            raise ValueError(f"training config: optim.total_steps={self.optim.total_steps} differs from "
                             f"train.steps={steps}; the schedule spans the run: leave optim.total_steps out")
        self.optim = replace(self.optim, total_steps=steps)
        for key in ("output", "init_from"):  # written and read with plain file I/O (checkpoints, model, records)
            value = getattr(self, key)
            if value and "://" in value:
                raise ValueError(f"training config: {key}={value!r} is a URI; checkpoints and the exported model "
                                 f"need a POSIX path, shared by every node on a cluster (e.g. a mount of the bucket)")

    def describe(self, step: int) -> str:
        """What was trained, for the MLflow run's description: the preset, `step` steps, the data, target sizes and
        loss terms."""
        return (f"InfGen {self.preset} trained {step} steps on {self.data} (targets {self.train.sizes} px, "
                f"loss {self.loss.describe(step)}).")


@dataclass
class TrainResult:
    model_dir: str  # the exported EMA model (InfGen.from_pretrained reads it)
    checkpoint: Optional[str]  # the last checkpoint directory
    metrics: dict
    run_id: Optional[str]
    skipped: bool = False  # a finished run of the same config: nothing was trained, exported or registered

    @property
    def output(self) -> str:
        """What the next stage reads, named as in StageResult."""
        return self.model_dir


# ---- data ---------------------------------------------------------------------------------------------------


def decode_targets(hr: Sequence[bytes], size: tuple[int, int],
                   region: Optional[tuple[int, int, int, int]] = None,
                   views: Optional[Sequence[tuple]] = None) -> torch.Tensor:
    """Encoded high-resolution crops (the shards' `hr`) → (B, 3, H, W) in [-1, 1] at `size`, or only the window
    `region` of it (infgen.data.target_window); with `views` = V (size, region) pairs instead, (V·B, 3, H', W'),
    view-major as InfGen.forward decodes them, each crop decoded once. A JPEG crop decodes at a reduced scale
    never below the largest size (pipelines.shards.hr_image)."""
    views = views or [(size, region)]
    at_least = (max(s[0] for s, _ in views), max(s[1] for s, _ in views))
    images = [shards.hr_image(data, at_least=at_least) for data in hr]
    return torch.stack([target_window(image, s, r) for s, r in views for image in images])


class TargetPrefetcher:
    """Step-ordered training batches with their targets decoded ahead, in background threads.

    For each raw batch ({"latent", "hr"} numpy rows, from Ray Data) the step's output size and window are drawn
    (`plan(step)`, the same on every rank) and the targets decoded and resized (`decode_targets`) on a thread
    pool while earlier steps train: Pillow releases the GIL while it decodes and resizes, so a step does not wait
    on images as long as the threads keep up. Up to `threads + 1` batches are in flight, yielded in step order as
    (latents (B, C, h, w) float32, targets (V·B, 3, H', W') in [-1, 1], the step's V views: (size, region) pairs).

    Not a Ray Data map_batches: the target size is a property of the step (identical on every rank and on resume),
    which a stage upstream of the trainer cannot know.
    """

    def __init__(self, batches, plan, first_step: int, last_step: int, threads: int) -> None:
        self.batches, self.plan, self.first, self.last = batches, plan, first_step, last_step
        self.threads = max(1, threads)

    @staticmethod
    def _prepare(batch: dict, views: list) -> tuple:
        latents = torch.from_numpy(np.asarray(batch["latent"], dtype=np.float32))
        return latents, decode_targets(batch["hr"], None, views=views), views

    def __iter__(self):
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        pending: deque = deque()
        with ThreadPoolExecutor(self.threads, thread_name_prefix="targets") as pool:
            try:
                step = self.first
                for batch in self.batches:
                    if step >= self.last:
                        break
                    pending.append(pool.submit(self._prepare, batch, self.plan(step)))
                    step += 1
                    if len(pending) > self.threads:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:  # an early exit (a failure, the last step): drop what is queued
                for future in pending:
                    future.cancel()


# ---- the loop on each worker --------------------------------------------------------------------------------


def build_model(preset: str, overrides: Mapping[str, Any], init_from: Optional[str] = None) -> InfGen:
    """A fresh `preset`, or the weights of a stage-1 checkpoint / exported model (`init_from`, stage 2), with
    the `overrides` of its config: a preset and a checkpoint are built with them; an exported model's config is
    changed through InfGenConfig's own checks (e.g. grad_checkpointing, max_size for stage 2). Raises ValueError
    for an `init_from` that is neither, or an override InfGenConfig rejects."""
    if not init_from:
        return InfGen.from_preset(preset, **overrides)
    if checkpoint.is_checkpoint(init_from):  # a training checkpoint: start from its EMA weights
        return checkpoint.load_ema(init_from, InfGen.from_preset(preset, **overrides))
    if (Path(init_from) / WEIGHTS_NAME).is_file():
        model = InfGen.from_pretrained(init_from)
        model.config = replace(model.config, **overrides)  # __post_init__ validates; the weights stay
        return model
    raise ValueError(f"init_from {init_from}: neither a training checkpoint ({checkpoint.STATE_FILE}) nor an "
                     f"exported model ({WEIGHTS_NAME})")


class Progress:
    """Averages over a window of steps, samples/s, ETA; what rank 0 prints and logs."""

    def __init__(self, total_steps: int, global_batch: int) -> None:
        self.total, self.batch = total_steps, global_batch
        self.sums: dict[str, float] = {}
        self.count, self.start = 0, time.perf_counter()

    def add(self, log: Mapping[str, float]) -> None:
        for k, v in log.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1

    def flush(self, step: int) -> dict[str, float]:
        elapsed = time.perf_counter() - self.start
        metrics = {k: v / self.count for k, v in self.sums.items()}
        metrics["samples_per_s"] = self.count * self.batch / elapsed
        metrics["eta_s"] = (self.total - step) * elapsed / self.count
        self.sums, self.count, self.start = {}, 0, time.perf_counter()
        return metrics


def train_loop(loop: dict) -> None:
    """One Ray Train worker's loop. `loop`: the checked TrainConfig (`config`), and what the driver adds:
    `run_dir`, `lineage` (MLflow tags), `parent_run_id`, `verbose`, the sample grid's rows (`sample_latents`
    (n, C, h, w), `sample_hr` encoded crops), the split's `holdout_record`."""
    import ray.train
    import ray.train.torch

    cfg: TrainConfig = loop["config"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    train = cfg.train
    device = ray.train.torch.get_device()
    if not loop["verbose"]:
        # libraries' INFO lines off on the workers: Ray Train logs a "Reporting training result" per report through
        # a logger named by its file path, which its own LoggingConfig level does not reach
        logging.getLogger().setLevel(logging.WARNING)
    torch.set_num_threads(max(1, int(train.threads_per_worker or 1)))

    torch.manual_seed(train.seed)  # the same initial weights (and LPIPS network) on every rank
    model = ray.train.torch.prepare_model(build_model(cfg.preset, cfg.model, cfg.init_from))
    loss = InfGenLoss(cfg.loss).to(device)
    torch.manual_seed(train.seed + rank)
    if world > 1:
        loss.discriminator = ray.train.torch.prepare_model(loss.discriminator)
    trainer = InfGenTrainer(model, loss, cfg.optim)

    run_id = None
    latest = ray.train.get_checkpoint()
    if latest:
        with latest.as_directory() as directory:
            run_id = checkpoint.restore(directory, trainer, rank)
        if rank == 0:
            print(f"[train] resumed from step {trainer.step}")

    tracker = sampler = None
    if rank == 0:
        tracker = cfg.mlflow.tracker(cfg.name, tags=loop["lineage"], run_id=run_id,
                                     parent_run_id=loop["parent_run_id"], system_metrics=True)
        run_id = tracker.start()
        if not latest:
            tracker.log_params({k: v for k, v in asdict(cfg).items() if k != "ray"})
        sampler = SampleGrid(cfg.samples.sizes, loop["sample_latents"], loop["sample_hr"], cfg.vae, device)

    # the run ends FINISHED, or FAILED / KILLED when the loop raises (a restarted attempt resumes it)
    with tracker if tracker else contextlib.nullcontext():
        shard = ray.train.get_dataset_shard("train")
        rows_per_worker = train.batch_size // world // train.views
        progress = Progress(train.steps, train.batch_size)
        scale = unwrap(trainer.model).config.scale

        def plan(step: int) -> list:
            return [train.geometry(step, scale, view) for view in range(train.views)]

        while trainer.step < train.steps:
            raw = shard.iter_batches(batch_size=rows_per_worker, batch_format="numpy", drop_last=True,
                                     local_shuffle_buffer_size=train.shuffle_buffer or None)
            batches = TargetPrefetcher(raw, plan, trainer.step, train.steps,
                                       train.decode_threads or max(1, int(train.cpus_per_worker)))
            for latents, targets, views in batches:
                step_log = trainer.train_step(latents.to(device), targets.to(device), views=views,
                                              halo=train.window_halo)
                step = trainer.step
                progress.add(step_log)
                due = {every: step % getattr(train, every) == 0 or step == train.steps
                       for every in ("log_every", "sample_every", "checkpoint_every")}
                if not any(due.values()):
                    continue
                metrics = {**progress.flush(step), "step": step}
                if rank == 0:
                    tracker.log_metrics({k: v for k, v in metrics.items() if k != "step"}, step=step)
                    print(f"[train] step {step}/{train.steps} loss {metrics['loss']:.4f} l1 {metrics['l1']:.4f} "
                          f"{metrics['samples_per_s']:.1f} samples/s ETA {metrics['eta_s'] / 60:.1f} min", flush=True)
                    if due["sample_every"]:
                        sampler.log(trainer.ema, tracker, step)
                if due["checkpoint_every"]:
                    save_checkpoint(trainer, rank, run_id, metrics)
                else:
                    ray.train.report(metrics)
        if rank == 0:
            export(loop, trainer, tracker)
            tracker.set_note(f"{cfg.describe(trainer.step)} {sampler.describe()}")


def save_checkpoint(trainer: InfGenTrainer, rank: int, run_id: Optional[str], metrics: dict) -> None:
    """Every rank reports the same checkpoint: rank 0 the trainer state, each rank its own RNG states."""
    import ray.train

    with tempfile.TemporaryDirectory() as directory:
        checkpoint.save(directory, trainer, rank, run_id)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def export(loop: Mapping[str, Any], trainer: InfGenTrainer, tracker: Tracker) -> None:
    """The EMA model to <run_dir>/model with its holdout record (RECORD, also the MLflow run's artifact and
    params), logged and registered in MLflow (one version per trained model: an export of the same step and
    config as the last registers nothing), then EXPORTED."""
    run_dir = Path(loop["run_dir"])
    model_dir = run_dir / "model"
    trainer.ema.save_pretrained(model_dir)
    record = loop["holdout_record"]
    tracker.log_artifact(record.write(model_dir))  # before the MLflow model, which then carries it too
    tracker.log_params(record.params())
    print(f"[train] exported the EMA model to {model_dir} (with {RECORD}: {record.held_out_rows} of {record.rows} "
          f"rows held out, {record.holdout.describe()})", flush=True)
    last = json.loads((run_dir / EXPORTED).read_text()) if (run_dir / EXPORTED).is_file() else {}
    done = {"step": trainer.step, "config_hash": loop["lineage"]["infgen.config_hash"], "run_id": tracker.run_id}
    name = loop["config"].mlflow.registered_model_name
    version = last.get("model_version") if {k: last.get(k) for k in done} == done else None
    if version is None:
        version = tracker.log_infgen_model(model_dir, name)
        if version is not None:
            print(f"[train] logged as an MLflow model, registered as {name} version {version} "
                  f"(models:/{name}@{NEWEST_ALIAS})", flush=True)
    (run_dir / EXPORTED).write_text(json.dumps({**done, "model_name": name, "model_version": version}))


def check_resume(run_dir: str, cfg: TrainConfig) -> None:
    """A rerun resumes the checkpoints in `run_dir` only with the preset, model overrides, loss, data and VAE
    they were trained with: anything else is a ValueError on the driver naming the keys that differ (before any
    worker starts and dies on a load_state_dict mismatch). The first run records them in RUN_CONFIG."""
    from pipelines.tracking import flatten

    shape = {"preset": cfg.preset, "model": cfg.model, "loss": asdict(cfg.loss), "data": cfg.data, "vae": cfg.vae}
    shape = json.loads(json.dumps(shape, default=str))
    path = Path(run_dir) / RUN_CONFIG
    if path.is_file():
        recorded = json.loads(path.read_text())
        # records written before the loss was a checked section hold only the keys their config set
        recorded["loss"] = json.loads(json.dumps(asdict(dataclass_from(LossConfig, recorded.get("loss") or {})),
                                                 default=str))
        old, new = flatten(recorded), flatten(shape)
        differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if differ:
            changes = ", ".join(f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in differ)
            raise ValueError(f"{run_dir} holds checkpoints trained with another config ({changes}); to resume, use "
                             f"the same values; to start from its weights, use another name with "
                             f"init_from={run_dir}/model")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(shape, indent=2))


def finished_run(run_dir: str, steps: int, config_hash_: str) -> Optional[dict]:
    """EXPORTED of a run that reached `steps` with this config (a rerun is then a no-op), else None."""
    path = Path(run_dir) / EXPORTED
    if not path.is_file():
        return None
    done = json.loads(path.read_text())
    return done if done.get("step") == steps and done.get("config_hash") == config_hash_ else None


class SampleGrid:
    """The same held-out latents decoded at several sizes by the EMA model, next to the ground truth and the
    baseline (VAE decode at native size + bicubic), logged as an image every `sample_every` steps."""

    def __init__(self, sizes: Sequence[Sequence[int]], latents: np.ndarray, hr: Sequence[bytes], vae: str,
                 device: torch.device) -> None:
        self.sizes = [tuple(s) for s in sizes]
        self.latents = torch.tensor(np.asarray(latents, dtype=np.float32))  # a copy: Ray's is read-only
        self.hr = hr
        self.device = device
        vae = load_vae(vae)
        native = vae.decode(self.latents)
        self.truth = {s: decode_targets(self.hr, s) for s in self.sizes}
        self.baseline = {s: resize(native, s, mode="bicubic") for s in self.sizes}
        self.last_psnr: dict[tuple, tuple[float, float]] = {}  # size → (infgen, VAE + bicubic) at the last log

    def describe(self) -> str:
        """The last logged PSNRs, infgen against the baseline at each size, for the run's description."""
        psnrs = "; ".join(f"{w}x{h}: {ours:.2f} vs {base:.2f} dB" for (h, w), (ours, base) in self.last_psnr.items())
        return (f"Held-out sample PSNR, infgen vs VAE decode + bicubic: {psnrs or 'not logged'} ({len(self.latents)} "
                f"samples: a progress signal; the evaluate stage measures quality).")

    @torch.no_grad()
    def log(self, model: InfGen, tracker: Tracker, step: int) -> None:
        from infgen.images import to_pil
        from infgen.metrics import psnr
        from infgen.visualize import image_grid

        model = unwrap(model).eval()
        rows, labels = [[] for _ in range(len(self.latents))], []
        for size in self.sizes:
            decoded = model.decode(self.latents.to(self.device), size).cpu()
            self.last_psnr[size] = (psnr(decoded, self.truth[size]).mean().item(),
                                    psnr(self.baseline[size], self.truth[size]).mean().item())
            if size == max(self.sizes, key=lambda s: s[0] * s[1]):
                decoded_largest = decoded
            tracker.log_metrics({f"sample_psnr_{size[1]}x{size[0]}": self.last_psnr[size][0],
                                 f"baseline_psnr_{size[1]}x{size[0]}": self.last_psnr[size][1]}, step=step)
            for i in range(len(self.latents)):
                rows[i] += [self.truth[size][i], self.baseline[size][i], decoded[i]]
            labels += [f"truth {size[1]}x{size[0]}", "VAE+bicubic", "infgen"]
        with tempfile.TemporaryDirectory() as directory:
            path = Path(directory) / f"samples_step{step:07d}.png"
            image_grid(rows, labels, cell=160).save(path)
            tracker.log_artifact(path, "samples")
        # the grid's thumbnails hide the detail infgen is about: a centre crop of the largest size at full
        # resolution, truth | VAE+bicubic | infgen, step-indexed (the UI's slider)
        size = max(self.sizes, key=lambda s: s[0] * s[1])
        crop = min(256, *size)
        top, left = (size[0] - crop) // 2, (size[1] - crop) // 2
        cells = [t[0, :, top:top + crop, left:left + crop] for t in
                 (self.truth[size], self.baseline[size], decoded_largest)]
        tracker.log_image(to_pil(torch.cat(cells, dim=2)), key=f"centre_crop_{size[1]}x{size[0]}", step=step)


# ---- the driver -----------------------------------------------------------------------------------------------


def run_train(config: TrainConfig | Mapping[str, Any]) -> TrainResult:
    """Train as configured (conf/train/*.yaml); rerunning with the same output and name resumes. `config`: a
    TrainConfig, or a mapping checked into one (ValueError naming the key, before any worker starts)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg = dataclass_from(TrainConfig, config)
    train = cfg.train
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    # workers' print() straight to their stdout, once: Ray Train's print patch would also echo each line through
    # its logger (every progress line twice); Ray Train propagates this variable to the workers
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    fs, paths = resolve_files(cfg.data, suffix=".parquet", key="data")  # a wrong path fails before Ray starts
    cfg.ray.init()

    # the sample grid's rows: never trained on, decoded in every sample grid
    keys, latents, hr = shards.last_rows(fs, paths, cfg.samples.count)
    # the split this model is trained with, kept with it (record): the evaluation scores only rows it never trained on
    holdout = cfg.holdout.read()
    excluded, record = holdout.training_split(cfg.data, shards.key_urls(fs, paths), keys)
    if holdout:
        print(f"[train] {record.held_out_rows} rows held out for evaluation (holdout: {holdout.describe()})", flush=True)
    dataset = shards.training_dataset(fs, paths, excluded)

    # the exported model records the latent space it learnt, for decode(..., scaled=False) and for users: as the
    # encode stage recorded it, else from the VAE's config (never its weights: the driver needs one number)
    space = shards.recorded_latent_space(fs, paths)
    if space and space["vae"] != cfg.vae:
        print(f"[train] note: {cfg.data} was encoded with vae={space['vae']!r}, the config says vae={cfg.vae!r} "
              f"(the sample grid's baseline); the model records the data's scaling factor", flush=True)
    scaling_factor = space["scaling_factor"] if space else vae_config(cfg.vae)[1]["scaling_factor"]
    cfg = replace(cfg, model={"scaling_factor": scaling_factor, **cfg.model})

    storage = os.path.abspath(cfg.output)
    run_dir = os.path.join(storage, cfg.name)
    # what shapes the model: not where it is logged or run (a rerun's new server port)
    shaping = {k: v for k, v in asdict(cfg).items() if k not in ("mlflow", "ray")}
    loop = {"config": cfg, "run_dir": run_dir,
            "verbose": verbose(),  # Ray's and the libraries' INFO lines on the workers too
            "parent_run_id": os.environ.get(PARENT_RUN_ENV),  # Ray workers do not see the driver's env
            "lineage": {"infgen.stage": "train", "infgen.input": cfg.data, "infgen.output": run_dir,
                        "infgen.config_hash": config_hash(shaping)},
            "sample_latents": latents, "sample_hr": hr, "holdout_record": record}
    check_resume(run_dir, cfg)
    record.write(run_dir)  # beside the checkpoints too: a checkpoint evaluated as a model finds it
    finished = finished_run(run_dir, train.steps, loop["lineage"]["infgen.config_hash"])
    if finished:
        print(f"[train] {run_dir} finished {train.steps} steps with this config already: nothing to "
              f"do (MLflow run {finished['run_id']}, model version {finished.get('model_version')})", flush=True)
        return TrainResult(model_dir=os.path.join(run_dir, "model"), checkpoint=None, metrics={},
                           run_id=finished["run_id"], skipped=True)
    trainer = TorchTrainer(
        train_loop, train_loop_config=loop, datasets={"train": dataset},
        scaling_config=ray.train.ScalingConfig(
            num_workers=train.num_workers, use_gpu=train.use_gpu,
            # fractional CPUs: a trainer fed by Ray Data hangs on a 2-CPU machine otherwise
            resources_per_worker={"CPU": train.cpus_per_worker, **({"GPU": 1} if train.use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=cfg.name, storage_path=storage,
            # Ray Train's own INFO lines only with INFGEN_VERBOSE=1
            logging_config=ray.train.LoggingConfig(log_level="INFO" if loop["verbose"] else "WARNING"),
            failure_config=ray.train.FailureConfig(max_failures=train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=train.keep_checkpoints)))
    result = trainer.fit()
    metrics = dict(result.metrics or {})
    state_run = None
    if result.checkpoint:
        with result.checkpoint.as_directory() as directory:
            state_run = checkpoint.mlflow_run_id(directory)
    return TrainResult(model_dir=os.path.join(run_dir, "model"),
                       checkpoint=result.checkpoint.path if result.checkpoint else None,
                       metrics=metrics, run_id=state_run)
