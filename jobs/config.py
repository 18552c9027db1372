"""Job configuration: a YAML file plus `key=value` overrides (dotted for nested keys), via OmegaConf."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError


def load_job_config(path: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """Load `path` and apply overrides; an override of a key the file does not have is an error."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config {path}: no such file")
    config = OmegaConf.load(path)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
    OmegaConf.set_struct(config, True)
    try:
        config = OmegaConf.merge(config, OmegaConf.from_dotlist(list(overrides)))
    except ConfigKeyError as e:
        raise ValueError(f"config {path}: unknown key in overrides ({e.msg})") from None
    OmegaConf.set_struct(config, False)
    return config


def parse_job_args(description: str, argv: Optional[Sequence[str]] = None) -> DictConfig:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, dotted for nested keys")
    args = parser.parse_args(argv)
    return load_job_config(args.config, args.overrides)
