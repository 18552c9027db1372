"""The evaluation's driver (`run_evaluate`): plan the units, find or reuse the output, run the actor pool, merge the
statistics into the table, write and log the outputs."""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping

from infgen.metrics import LPIPSUnavailable, load_lpips
from pipelines.common import StageResult, fingerprint, is_complete, mark_success, output_root, output_uri, read_json
from pipelines.config import dataclass_from
from pipelines.evaluate.config import EvalConfig, extractor_id
from pipelines.evaluate.plan import Plan, plan
from pipelines.evaluate.reference_cache import reference_cache_path, reference_cache_root, reference_is_cached
from pipelines.evaluate.report import log_results, print_table, write_outputs
from pipelines.evaluate.scores import collect
from pipelines.evaluate.worker import EvalWorker
from pipelines.tracking import config_hash

log = logging.getLogger(__name__)


def run_evaluate(config: EvalConfig | Mapping[str, Any]) -> StageResult:
    """Evaluate as configured (conf/eval/*.yaml); a complete output with the same fingerprint is reused.
    `config`: an EvalConfig, or a mapping checked into one (ValueError naming the key)."""
    import ray

    cfg = dataclass_from(EvalConfig, config)
    start = time.time()
    p = plan(cfg)  # a wrong path or split fails before Ray starts
    cfg.ray.init()
    data_fp, params, fp = fingerprints(cfg, p)
    fs, root = output_root(cfg.output)
    out_dir = f"{root.rstrip('/')}/{fp}"  # a path on fs
    where = output_uri(cfg.output, fp)  # what people and the next stage see: with its scheme
    if is_complete(fs, out_dir):
        print(f"[evaluate] complete output found, nothing to do: {where}", flush=True)
        return StageResult(where, read_json(fs, f"{out_dir}/results.json"), skipped=True)

    lpips_note = lpips_status(cfg)
    cache_fs, cache_root = reference_cache_root(cfg)
    cache = {res: reference_cache_path(cfg, cache_root, res, data_fp) for res in cfg.resolutions}
    cached = all(reference_is_cached(cache_fs, path) for path in cache.values())
    print(f"[evaluate] {p.samples} samples in {len(p.units)} units"
          + (f" (holdout from the {p.holdout_source}: {p.holdout})" if p.holdout_source else "")
          + f", resolutions {cfg.resolutions}, decoders {cfg.decoders}; reference statistics "
          f"{'cached' if cached else 'computed in this run'}", flush=True)

    lineage = {"infgen.stage": "evaluate", "infgen.input": cfg.data, "infgen.output": where,
               "infgen.model": str(cfg.model), "infgen.config_hash": config_hash(params)}
    with cfg.mlflow.tracker(cfg.name, tags=lineage, system_metrics=True) as tracker:
        tracker.log_params({**params, **cfg.patches.to_dict(), "extractor_id": extractor_id(cfg),
                            "lpips_status": lpips_note, "samples": p.samples, "workers": asdict(cfg.workers),
                            "holdout_source": p.holdout_source, "trained_rows": p.trained_rows})
        actors = evaluate_units(cfg, p.units + ([] if cached else p.reference_units), not cached,
                                lpips_note == "pretrained", p.grid_keys, p.aspect)
        rows, summary = collect(cfg, actors, cache_fs, cache, cached)
        for actor in actors:
            ray.kill(actor)
        names, results = write_outputs(cfg, fs, out_dir, rows, summary, p, lpips_note, cached, time.time() - start)
        log_results(tracker, cfg, rows, p, lpips_note, fs, [f"{out_dir}/{name}" for name in names])
        tracker.log_metrics({"eval_seconds": time.time() - start})
        mark_success(fs, out_dir)
        print_table(rows)
        print(f"[evaluate] results: {where}  (MLflow run {tracker.run_id})", flush=True)
        return StageResult(where, results, run_id=tracker.run_id)


def fingerprints(cfg: EvalConfig, p: Plan) -> tuple[str, dict, str]:
    """(the data's fingerprint: input files, selection, reference images; the parameters that shape the results;
    the output's fingerprint: both and the model's files, by content, so a re-export is the same model)."""
    selection = {"limit": cfg.limit, "selection": "per-resolution", "kind": cfg.data_kind,
                 "reference": p.reference_files, "holdout": p.holdout}
    if cfg.limit_at:  # only when set: without it the data fingerprint, the reference cache's key, is as before
        selection["limit_at"] = {str(r): n for r, n in sorted(cfg.limit_at.items())}
    data_fp = fingerprint(p.fs, p.input_files, selection)
    model_dir = Path(cfg.model or "")
    model_files = sorted(f for f in model_dir.glob("*") if f.is_file()) if cfg.model and model_dir.is_dir() else []
    params = {k: v for k, v in asdict(cfg).items() if k not in ("ray", "mlflow", "output", "workers")}
    fp = config_hash({"data": data_fp, "params": params, "model": [(f.name, file_digest(f)) for f in model_files]})
    return data_fp, params, fp


def evaluate_units(cfg: EvalConfig, units: list[dict], *worker_args: Any) -> list:
    """`workers.num_actors` EvalWorker actors (`EvalWorker(cfg, *worker_args)`) take the units one at a time, with
    a progress bar; returns the actors, holding their statistics."""
    import ray
    from ray.util import ActorPool
    from tqdm import tqdm

    actor = ray.remote(EvalWorker).options(num_cpus=cfg.workers.cpus_per_actor, num_gpus=cfg.workers.num_gpus)
    actors = [actor.remote(cfg, *worker_args) for _ in range(cfg.workers.num_actors)]
    pool = ActorPool(actors)
    for _ in tqdm(pool.map_unordered(lambda a, unit: a.process.remote(unit), units), total=len(units),
                  desc="evaluate", unit="unit", mininterval=2):
        pass
    return actors


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, read in 16 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2 ** 24), b""):
            h.update(block)
    return h.hexdigest()


def lpips_status(cfg: EvalConfig) -> str:
    """'pretrained', or why LPIPS is not reported (it never falls back to a random backbone)."""
    if not cfg.lpips:
        return "disabled in the config"
    try:
        load_lpips(cfg.lpips_net, cfg.lpips_weights)
        return "pretrained"
    except LPIPSUnavailable as e:
        log.warning("LPIPS is not reported: %s", e)
        return f"not reported: {e}"
