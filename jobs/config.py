"""Job configuration: a YAML file plus `key=value` overrides (dotted for nested keys), via OmegaConf."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError


def _open_empty_sections(node: DictConfig) -> None:
    """An empty section (`model: {}`) is an open map: overrides add keys to it (`model.grad_checkpointing=true`),
    which the stage then checks against what it knows."""
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            if len(child) == 0:
                OmegaConf.set_struct(child, False)
            else:
                _open_empty_sections(child)


def load_job_config(path: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """Load `path` and apply overrides; an override of a key the file does not have is an error, except
    inside a section the file leaves empty (`{}`), whose keys the stage checks itself."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config {path}: no such file")
    config = OmegaConf.load(path)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        try:
            OmegaConf.from_dotlist([item])
        except Exception as e:  # YAML that does not parse (a value of `...`, an unclosed bracket)
            raise ValueError(f"override {item!r}: the value does not parse as YAML ({type(e).__name__}); quote "
                             f"it") from None
    OmegaConf.set_struct(config, True)
    _open_empty_sections(config)
    try:
        config = OmegaConf.merge(config, OmegaConf.from_dotlist(list(overrides)))
    except ConfigKeyError as e:
        raise ValueError(f"config {path}: unknown key in overrides ({e.msg})") from None
    OmegaConf.set_struct(config, False)
    return config


@contextlib.contextmanager
def job_errors() -> Iterator[None]:
    """Bad input or config (a ValueError naming the problem) → that one line on stderr and exit status 2, not a
    traceback; anything else is a bug and keeps its traceback."""
    try:
        yield
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


PLACEHOLDERS = ("FINGERPRINT", "<fp>", "<fingerprint>", "YOUR-BUCKET")


def check_placeholders(config: DictConfig) -> None:
    """A value still holding a documentation placeholder is an error naming its key."""
    def walk(node, prefix: str) -> None:
        for key, value in (node.items() if isinstance(node, dict) else enumerate(node)):
            name = f"{prefix}{key}"
            if isinstance(value, (dict, list)):
                walk(value, f"{name}.")
            elif isinstance(value, str) and any(p in value for p in PLACEHOLDERS):
                raise ValueError(f"{name}={value!r} still holds a placeholder: set it on the command line")

    walk(OmegaConf.to_container(config, resolve=True), "")


def parse_job_args(description: str, argv: Optional[Sequence[str]] = None,
                   check: Optional[Callable[[DictConfig], Any]] = None) -> DictConfig:
    """`--config FILE [key=value ...]` → the job's config. With `--dry-run`: check it (unknown keys, values,
    required paths, placeholders left in; `check` is the stage's own check), print it and exit 0, running
    nothing; a bad config exits 2 with the problem named."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the config (keys, values, required paths) and print it; run nothing")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, dotted for nested keys")
    args = parser.parse_args(argv)
    try:
        config = load_job_config(args.config, args.overrides)
        if args.dry_run:
            check_placeholders(config)
            if check is not None:
                check(config)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    if args.dry_run:
        print(OmegaConf.to_yaml(config, resolve=True), end="")
        parser.exit(0, f"{args.config}: config OK (--dry-run: nothing was run)\n")
    return config
