"""Stage 4: evaluation across resolutions on a Ray actor pool: FID / FIDp / sFIDp / KIDp / precision-recall on
patches, PSNR / SSIM / LPIPS, decode latency; infgen against the VAE + resize baselines, in one run.

Inputs (`data_kind`):
  encoded  the encode stage's parquet shards (held-out ones): latent + high-resolution ground truth, i.e.
           reconstruction; the ground truth at each resolution is the reference for the FID family;
  latents  a directory of latents from any diffusion model (.pt / .npy / .safetensors, one or a batch per
           file) plus `reference`, a directory of real images for the FID family.

Work is split into units (a parquet row group, a latent file, a chunk of reference images) that a
`ray.util.ActorPool` of `EvalWorker`s processes; each actor loads the model, the VAE, the feature extractor and
LPIPS once (on a GPU when `workers.num_gpus` > 0) and accumulates float64 sums. The driver then merges them one
statistic at a time (a few D×D matrices in memory at once, however many patches were seen), so a million
patches never sit in memory. Reference statistics are cached and reused by the next evaluation of another model
on the same data.

`data` (encoded shards), `output` and `reference_cache` are local paths or URIs (s3://, gs://, ...), read and
written through pyarrow filesystems; `model`, `reference`, latent files and `holdout.urls` are local (or mounted).

Output, under `<output>/<fingerprint>/`: results.csv / results.json (one row per decoder and resolution,
with the protocol), per_image.csv, metrics_vs_resolution.png, crops_<R>.png; all logged to one MLflow run.

The package, by job:
  config.py           EvalConfig and its sections: what an evaluation takes
  model.py            load_model: what `model` names (exported directory, checkpoint, MLflow URI) → the model
  plan.py             the selected samples, cut into work units
  worker.py           EvalWorker, the actor, and the readers of its units
  reference_cache.py  the reference statistics, saved and reused
  scores.py           the table's numbers from the merged statistics, and what each one is
  report.py           the files, plots, MLflow description and printed table an evaluation leaves
  run.py              run_evaluate, the driver
"""

from pipelines.evaluate.config import EvalConfig
from pipelines.evaluate.model import load_model
from pipelines.evaluate.plan import plan, select
from pipelines.evaluate.report import print_table
from pipelines.evaluate.run import run_evaluate
from pipelines.evaluate.scores import distances
from pipelines.evaluate.worker import EvalWorker, read_encoded_unit

__all__ = ["EvalConfig", "EvalWorker", "distances", "load_model", "plan", "print_table", "read_encoded_unit",
           "run_evaluate", "select"]
