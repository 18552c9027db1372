"""The whole pipeline in one call: filter → download → encode → train → evaluate, each stage with its own config
(a stage YAML plus overrides), chained output → input, under one parent MLflow run with a nested run per stage.

Every stage keeps its own guarantees: a rerun of the pipeline skips the data stages whose output is complete,
resumes training from its last checkpoint and reuses a complete evaluation, so a pipeline that died is finished
by running the same command again.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Optional

from omegaconf import OmegaConf

from pipelines.common import local_files, output_root
from pipelines.config import MlflowConfig, RayConfig, dataclass_from
from pipelines.tracking import PARENT_RUN_ENV, config_hash

STAGES = ("filter", "download", "encode", "train", "evaluate")
ROOT = Path(__file__).resolve().parents[1]  # stage YAMLs are named relative to the repository


@dataclass
class StageSpec:
    """One stage of `stages`: its YAML (relative to the repository) and overrides on top of it."""

    config: str
    overrides: dict = field(default_factory=dict)


@dataclass
class Stages:
    """The `stages` section: the stages to run (a stage left out is not run), in pipeline order."""

    filter: Optional[StageSpec] = None
    download: Optional[StageSpec] = None
    encode: Optional[StageSpec] = None
    train: Optional[StageSpec] = None
    evaluate: Optional[StageSpec] = None

    def listed(self) -> dict[str, StageSpec]:
        return {stage: getattr(self, stage) for stage in STAGES if getattr(self, stage) is not None}


@dataclass
class PipelineConfig:
    """The pipeline's own keys. Checked on construction, each listed stage's config too, as run_pipeline builds
    it (its YAML + overrides, chained paths stood in for: `check_stages`); a ValueError names the problem."""

    CONFIG_NAME: ClassVar[str] = "pipeline"
    REQUIRED: ClassVar[tuple] = ("output",)  # null or "": an error naming them (dataclass_from)
    name: str = "pipeline"
    output: Optional[str] = None  # every stage writes under <output>/<stage>
    input: Optional[str] = None  # LAION metadata parquet (file, directory, glob or URI)
    mlflow: MlflowConfig = field(default_factory=lambda: MlflowConfig(experiment="infgen-pipeline"))
    ray: RayConfig = field(default_factory=RayConfig)
    stages: Stages = field(default_factory=Stages)

    def __post_init__(self) -> None:
        check_stages(self)


@dataclass
class PipelineResult:
    stages: dict[str, Any] = field(default_factory=dict)  # stage → StageResult / TrainResult
    run_ids: dict[str, Optional[str]] = field(default_factory=dict)  # stage → MLflow run id ("pipeline": parent)
    seconds: dict[str, float] = field(default_factory=dict)


def stage_runners() -> dict[str, tuple[type, Callable[[Any], Any]]]:
    """Stage → (its config dataclass, its run function)."""
    from pipelines.download import DownloadConfig, run_download
    from pipelines.encode import EncodeConfig, run_encode
    from pipelines.evaluate import EvalConfig, run_evaluate
    from pipelines.filter import FilterConfig, run_filter
    from pipelines.train import TrainConfig, run_train

    return {"filter": (FilterConfig, run_filter), "download": (DownloadConfig, run_download),
            "encode": (EncodeConfig, run_encode), "train": (TrainConfig, run_train),
            "evaluate": (EvalConfig, run_evaluate)}


def stage_config(cfg: PipelineConfig, stage: str, wiring: Mapping[str, Any]) -> Any:
    """The stage's checked config: its YAML with its overrides, then the pipeline's wiring (inputs, outputs,
    tracking, Ray) on top. Raises ValueError naming the stage and the problem."""
    spec = cfg.stages.listed()[stage]
    path = Path(spec.config)
    path = path if path.is_absolute() else ROOT / path
    if not path.is_file():
        raise ValueError(f"stages.{stage}: config {path}: no such file")
    wiring = {**wiring, "mlflow": asdict(cfg.mlflow), "ray": asdict(cfg.ray)}
    try:
        return dataclass_from(stage_runners()[stage][0], OmegaConf.merge(OmegaConf.load(path), spec.overrides, wiring))
    except ValueError as e:
        raise ValueError(f"stages.{stage}: {e}") from None


# the paths the pipeline wires from one stage into the next (see run_pipeline)
WIRED = {"filter": ("input", "output"), "download": ("input", "output"), "encode": ("input", "output"),
         "train": ("data", "output"), "evaluate": ("data", "model", "output")}


def check_stages(cfg: PipelineConfig) -> None:
    """Each listed stage's config as run_pipeline builds it, chained paths stood in for; ValueError naming the
    stage and the problem."""
    for stage in cfg.stages.listed():
        stage_config(cfg, stage, {key: f"{cfg.output}/{stage}/{key}" for key in WIRED[stage]})


def run_pipeline(config: PipelineConfig | Mapping[str, Any], input_uri: Optional[str] = None) -> PipelineResult:
    """Run the stages listed in `config.stages` (in pipeline order) on `input_uri` (LAION metadata parquet;
    default: `config.input`)."""
    cfg = dataclass_from(PipelineConfig, config)
    runners = stage_runners()
    output = Path(cfg.output).resolve() if "://" not in cfg.output else cfg.output
    input_uri = input_uri or cfg.input
    cfg.ray.init()

    result = PipelineResult()
    lineage = {"infgen.stage": "pipeline", "infgen.input": str(input_uri), "infgen.output": str(output),
               "infgen.config_hash": config_hash(asdict(cfg))}
    with cfg.mlflow.tracker(cfg.name, tags=lineage) as parent:
        parent.log_params({"stages": list(cfg.stages.listed()), "output": str(output), "input": str(input_uri)})
        result.run_ids["pipeline"] = parent.run_id
        if parent.run_id:  # every stage's Tracker (driver or Ray worker) nests under this run
            os.environ[PARENT_RUN_ENV] = parent.run_id
        try:
            def run(stage: str, **chained: Any) -> Any:
                wiring = {**chained, "output": f"{output}/{stage}"}
                return runners[stage][1](stage_config(cfg, stage, wiring))

            current, encoded, model = input_uri, None, None
            for stage in cfg.stages.listed():
                print(f"\n===== {stage} =====", flush=True)
                start = time.time()
                if stage == "filter":
                    out = run(stage, input=str(current))
                    current = out.output
                elif stage == "download":
                    out = run(stage, input=str(current))
                    current = f"{out.output}/shards"
                elif stage == "encode":
                    out = run(stage, input=str(current))
                    current = encoded = out.output
                elif stage == "train":
                    out = run(stage, data=str(current))
                    model = out.model_dir
                else:
                    out = run(stage, **{k: str(v) for k, v in (("data", encoded), ("model", model)) if v is not None})
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
