"""The demo (`make demo`): the whole pipeline on one machine, offline, with everything it needs started here and
stopped at the end: an HTTP server on 127.0.0.1 serving real photos (the wallpaper files of conf/photos.yaml, with
their fixed split by file as the train/evaluation split), an MLflow server (SQLite), a local Ray.

It ends by printing the outputs, the MLflow run ids, the command that reopens the MLflow UI, and the evaluation
table; and it writes `decoded_sizes.png`: one held-out latent decoded at several sizes and aspect ratios.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Mapping

from infgen.photos import Photo
from pipelines.config import MlflowConfig, dataclass_from
from pipelines.holdout import Holdout
from pipelines.pipeline import PipelineConfig, PipelineResult, run_pipeline
from pipelines.services import mlflow_server, mlflow_server_command

log_prefix = "[demo]"
PHOTO_SETS = ("wallpapers", "shipped")  # conf/photos.yaml's files | the small photos Python packages ship (tests)


def demo_photos(photo_set: str) -> list[Photo]:
    """The `photos` the demo serves (one of PHOTO_SETS, as DemoConfig checks): 'wallpapers'
    (infgen.photos.load_photos(), both splits) or 'shipped'."""
    from infgen.photos import load_photos, load_shipped_photos

    return load_photos() if photo_set == "wallpapers" else load_shipped_photos()


@dataclass
class DemoConfig(PipelineConfig):
    """The demo's config (conf/demo.yaml documents every key): the pipeline's, plus the demo's own data.
    Checked on construction, every stage's config too (PipelineConfig; ValueError naming the stage and key)."""

    CONFIG_NAME: ClassVar[str] = "demo"
    name: str = "demo"
    mlflow: MlflowConfig = field(default_factory=lambda: MlflowConfig(experiment="infgen-demo"))
    photos: str = "wallpapers"  # wallpapers | shipped (PHOTO_SETS)
    site_port: int = 18765  # 127.0.0.1 port serving the photos (fixed: the URLs are part of the data)
    holdout: Holdout = field(default_factory=Holdout)  # its `urls`: where the held-out photos' URLs are written
    figure_sizes: list = field(default_factory=lambda: ["256x256", "512x512"])  # WxH, one held-out latent at each

    def __post_init__(self) -> None:
        if self.photos not in PHOTO_SETS:
            raise ValueError(f"demo config: photos={self.photos!r} is not one of {list(PHOTO_SETS)}")
        super().__post_init__()


def run_demo(config: DemoConfig | Mapping[str, Any]) -> PipelineResult:
    """Serve the demo's data, start MLflow and Ray, run the pipeline, draw the figure and print the summary."""
    cfg = dataclass_from(DemoConfig, config)
    output = Path(cfg.output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local Ray: no token file in ~/.ray
    start = time.time()
    with contextlib.ExitStack() as stack:
        input_uri = cfg.input
        if not input_uri:
            from pipelines.sample_data import serve, write_demo_dataset

            site = output / "site"
            # a fixed port: the URLs, and so the fingerprints, are the same every run
            base_url = stack.enter_context(serve(site, cfg.site_port))
            data = write_demo_dataset(site, base_url, demo_photos(cfg.photos), cfg.holdout.urls)
            input_uri, n = data.metadata, data.counts
            listed = f"listed in {data.holdout_urls}" if data.holdout_urls else "not listed: holdout.urls is null"
            print(f"{log_prefix} serving {n['photos']} photos ({cfg.photos}; {n['held_out']} held out by file, "
                  f"{listed}), {n['broken']} broken URLs and {n['filtered_out']} rows to filter out from {base_url}",
                  flush=True)
        if not cfg.mlflow.tracking_uri:
            cfg = replace(cfg, mlflow=replace(cfg.mlflow, tracking_uri=stack.enter_context(
                mlflow_server(output / "mlflow"))))
            print(f"{log_prefix} MLflow server at {cfg.mlflow.tracking_uri} (SQLite: {output / 'mlflow' / 'mlflow.db'})",
                  flush=True)
        result = run_pipeline(cfg, input_uri=str(input_uri))
        figure = decoded_sizes_figure(cfg, result, output / "decoded_sizes.png")
        summary(cfg, result, output, figure, time.time() - start)
    return result


def decoded_sizes_figure(cfg: DemoConfig, result: PipelineResult, path: Path) -> Path | None:
    """One held-out latent decoded by the trained model at each of `figure_sizes`, side by side."""
    import torch

    from infgen.cli import parse_cli_size
    from infgen.models import InfGen
    from infgen.visualize import image_grid
    from pipelines import shards
    from pipelines.common import resolve_files

    if "train" not in result.stages or "encode" not in result.stages:
        return None
    fs, paths = resolve_files(result.stages["encode"].output)
    keys = cfg.holdout.read().keys_in(shards.key_urls(fs, paths))  # in file order: the first one
    if not keys:
        return None
    latent = torch.from_numpy(shards.latents(shards.read_rows(fs, paths, ["latent"], keys=keys[:1])))
    model = InfGen.from_pretrained(result.stages["train"].model_dir)
    images, labels = [], []
    for size in cfg.figure_sizes:
        h, w = parse_cli_size(size)
        images.append(model.decode(latent, (h, w), tile=256 if max(h, w) > 512 else None)[0])
        labels.append(f"{w}x{h}")
    image_grid([images], labels, cell=320).save(path)
    if result.run_ids.get("pipeline"):  # none when every stage was reused: no run for a figure that is the same
        with cfg.mlflow.tracker("demo-figure", run_id=result.run_ids["pipeline"]) as tracker:
            tracker.log_artifact(path)
    return path


def summary(cfg: DemoConfig, result: PipelineResult, output: Path, figure: Path | None, seconds: float) -> None:
    from pipelines.evaluate import print_table

    print(f"\n{log_prefix} done in {seconds / 60:.1f} min. Outputs under {output}:")
    for stage, out in result.stages.items():
        run = "complete already: reused" if getattr(out, "skipped", False) else f"MLflow run {result.run_ids.get(stage)}"
        print(f"  {stage:<9} {out.output}   ({result.seconds[stage]:.0f} s, {run})")
    if figure:
        print(f"  figure    {figure}")
    print(f"\nMLflow: experiment {cfg.mlflow.experiment!r}, parent run {result.run_ids.get('pipeline')} "
          f"with one nested run per stage.")
    if (output / "mlflow" / "mlflow.db").exists():
        port_cmd = mlflow_server_command(output / "mlflow", 5000)
        print("Open the UI:  " + " ".join(shlex.quote(c) for c in port_cmd) + "   → http://127.0.0.1:5000")
    if "evaluate" in result.stages:
        stats = result.stages["evaluate"].stats
        print(f"\nEvaluation ({stats['samples']} held-out crops; features: {stats['extractor']}; "
              f"LPIPS: {stats['lpips']}):")
        print_table(stats["rows"])
        skipped = {r["resolution"]: r.get("truth_skipped", 0) for r in stats["rows"]}
        if any(skipped.values()):
            print("Crops whose ground truth is smaller than the resolution are left out there (never upsampled): "
                  + ", ".join(f"{n} at {res}" for res, n in skipped.items() if n))
