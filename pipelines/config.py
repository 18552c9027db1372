"""Stage configs: one loader for every stage, and the sections the stages share.

A stage's config is a dataclass whose fields are its keys (FilterConfig, DownloadConfig, EncodeConfig,
TrainConfig, EvalConfig, DecodeConfig, PipelineConfig, DemoConfig); a section is a nested dataclass (RayConfig,
MlflowConfig, pipelines.holdout.Holdout, TrainConfig's train/optim/loss/samples, ...). `dataclass_from` builds one
from a mapping, as conf/ YAML gives it (jobs.config loads the file and the command line's overrides):

  * an unknown key anywhere is one ValueError naming every such key, dotted (`loss.foo`, `workers.gpus`);
  * a section's keys override its defaults one by one (`mlflow: {tracking_uri: ...}` keeps the stage's experiment);
  * each dataclass checks its own values in `__post_init__` (ValueError naming the key).

The object is built once, on the driver, and travels to Ray workers as it is (pickling does not check it again).
"""

from __future__ import annotations

import functools
import typing
from dataclasses import MISSING, Field, dataclass, fields, is_dataclass
from typing import Any, Mapping, Optional, Sequence, TypeVar

from pipelines.common import init_ray

T = TypeVar("T")


def plain_config(config: Any) -> dict:
    """An OmegaConf config (as jobs/ load it, interpolations resolved) or any mapping → a plain dict."""
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else dict(config)


def require(values: Mapping[str, Any], keys: Sequence[str], what: str) -> None:
    """ValueError naming every key of `keys` that is missing, null or empty: paths a stage cannot run without."""
    missing = [k for k in keys if values.get(k) in (None, "")]
    if missing:
        raise ValueError(f"{what} config: {', '.join(missing)} must be set (e.g. {missing[0]}=PATH on the command "
                         f"line)")


def dataclass_from(cls: type[T], values: Any) -> T:
    """A config (an OmegaConf DictConfig, a mapping, or already a `cls`) → the dataclass `cls`, sections built
    recursively over their defaults. Raises ValueError: every unknown key at once, dotted; a missing required
    key; a section that is not a mapping; or whatever a dataclass's own checks reject."""
    if isinstance(values, cls):
        return values
    label = getattr(cls, "CONFIG_NAME", cls.__name__)
    values = _mapping(values, label, "")
    unknown = sorted(_unknown_keys(cls, values, ""))
    if unknown:
        raise ValueError(f"{label} config: unknown keys {unknown}")
    return _build(cls, values, label, "")


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


def keys_of(schema: type) -> dict:
    """Field metadata for a dict of overrides whose keys must be fields of the dataclass `schema` (a partial
    section: TrainConfig.model overrides the preset's InfGenConfig); its values are the owner's to check."""
    return {"keys_of": schema}


# ---- the loader's parts -------------------------------------------------------------------------------------


def _mapping(values: Any, label: str, where: str) -> dict:
    if values is None:
        return {}
    if not isinstance(values, Mapping):  # an OmegaConf DictConfig is a Mapping too
        name = f"section {where.rstrip('.')}" if where else "config"
        raise ValueError(f"{label} config: the {name} must be a mapping, got {type(values).__name__}")
    return plain_config(values)


def _init_fields(cls: type) -> dict[str, Field]:
    return {f.name: f for f in fields(cls) if f.init}


@functools.lru_cache(maxsize=None)
def _sections(cls: type) -> dict[str, type]:
    """Field name → the dataclass type of each section field of `cls` (`X` or `Optional[X]`)."""
    found = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) else [hint]
        if len(args) == 1 and isinstance(args[0], type) and is_dataclass(args[0]):
            found[name] = args[0]
    return found


def _unknown_keys(cls: type, values: Mapping[str, Any], prefix: str) -> list[str]:
    known = _init_fields(cls)
    unknown = [prefix + key for key in values if key not in known]
    for key, value in values.items():
        if key not in known or not isinstance(value, Mapping):
            continue
        section, schema = _sections(cls).get(key), known[key].metadata.get("keys_of")
        if section:
            unknown += _unknown_keys(section, value, f"{prefix}{key}.")
        elif schema:  # a dict of overrides: its keys, not its values
            unknown += [f"{prefix}{key}.{k}" for k in value if k not in _init_fields(schema)]
    return unknown


def _default(f: Field) -> Any:
    if f.default_factory is not MISSING:
        return f.default_factory()
    return None if f.default is MISSING else f.default


def _build(cls: type[T], values: Mapping[str, Any], label: str, prefix: str) -> T:
    known = _init_fields(cls)
    missing = [prefix + name for name, f in known.items()
               if name not in values and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise ValueError(f"{label} config: missing keys {missing}")
    kwargs = dict(values)
    for name, section in _sections(cls).items():
        value = kwargs.get(name, MISSING)
        if value is MISSING or isinstance(value, section):
            continue
        base = _default(known[name])
        if value is None and (base is None or not is_dataclass(base)):
            continue  # an optional section left out
        value = _mapping(value, label, f"{prefix}{name}.")
        defaults = {f: getattr(base, f) for f in _init_fields(section)} if is_dataclass(base) else {}
        kwargs[name] = _build(section, {**defaults, **value}, label, f"{prefix}{name}.")
    return cls(**kwargs)
