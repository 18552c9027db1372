"""Every `python -m jobs.<name> --config ...` command that the README, the conf/ headers and the jobs' own
docstrings show runs as written, with `--dry-run` (the job checks its config: keys, values, required paths,
placeholders left in; nothing runs). Placeholders a user fills in (`FINGERPRINT`, `[key=value ...]`) get a value."""

from __future__ import annotations

import importlib
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILLED = {"FINGERPRINT": "0123456789abcdef", "YOUR-BUCKET": "infgen-example-bucket"}
COMMAND = re.compile(r"python -m jobs\.([a-z_]+)(\s[^`)#]*)?")


def _logical_lines(text: str) -> list[str]:
    """Lines with `\\` continuations joined."""
    return re.sub(r"\\\n\s*(#\s*)?", " ", text).splitlines()


def _sources() -> list[tuple[str, str]]:
    """(where, text) of every place a command is shown: README code blocks, conf headers, job docstrings."""
    readme = (ROOT / "README.md").read_text()
    places = [(f"README.md code block {i}", block)
              for i, block in enumerate(re.findall(r"^```[a-z]*\n(.*?)^```", readme, re.S | re.M))]
    for path in sorted((ROOT / "conf").rglob("*.yaml")):
        header = "\n".join(line.lstrip("# ") for line in path.read_text().splitlines() if line.startswith("#"))
        places.append((str(path.relative_to(ROOT)), header))
    for path in sorted((ROOT / "jobs").glob("*.py")):
        places.append((str(path.relative_to(ROOT)), importlib.import_module(f"jobs.{path.stem}").__doc__ or ""))
    return places


def documented_commands() -> list[tuple[str, str, list[str]]]:
    commands = []
    for where, text in _sources():
        for line in _logical_lines(text):
            for match in COMMAND.finditer(line):
                args = match.group(2) or ""
                if "--config" not in args:
                    continue  # prose naming a job, not a command
                args = args.replace("[key=value ...]", "")
                for placeholder, value in FILLED.items():
                    args = args.replace(placeholder, value)
                commands.append((where, match.group(1), shlex.split(args)))
    return commands


COMMANDS = documented_commands()


def test_the_commands_are_found():
    shown = {job for _, job, _ in COMMANDS}
    assert shown >= {"filter", "download", "encode", "train", "evaluate", "decode", "demo"}
    assert len(COMMANDS) >= 25


@pytest.mark.parametrize("where, job, args", COMMANDS, ids=[f"{w}: {j} {' '.join(a)}"[:120] for w, j, a in COMMANDS])
def test_documented_command_runs_as_written(where, job, args, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow-host:5000")
    monkeypatch.setattr(sys, "argv", [f"jobs.{job}", "--dry-run", *args])
    with pytest.raises(SystemExit) as done:
        importlib.import_module(f"jobs.{job}").main()
    assert done.value.code == 0, f"{where}: python -m jobs.{job} {' '.join(args)}\n{capsys.readouterr().err}"


def test_dry_run_names_a_missing_path_and_a_placeholder(monkeypatch, capsys):
    from jobs import evaluate, train

    monkeypatch.setattr(sys, "argv", ["jobs.evaluate", "--dry-run", "--config", "conf/cluster/evaluate.yaml"])
    with pytest.raises(SystemExit) as done:
        evaluate.main()
    assert done.value.code == 2 and "evaluation config: data must be set" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["jobs.train", "--dry-run", "--config", "conf/cluster/train_stage1.yaml",
                                      "data=/mnt/shared/infgen/data/encoded/FINGERPRINT"])
    with pytest.raises(SystemExit) as done:
        train.main()
    assert done.value.code == 2 and "data='/mnt/shared/infgen/data/encoded/FINGERPRINT' still holds a placeholder" \
        in capsys.readouterr().err
