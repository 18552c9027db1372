"""The one config loader (pipelines.config.dataclass_from) and the job runner (jobs.config.run_job): every stage's
config is a dataclass built from YAML + overrides, checked once, with unknown keys named, dotted."""

import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Optional

import pytest

from jobs.config import load_job_config, run_job
from pipelines.config import KEYS_OF, MlflowConfig, RayConfig, dataclass_from
from pipelines.holdout import Holdout

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Inner:
    size: int = 8
    mode: str = "grid"

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"inner.size must be >= 1, got {self.size}")


@dataclass
class Stage:
    CONFIG_NAME: ClassVar[str] = "toy"
    REQUIRED: ClassVar[tuple] = ("output",)
    path: str  # required: no default
    output: Optional[str] = None  # required: null or "" is unset
    inner: Inner = field(default_factory=lambda: Inner(size=16))  # the stage's own default for the section
    maybe: Optional[Inner] = None
    overrides: dict = field(default_factory=dict, metadata={KEYS_OF: Inner})
    mlflow: MlflowConfig = field(default_factory=lambda: MlflowConfig(experiment="toy-experiment"))


def test_sections_are_built_over_the_stage_defaults():
    cfg = dataclass_from(Stage, {"path": "p", "output": "o", "inner": {"mode": "random"},
                                 "mlflow": {"tracking_uri": "http://x"}})
    assert cfg.inner == Inner(size=16, mode="random")  # the stage's size, the given mode
    assert cfg.mlflow == MlflowConfig(tracking_uri="http://x", experiment="toy-experiment")
    assert cfg.maybe is None
    assert dataclass_from(Stage, {"path": "p", "output": "o", "maybe": {"size": 2}}).maybe == Inner(2)
    assert dataclass_from(Stage, {"path": "p", "output": "o", "inner": None}).inner == Inner(size=16)  # the defaults
    assert dataclass_from(Stage, cfg) is cfg  # a checked config passes as it is
    assert pickle.loads(pickle.dumps(cfg)) == cfg  # what Ray ships to workers


def test_every_unknown_key_is_named_dotted_at_once():
    values = {"path": "p", "output": "o", "pth": 1, "inner": {"sise": 1}, "maybe": {"x": 1},
              "overrides": {"size": 2, "colour": 1}, "mlflow": {"experiment_name": "e"}}
    with pytest.raises(ValueError) as error:
        dataclass_from(Stage, values)
    assert str(error.value) == ("toy config: unknown keys ['inner.sise', 'maybe.x', 'mlflow.experiment_name', "
                                "'overrides.colour', 'pth']")


def test_missing_keys_bad_sections_and_bad_values_are_named():
    with pytest.raises(ValueError, match=r"toy config: path must be set \(e.g. path=PATH"):
        dataclass_from(Stage, {"output": "o"})
    with pytest.raises(ValueError, match=r"toy config: path, output must be set"):
        dataclass_from(Stage, {"output": ""})
    with pytest.raises(ValueError, match=r"toy config: output must be set"):  # a checked config passed in too
        dataclass_from(Stage, Stage(path="p"))
    with pytest.raises(ValueError, match="toy config: the section inner must be a mapping, got int"):
        dataclass_from(Stage, {"path": "p", "output": "o", "inner": 3})
    with pytest.raises(ValueError, match="toy config: the config must be a mapping, got list"):
        dataclass_from(Stage, [1])
    with pytest.raises(ValueError, match="inner.size must be >= 1, got 0"):  # the section's own check
        dataclass_from(Stage, {"path": "p", "output": "o", "inner": {"size": 0}})
    with pytest.raises(ValueError, match=r"toy config: inner.size='big': "):  # a value of the wrong type
        dataclass_from(Stage, {"path": "p", "output": "o", "inner": {"size": "big"}})


def test_training_model_overrides_are_checked_by_their_keys():
    from pipelines.train import TrainConfig

    with pytest.raises(ValueError, match=r"training config: unknown keys \['model.depht'\]"):
        dataclass_from(TrainConfig, {"data": "d", "output": "o", "model": {"depht": 2, "width": 64}})
    assert dataclass_from(TrainConfig, {"data": "d", "output": "o", "model": {"width": 64}}).model == {"width": 64}


def test_holdout_is_checked_without_reading_its_list(tmp_path):
    section = dataclass_from(Holdout, {"fraction": None, "urls": str(tmp_path / "later.txt")})
    assert (section.fraction, section.seed) == (0.0, 0)  # nulls: nothing held out by hash
    with pytest.raises(RuntimeError, match="was not read"):
        bool(section)  # an unread list would hold nothing out: never silently
    (tmp_path / "later.txt").write_text("http://a/x.jpg\n")
    assert section.read().held_out("https://b/x.jpg") and section.read() == section


def test_ray_and_mlflow_sections_are_shared():
    from pipelines.decode import DecodeConfig
    from pipelines.filter import FilterConfig

    cfgs = [dataclass_from(cls, {"input": "i", "output": "o", "ray": {"num_cpus": 2}, **extra})
            for cls, extra in ((FilterConfig, {}), (DecodeConfig, {"model": "m"}))]
    assert all(type(c.ray) is RayConfig and c.ray.num_cpus == 2 for c in cfgs)
    assert [c.mlflow.experiment for c in cfgs] == ["infgen-data", "infgen-decode"]
    # the stages whose section is a subclass keep their experiment when a key of the section is set
    from pipelines.encode import EncodeConfig
    from pipelines.train import TrainConfig

    section = {"mlflow": {"tracking_uri": "http://x"}}
    assert dataclass_from(EncodeConfig, {"input": "i", "output": "o", **section}).mlflow.experiment == "infgen-data"
    assert dataclass_from(TrainConfig, {"data": "d", "output": "o", **section}).mlflow.experiment == "infgen-train"


def test_a_job_checks_its_config_once_then_runs_the_object(monkeypatch, capsys):
    from pipelines.filter import FilterConfig

    seen = []
    argv = ["--config", str(ROOT / "conf/data/filter.yaml"), "input=x", "output=y", "max_rows=7", "ray.num_cpus=1"]
    run_job("doc", FilterConfig, run=lambda cfg: seen.append(cfg) or "done", report=print, argv=argv)
    assert isinstance(seen[0], FilterConfig) and seen[0].max_rows == 7 and seen[0].ray.num_cpus == 1
    assert capsys.readouterr().out == "done\n"
    with pytest.raises(SystemExit) as done:  # a key the stage does not have: exit 2, named, nothing run
        run_job("doc", FilterConfig, run=seen.append, report=print, argv=[*argv, "ray.cpus=1"])
    assert done.value.code == 2 and "filter config: unknown keys ['ray.cpus']" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:  # a ValueError from the run: one line, exit 2
        run_job("doc", FilterConfig, run=lambda cfg: int("x"), report=print, argv=argv)
    assert done.value.code == 2 and "error: invalid literal" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:  # --dry-run prints the checked config, defaults filled in
        run_job("doc", FilterConfig, run=seen.append, report=print, argv=["--dry-run", *argv])
    out = capsys.readouterr().out
    assert done.value.code == 0 and "max_rows: 7" in out and "experiment: infgen-data" in out and len(seen) == 1


def test_overrides_are_checked_by_the_stage_not_the_file(tmp_path):
    (tmp_path / "c.yaml").write_text("a: 1\nsection: {}\nsizes: [1, 2]\n")
    cfg = load_job_config(tmp_path / "c.yaml", ["section.b=2", "sizes=[3,4]", "new=x"])
    assert cfg.section.b == 2 and list(cfg.sizes) == [3, 4] and cfg.new == "x"  # keys the file lacks too
    with pytest.raises(ValueError, match="the overrides do not apply"):
        load_job_config(tmp_path / "c.yaml", ["sizes.x=1"])  # a key of a list
    with pytest.raises(ValueError, match="is not key=value"):
        load_job_config(tmp_path / "c.yaml", ["a"])
