"""Stage 1 of the data pipeline: filter LAION metadata down to the rows worth downloading.

    run_filter({"input": "laion/*.parquet", "output": "outputs/filter", ...}) -> StageResult

Inputs are LAION parquet parts in any of the real schema variants (Aesthetics V2: float64 WIDTH/HEIGHT and
AESTHETIC_SCORE; laion2B-en-aesthetic V1: int32 sizes and `aesthetic`; laion-high-resolution: no score).
Every file's schema is checked up front (footers only). Output rows have one schema, `OUTPUT_SCHEMA`
(`url`, `caption` and the metadata img2dataset saves), under `<output>/<fingerprint>/` with `_stats.json`
and `_SUCCESS`; the fingerprint covers the input files and the parameters, so a rerun is a no-op.

Each dropped row is counted once, under the first reason it fails, in the order of `REASONS`. The cheap
numeric checks come first, so the string work (URL parsing, hashing) only touches the few rows left.

How it runs (one read of the input, exact counts):
  1. Ray Data reads only the needed columns; a `map_batches` UDF (vectorised pyarrow/numpy) gives each row
     its first failing row-level reason, keeps the passing rows and appends one *stats row* per
     (batch, reason) holding the count. Counts therefore live in the dataset itself: a retried task's output
     replaces the failed attempt's, never adds to it, so summing stats rows of the materialized dataset is
     exact (a side-effect counter would double count retries). Passing rows carry slim keys: a 128-bit URL
     hash (two SipHash keys), a content hash of the row, and a (batch id, position) identity.
  2. The driver pulls only the slim keys and decides, globally: duplicate URLs keep the row with the
     smallest content hash (so the choice depends on the data, not on file order or scheduling; rows that
     tie are identical, so either copy gives the same output); `max_rows` keeps the URLs with the smallest
     hash of (url, seed), as a lexicographic threshold.
  3. The materialized survivors (object store, not the input files) are filtered by that decision and
     written as parquet into a temporary directory next to the final one, which is then renamed into place.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Mapping, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.common import (STATS, StageResult, fingerprint, init_ray, is_complete, mark_success, plain_config,
                              output_root, output_uri, read_json, remove_dir, renames_are_atomic, resolve_files,
                              write_json)


FORMAT_VERSION = 1  # bump when the output changes for the same inputs and parameters (new fingerprint)

# Row-level reasons, in the order they are checked; then the two global ones.
ROW_REASONS = ("bad_size", "too_small", "short_side", "aspect_ratio", "low_aesthetic", "unsafe", "watermark",
               "bad_url", "private_host")
REASONS = ROW_REASONS + ("duplicate_url", "over_max_rows")
_CODE = {name: i + 1 for i, name in enumerate(ROW_REASONS)}  # 0 = passes every row-level check

# The filter parameters (all part of the fingerprint) and their defaults; conf/data/filter.yaml documents them.
DEFAULTS: dict[str, Any] = {
    "min_pixels": 2_000_000, "min_short_side": None, "max_aspect_ratio": None, "min_aesthetic": None,
    "max_punsafe": None, "max_pwatermark": None, "allow_private_hosts": False, "max_rows": None, "seed": 0,
}
OTHER_KEYS = {"input", "output", "overwrite", "ray", "mlflow"}

OUTPUT_SCHEMA = pa.schema([
    ("url", pa.string()), ("caption", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("aesthetic", pa.float32()), ("punsafe", pa.float32()), ("pwatermark", pa.float32()),
    ("similarity", pa.float64()), ("hash", pa.int64()),
])
# Source column names per output column, first match wins (LAION spells them differently per release).
SOURCES = {"url": ("URL", "url"), "caption": ("TEXT", "caption", "text"), "width": ("WIDTH", "width"),
           "height": ("HEIGHT", "height"), "aesthetic": ("AESTHETIC_SCORE", "aesthetic"),
           "punsafe": ("punsafe",), "pwatermark": ("pwatermark",), "similarity": ("similarity",),
           "hash": ("hash",)}
REQUIRED = ("url", "width", "height")
NEEDS_COLUMN = {"min_aesthetic": "aesthetic", "max_punsafe": "punsafe", "max_pwatermark": "pwatermark"}
INTERNAL = pa.schema([("_reason", pa.uint8()), ("_count", pa.int64()), ("_h1", pa.uint64()), ("_h2", pa.uint64()),
                      ("_rowkey", pa.uint64()), ("_bid", pa.uint64()), ("_pos", pa.uint32())])
SLIM = INTERNAL.names
_MAX_SIDE = 2**31 - 1  # sizes are written as int32
_SIP_KEYS = ("infgen-url-hash1", "infgen-url-hash2", "infgen-row-hash0")  # pandas SipHash keys (16 bytes)
# scheme and authority; the host is a bracketed IPv6 literal or a name / IPv4 literal
_URL_RE = r"^(?i:https?)://(?:[^/?#@\s]*@)?(?P<host>\[[^\]/?#\s]*\]|[^/?#:@\s\[\]]+)(?::[0-9]*)?(?:[/?#]|$)"
_IP_LIKE_RE = r"^(\[.*\]|[0-9a-fx.]+|localhost|.*\.localhost)$"  # the only hosts worth a closer look
_PLAIN_HOST_RE = r"^(?i:https?)://[a-zA-Z0-9-]+(?:\.[a-zA-Z0-9-]+)*\.[a-zA-Z][a-zA-Z0-9-]*\.?(?::[0-9]*)?(?:[/?#]|$)"
_LOCALHOST_RE = r"^[^/]*//[^/?#]*\.(?i:localhost)\.?(?::[0-9]*)?(?:[/?#]|$)"


# ---- configuration and inputs -----------------------------------------------------------------------------

def _config_dict(config: Any) -> dict:
    config = plain_config(config)
    unknown = set(config) - set(DEFAULTS) - OTHER_KEYS
    if unknown:
        raise ValueError(f"filter config: unknown keys {sorted(unknown)} (known: {sorted(set(DEFAULTS) | OTHER_KEYS)})")
    for key in ("input", "output"):
        if not config.get(key):
            raise ValueError(f"filter config: {key!r} is required")
    return config


def filter_params(config: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters that shape the output (the fingerprint's), defaults filled in and checked."""
    p = {k: config.get(k, v) for k, v in DEFAULTS.items()}
    for key in ("min_pixels", "min_short_side", "max_aspect_ratio", "min_aesthetic", "max_punsafe", "max_pwatermark"):
        if p[key] is not None and not isinstance(p[key], (int, float)):
            raise ValueError(f"filter config: {key}={p[key]!r} is not a number (or null to turn it off)")
    if p["max_rows"] is not None and (not isinstance(p["max_rows"], int) or p["max_rows"] < 0):
        raise ValueError(f"filter config: max_rows={p['max_rows']!r} must be a non-negative integer or null")
    if p["max_aspect_ratio"] is not None and p["max_aspect_ratio"] < 1:
        raise ValueError(f"filter config: max_aspect_ratio={p['max_aspect_ratio']!r} must be >= 1")
    p["min_pixels"] = p["min_pixels"] or 0
    p["seed"] = int(p["seed"] or 0)
    p["allow_private_hosts"] = bool(p["allow_private_hosts"])
    return p


def column_mapping(path: str, schema: pa.Schema, params: Mapping[str, Any]) -> tuple[tuple[str, Optional[str]], ...]:
    """Output column → source column (None when absent) for one file; errors name the file and column."""
    names = set(schema.names)
    mapping = {out: next((c for c in candidates if c in names), None) for out, candidates in SOURCES.items()}
    for out in REQUIRED:
        if mapping[out] is None:
            raise ValueError(f"{path}: required column {SOURCES[out][0]!r} is missing (columns: {schema.names})")
    for out in ("width", "height", "aesthetic", "punsafe", "pwatermark", "similarity"):
        col = mapping[out]
        kind = schema.field(col).type if col is not None else None
        if kind is not None and not (pa.types.is_integer(kind) or pa.types.is_floating(kind)):
            raise ValueError(f"{path}: column {col!r} has type {kind}, expected a number")
    for out in ("url", "caption"):
        col = mapping[out]
        kind = schema.field(col).type if col is not None else None
        if kind is not None and not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise ValueError(f"{path}: column {col!r} has type {kind}, expected a string")
    for key, out in NEEDS_COLUMN.items():
        if params[key] is not None and mapping[out] is None:
            raise ValueError(f"{path}: {key}={params[key]} is set but the file has no {' or '.join(SOURCES[out])} "
                             f"column (laion-high-resolution has no aesthetic score): set {key}: null for such inputs")
    return tuple(mapping.items())


def inspect_inputs(fs: pafs.FileSystem, paths: list[str], params: Mapping[str, Any]) -> dict[tuple, list[str]]:
    """Read every file's footer (threads: remote stores answer slowly) → {column mapping: [paths]}."""
    def schema(path: str) -> pa.Schema:
        try:
            return pq.read_schema(path, filesystem=fs)
        except Exception as e:  # a non-parquet or truncated file: say which
            raise ValueError(f"{path}: cannot read parquet schema ({e})") from e

    with ThreadPoolExecutor(max_workers=min(16, len(paths))) as pool:
        schemas = list(pool.map(schema, paths))
    groups: dict[tuple, list[str]] = {}
    for path, s in zip(paths, schemas):
        key = column_mapping(path, s, params) + tuple((c, str(s.field(c).type)) for c in s.names)
        groups.setdefault(key, []).append(path)
    return groups


# ---- row-level checks (the Ray Data UDF) ------------------------------------------------------------------

def host_verdict(host: str) -> Optional[str]:
    """'private_host' for a literal IP that is not globally routable (private, loopback, link-local, CGNAT,
    unspecified, reserved; IPv4-mapped IPv6 too) or localhost, 'bad_url' for a malformed IPv6 literal,
    else None. Short/decimal/hex IPv4 forms (127.1, 2130706433, 0x7f.0.0.1) count, as resolvers accept them."""
    if host == "localhost" or host.endswith(".localhost"):
        return "private_host"
    if host.startswith("["):
        try:
            ip = ipaddress.IPv6Address(host[1:-1].split("%")[0])
        except ValueError:
            return "bad_url"
        ip = ip.ipv4_mapped or ip
    else:
        try:
            ip = ipaddress.IPv4Address(socket.inet_aton(host))
        except (OSError, ValueError):
            return None  # a host name
    return None if ip.is_global and not ip.is_multicast else "private_host"


def _url_reasons(url: pa.Array, allow_private: bool) -> np.ndarray:
    """Reason code per URL (0 = fine): not http(s) with a host → bad_url; private literal host → private_host."""
    # Nearly every URL has a plain dotted host name ending in a letter label: never an IP literal (resolvers
    # read a part starting with a letter as no number). One DFA match clears those; the capturing regex
    # (10× slower) only sees the rest.
    fast = pc.and_kleene(pc.match_substring_regex(url, _PLAIN_HOST_RE),
                         pc.invert(pc.match_substring_regex(url, _LOCALHOST_RE)))
    rest = np.flatnonzero(~pc.fill_null(fast, False).to_numpy(zero_copy_only=False))
    codes = np.zeros(len(url), np.uint8)
    if len(rest):
        codes[rest] = _url_reasons_slow(url.take(rest), allow_private)
    return codes


def _url_reasons_slow(url: pa.Array, allow_private: bool) -> np.ndarray:
    host = pc.struct_field(pc.extract_regex(url, _URL_RE), "host")
    host = pc.utf8_rtrim(pc.utf8_lower(host), ".")
    codes = np.where(pc.fill_null(pc.equal(pc.utf8_length(host), 0), True).to_numpy(zero_copy_only=False),
                     _CODE["bad_url"], 0).astype(np.uint8)
    ip_like = pc.fill_null(pc.match_substring_regex(host, _IP_LIKE_RE), False)
    candidates = pc.unique(pc.filter(host, ip_like)).to_pylist()  # distinct IP-literal hosts: few, not per row
    verdicts = {h: host_verdict(h) for h in candidates}
    for reason in ("bad_url",) + (() if allow_private else ("private_host",)):
        hosts = [h for h, v in verdicts.items() if v == reason]
        if hosts:
            hit = pc.fill_null(pc.is_in(host, pa.array(hosts, pa.string())), False).to_numpy(zero_copy_only=False)
            codes[hit & (codes == 0)] = _CODE[reason]
    return codes


def _numbers(batch: pa.Table, column: Optional[str]) -> np.ndarray:
    """A numeric column as float64 with NaN for null (an absent column is all NaN)."""
    if column is None:
        return np.full(batch.num_rows, np.nan)
    return pc.cast(batch[column], pa.float64()).to_numpy()


def _row_reasons(batch: pa.Table, src: Mapping[str, Optional[str]], p: Mapping[str, Any]) -> np.ndarray:
    w, h = _numbers(batch, src["width"]), _numbers(batch, src["height"])
    with np.errstate(invalid="ignore", over="ignore"):
        short, long_ = np.minimum(w, h), np.maximum(w, h)  # NaN propagates (np.fmin would hide it)
        checks = [("bad_size", ~((short >= 1) & (long_ <= _MAX_SIDE))),  # NaN, null, 0, negative, absurd
                  ("too_small", w * h < p["min_pixels"])]
        if p["min_short_side"] is not None:
            checks.append(("short_side", short < p["min_short_side"]))
        if p["max_aspect_ratio"] is not None:
            checks.append(("aspect_ratio", long_ > p["max_aspect_ratio"] * short))
        # a missing score/probability fails an active threshold: unknown is not good enough
        for key, reason, out, sign in (("min_aesthetic", "low_aesthetic", "aesthetic", 1),
                                       ("max_punsafe", "unsafe", "punsafe", -1),
                                       ("max_pwatermark", "watermark", "pwatermark", -1)):
            if p[key] is not None:
                checks.append((reason, ~(sign * _numbers(batch, src[out]) >= sign * p[key])))
    reason = np.zeros(batch.num_rows, np.uint8)
    for name, fail in checks:
        reason[fail & (reason == 0)] = _CODE[name]
    return reason


def _splitmix(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a bijective, well-mixed uint64 → uint64 (numpy wraps on overflow)."""
    x = (x + np.uint64(0x9E3779B97F4A7C15)) & np.uint64(0xFFFFFFFFFFFFFFFF)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _hash_strings(values: pa.ChunkedArray | pa.Array | np.ndarray, key: str) -> np.ndarray:
    """SipHash-2-4 of each string (pandas' C loop over the objects; null hashes like None)."""
    from pandas.util import hash_array

    if not isinstance(values, np.ndarray):
        values = values.to_numpy(zero_copy_only=False)
    return hash_array(values, hash_key=key, categorize=False)


def _content_hash(table: pa.Table) -> np.ndarray:
    """A hash of every output column but the URL: which duplicate of a URL survives depends only on content."""
    h = _hash_strings(table["caption"], _SIP_KEYS[2])
    for name in OUTPUT_SCHEMA.names[2:]:
        if name == "hash":
            bits = pc.fill_null(table[name], 0).to_numpy().view(np.uint64)
        else:  # exact in float64; null → NaN bits
            bits = pc.cast(table[name], pa.float64()).to_numpy().view(np.uint64)
        h = _splitmix(h ^ bits)
    return h


def filter_batch(batch: pa.Table, mapping: tuple, params: Mapping[str, Any]) -> pa.Table:
    """Pass-1 UDF: the rows passing every row-level check (OUTPUT_SCHEMA + slim keys) plus one stats row per
    failing reason (`_reason` > 0, `_count` rows, every other column null)."""
    src = dict(mapping)
    reason = _row_reasons(batch, src, params)
    idx = np.flatnonzero(reason == 0)
    reason[idx] = _url_reasons(batch[src["url"]].take(idx), params["allow_private_hosts"])
    idx = idx[reason[idx] == 0]

    rows = batch.take(idx)
    n = len(idx)
    cols = {}
    for name, field in zip(OUTPUT_SCHEMA.names, OUTPUT_SCHEMA):
        if src[name] is None:
            cols[name] = pa.nulls(n, field.type)
        elif name in ("width", "height"):  # checked finite and in [1, 2^31): truncating is safe
            cols[name] = pa.array(pc.cast(rows[src[name]], pa.float64()).to_numpy().astype(np.int32))
        else:
            cols[name] = pc.cast(rows[src[name]], field.type)
    out = pa.table(cols, schema=OUTPUT_SCHEMA)
    bid = np.frombuffer(os.urandom(8), np.uint64)[0]  # identity only: choices never depend on it
    urls = out["url"].to_numpy()
    keys = {"_reason": np.zeros(n, np.uint8), "_count": pa.nulls(n, pa.int64()),
            "_h1": _hash_strings(urls, _SIP_KEYS[0]), "_h2": _hash_strings(urls, _SIP_KEYS[1]),
            "_rowkey": _content_hash(out), "_bid": np.full(n, bid, np.uint64), "_pos": np.arange(n, dtype=np.uint32)}
    for name, field in zip(INTERNAL.names, INTERNAL):
        out = out.append_column(field, pa.chunked_array([pa.array(keys[name], field.type)]))

    counts = np.bincount(reason, minlength=len(ROW_REASONS) + 1)
    codes = np.flatnonzero(counts[1:]) + 1
    stats = {name: pa.nulls(len(codes), field.type) for name, field in zip(out.schema.names, out.schema)}
    stats["_reason"] = pa.array(codes, pa.uint8())
    stats["_count"] = pa.array(counts[codes], pa.int64())
    _crash_once_hook(batch)
    return pa.concat_tables([out, pa.table(stats, schema=out.schema)])


def _crash_once_hook(batch: pa.Table) -> None:
    """Fault injection for tests: with the Ray Data context config `infgen.filter.crash_once_dir` set, the
    first attempt at each batch kills its worker after all the work is done, so Ray retries the task."""
    from ray.data import DataContext

    directory = DataContext.get_current().get_config("infgen.filter.crash_once_dir")
    if directory and batch.num_rows:
        marker = os.path.join(directory, f"{batch.num_rows}-{uuid.uuid5(uuid.NAMESPACE_URL, str(batch[0][0]))}")
        try:
            open(marker, "x").close()
        except FileExistsError:
            return
        os._exit(1)


# ---- global decisions: duplicates and max_rows ------------------------------------------------------------

def _cap_key(h1: np.ndarray, h2: np.ndarray, seed: int) -> np.ndarray:
    """A pseudo-random uint64 per URL for `max_rows`: a function of (url, seed) only."""
    return _splitmix(h1 ^ _splitmix(h2 ^ _splitmix(np.full(len(h1), seed, np.uint64))))


def decide(slim: pa.Table, max_rows: Optional[int], seed: int) -> tuple[int, dict, dict, Optional[np.ndarray]]:
    """From the slim keys of pass 1 → (rows in, drop counts per reason, {batch id: positions of duplicates
    to drop}, cap). cap: None = no cap, empty = keep nothing, else the threshold (capkey, h1, h2): a URL is
    kept when its (capkey, h1, h2) is lexicographically at most that."""
    reason = slim["_reason"].to_numpy()
    stats = reason > 0
    counts = np.zeros(len(ROW_REASONS) + 1, np.int64)
    np.add.at(counts, reason[stats], slim["_count"].filter(pa.array(stats)).to_numpy())
    dropped = {name: int(counts[_CODE[name]]) for name in ROW_REASONS}
    rows_in = int(counts.sum()) + int((~stats).sum())

    data = slim.filter(pc.equal(slim["_reason"], 0)).select(["_h1", "_h2", "_rowkey", "_bid", "_pos"])
    urls = data.group_by(["_h1", "_h2"]).aggregate([([], "count_all")])  # hash aggregation: one row per URL
    dup_urls = urls.filter(pc.greater(urls["count_all"], 1))
    losers: dict[int, np.ndarray] = {}
    if dup_urls.num_rows:
        cand = data.join(dup_urls, ["_h1", "_h2"], join_type="inner")  # only rows whose URL repeats
        h1, h2, rk, bid, pos = (cand[c].to_numpy() for c in ("_h1", "_h2", "_rowkey", "_bid", "_pos"))
        order = np.lexsort((pos, bid, rk, h2, h1))  # per URL: smallest content hash first
        h1, h2, bid, pos = h1[order], h2[order], bid[order], pos[order]
        lose = np.r_[False, (h1[1:] == h1[:-1]) & (h2[1:] == h2[:-1])]
        for b in np.unique(bid[lose]):
            losers[int(b)] = np.sort(pos[lose & (bid == b)])
    dropped["duplicate_url"] = data.num_rows - urls.num_rows

    cap: Optional[np.ndarray] = None
    if max_rows is not None and urls.num_rows > max_rows:
        cap = np.empty(0, np.uint64)
        if max_rows > 0:
            h1, h2 = urls["_h1"].to_numpy(), urls["_h2"].to_numpy()
            ck = _cap_key(h1, h2, seed)
            t = np.partition(ck, max_rows - 1)[max_rows - 1]
            tied = np.flatnonzero(ck == t)  # (almost always one URL) break ties by the URL hash
            tied = tied[np.lexsort((h2[tied], h1[tied]))][max_rows - 1 - int((ck < t).sum())]
            cap = np.array([t, h1[tied], h2[tied]], np.uint64)
    dropped["over_max_rows"] = urls.num_rows - max_rows if cap is not None else 0
    return rows_in, dropped, losers, cap


def finalize_batch(batch: pa.Table, losers_ref: list, cap: Optional[np.ndarray], seed: int) -> pa.Table:
    """Pass-2 UDF: drop stats rows, duplicate losers and rows past the cap; keep OUTPUT_SCHEMA columns."""
    import ray

    keep = batch["_reason"].to_numpy() == 0
    losers = ray.get(losers_ref[0]) if losers_ref else {}
    if losers and keep.any():
        bid, pos = pc.fill_null(batch["_bid"], 0).to_numpy(), pc.fill_null(batch["_pos"], 0).to_numpy()
        for b in np.unique(bid[keep]):
            if int(b) in losers:
                sel = keep & (bid == b)
                keep[sel] = ~np.isin(pos[sel], losers[int(b)])
    if cap is not None:
        if len(cap) == 0:
            keep[:] = False
        elif keep.any():
            h1 = pc.fill_null(batch["_h1"], 0).to_numpy()
            h2 = pc.fill_null(batch["_h2"], 0).to_numpy()
            ck = _cap_key(h1, h2, seed)
            keep &= (ck < cap[0]) | ((ck == cap[0]) & ((h1 < cap[1]) | ((h1 == cap[1]) & (h2 <= cap[2]))))
    return batch.filter(pa.array(keep)).select(OUTPUT_SCHEMA.names)


# ---- the stage --------------------------------------------------------------------------------------------

def _publish(fs: pafs.FileSystem, tmp: str, final: str) -> None:
    """Rename the finished temporary directory into place (atomic on local filesystems), replacing an old output
    only once the new one is complete."""
    old = f"{final}.old-{uuid.uuid4().hex[:8]}"
    if fs.get_file_info(final).type == pafs.FileType.Directory:
        fs.move(final, old)  # overwrite: keep the old output until the new one is in place
    fs.move(tmp, final)
    remove_dir(fs, old)


def _sample(fs: pafs.FileSystem, files: list[str], max_files: int = 8, rows_per_file: int = 20_000) -> pa.Table:
    """A bounded sample of width/height/aesthetic from files spread over the output (cheap at any size)."""
    picks = sorted({files[int(i)] for i in np.linspace(0, len(files) - 1, min(max_files, len(files)))})
    parts = []
    for path in picks:
        with fs.open_input_file(path) as f:
            batches = pq.ParquetFile(f).iter_batches(batch_size=rows_per_file, columns=["width", "height", "aesthetic"])
            parts.extend(pa.Table.from_batches([b]) for b in [next(batches, None)] if b is not None)
    return pa.concat_tables(parts) if parts else OUTPUT_SCHEMA.empty_table().select(["width", "height", "aesthetic"])


def histogram_figure(sample: pa.Table):
    """Resolution (megapixels, log scale) and aesthetic score of kept rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    mp = sample["width"].to_numpy().astype(np.float64) * sample["height"].to_numpy() / 1e6
    if len(mp):
        ax1.hist(mp, bins=np.geomspace(max(mp.min(), 1e-3), max(mp.max(), 1e-3) * 1.01, 50))
    ax1.set_xscale("log")
    ax1.set(xlabel="megapixels (crawl-time WIDTH×HEIGHT)", ylabel="rows",
            title=f"kept rows: resolution (sample of {len(mp)})")
    score = pc.drop_null(sample["aesthetic"]).to_numpy()
    if len(score):
        ax2.hist(score, bins=50)
    ax2.set(xlabel="aesthetic score",
            title=f"kept rows: aesthetic (sample of {len(score)})" if len(score) else "aesthetic: not in the input")
    fig.tight_layout()
    return fig


def _track(config: dict, stats: dict, output: str, fs: pafs.FileSystem, files: list[str]) -> Optional[str]:
    from pipelines.tracking import Tracker, config_hash

    mlflow_cfg = config.get("mlflow") or {}
    lineage = {"infgen.stage": "filter", "infgen.input": str(config["input"]), "infgen.output": output,
               "infgen.config_hash": config_hash(config), "infgen.fingerprint": stats["fingerprint"]}
    with Tracker(mlflow_cfg.get("tracking_uri"), mlflow_cfg.get("experiment") or "infgen-data", run_name="filter",
                 tags=lineage) as tracker:
        tracker.log_params(config)
        tracker.log_metrics({"rows_in": stats["rows_in"], "rows_out": stats["rows_out"],
                             **{f"dropped_{k}": v for k, v in stats["dropped"].items()},
                             **{f"seconds_{k}": v for k, v in stats["seconds"].items()}})
        tracker.log_dict(stats, STATS)
        if stats["rows_out"]:
            import matplotlib.pyplot as plt

            fig = histogram_figure(_sample(fs, files))
            tracker.log_figure(fig, "filter_histograms.png")
            plt.close(fig)
        return tracker.run_id


def _pass1(groups: dict[tuple, list[str]], fs: pafs.FileSystem, params: dict):
    """Read (only the needed columns) and apply the row-level checks; materialized in the object store, which
    spills to disk when the survivors outgrow it."""
    import ray

    parts = []
    for key, group in groups.items():
        mapping = key[:len(SOURCES)]
        columns = [c for _, c in mapping if c is not None]
        # select_columns is pushed down into the parquet read (`columns=` is deprecated in Ray 2.60)
        parts.append(ray.data.read_parquet(group, filesystem=fs).select_columns(columns).map_batches(
            filter_batch, batch_format="pyarrow", batch_size=None, fn_kwargs={"mapping": mapping, "params": params}))
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    # Per-operator CPU reservation keeps one of two CPUs idle on a small node (1.1 tasks in flight instead of
    # 1.8, measured); these task-only chains cannot starve each other. Set on this dataset's context only
    # (the write below inherits it), not on the process-wide DataContext.
    ds.context.op_resource_reservation_enabled = False
    return ds.materialize()


def _write(survivors, losers: dict, cap: Optional[np.ndarray], seed: int, fs: pafs.FileSystem,
           tmp: str) -> tuple[list[str], int]:
    """Pass 2 over the materialized survivors → parquet parts in `tmp`; returns (files, rows written)."""
    import ray

    losers_ref = [ray.put(losers)] if losers else []
    kwargs = {"losers_ref": losers_ref, "cap": cap, "seed": seed}
    survivors.map_batches(finalize_batch, batch_format="pyarrow", batch_size=None, fn_kwargs=kwargs
                          ).write_parquet(tmp, filesystem=fs)
    files = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(tmp)) if i.path.endswith(".parquet"))
    if not files:  # nothing kept: an empty part still tells readers the schema
        files = [f"{tmp}/part-empty.parquet"]
        with fs.open_output_stream(files[0]) as f:
            pq.write_table(OUTPUT_SCHEMA.empty_table(), f)
    return files, sum(pq.read_metadata(p, filesystem=fs).num_rows for p in files)


def run_filter(config: Any) -> StageResult:
    """Filter LAION parquet (`config["input"]`: file, directory, glob or URI) into `<output>/<fingerprint>`."""
    t0 = time.perf_counter()
    config = _config_dict(config)
    params = filter_params(config)
    fs, paths = resolve_files(str(config["input"]))
    groups = inspect_inputs(fs, paths, params)
    fp = fingerprint(fs, paths, {"stage": "filter", "format": FORMAT_VERSION, **params})
    out_fs, root = output_root(str(config["output"]))
    final = f"{root.rstrip('/')}/{fp}"  # a path on out_fs
    where = output_uri(str(config["output"]), fp)  # for people and the next stage: with its scheme
    if is_complete(out_fs, final) and not config.get("overwrite"):
        print(f"filter: {where} is complete for these inputs and parameters; nothing to do (overwrite=true redoes it)")
        return StageResult(output=where, stats=read_json(out_fs, f"{final}/{STATS}"), skipped=True)

    t_inspect = time.perf_counter()
    ray_cfg = config.get("ray") or {}
    init_ray(ray_cfg.get("address"), ray_cfg.get("num_cpus"))
    t_start = time.perf_counter()
    survivors = _pass1(groups, fs, params)  # the only read of the input
    t_read = time.perf_counter()
    # only the slim key columns travel to the driver (~45 bytes per surviving row)
    slim = pa.concat_tables([INTERNAL.empty_table()] + [
        b.select(SLIM) for b in survivors.select_columns(SLIM).iter_batches(batch_format="pyarrow", batch_size=None)])
    rows_in, dropped, losers, cap = decide(slim, params["max_rows"], params["seed"])
    rows_out = rows_in - sum(dropped.values())
    del slim
    t_decide = time.perf_counter()

    # where renames are atomic: a temporary directory beside the final one, renamed when complete; on object
    # stores (a rename is a copy of every object): in place, `_SUCCESS` last, after what an earlier run left
    atomic = renames_are_atomic(out_fs)
    tmp = f"{root.rstrip('/')}/.tmp-{fp}-{uuid.uuid4().hex[:8]}" if atomic else final
    if not atomic:
        remove_dir(out_fs, final)
    out_fs.create_dir(tmp)
    try:
        files, written = _write(survivors, losers, cap, params["seed"], out_fs, tmp)
        if written != rows_out:  # the counts and the data must agree; never publish if they do not
            raise RuntimeError(f"filter: wrote {written} rows but the counts say {rows_out} ({dropped})")
        stats = {"stage": "filter", "rows_in": rows_in, "rows_out": rows_out,
                 "dropped": {name: dropped.get(name, 0) for name in REASONS}, "reason_order": list(REASONS),
                 "input": str(config["input"]), "input_files": paths, "fingerprint": fp, "output": where,
                 "params": params, "config": config, "schema": OUTPUT_SCHEMA.names,
                 "seconds": {"inspect": round(t_inspect - t0, 3), "ray_init": round(t_start - t_inspect, 3),
                             "read_filter": round(t_read - t_start, 3),
                             "decide": round(t_decide - t_read, 3), "write": round(time.perf_counter() - t_decide, 3)}}
        write_json(out_fs, f"{tmp}/{STATS}", stats)
        mark_success(out_fs, tmp)
        if atomic:
            _publish(out_fs, tmp, final)
    except BaseException:
        remove_dir(out_fs, tmp)
        raise
    del survivors
    run_id = _track(config, stats, where, out_fs, [f"{final}/{os.path.basename(p)}" for p in files])
    print(f"filter: {rows_in} rows in, {rows_out} kept → {where}")
    return StageResult(output=where, stats=stats, skipped=False, run_id=run_id)
