"""What every job shares: a YAML file plus `key=value` overrides (dotted for nested keys, via OmegaConf), checked
into the stage's config dataclass (pipelines.config.dataclass_from), then the stage run, with bad input reported
as one line and exit status 2 (`run_job`)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from pipelines.config import dataclass_from


def load_job_config(path: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """Load `path` and apply overrides (any key, dotted for nested ones). Which keys exist is the stage's
    config dataclass's to say (dataclass_from names every unknown one); here only the file and the override
    syntax are checked. Raises ValueError naming the file or the override."""
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
    try:
        return OmegaConf.merge(config, OmegaConf.from_dotlist(list(overrides)))
    except Exception as e:  # e.g. a key of a list (`sizes.x=1`)
        raise ValueError(f"config {path}: the overrides do not apply ({type(e).__name__}: {e})") from None


@contextlib.contextmanager
def job_errors(exit_codes: Mapping[type, int]) -> Iterator[None]:
    """An error of a type in `exit_codes` (bad input or config: a ValueError naming the problem) → its one line
    on stderr and that exit status, not a traceback; anything else is a bug and keeps its traceback."""
    try:
        yield
    except tuple(exit_codes) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(next(code for kind, code in exit_codes.items() if isinstance(e, kind))) from None


BAD_INPUT = {ValueError: 2}  # a config or input that is wrong: the message names it
PLACEHOLDERS = ("FINGERPRINT", "<fp>", "<fingerprint>", "YOUR-BUCKET")


def check_placeholders(config: Any) -> None:
    """A value still holding a documentation placeholder is an error naming its key."""
    def walk(node, prefix: str) -> None:
        for key, value in (node.items() if isinstance(node, dict) else enumerate(node)):
            name = f"{prefix}{key}"
            if isinstance(value, (dict, list)):
                walk(value, f"{name}.")
            elif isinstance(value, str) and any(p in value for p in PLACEHOLDERS):
                raise ValueError(f"{name}={value!r} still holds a placeholder: set it on the command line")

    walk(OmegaConf.to_container(config, resolve=True), "")


def run_job(description: str, config_class: type, run: Callable[[Any], Any], report: Callable[[Any], None],
            argv: Optional[Sequence[str]] = None, exit_codes: Mapping[type, int] = BAD_INPUT) -> None:
    """The job entry point: `--config FILE [key=value ...]` → the stage's checked config (`config_class`, on
    the driver, once) → `run(config)` → `report(result)`. With `--dry-run`: check the config (keys, values,
    required keys set, documentation placeholders such as FINGERPRINT left in), print it with its defaults filled
    in and exit 0, running nothing. A bad config exits 2 with the problem named; an error of a type in
    `exit_codes` raised by `run` exits with its code and message."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the config (keys, values, required paths) and print it; run nothing")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, dotted for nested keys")
    args = parser.parse_args(argv)
    try:
        raw = load_job_config(args.config, args.overrides)
        if args.dry_run:  # a run fails on such a path itself, naming its key (it does not exist)
            check_placeholders(raw)
        config = dataclass_from(config_class, raw)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    if args.dry_run:
        print(OmegaConf.to_yaml(json.loads(json.dumps(asdict(config), default=str))), end="")
        parser.exit(0, f"{args.config}: config OK (--dry-run: nothing was run)\n")
    with job_errors(exit_codes):
        result = run(config)
    report(result)
