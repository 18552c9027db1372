"""How far a newcomer walks to follow a training config through the code (issue 14), measured on a real run.

Runs `python -m jobs.train --config conf/train/local.yaml` of a checkout for real (2 Ray Train workers, the tiny
preset, 2 steps, on shards of the photos Python packages ship) under a profiler installed in the driver and in
every Ray worker (Ray's `worker_process_setup_hook`), and records each call of the checkout's functions (jobs/,
pipelines/, infgen/) that the config is passed to:

- a *stop*: a function called with the config or a part of it as an argument other than `self`: a mapping or a
  dataclass (instance or class) that shares at least 2 key names with the YAML file or one of its sections, or
  with InfGenConfig (the model config the preset and `model` overrides build), or a dict holding one of those.
  Key names, not types, so the same rule measures a checkout whose config is a dict and one whose config is
  dataclasses. Counted once per (file, function), in the order first reached (driver first, then the workers);
- a *climb*: a stop called from a stop in a deeper layer (jobs < pipelines < infgen): the walk goes back up;
- a *re-entry*: in that order, a stop in a file the walk had already left for another.

    python benchmarks/code_walk.py --out benchmarks/results/code_walk.json
    python benchmarks/code_walk.py --checkout /path/to/an/older/worktree --out /tmp/before.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path

# the checkout traced: this one, or --checkout (set before any project import, here and in the Ray workers)
ROOT = Path(os.environ.get("INFGEN_CODE_WALK_CHECKOUT") or Path(__file__).resolve().parents[1]).resolve()
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

LAYERS = {"jobs": 0, "pipelines": 1, "infgen": 2}
WALK_DIR = "INFGEN_CODE_WALK_DIR"  # where each traced process appends its stops


def config_keys() -> list[frozenset]:
    """The key names of the training config: the YAML file's top level, each of its sections, and InfGenConfig."""
    from omegaconf import OmegaConf

    from infgen.models import InfGenConfig

    yaml = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/train/local.yaml"))
    sections = [frozenset(yaml)] + [frozenset(v) for v in yaml.values() if isinstance(v, dict) and len(v) >= 2]
    return sections + [frozenset(f.name for f in dataclasses.fields(InfGenConfig))]


def install() -> None:
    """The profiler, in this process and every thread it starts: appends one JSON line per stop to
    $INFGEN_CODE_WALK_DIR/<pid>.jsonl (file, function, layer, the calling stop's layer)."""
    sections = config_keys()
    out = Path(os.environ[WALK_DIR]) / f"{os.getpid()}.jsonl"
    project = {str(ROOT / name) + os.sep: name for name in LAYERS}
    frames: set[int] = set()  # the stops on the stack
    seen: set[tuple[str, str]] = set()

    def names(value) -> frozenset:
        if dataclasses.is_dataclass(value):
            return frozenset(f.name for f in dataclasses.fields(value))
        if isinstance(value, Mapping):
            return frozenset(k for k in value.keys() if isinstance(k, str))
        return frozenset()

    def is_config(value, depth: int = 0) -> bool:
        keys = names(value)
        if any(len(keys & section) >= 2 for section in sections):
            return True
        return depth == 0 and isinstance(value, dict) and any(is_config(v, 1) for v in value.values())

    def profile(frame, event, arg):
        if event == "return":
            frames.discard(id(frame))
            return
        if event != "call":
            return
        filename = frame.f_code.co_filename
        package = next((name for prefix, name in project.items() if filename.startswith(prefix)), None)
        if package is None:
            return
        code = frame.f_code
        arguments = code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]
        if not any(is_config(frame.f_locals.get(name)) for name in arguments if name != "self"):
            return
        frames.add(id(frame))
        parent = frame.f_back
        while parent is not None and id(parent) not in frames:
            parent = parent.f_back
        caller = None
        if parent is not None:
            caller = next(name for prefix, name in project.items() if parent.f_code.co_filename.startswith(prefix))
        key = (os.path.relpath(filename, ROOT), code.co_qualname)
        edge = key + (caller,)
        if edge in seen:
            return
        seen.add(edge)
        with open(out, "a") as f:
            f.write(json.dumps({"file": key[0], "function": key[1], "layer": LAYERS[package],
                                "caller_layer": LAYERS[caller] if caller else None, "pid": os.getpid()}) + "\n")

    sys.setprofile(profile)
    threading.setprofile(profile)


def training_data(directory: Path) -> Path:
    """Two shards in the encode stage's layout: 4 crops of each shipped photo, 16×16 latents of the tiny VAE."""
    from infgen.data import photo_pairs
    from infgen.images import shipped_photos
    from infgen.vae import load_vae

    latents, hr = photo_pairs(list(shipped_photos().values()), load_vae("tiny"), crops_per_image=4, input_size=128,
                              hr_size=256)
    from pipelines.sample_data import write_encoded_shards

    return write_encoded_shards(directory, latents, hr)


def summarise(stops: list[dict]) -> dict:
    """The distinct stops in order, files, climbs and re-entries (see the module docstring)."""
    order, seen = [], set()
    for stop in stops:
        key = (stop["file"], stop["function"])
        if key not in seen:
            seen.add(key)
            order.append(stop)
    climbs = sorted({(s["file"], s["function"]) for s in stops
                     if s["caller_layer"] is not None and s["layer"] < s["caller_layer"]})
    files, reentries, left = [], {}, set()
    for stop in order:
        if files and files[-1] != stop["file"]:
            left.add(files[-1])
            if stop["file"] in left:
                reentries[stop["file"]] = reentries.get(stop["file"], 0) + 1
        files.append(stop["file"])
    return {"stops": len(order), "files": len(set(files)), "climbs": len(climbs),
            "climbing_stops": [f"{f}:{fn}" for f, fn in climbs], "reentries": reentries,
            "walk": [f"{s['file']}:{s['function']}" for s in order]}


def commit() -> str:
    import subprocess

    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/code_walk.json")
    parser.add_argument("--checkout", type=Path, default=None, help="trace this checkout's code (a git worktree of "
                        "another commit) instead of this one's; it must have the same venv's packages")
    args = parser.parse_args()
    if args.checkout and args.checkout.resolve() != ROOT:  # start again with the checkout first on sys.path
        env = {**os.environ, "INFGEN_CODE_WALK_CHECKOUT": str(args.checkout.resolve())}
        os.execve(sys.executable, [sys.executable, __file__, "--out", str(args.out.resolve())], env)
    import ray

    with tempfile.TemporaryDirectory(prefix="code-walk-") as tmp:
        tmp = Path(tmp)
        (tmp / "walk").mkdir()
        os.environ[WALK_DIR] = str(tmp / "walk")
        data = training_data(tmp / "encoded")
        os.chdir(ROOT)  # the job's relative paths (conf/...) are the checkout's
        ray.init(num_cpus=2, include_dashboard=False, runtime_env={
            "worker_process_setup_hook": install, "env_vars": {WALK_DIR: str(tmp / "walk"),
                                                               "PYTHONPATH": str(ROOT)}})
        install()
        sys.argv = ["jobs.train", "--config", "conf/train/local.yaml", f"data={data}", f"output={tmp / 'train'}",
                    f"mlflow.tracking_uri=sqlite:///{tmp / 'mlflow.db'}", "train.steps=2", "train.checkpoint_every=1",
                    "train.sample_every=1", "train.log_every=1", "loss.disc_start=1"]
        from jobs.train import main as train_main

        try:
            train_main()
        finally:
            sys.setprofile(None)
            threading.setprofile(None)
            ray.shutdown()
        files = sorted((tmp / "walk").glob("*.jsonl"), key=lambda p: (p.stem != str(os.getpid()), p.stem))
        stops = [json.loads(line) for path in files for line in path.read_text().splitlines()]
    report = {"what": "the training config's walk through the code, from python -m jobs.train to the model: "
                      "stops, files, climbs back up the layers (jobs < pipelines < infgen), re-entries "
                      "(benchmarks/code_walk.py's docstring defines them)",
              "command": "python -m jobs.train --config conf/train/local.yaml (2 workers, 2 steps, tiny shards)",
              "checkout": str(ROOT), "commit": commit(),
              "processes_traced": len({s["pid"] for s in stops}), **summarise(stops)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "walk"}, indent=2))
    print("\n".join(report["walk"]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
