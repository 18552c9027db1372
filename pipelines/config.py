"""Stage configs: one loader for every stage, and the sections the stages share.

A stage's config is a dataclass whose fields are its keys (FilterConfig, DownloadConfig, EncodeConfig,
TrainConfig, EvalConfig, DecodeConfig, PipelineConfig, DemoConfig); a section is a nested dataclass (RayConfig,
MlflowConfig, pipelines.holdout.Holdout, TrainConfig's train/optim/loss/samples, ...). `dataclass_from` builds one
from a mapping, as conf/ YAML gives it (jobs.config loads the file and the command line's overrides), as an
OmegaConf structured config (the dataclass is the schema: its field types are checked):

  * an unknown key anywhere is one ValueError naming every such key, dotted (`loss.foo`, `workers.gpus`);
  * a section's keys override its defaults one by one (`mlflow: {tracking_uri: ...}` keeps the stage's experiment);
  * a key the stage cannot run without (a field without a default, or one its class attribute `REQUIRED`
    names, e.g. `("data", "output")`, left null or empty), or a value of the wrong type, is a ValueError naming
    the key;
  * each dataclass checks its own values in `__post_init__` (ValueError naming the key).

The object is built once, on the driver, and travels to Ray workers as it is (pickling does not check it again).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, Mapping, Optional, TypeVar, Union

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipelines.common import init_ray

T = TypeVar("T")

# A number field of a config: OmegaConf keeps an int as written, where a `float` field would turn 1 into 1.0 (and
# so change the params a stage logs and the output fingerprints that hash them).
Number = Union[int, float]

# Field metadata {KEYS_OF: schema} marks a dict of overrides whose keys must be fields of the dataclass `schema`
# (a partial section: TrainConfig.model overrides the preset's InfGenConfig); its values are the owner's to check.
KEYS_OF = "keys_of"


def dataclass_from(cls: type[T], values: Any) -> T:
    """A config (an OmegaConf DictConfig, a mapping, or already a `cls`) → the dataclass `cls`: `values` merged
    over the OmegaConf structured config of `cls`, sections key by key over their defaults. Raises ValueError,
    prefixed with the stage's label: every unknown key at once, dotted; a section or config that is not a
    mapping; a required key unset (a field without a default; a key of `cls.REQUIRED` null or empty, also on a
    `cls` passed in); a value of the wrong type (the key and the value); or whatever a dataclass's own checks
    reject."""
    label = getattr(cls, "CONFIG_NAME", cls.__name__)
    if not isinstance(values, cls):
        if isinstance(values, DictConfig):
            values = OmegaConf.to_container(values, resolve=True)
        if values is not None and not isinstance(values, Mapping):
            raise ValueError(f"{label} config: the config must be a mapping, got {type(values).__name__}")
        unknown: list[str] = []
        values = _known(cls, values or {}, label, "", unknown)
        if unknown:  # OmegaConf would stop at the first one
            raise ValueError(f"{label} config: unknown keys {sorted(unknown)}")
        schema = OmegaConf.structured(cls)  # outside the try: a field type OmegaConf cannot hold is a bug, not input
    try:
        config = values if isinstance(values, cls) else OmegaConf.merge(schema, values)
        unset = [k for k in getattr(cls, "REQUIRED", ()) if getattr(config, k) in (None, "")]
        if not isinstance(config, cls):  # a field without a default, left out (an instance has them all)
            unset = sorted(OmegaConf.missing_keys(config)) + unset
        if unset:
            raise ValueError(f"{label} config: {', '.join(unset)} must be set (e.g. {unset[0]}=PATH on the command "
                             f"line)")
        return config if isinstance(config, cls) else OmegaConf.to_object(config)  # runs each __post_init__
    except OmegaConfBaseException as e:  # a value of the wrong type
        reason = str(e).splitlines()[0]  # the lines after it repeat the key and name the dataclasses
        if "is not a ListConfig" in reason:  # OmegaConf's words for one value where a list belongs
            reason = f"a list is needed, e.g. {e.full_key}=[{e.value}]"
        raise ValueError(f"{label} config: {f'{e.full_key}={e.value!r}: ' if e.full_key else ''}{reason}") from None


@dataclass
class RayConfig:
    """The `ray` section: which cluster a stage runs on."""

    address: Optional[str] = None  # null: RAY_ADDRESS (as `ray job submit` sets it), else a local Ray
    num_cpus: Optional[int] = None  # a local Ray only; null: every core

    def init(self) -> None:
        """Connect to the cluster, or start a local Ray (pipelines.common.init_ray); a no-op once connected."""
        init_ray(self.address, self.num_cpus)


@dataclass
class MlflowConfig:
    """The `mlflow` section: where a stage's run is logged. A stage sets its own default experiment where it
    declares the section: `field(default_factory=lambda: MlflowConfig(experiment=...))` (or its subclass)."""

    tracking_uri: Optional[str] = None  # null: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    experiment: str = "infgen"

    def tracker(self, run_name: str, **kwargs: Any):
        """A pipelines.tracking.Tracker for one run in this experiment (`kwargs`: tags, run_id, ...)."""
        from pipelines.tracking import Tracker

        return Tracker(self.tracking_uri, self.experiment, run_name, **kwargs)


# ---- what OmegaConf does not check ---------------------------------------------------------------------------


def _known(cls: type, values: Mapping[str, Any], label: str, prefix: str, unknown: list[str]) -> dict:
    """`values` ready to merge over `cls`'s defaults: a null section left out, so that its defaults stand (null
    for an optional one); the dotted name of each key `cls` lacks appended to `unknown`, the keys of a KEYS_OF
    dict too. Raises ValueError for a section that is neither a mapping nor an instance of its dataclass."""
    known, hints, kept = {f.name: f for f in fields(cls) if f.init}, typing.get_type_hints(cls), {}
    for key, value in values.items():
        if key not in known:
            unknown.append(prefix + key)
            continue
        hint = hints[key]  # a section is `X` or `Optional[X]` with X a dataclass
        section = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Union else hint
        schema = known[key].metadata.get(KEYS_OF)
        if isinstance(section, type) and is_dataclass(section):
            if value is None:
                continue
            if not isinstance(value, (Mapping, section)):
                raise ValueError(f"{label} config: the section {prefix}{key} must be a mapping, got "
                                 f"{type(value).__name__}")
            if isinstance(value, Mapping):
                value = _known(section, value, label, f"{prefix}{key}.", unknown)
        elif schema and isinstance(value, Mapping):
            names = {f.name for f in fields(schema) if f.init}
            unknown += [f"{prefix}{key}.{k}" for k in value if k not in names]
        kept[key] = value
    return kept
