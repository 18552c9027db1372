"""What an evaluation leaves behind: results.csv / results.json (one row per decoder and resolution, with the
protocol and the definitions), per_image.csv, metrics_vs_resolution.png, crops_<R>.png, the MLflow run's
description, and the table printed at the end."""

from __future__ import annotations

import csv
import io
import math
from typing import Any, Optional

import pyarrow.fs as pafs
import torch

from infgen.evaluation import REFERENCE
from pipelines.common import local_files, write_bytes, write_json
from pipelines.evaluate.config import EvalConfig, extractor_id
from pipelines.evaluate.model import exported_record
from pipelines.evaluate.plan import Plan
from pipelines.evaluate.scores import BASELINE, DEFINITIONS, METRICS
from pipelines.tracking import logged_model_id


def write_outputs(cfg: EvalConfig, fs: pafs.FileSystem, out_dir: str, rows: list[dict], summary: dict, p: Plan,
                  lpips_note: str, reference_cached: bool, seconds: float) -> tuple[list[str], dict]:
    """results.csv/json, per_image.csv, metrics_vs_resolution.png, crops_<R>.png; returns their names and the
    content of results.json."""
    fs.create_dir(out_dir, recursive=True)
    names = ["results.json", "results.csv", "per_image.csv", "metrics_vs_resolution.png"]
    results = {
        "rows": rows, "protocol": cfg.patches.to_dict(), "extractor": extractor_id(cfg), "lpips": lpips_note,
        "resolutions": cfg.resolutions, "decoders": cfg.decoders, "model": cfg.model, "data": cfg.data,
        "data_kind": cfg.data_kind, "samples": p.samples, "reference_files": len(p.reference_files),
        "holdout": {"split": p.holdout, "source": p.holdout_source, "trained_rows": p.trained_rows},
        "broken_reference_images": int(summary["counts"].get((REFERENCE, 0), {}).get("broken", 0)),
        "reference_cached": reference_cached, "seconds": seconds, "definitions": DEFINITIONS}
    write_json(fs, f"{out_dir}/results.json", results)
    columns = ["decoder", "resolution", *METRICS, "images", "patches", "skipped_small", "reference_images",
               "reference_patches", "truth_upsampled", "truth_skipped"]
    _write_csv(fs, f"{out_dir}/results.csv", rows, columns)
    _write_csv(fs, f"{out_dir}/per_image.csv", summary["per_image"],
               ["key", "decoder", "resolution", "height", "width", "psnr", "ssim", "lpips"])
    write_bytes(fs, f"{out_dir}/metrics_vs_resolution.png", plot_metrics(rows, cfg.decoders))
    for res in cfg.resolutions:
        png = crop_grid(summary["crops"], p.grid_keys, res, cfg.decoders)
        if png:
            write_bytes(fs, f"{out_dir}/crops_{res}.png", png)
            names.append(f"crops_{res}.png")
    return names, results


def _write_csv(fs: pafs.FileSystem, path: str, rows: list[dict], columns: list[str]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_bytes(fs, path, buffer.getvalue().encode())


def plot_metrics(rows: list[dict], decoders: list[str]) -> bytes:
    """One panel per metric, metric against resolution, one line per decoder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in METRICS if not m.endswith("_se") and any(r.get(m) is not None for r in rows)]
    cols = 3
    fig, axes = plt.subplots(math.ceil(len(metrics) / cols), cols, figsize=(4 * cols, 3 * math.ceil(len(metrics) / cols)),
                             squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        for decoder in decoders:
            points = [(r["resolution"], r[metric]) for r in rows if r["decoder"] == decoder and r.get(metric) is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=decoder)
        ax.set_title(metric)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("resolution (long side, px)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def crop_grid(crops: dict, keys: list[str], res: int, decoders: list[str]) -> Optional[bytes]:
    """Centre crops at full resolution, side by side: the reference (ground truth), then each decoder."""
    from infgen.visualize import image_grid

    sources = [s for s in [REFERENCE, *decoders] if any((key, res, s) in crops for key in keys)]
    rows = []
    for key in keys:
        cells = [crops.get((key, res, s)) for s in sources]
        if all(c is None for c in cells):
            continue
        rows.append([torch.from_numpy(c.copy()).permute(2, 0, 1).float() / 127.5 - 1 if c is not None
                     else torch.ones(3, 8, 8) for c in cells])
    if not rows:
        return None
    labels = [f"{'truth' if s == REFERENCE else s} {res}" for s in sources]
    buffer = io.BytesIO()
    image_grid(rows, labels, cell=max(max(c.shape[1:]) for row in rows for c in row)).save(buffer, format="PNG")
    return buffer.getvalue()


def log_results(tracker: Any, cfg: EvalConfig, rows: list[dict], p: Plan, lpips_note: str,
                fs: pafs.FileSystem, paths: list[str]) -> None:
    """The evaluation's MLflow run: each metric named with its decoder and resolution (infgen's also on the
    registered model version it scored, when there is one), the table, the description, the files at `paths`."""
    version = tracker.model_version(str(cfg.model), exported_record(cfg.model))
    if version is not None:  # the evaluation is linked to the model version it scored, and shows on its page
        tracker.set_tags({"infgen.model_name": version.name, "infgen.model_version": version.version})
    for row in rows:  # the resolution in the name, not on the step axis
        tracker.log_metrics({f"{m}/{row['decoder']}/{row['resolution']}": row[m]
                             for m in METRICS if row.get(m) is not None},
                            model_id=logged_model_id(version) if row["decoder"] == "infgen" else None)
    tracker.log_metrics({"samples": p.samples})
    tracker.log_table(rows, "evaluation/results_table.json")
    tracker.set_note(evaluation_note(rows, p, extractor_id(cfg), lpips_note))
    with local_files(fs, paths) as local:
        for path in local:
            tracker.log_artifact(path, "evaluation")


def evaluation_note(rows: list[dict], p: Plan, extractor: str, lpips_note: str) -> str:
    """One paragraph: infgen against VAE + bicubic at each resolution (PSNR), on which samples, and the caveats."""
    by = {(r["decoder"], r["resolution"]): r for r in rows}
    parts = []
    for res in sorted({r["resolution"] for r in rows}):
        ours, base = by.get(("infgen", res)), by.get((BASELINE, res))
        if ours and base and ours.get("psnr") is not None and base.get("psnr") is not None:
            gain = (f"{ours['psnr_gain']:+.2f} ± {ours['psnr_gain_se']:.2f}" if ours.get("psnr_gain") is not None
                    else f"{ours['psnr'] - base['psnr']:+.2f}")
            parts.append(f"{res}: {ours['psnr']:.2f} vs {base['psnr']:.2f} dB ({gain})")
    head = (f"infgen against VAE decode + bicubic, PSNR on {scored_samples(p)}: " + "; ".join(parts) + "."
            if parts else f"{p.samples} samples; decoders: {sorted({r['decoder'] for r in rows})}.")
    return (f"{head} Patch features: {extractor}. LPIPS: {lpips_note}. Full table: evaluation/results_table.json "
            f"and results.csv; side-by-side crops: evaluation/crops_<resolution>.png.")


def scored_samples(p: Plan) -> str:
    """The samples a reconstruction scored, named for what they are: held out from the model's training, partly
    trained on (allow_trained_rows), or neither known (no holdout split and no model record)."""
    if p.trained_rows:
        return f"{p.samples} samples, {p.trained_rows} of them trained on (allow_trained_rows)"
    return f"{p.samples} held-out samples" if p.holdout_source != "none" else f"{p.samples} samples (no holdout split)"


def print_table(rows: list[dict]) -> None:
    """The results table, one line per decoder and resolution; psnr_gain as mean ± standard error (dB)."""
    fmt = lambda v: "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
    gain = lambda r: "-" if r.get("psnr_gain") is None else f"{r['psnr_gain']:+.2f}±{r['psnr_gain_se']:.2f}"
    columns = ["decoder", "resolution", "fidp", "sfidp", "fid", "kidp", "precisionp", "recallp", "psnr",
               "psnr_gain", "ssim", "lpips", "latency_s"]
    cell = lambda r, c: gain(r) if c == "psnr_gain" else fmt(r.get(c))
    widths = [max(len(c), *(len(cell(r, c)) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(cell(r, c).ljust(w) for c, w in zip(columns, widths)))
