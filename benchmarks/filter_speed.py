"""Throughput of the filter stage (pipelines/filter.py) against a bare single-process pyarrow scan+filter.

    python benchmarks/filter_speed.py --out benchmarks/results/filter_speed.json        # 10M rows, 16 files
    python benchmarks/filter_speed.py --rows 200000 --files 4 --data /tmp/fs-small --rss-rows '' --out /tmp/smoke.json

Synthetic LAION Aesthetics V2 parts (realistic URL/TEXT strings, sizes, scores, duplicates, bad URLs) are
generated once with numpy/pyarrow under --data and reused while rows/files/seed match. One run then times
(a) `run_filter` on them (Ray already started and its workers warm: `ray_start_s` and `warmup_s` are
reported apart) and (b) the same filters in plain pyarrow, one process, reading each file, filtering,
deduplicating URLs and writing the kept rows. Both read from the page cache (the data was just written or read).
Then (c) for each of --rss-rows (10M and 50M rows by default) the stage runs as its own driver process joining
this Ray: its peak RSS (VmHWM) must stay flat, since the dedup is a distributed group-by and the driver only sums
stats rows; the bare pyarrow baseline runs on the same rows in its own process (it holds every survivor).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipelines.filter import _IP_LIKE_RE, _URL_RE, host_verdict, run_filter  # noqa: E402

# the thresholds of conf/data/filter.yaml (the real job's)
THRESHOLDS = dict(min_pixels=2_000_000, min_short_side=1024, max_aspect_ratio=2.0, min_aesthetic=5.0,
                  max_punsafe=0.5, max_pwatermark=0.5, allow_private_hosts=False, max_rows=None, seed=0)
WORDS = ("photo image stock vintage modern house garden blue red green black white wooden table chair dog cat "
         "portrait landscape mountain lake sunset beach city street night light art painting abstract design "
         "wedding dress fashion model car road travel food cake coffee flower tree forest winter summer autumn "
         "spring interior kitchen bedroom living room bathroom office logo icon vector illustration texture "
         "background pattern floral minimal luxury hotel resort pool view aerial drone sky cloud rain snow").split()
TLDS = np.array(["com", "net", "org", "de", "co.uk", "fr", "jp", "ru", "com.au", "io"])


# ---- synthetic data -----------------------------------------------------------------------------------------

def _join(*parts) -> pa.Array:
    return pc.binary_join_element_wise(*parts, "")


def _pick(pool: pa.Array, rng: np.random.Generator, n: int) -> pa.Array:
    return pool.take(pa.array(rng.integers(0, len(pool), n)))


def _numbers(rng: np.random.Generator, n: int, high: int) -> pa.Array:
    return pc.cast(pa.array(rng.integers(0, high, n)), pa.string())


def synthetic_part(n: int, rng: np.random.Generator, shared_urls: pa.Array) -> pa.Table:
    """n rows in the Aesthetics V2 schema; URLs ~100 chars, captions ~70 chars, LAION-like size and score mix."""
    words = pa.array(WORDS)
    hosts = _join(pa.array(rng.choice(["cdn", "img", "images", "static", "media", "i", "www"], 20000)),
                  _numbers(rng, 20000, 500), ".", _pick(words, rng, 20000), _pick(words, rng, 20000), ".",
                  pa.array(rng.choice(TLDS, 20000)))
    scheme = pa.array(rng.choice(["https://", "http://", "ftp://", "data:image/png;base64,"], n,
                                 p=[0.85, 0.144, 0.003, 0.003]))
    host = _pick(hosts, rng, n)
    ip_rows = rng.random(n) < 0.001  # literal IP hosts, most of them private
    ip = _join(pa.array(rng.choice(["10.", "192.168.", "127.0.", "93.184."], n)), _numbers(rng, n, 255), ".",
               _numbers(rng, n, 255))
    host = pc.if_else(pa.array(ip_rows), ip, host)
    query = pc.if_else(pa.array(rng.random(n) < 0.3), _join("?w=", _numbers(rng, n, 4000), "&q=80"), "")
    url = _join(scheme, host, "/wp-content/uploads/", _numbers(rng, n, 30), "/", _pick(words, rng, n), "-",
                _pick(words, rng, n), "-", _numbers(rng, n, 10**12), ".",
                pa.array(rng.choice(["jpg", "jpeg", "png", "webp"], n)), query)
    source = np.arange(n)  # 2% repeat a URL of this part, 0.5% one shared by all parts
    dup = rng.random(n) < 0.02
    source[dup] = rng.integers(0, n, int(dup.sum()))
    url = url.take(pa.array(source))
    shared = rng.random(n) < 0.005
    url = pc.if_else(pa.array(shared), _pick(shared_urls, rng, n), url)

    lengths = rng.integers(3, 18, n)
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int32)
    text = pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets), _pick(words, rng, int(offsets[-1]))), " ")

    long_side = np.exp(rng.normal(np.log(1000), 0.55, n))
    aspect = np.exp(np.abs(rng.normal(0.0, 0.35, n)))
    portrait = rng.random(n) < 0.3
    width = np.round(np.where(portrait, long_side / aspect, long_side))
    height = np.round(np.where(portrait, long_side, long_side / aspect))
    width[rng.random(n) < 0.01] = np.nan
    height[rng.random(n) < 0.005] = 0
    return pa.table({
        "URL": url, "TEXT": text, "WIDTH": width, "HEIGHT": height,
        "similarity": rng.normal(0.31, 0.03, n), "punsafe": rng.beta(0.5, 8, n).astype(np.float32),
        "pwatermark": rng.beta(0.7, 3, n).astype(np.float32),
        "AESTHETIC_SCORE": rng.normal(5.6, 0.5, n).astype(np.float32),
        "hash": rng.integers(-2**63, 2**63 - 1, n, dtype=np.int64), "__index_level_0__": np.arange(n)})


def ensure_data(directory: Path, rows: int, files: int, seed: int) -> list[Path]:
    manifest = {"rows": rows, "files": files, "seed": seed, "version": 1}
    paths = [directory / f"part-{i:05d}.parquet" for i in range(files)]
    if (directory / "manifest.json").is_file() and json.loads((directory / "manifest.json").read_text()) == manifest \
            and all(p.is_file() for p in paths):
        return paths
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    shared = synthetic_part(10_000, rng, pa.array(["https://example.com/x.jpg"]))["URL"].combine_chunks()
    t = time.perf_counter()
    for i, path in enumerate(paths):
        n = rows // files + (1 if i < rows % files else 0)
        pq.write_table(synthetic_part(n, np.random.default_rng([seed, i]), shared), path)
    (directory / "manifest.json").write_text(json.dumps(manifest))
    print(f"generated {rows} rows in {files} files under {directory} in {time.perf_counter() - t:.1f} s")
    return paths


# ---- the bare pyarrow baseline --------------------------------------------------------------------------------

def bare_pyarrow(paths: list[Path], out: Path, p: dict) -> dict:
    """The same row filters and URL dedup in plain pyarrow, one process, then one output file."""
    columns = ["URL", "TEXT", "WIDTH", "HEIGHT", "AESTHETIC_SCORE", "punsafe", "pwatermark", "similarity", "hash"]
    rows_in, kept = 0, []
    for path in paths:
        t = pq.read_table(path, columns=columns)
        rows_in += t.num_rows
        w, h = t["WIDTH"], t["HEIGHT"]
        short, long_ = pc.min_element_wise(w, h), pc.max_element_wise(w, h)
        mask = pc.and_(pc.greater_equal(short, 1), pc.less_equal(long_, 2**31 - 1))
        mask = pc.and_(mask, pc.greater_equal(pc.multiply(w, h), p["min_pixels"]))
        mask = pc.and_(mask, pc.greater_equal(short, p["min_short_side"]))
        mask = pc.and_(mask, pc.less_equal(long_, pc.multiply(short, p["max_aspect_ratio"])))
        mask = pc.and_(mask, pc.greater_equal(t["AESTHETIC_SCORE"], p["min_aesthetic"]))
        mask = pc.and_(mask, pc.less_equal(t["punsafe"], p["max_punsafe"]))
        mask = pc.and_(mask, pc.less_equal(t["pwatermark"], p["max_pwatermark"]))
        t = t.filter(pc.fill_null(mask, False))
        host = pc.utf8_rtrim(pc.utf8_lower(pc.struct_field(pc.extract_regex(t["URL"], _URL_RE), "host")), ".")
        ok = pc.fill_null(pc.greater(pc.utf8_length(host), 0), False)
        candidates = pc.unique(pc.filter(host, pc.fill_null(pc.match_substring_regex(host, _IP_LIKE_RE), False)))
        blocked = [x for x in candidates.to_pylist() if host_verdict(x)]
        if blocked:
            ok = pc.and_(ok, pc.invert(pc.fill_null(pc.is_in(host, pa.array(blocked)), False)))
        kept.append(t.filter(ok))
    t = pa.concat_tables(kept).combine_chunks()
    t = t.append_column("_i", pa.array(np.arange(t.num_rows)))
    first = t.group_by("URL").aggregate([("_i", "min")])["_i_min"]  # first occurrence of each URL
    t = t.take(pc.sort_indices(first)).drop_columns(["_i"])
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(t, out / "part-0.parquet")
    return {"rows_in": rows_in, "rows_out": t.num_rows}


# ---- driver memory at growing sizes ----------------------------------------------------------------------------

CHILD = """
import json, os, sys, time
sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
from pathlib import Path
cfg = json.loads(sys.argv[2])
t = time.perf_counter()
if sys.argv[1] == "stage":
    from pipelines.filter import run_filter
    stats = run_filter(cfg).stats
    out = {"rows_in": stats["rows_in"], "rows_out": stats["rows_out"], "partitions": stats["partitions"],
           "phases_s": stats["seconds"]}
else:
    from filter_speed import THRESHOLDS, bare_pyarrow
    out = bare_pyarrow(sorted(Path(cfg["input"]).glob("part-*.parquet")), Path(cfg["output"]), THRESHOLDS)
out["seconds"] = round(time.perf_counter() - t, 2)
# VmHWM: this process's own peak (ru_maxrss would carry the parent's across fork + exec)
out["peak_rss_mib"] = round(int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1024, 1)
print(json.dumps(out))
"""


def own_process(kind: str, cfg: dict, address: str) -> dict:
    """The stage (joining this Ray) or the bare baseline, as its own process: seconds and peak RSS."""
    import subprocess

    done = subprocess.run([sys.executable, "-c", CHILD, kind, json.dumps(cfg)], capture_output=True, text=True,
                          env={**os.environ, "RAY_ADDRESS": address}, cwd=Path(__file__).resolve().parents[1])
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def driver_rss(sizes: list[int], files: int, seed: int, data_root: Path, work: Path, base: dict,
               address: str) -> dict:
    out = {}
    for n in sizes:
        paths = ensure_data(data_root / f"rss-{n}", n, files * max(1, n // 10_000_000), seed)
        cfg = {**base, "input": str(paths[0].parent), "output": str(work / f"rss{n}")}
        stage = own_process("stage", cfg, address)
        bare = own_process("bare", {"input": str(paths[0].parent), "output": str(work / f"rss{n}-bare")}, address)
        out[str(n)] = {"files": len(paths), "stage": stage, "bare_pyarrow": bare,
                       "ratio_stage_over_bare": round(bare["seconds"] / stage["seconds"], 3),
                       "same_rows_out": stage["rows_out"] == bare["rows_out"]}
        print(f"{n} rows: {json.dumps(out[str(n)])}")
        shutil.rmtree(work / f"rss{n}", ignore_errors=True)
        shutil.rmtree(work / f"rss{n}-bare", ignore_errors=True)
    return out


# ---- the run --------------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "infgen-bench" / "filter")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count())
    parser.add_argument("--rss-rows", default="10000000,50000000",
                        help="driver peak RSS runs (rows each, comma-separated; '' for none)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/filter_speed.json"))
    args = parser.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    paths = ensure_data(args.data, args.rows, args.files, args.seed)
    work = Path(tempfile.mkdtemp(prefix="filter-speed-"))
    config = {"input": str(args.data), "output": str(work / "stage"), "overwrite": True, **THRESHOLDS,
              "ray": {"address": None, "num_cpus": args.num_cpus},
              "mlflow": {"tracking_uri": f"sqlite:///{work}/mlflow.db", "experiment": "filter-speed"}}
    load = {"before": os.getloadavg()}

    import ray

    t = time.perf_counter()
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, configure_logging=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray_start = time.perf_counter() - t
    t = time.perf_counter()  # warm-up on two parts (both workers): processes, imports, MLflow tables (not timed below)
    run_filter({**config, "input": str(args.data / "part-0000[01].parquet"), "output": str(work / "warmup")})
    warmup = time.perf_counter() - t

    for p in paths:  # same page-cache state for both contenders
        pq.read_metadata(p)
    t = time.perf_counter()
    baseline = bare_pyarrow(paths, work / "baseline", THRESHOLDS)
    baseline["seconds"] = time.perf_counter() - t
    load["after_baseline"] = os.getloadavg()

    t = time.perf_counter()
    result = run_filter(config)
    stage_s = time.perf_counter() - t
    load["after_stage"] = os.getloadavg()

    sizes = [int(x) for x in args.rss_rows.split(",") if x.strip()]
    rss = driver_rss(sizes, args.files, args.seed, args.data.parent, work, {**config, "mlflow": {
        **config["mlflow"], "experiment": "filter-speed-rss"}}, ray.get_runtime_context().gcs_address) if sizes else {}

    # only now: it loads torch, which the RSS children (which import this file) must not carry
    from infgen.machine import describe_machine

    rows = result.stats["rows_in"]
    stage_rps, base_rps = rows / stage_s, baseline["rows_in"] / baseline["seconds"]
    report = {
        "environment": {**describe_machine(), "ray_num_cpus": args.num_cpus,
                        "ray": ray.__version__, "pyarrow": pa.__version__, "loadavg_1_5_15": load},
        "data": {"rows": rows, "files": len(paths), "bytes": sum(p.stat().st_size for p in paths),
                 "schema": "aesthetics_v2", "thresholds": THRESHOLDS},
        "stage": {"seconds": round(stage_s, 2), "rows_per_s": round(stage_rps), "rows_out": result.stats["rows_out"],
                  "phases_s": result.stats["seconds"], "dropped": result.stats["dropped"],
                  "ray_start_s": round(ray_start, 2), "warmup_s": round(warmup, 2),
                  "note": "includes MLflow logging and the histogram; excludes ray.init and worker start-up"},
        "bare_pyarrow": {"seconds": round(baseline["seconds"], 2), "rows_per_s": round(base_rps),
                         "rows_out": baseline["rows_out"]},
        "driver_rss": rss,
        "derived": {"ratio_stage_over_bare": {"value": round(stage_rps / base_rps, 3), "target": 0.8,
                                              "meets_target": stage_rps / base_rps >= 0.8},
                    "same_rows_out": baseline["rows_out"] == result.stats["rows_out"],
                    **({"driver_rss_ratio_largest_over_smallest": {
                        "value": round(rss[str(max(sizes))]["stage"]["peak_rss_mib"]
                                       / rss[str(min(sizes))]["stage"]["peak_rss_mib"], 3),
                        "target": "flat (within 10%)"}} if len(sizes) > 1 else {})},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    ray.shutdown()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
