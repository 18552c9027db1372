"""The whole pipeline in one call: filter → download → encode → train → evaluate, each stage with its own config
(a stage YAML plus overrides), chained output → input, under one parent MLflow run with a nested run per stage.

Every stage keeps its own guarantees: a rerun of the pipeline skips the data stages whose output is complete,
resumes training from its last checkpoint and reuses a complete evaluation, so a pipeline that died is finished
by running the same command again.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from pipelines.common import init_ray, local_files, output_root, plain_config
from pipelines.tracking import PARENT_RUN_ENV, Tracker, config_hash

STAGES = ("filter", "download", "encode", "train", "evaluate")


@dataclass
class PipelineResult:
    stages: dict[str, Any] = field(default_factory=dict)  # stage → StageResult / TrainResult
    run_ids: dict[str, Optional[str]] = field(default_factory=dict)  # stage → MLflow run id ("pipeline": parent)
    seconds: dict[str, float] = field(default_factory=dict)


def stage_config(spec: Any, root: Path, **wiring: Any) -> Any:
    """A stage's YAML (`spec.config`, relative to the repository) with `spec.overrides`, then the pipeline's
    wiring (inputs, outputs, tracking, Ray) on top."""
    path = Path(spec["config"])
    path = path if path.is_absolute() else root / path
    if not path.is_file():
        raise ValueError(f"stage config {path}: no such file")
    config = OmegaConf.merge(OmegaConf.load(path), spec.get("overrides") or {}, wiring)
    return config


# the paths the pipeline wires from one stage into the next (see run_pipeline)
WIRED = {"filter": ("input", "output"), "download": ("input", "output"), "encode": ("input", "output"),
         "train": ("data", "output"), "evaluate": ("data", "model", "output")}


def check_config(config: Any) -> None:
    """Each listed stage's config as run_pipeline builds it (its YAML + overrides, chained paths wired in),
    checked by that stage's own check (what `--dry-run` runs); ValueError naming the stage and the problem."""
    from pipelines.download import check_config as check_download
    from pipelines.encode import EncodeConfig
    from pipelines.evaluate import EvalConfig
    from pipelines.filter import check_config as check_filter
    from pipelines.train import check_config as check_train

    checks = {"filter": check_filter, "download": check_download, "encode": EncodeConfig.from_mapping,
              "train": lambda c: check_train(plain_config(c)), "evaluate": EvalConfig.from_mapping}
    cfg = OmegaConf.create(plain_config(config))
    unknown = sorted(set(cfg.stages) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown pipeline stages {unknown}; known: {list(STAGES)}")
    root = Path(__file__).resolve().parents[1]
    for stage in STAGES:
        if stage in cfg.stages:
            wiring = {key: f"{cfg.output}/{stage}/{key}" for key in WIRED[stage]}  # stand-ins for the chained paths
            try:
                checks[stage](stage_config(cfg.stages[stage], root, **wiring, mlflow=cfg.mlflow, ray=cfg.ray))
            except ValueError as e:
                raise ValueError(f"stages.{stage}: {e}") from None


def run_pipeline(config: Any, input_uri: Optional[str] = None) -> PipelineResult:
    """Run the stages listed in `config.stages` (in pipeline order) on `input_uri` (LAION metadata parquet)."""
    from pipelines.download import run_download
    from pipelines.encode import run_encode
    from pipelines.evaluate import run_evaluate
    from pipelines.filter import run_filter
    from pipelines.train import run_train

    cfg = OmegaConf.create(plain_config(config))
    unknown = sorted(set(cfg.stages) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown pipeline stages {unknown}; known: {list(STAGES)}")
    root = Path(__file__).resolve().parents[1]
    output = Path(cfg.output).resolve() if "://" not in cfg.output else cfg.output
    input_uri = input_uri or cfg.input
    # the stages log to the pipeline's experiment: MLflow shows nested runs within one experiment
    mlflow = {"tracking_uri": cfg.mlflow.tracking_uri, "experiment": cfg.mlflow.experiment}
    ray = {"address": cfg.ray.address, "num_cpus": cfg.ray.num_cpus}
    init_ray(ray["address"], ray["num_cpus"])

    result = PipelineResult()
    lineage = {"infgen.stage": "pipeline", "infgen.input": str(input_uri), "infgen.output": str(output),
               "infgen.config_hash": config_hash(plain_config(cfg))}
    with Tracker(cfg.mlflow.tracking_uri, cfg.mlflow.experiment, cfg.get("name", "pipeline"), tags=lineage) as parent:
        parent.log_params({"stages": list(cfg.stages), "output": str(output), "input": str(input_uri)})
        result.run_ids["pipeline"] = parent.run_id
        if parent.run_id:  # every stage's Tracker (driver or Ray worker) nests under this run
            os.environ[PARENT_RUN_ENV] = parent.run_id
        try:
            current, encoded, model = input_uri, None, None
            for stage in STAGES:
                if stage not in cfg.stages:
                    continue
                spec = cfg.stages[stage]
                print(f"\n===== {stage} =====", flush=True)
                start = time.time()
                if stage == "filter":
                    out = run_filter(stage_config(spec, root, input=str(current), output=f"{output}/filter",
                                                  mlflow=mlflow, ray=ray))
                    current = out.output
                elif stage == "download":
                    out = run_download(stage_config(spec, root, input=str(current), output=f"{output}/download",
                                                    mlflow=mlflow, ray=ray))
                    current = f"{out.output}/shards"
                elif stage == "encode":
                    out = run_encode(stage_config(spec, root, input=str(current), output=f"{output}/encode",
                                                  mlflow=mlflow, ray=ray))
                    current = encoded = out.output
                elif stage == "train":
                    out = run_train(stage_config(spec, root, data=str(current), output=f"{output}/train",
                                                 mlflow=mlflow, ray=ray))
                    model = out.model_dir
                elif stage == "evaluate":
                    chained = {k: str(v) for k, v in (("data", encoded), ("model", model)) if v is not None}
                    out = run_evaluate(stage_config(spec, root, **chained, output=f"{output}/evaluate",
                                                    mlflow=mlflow, ray=ray))
                result.stages[stage], result.run_ids[stage] = out, out.run_id
                result.seconds[stage] = time.time() - start
                parent.log_metrics({f"{stage}_seconds": result.seconds[stage]})
                parent.set_tags({f"infgen.{stage}.output": out.output,
                                 f"infgen.{stage}.run_id": out.run_id})
        finally:
            os.environ.pop(PARENT_RUN_ENV, None)
        if result.stages and all(getattr(out, "skipped", False) for out in result.stages.values()):
            parent.discard()  # every stage was complete: a parent run would hold nothing new
            result.run_ids["pipeline"] = None
            print("every stage was complete already: no new MLflow runs", flush=True)
            return result
        if "evaluate" in result.stages:
            fs, directory = output_root(result.stages["evaluate"].output)
            with local_files(fs, [f"{directory}/results.csv", f"{directory}/metrics_vs_resolution.png"]) as paths:
                for path in paths:
                    parent.log_artifact(path, "evaluation")
    return result
