"""The cluster configs (conf/cluster/*.yaml) parse into each stage's own config/validation, without running
anything: a misspelt key or a bad value fails here, not hours into a job on the cluster."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from jobs.config import load_job_config
from pipelines.config import dataclass_from

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "conf" / "cluster"
SHARED = "/mnt/shared/infgen/"


def plain_config(config) -> dict:
    """A loaded config as a plain dict, interpolations resolved (what dataclass_from reads)."""
    return OmegaConf.to_container(config, resolve=True)


def _filter(cfg: dict) -> None:
    from pipelines.filter import FilterConfig

    params = dataclass_from(FilterConfig, cfg).params()
    assert params["min_pixels"] == 2_000_000


def _download(cfg: dict) -> None:
    from pipelines.download import DownloadConfig

    assert dataclass_from(DownloadConfig, cfg).distributor == "ray"


def _encode(cfg: dict) -> None:
    from pipelines.encode import EncodeConfig

    enc = dataclass_from(EncodeConfig, cfg)
    assert (enc.num_gpus, enc.num_actors, enc.precision, enc.input_size) == (1, 8, "fp16", 512)


def _keys(tree: dict, prefix: str = "") -> set[str]:
    """Dotted keys, descending into the sections whose keys the local config lists one by one."""
    keys = set()
    for key, value in tree.items():
        keys.add(prefix + key)
        if isinstance(value, dict) and key in ("train", "samples", "mlflow", "ray"):
            keys |= _keys(value, f"{prefix}{key}.")
    return keys


def _train(cfg: dict) -> None:
    from infgen.models import INFGEN_PRESETS, InfGenConfig
    from pipelines.train import TrainConfig

    # the same keys as the local config the training tests run with
    local = plain_config(OmegaConf.load(ROOT / "conf" / "train" / "local.yaml"))
    assert _keys(cfg) == _keys(local), f"keys differ from conf/train/local.yaml: {_keys(cfg) ^ _keys(local)}"
    checked = dataclass_from(TrainConfig, cfg)  # every section by its dataclass (unknown keys are errors)
    assert checked.optim.total_steps == cfg["train"]["steps"]
    assert not checked.loss.lpips_random_backbone  # a real run reports LPIPS: the pretrained backbone
    assert cfg["preset"] in INFGEN_PRESETS
    model = InfGenConfig(**{**INFGEN_PRESETS[cfg["preset"]], **cfg["model"]})
    train = cfg["train"]
    assert train["use_gpu"] and train["num_workers"] == 8 and cfg["optim"]["bf16"]
    assert train["batch_size"] % train["num_workers"] == 0
    assert train["sizes"][0] <= train["sizes"][1] <= model.max_size
    assert all(s % train["multiple"] == 0 for s in train["sizes"]) and train["multiple"] % model.scale == 0
    assert all(max(hw) <= model.max_size for hw in cfg["samples"]["sizes"])
    # targets are resized from the encoded high-resolution crops: never ask for more than the crops hold
    encode = plain_config(OmegaConf.load(CLUSTER / "encode.yaml"))
    assert train["sizes"][1] <= encode["hr_max_side"]
    assert cfg["output"].startswith(SHARED) and "://" not in cfg["output"]  # written with plain file I/O


def _evaluate(cfg: dict) -> None:
    from pipelines.evaluate import EvalConfig

    dataclass_from(EvalConfig, cfg)


def _decode(cfg: dict) -> None:
    from pipelines.decode import DecodeConfig

    local = plain_config(OmegaConf.load(ROOT / "conf/decode/local.yaml"))
    assert _keys(cfg) == _keys(local), f"keys differ from conf/decode/local.yaml: {_keys(cfg) ^ _keys(local)}"
    decode = dataclass_from(DecodeConfig, cfg)
    assert decode.workers.num_gpus >= 1 and decode.tile and max(max(s) for s in decode.sizes) <= 8192
    stage2 = plain_config(OmegaConf.load(CLUSTER / "train_stage2.yaml"))
    assert cfg["model"] == f"models:/{stage2['mlflow']['registered_model_name']}@newest"  # what training registers


VALIDATORS = {"filter.yaml": _filter, "download.yaml": _download, "encode.yaml": _encode,
              "train_stage1.yaml": _train, "train_stage2.yaml": _train, "evaluate.yaml": _evaluate,
              "decode.yaml": _decode}


def test_every_stage_has_a_cluster_config():
    names = {p.name for p in CLUSTER.glob("*.yaml")}
    assert {"filter.yaml", "download.yaml", "encode.yaml", "train_stage1.yaml", "train_stage2.yaml"} <= names
    assert names <= set(VALIDATORS), f"no validator in this test for {sorted(names - set(VALIDATORS))}"


@pytest.mark.parametrize("path", sorted(CLUSTER.glob("*.yaml")), ids=lambda p: p.name)
def test_cluster_config_is_valid(path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    text = path.read_text()
    assert text.startswith("#") and "ray job submit" in text.split("\n\n")[0], "header: purpose + submit command"
    cfg = plain_config(load_job_config(path))  # what the job sees (interpolations resolved)
    per_run = [k for k in ("input", "data") if k in cfg and cfg[k] is None]  # required on the command line
    assert all(f"{k}=" in text.split("\n\n")[0] for k in per_run), f"the header's command must set {per_run}"
    cfg.update({k: f"{SHARED}stand-in/{k}" for k in per_run})
    assert cfg["mlflow"]["tracking_uri"].startswith("http://")  # the placeholder, when nothing is set
    if "output" in cfg:
        assert cfg["output"].startswith(SHARED) or "://" in cfg["output"]
    VALIDATORS[path.name](cfg)


def test_tracking_uri_comes_from_the_environment_or_the_command_line(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    for path in CLUSTER.glob("*.yaml"):
        assert plain_config(load_job_config(path))["mlflow"]["tracking_uri"] == "http://tracking.example:5000"
        cfg = load_job_config(path, ["mlflow.tracking_uri=http://other:1"])
        assert plain_config(cfg)["mlflow"]["tracking_uri"] == "http://other:1"


def test_stage2_starts_from_stage1():
    stage1, stage2 = (plain_config(OmegaConf.load(CLUSTER / f"train_stage{i}.yaml")) for i in (1, 2))
    assert stage2["init_from"] == f"{stage1['output']}/{stage1['name']}/model"  # stage 1's exported model
    assert stage2["preset"] == stage1["preset"] and stage2["data"] == stage1["data"]
    assert stage2["train"]["sizes"][1] == 2048 and stage1["train"]["sizes"] == [512, 1024]


def test_evaluation_holdout_matches_training():
    """The images the evaluation scores must be the ones both training stages held out: both stages hold out the
    same images (a split, not nothing), and the evaluation reads the split from the stage-2 model's record, never
    scoring a row it trained on."""
    from pipelines.evaluate import EvalConfig
    from pipelines.train import TrainConfig

    data = "/mnt/shared/infgen/data/encoded/0123456789abcdef"
    stage1, stage2 = (dataclass_from(TrainConfig, load_job_config(CLUSTER / f"train_stage{i}.yaml", [f"data={data}"]))
                      for i in (1, 2))
    assert stage1.holdout == stage2.holdout and stage1.holdout.fraction > 0
    evaluation = dataclass_from(EvalConfig, load_job_config(CLUSTER / "evaluate.yaml", [f"data={data}"]))
    assert evaluation.holdout is None and not evaluation.allow_trained_rows  # the model's record of its split
    assert evaluation.model == f"{stage2.output}/{stage2.name}/model" and evaluation.data_kind == "encoded"


@pytest.mark.parametrize("cluster, local", [("filter", "data/filter"), ("download", "data/download"),
                                            ("encode", "data/encode"), ("train_stage1", "train/local"),
                                            ("train_stage2", "train/local")])
def test_same_keys_as_the_local_config(cluster, local):
    """A key added to a stage (and its local config) must reach its cluster config too."""
    def keys(path: Path) -> set[str]:
        tree = OmegaConf.to_container(OmegaConf.load(path))
        return {f"{k}.{sub}" if sub else k for k, v in tree.items()
                for sub in (list(v) if isinstance(v, dict) and k in ("train", "ray", "mlflow", "samples", "holdout")
                            else [None])}

    theirs, ours = keys(ROOT / "conf" / f"{local}.yaml"), keys(CLUSTER / f"{cluster}.yaml")
    assert ours == theirs, f"conf/cluster/{cluster}.yaml vs conf/{local}.yaml: {sorted(ours ^ theirs)}"


def test_overrides_of_nested_keys_reach_the_stage_checks():
    """conf/cluster/train_stage1.yaml documents `model.grad_checkpointing=true` on its `model: {}` section. A key
    inside a section overrides like any other, whether the file has it or not; which keys exist is the stage's
    config to say, and an unknown one is an error naming it, dotted."""
    from pipelines.train import TrainConfig

    assert "model.grad_checkpointing=true" in (CLUSTER / "train_stage1.yaml").read_text()
    data = "data=/mnt/shared/infgen/data/encoded/0123456789abcdef"
    load = lambda name, *overrides: dataclass_from(TrainConfig, load_job_config(CLUSTER / name, [*overrides, data]))
    cfg = load("train_stage1.yaml", "model.grad_checkpointing=true", "loss.l2_weight=0.5")
    assert cfg.model == {"grad_checkpointing": True} and cfg.loss.l2_weight == 0.5  # l2_weight: not in the file
    assert cfg.loss.lpips_weight == 0.1  # the section's other keys stay as the file has them
    stage2 = load("train_stage2.yaml", "model.max_size=4096")  # a section the file fills: the same
    assert stage2.model == {"grad_checkpointing": True, "max_size": 4096}
    with pytest.raises(ValueError, match=r"training config: unknown keys \['model.grad_checkpointin'\]"):
        load("train_stage1.yaml", "model.grad_checkpointin=true")
    with pytest.raises(ValueError, match=r"training config: unknown keys \['loss.foo', 'train.stepz'\]"):
        load("train_stage1.yaml", "train.stepz=5", "loss.foo=1")
    with pytest.raises(ValueError, match=r"override 'input=\.\.\.': the value does not parse as YAML"):
        load_job_config(ROOT / "conf/data/download.yaml", ["input=..."])
