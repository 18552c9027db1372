"""Stage 1 of the data pipeline: filter LAION metadata down to the rows worth downloading.

    run_filter({"input": "laion/*.parquet", "output": "outputs/filter", ...}) -> StageResult

Inputs are LAION parquet parts in any of the real schema variants (Aesthetics V2: float64 WIDTH/HEIGHT and
AESTHETIC_SCORE; laion2B-en-aesthetic V1: int32 sizes and `aesthetic`; laion-high-resolution: no score).
Every file's schema is checked up front (footers only). Output rows have one schema, `OUTPUT_SCHEMA`
(`url`, `caption` and the metadata img2dataset saves), under `<output>/<fingerprint>/` with `_stats.json`
and `_SUCCESS`; the fingerprint covers the input files and the parameters, so a rerun is a no-op.

Each dropped row is counted once, under the first reason it fails, in the order of `REASONS`. The cheap
numeric checks come first, so the string work (URL parsing, hashing) only touches the few rows left.

How it runs (one read of the input, exact counts, nothing proportional to the rows on the driver):
  1. Ray Data reads only the needed columns; a `map_batches` UDF (vectorised pyarrow/numpy) gives each row
     its first failing row-level reason, keeps the passing rows and appends one *stats row* per
     (batch, reason) holding the count. Counts therefore live in the dataset itself: a retried task's output
     replaces the failed attempt's, never adds to it, so summing stats rows of the materialized dataset is
     exact (a side-effect counter would double count retries). Passing rows carry a 128-bit URL hash (two
     SipHash keys), a content hash of the row and their URL's hash partition.
  2. Dedup is a distributed group-by: Ray Data shuffles the passing rows by hash partition (`partitions` of
     them; Ray's push-based sort shuffle, whose driver state grows with blocks, not blocks × partitions), so every
     copy of a URL meets in one `map_groups` call, which keeps the copy with the smallest content
     hash (the choice depends on the data, not on file order or scheduling; rows that tie are identical) and
     adds a stats row counting the copies dropped. The result is materialized (object store, spilled to disk
     when it outgrows memory); the driver only sums stats rows, a few per block.
  3. `max_rows` keeps the URLs with the smallest hash of (url, seed). The driver finds that threshold from a
     65,536-bin histogram of the hashes (summed block by block) and the few hashes in the bin it falls in.
  4. The deduplicated rows under the threshold are written as parquet by the workers into a temporary directory
     next to the final one, which is then renamed into place (object stores: in place, `_SUCCESS` last).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Mapping, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.common import (STATS, StageResult, fingerprint, is_complete, mark_success, output_root, output_uri,
                              read_json, remove_dir, renames_are_atomic, resolve_files, write_json)
from pipelines.config import MlflowConfig, Number, RayConfig, dataclass_from


FORMAT_VERSION = 2  # 2: URLs normalised (normalize_urls) before dedup. Bump when the output changes for the same inputs and parameters (new fingerprint)

# Row-level reasons, in the order they are checked; then the two global ones.
ROW_REASONS = ("bad_size", "too_small", "short_side", "aspect_ratio", "low_aesthetic", "unsafe", "watermark",
               "bad_url", "private_host")
REASONS = ROW_REASONS + ("duplicate_url", "over_max_rows")
_CODE = {name: i + 1 for i, name in enumerate(REASONS)}  # 0 = a kept row; stats rows carry the others

# The filter parameters of FilterConfig: they (and the input files) make the output's fingerprint.
PARAMS = ("min_pixels", "min_short_side", "max_aspect_ratio", "min_aesthetic", "max_punsafe", "max_pwatermark",
          "allow_private_hosts", "max_rows", "seed")
# dedup hash partitions when `partitions` is null: at least this many input rows per partition, and
# PARTITIONS_PER_CPU per CPU of the cluster so every core has work (8: measured fastest on 2 CPUs, 10M rows)
ROWS_PER_PARTITION = 20_000_000
PARTITIONS_PER_CPU = 8
# input rows per filter task (Ray Data bundles read blocks up to it): the shuffle's driver keeps state per block
# entering it, so fewer, larger blocks keep the driver smaller. Measured with the pull-based sort shuffle on 10M /
# 50M synthetic rows, 2 CPUs, against one ~625k-row block per task: the driver's peak after the dedup 226 / 246 MiB
# instead of 228 / 282, the pass 11.8 / 42.0 s instead of 13.6 / 48.5 s; 2.5M rows per task was flatter (224 / 234)
# but slower (16.7 / 70.4 s)
FILTER_BATCH_ROWS = 1_250_000
_CAP_BITS = 16  # max_rows: histogram of the top bits of the (url, seed) hash

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
                      ("_rowkey", pa.uint64()), ("_part", pa.int32())])
_STATS_PART = -1  # the hash partition of stats rows
_MAX_SIDE = 2**31 - 1  # sizes are written as int32
_SIP_KEYS = ("infgen-url-hash1", "infgen-url-hash2", "infgen-row-hash0")  # pandas SipHash keys (16 bytes)
# scheme and authority; the host is a bracketed IPv6 literal or a name / IPv4 literal
_URL_RE = r"^(?i:https?)://(?:[^/?#@\s]*@)?(?P<host>\[[^\]/?#\s]*\]|[^/?#:@\s\[\]]+)(?::[0-9]*)?(?:[/?#]|$)"
_IP_LIKE_RE = r"^(\[.*\]|[0-9a-fx.]+|localhost|.*\.localhost)$"  # the only hosts worth a closer look
_PLAIN_HOST_RE = r"^(?i:https?)://[a-zA-Z0-9-]+(?:\.[a-zA-Z0-9-]+)*\.[a-zA-Z][a-zA-Z0-9-]*\.?(?::[0-9]*)?(?:[/?#]|$)"
_LOCALHOST_RE = r"^[^/]*//[^/?#]*\.(?i:localhost)\.?(?::[0-9]*)?(?:[/?#]|$)"


# ---- configuration and inputs -----------------------------------------------------------------------------

@dataclass
class FilterConfig:
    """The filter stage's config; conf/data/filter.yaml documents every key. Checked on construction: a
    ValueError names the key that is wrong."""

    CONFIG_NAME: ClassVar[str] = "filter"
    REQUIRED: ClassVar[tuple] = ("input", "output")  # null or "": an error naming them (dataclass_from)
    input: Optional[str] = None  # parquet: a file, a directory of parts, a glob or a URI
    output: Optional[str] = None  # the result lands in <output>/<fingerprint>/
    overwrite: bool = False
    min_pixels: Optional[Number] = 2_000_000  # null: 0
    min_short_side: Optional[Number] = None  # each threshold: null turns it off
    max_aspect_ratio: Optional[Number] = None
    min_aesthetic: Optional[Number] = None
    max_punsafe: Optional[Number] = None
    max_pwatermark: Optional[Number] = None
    allow_private_hosts: bool = False
    max_rows: Optional[int] = None
    seed: int = 0
    partitions: Optional[int] = None  # dedup hash partitions; null: partition_count decides
    ray: RayConfig = field(default_factory=RayConfig)
    mlflow: MlflowConfig = field(default_factory=lambda: MlflowConfig(experiment="infgen-data"))

    def __post_init__(self) -> None:
        if self.partitions is not None and (not isinstance(self.partitions, int) or self.partitions < 1):
            raise ValueError(f"filter config: partitions={self.partitions!r} must be a positive integer or null")
        for key in ("min_pixels", "min_short_side", "max_aspect_ratio", "min_aesthetic", "max_punsafe",
                    "max_pwatermark"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, (int, float)):
                raise ValueError(f"filter config: {key}={value!r} is not a number (or null to turn it off)")
        if self.max_rows is not None and (not isinstance(self.max_rows, int) or self.max_rows < 0):
            raise ValueError(f"filter config: max_rows={self.max_rows!r} must be a non-negative integer or null")
        if self.max_aspect_ratio is not None and self.max_aspect_ratio < 1:
            raise ValueError(f"filter config: max_aspect_ratio={self.max_aspect_ratio!r} must be >= 1")
        self.min_pixels = self.min_pixels or 0
        self.seed = int(self.seed or 0)
        self.allow_private_hosts = bool(self.allow_private_hosts)

    def params(self) -> dict[str, Any]:
        """The parameters that shape the output (the fingerprint's, and what the row checks read)."""
        return {key: getattr(self, key) for key in PARAMS}


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
        # a null-typed column is a valid all-null column (what writers give a column with no value at all)
        if kind is not None and not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_null(kind)):
            raise ValueError(f"{path}: column {col!r} has type {kind}, expected a number")
    for out in ("url", "caption"):
        col = mapping[out]
        kind = schema.field(col).type if col is not None else None
        if kind is not None and not _is_text(kind):
            raise ValueError(f"{path}: column {col!r} has type {kind}, expected a string")
    for key, out in NEEDS_COLUMN.items():
        if params[key] is not None and mapping[out] is None:
            raise ValueError(f"{path}: {key}={params[key]} is set but the file has no {' or '.join(SOURCES[out])} "
                             f"column (laion-high-resolution has no aesthetic score): set {key}: null for such inputs")
    return tuple(mapping.items())


def _is_text(kind: pa.DataType) -> bool:
    """string, large_string, a dictionary of either, or null (all-null)."""
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)


def normalize_urls(url: pa.Array) -> pa.Array:
    """URLs as they are fetched and deduplicated: the `#fragment` dropped (it never reaches the server) and
    characters that may not appear in a URL (space, quotes, angle brackets, ...) percent-encoded (RFC 3986), as
    browsers send them; anything else is left as it is."""
    url = pc.replace_substring_regex(pc.cast(url, pa.string()), r"#.*$", "")
    for char in ' "<>\\^`{|}':
        url = pc.replace_substring(url, char, f"%{ord(char):02X}")
    return url


def inspect_inputs(fs: pafs.FileSystem, paths: list[str],
                   params: Mapping[str, Any]) -> tuple[dict[tuple, list[str]], int]:
    """Read every file's footer (threads: remote stores answer slowly) → ({column mapping: [paths]}, rows)."""
    def footer(path: str) -> pq.FileMetaData:
        try:
            return pq.read_metadata(path, filesystem=fs)
        except Exception as e:  # a non-parquet or truncated file: say which
            raise ValueError(f"{path}: cannot read parquet schema ({e})") from e

    with ThreadPoolExecutor(max_workers=min(16, len(paths))) as pool:
        footers = list(pool.map(footer, paths))
    groups: dict[tuple, list[str]] = {}
    for path, meta in zip(paths, footers):
        s = meta.schema.to_arrow_schema()
        key = column_mapping(path, s, params) + tuple((c, str(s.field(c).type)) for c in s.names)
        groups.setdefault(key, []).append(path)
    return groups, sum(meta.num_rows for meta in footers)


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


def partition_of(h1: np.ndarray, partitions: int) -> np.ndarray:
    """The dedup hash partition of each URL, in [0, partitions): its 64-bit hash scaled (uniform: it is a hash)."""
    return (((h1 >> np.uint64(32)) * np.uint64(partitions)) >> np.uint64(32)).astype(np.int32)


def filter_batch(batch: pa.Table, mapping: tuple, params: Mapping[str, Any], partitions: int = 1) -> pa.Table:
    """Pass-1 UDF: the rows passing every row-level check (OUTPUT_SCHEMA + INTERNAL keys) plus one stats row per
    failing reason (`_reason` > 0, `_count` rows, `_part` = -1, every other column null)."""
    src = dict(mapping)
    reason = _row_reasons(batch, src, params)
    idx = np.flatnonzero(reason == 0)
    # URLs are normalised only where the numeric checks passed (~15% of LAION rows): over every row it was 3/4
    # of this function's time
    urls = normalize_urls(batch[src["url"]].take(idx))
    reason[idx] = _url_reasons(urls, params["allow_private_hosts"])
    passed = reason[idx] == 0
    idx = idx[passed]

    rows = batch.take(idx)
    n = len(idx)
    cols = {"url": urls.filter(passed)}
    for name, column in zip(OUTPUT_SCHEMA.names, OUTPUT_SCHEMA):
        if name == "url":
            continue
        if src[name] is None:
            cols[name] = pa.nulls(n, column.type)
        elif name in ("width", "height"):  # checked finite and in [1, 2^31): truncating is safe
            cols[name] = pa.array(pc.cast(rows[src[name]], pa.float64()).to_numpy().astype(np.int32))
        else:
            cols[name] = pc.cast(rows[src[name]], column.type)
    out = pa.table(cols, schema=OUTPUT_SCHEMA)
    urls = out["url"].to_numpy()
    h1 = _hash_strings(urls, _SIP_KEYS[0])
    keys = {"_reason": np.zeros(n, np.uint8), "_count": pa.nulls(n, pa.int64()), "_h1": h1,
            "_h2": _hash_strings(urls, _SIP_KEYS[1]), "_rowkey": _content_hash(out),
            "_part": partition_of(h1, partitions)}
    for name, column in zip(INTERNAL.names, INTERNAL):
        out = out.append_column(column, pa.chunked_array([pa.array(keys[name], column.type)]))

    counts = np.bincount(reason, minlength=len(ROW_REASONS) + 1)
    codes = np.flatnonzero(counts[1:]) + 1
    return pa.concat_tables([out, _stats_rows(codes, counts[codes], out.schema)])


def _stats_rows(codes: np.ndarray, counts: np.ndarray, schema: pa.Schema) -> pa.Table:
    """One stats row per reason code: `_reason`, `_count`, `_part` = -1, every other column null."""
    cols = {name: pa.nulls(len(codes), column.type) for name, column in zip(schema.names, schema)}
    cols["_reason"] = pa.array(codes, pa.uint8())
    cols["_count"] = pa.array(counts, pa.int64())
    cols["_part"] = pa.array(np.full(len(codes), _STATS_PART), pa.int32())
    return pa.table(cols, schema=schema)


# ---- global decisions: duplicates and max_rows ------------------------------------------------------------

def dedup_partition(part: pa.Table) -> pa.Table:
    """Pass-2 UDF (`map_groups`): all rows of one hash partition, so every copy of its URLs → one row per URL, the
    copy with the smallest content hash (copies that tie are identical), sorted by URL hash, plus a stats row
    counting the copies dropped as `duplicate_url`. The stats rows' partition (-1) passes through."""
    if part.num_rows == 0 or part["_part"][0].as_py() == _STATS_PART:
        return part
    part = part.take(pc.sort_indices(part, [("_h1", "ascending"), ("_h2", "ascending"), ("_rowkey", "ascending")]))
    h1, h2 = part["_h1"].to_numpy(), part["_h2"].to_numpy()
    first = np.r_[True, (h1[1:] != h1[:-1]) | (h2[1:] != h2[:-1])]
    dropped = len(first) - int(first.sum())
    kept = part.filter(pa.array(first))
    if not dropped:
        return kept
    return pa.concat_tables([kept, _stats_rows(np.array([_CODE["duplicate_url"]]), np.array([dropped]), kept.schema)])


def count_reasons(block: pa.Table) -> pa.Table:
    """(`_reason`, `_count`) summed per reason over a block: reason 0 counts kept rows, the others sum stats rows."""
    reason = block["_reason"].to_numpy()
    counts = np.zeros(len(REASONS) + 1, np.int64)
    stats = reason > 0
    np.add.at(counts, reason[stats], block["_count"].filter(pa.array(stats)).to_numpy())
    counts[0] = int((~stats).sum())
    codes = np.flatnonzero(counts)
    return pa.table({"_reason": pa.array(codes, pa.uint8()), "_count": pa.array(counts[codes], pa.int64())})


def cap_key(h1: np.ndarray, h2: np.ndarray, seed: int) -> np.ndarray:
    """A pseudo-random uint64 per URL for `max_rows`: a function of (url, seed) only."""
    return _splitmix(h1 ^ _splitmix(h2 ^ _splitmix(np.full(len(h1), seed, np.uint64))))


def _kept_keys(block: pa.Table, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cap key, h1, h2) of a block's kept rows."""
    kept = block.filter(pc.equal(block["_reason"], 0))
    h1, h2 = kept["_h1"].to_numpy(), kept["_h2"].to_numpy()
    return cap_key(h1, h2, seed), h1, h2


def cap_histogram(block: pa.Table, seed: int) -> pa.Table:
    """(`bin`, `count`) of the kept rows' cap keys over 2^16 bins of their top bits (nonzero bins only)."""
    ck, _, _ = _kept_keys(block, seed)
    bins, counts = np.unique((ck >> np.uint64(64 - _CAP_BITS)).astype(np.int64), return_counts=True)
    return pa.table({"bin": bins, "count": counts.astype(np.int64)})


def cap_candidates(block: pa.Table, seed: int, bin_: int) -> pa.Table:
    """(`ck`, `h1`, `h2`) of the kept rows whose cap key falls in histogram bin `bin_`."""
    ck, h1, h2 = _kept_keys(block, seed)
    sel = (ck >> np.uint64(64 - _CAP_BITS)).astype(np.int64) == bin_
    return pa.table({"ck": ck[sel], "h1": h1[sel], "h2": h2[sel]})


def cap_threshold(histogram: np.ndarray, candidates, max_rows: int) -> np.ndarray:
    """The `max_rows` cut over unique URLs: the (cap key, h1, h2) of the max_rows-th smallest, so a URL is kept
    when its triple is lexicographically at most that; empty when max_rows is 0.

    histogram: counts per bin of the top 16 bits of the cap keys (sum must exceed max_rows);
    candidates(bin) → pa.Table (ck, h1, h2) of every URL in that bin."""
    if max_rows == 0:
        return np.empty(0, np.uint64)
    below = np.cumsum(histogram)
    bin_ = int(np.searchsorted(below, max_rows))  # the bin holding the max_rows-th key
    rank = max_rows - 1 - (int(below[bin_ - 1]) if bin_ else 0)
    c = candidates(bin_)
    ck, h1, h2 = (c[n].to_numpy() for n in ("ck", "h1", "h2"))
    i = np.lexsort((h2, h1, ck))[rank]
    return np.array([ck[i], h1[i], h2[i]], np.uint64)


def finalize_batch(batch: pa.Table, cap: Optional[np.ndarray], seed: int) -> pa.Table:
    """Pass-3 UDF: drop stats rows and rows past the cap; keep OUTPUT_SCHEMA columns."""
    keep = batch["_reason"].to_numpy() == 0
    if cap is not None:
        if len(cap) == 0:
            keep[:] = False
        elif keep.any():
            h1 = pc.fill_null(batch["_h1"], 0).to_numpy()
            h2 = pc.fill_null(batch["_h2"], 0).to_numpy()
            ck = cap_key(h1, h2, seed)
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


def _track(cfg: FilterConfig, stats: dict, output: str, fs: pafs.FileSystem, files: list[str]) -> Optional[str]:
    from pipelines.tracking import config_hash

    config = asdict(cfg)
    lineage = {"infgen.stage": "filter", "infgen.input": cfg.input, "infgen.output": output,
               "infgen.config_hash": config_hash(config), "infgen.fingerprint": stats["fingerprint"]}
    with cfg.mlflow.tracker("filter", tags=lineage) as tracker:
        tracker.log_params(config)
        tracker.log_metrics({"rows_in": stats["rows_in"], "rows_out": stats["rows_out"],
                             **{f"dropped_{k}": v for k, v in stats["dropped"].items()},
                             **{f"seconds_{k}": v for k, v in stats["seconds"].items()}})
        tracker.log_dict(stats, STATS)
        dropped = ", ".join(f"{k} {v}" for k, v in stats["dropped"].items() if v) or "none"
        tracker.set_note(f"{stats['rows_in']} metadata rows in, {stats['rows_out']} kept → {output}. Dropped (each "
                         f"row once, under its first failing reason): {dropped}. Thresholds: see the params.")
        if stats["rows_out"]:
            import matplotlib.pyplot as plt

            fig = histogram_figure(_sample(fs, files))
            tracker.log_figure(fig, "filter_histograms.png")
            plt.close(fig)
        return tracker.run_id


def partition_count(cfg: FilterConfig, rows_in: int) -> int:
    """Dedup hash partitions: `partitions` if set, else enough that each CPU has several and none holds more
    than ROWS_PER_PARTITION input rows (a partition's survivors meet in one worker's memory)."""
    import ray

    if cfg.partitions is not None:
        return cfg.partitions
    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(PARTITIONS_PER_CPU * cpus, -(-rows_in // ROWS_PER_PARTITION))


def _dedup(groups: dict[tuple, list[str]], fs: pafs.FileSystem, params: dict, partitions: int):
    """Read (only the needed columns), apply the row-level checks, shuffle by URL hash partition and keep one row
    per URL; materialized in the object store, which spills to disk when it outgrows memory."""
    import ray
    from ray.data.context import ShuffleStrategy

    parts = []
    for key, group in groups.items():
        mapping = key[:len(SOURCES)]
        columns = [c for _, c in mapping if c is not None]
        kwargs = {"mapping": mapping, "params": params, "partitions": partitions}
        # select_columns is pushed down into the parquet read (`columns=` is deprecated in Ray 2.60)
        # FILTER_BATCH_ROWS per task, not one read block: fewer blocks enter the sort shuffle (see there)
        parts.append(ray.data.read_parquet(group, filesystem=fs).select_columns(columns).map_batches(
            filter_batch, batch_format="pyarrow", batch_size=FILTER_BATCH_ROWS, fn_kwargs=kwargs))
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    # Set on this dataset's context only (what follows inherits it), not on the process-wide DataContext:
    # - per-operator CPU reservation keeps one of two CPUs idle on a small node (1.1 tasks in flight instead of
    #   1.8, measured); these task-only chains cannot starve each other;
    # - the push-based sort shuffle (Ray's choice for shuffles of many blocks): its merge tasks combine the map
    #   outputs, so the driver's state grows with blocks, not blocks × partitions as the pull-based one's does.
    #   Read + checks + dedup of 10M / 50M / 100M synthetic rows (filter_speed.py's data, 2 CPUs, 16 partitions),
    #   the driver's peak: push 227 / 238 / 251 MiB in 20 / 71 / 283 s; pull 226 / 246 / 286 MiB in 15 / 110 /
    #   125 s; Ray 2.60's hash shuffle (aggregator actors) 225 / 234 / 243 MiB, but 775 s at 100M rows.
    ds.context.op_resource_reservation_enabled = False
    ds.context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PUSH_BASED
    return ds.groupby("_part", num_partitions=partitions).map_groups(dedup_partition, batch_format="pyarrow").materialize()


def _counts(deduped) -> tuple[int, dict[str, int], int]:
    """(rows in, dropped per reason, URLs kept so far) from the stats rows, summed block by block on the driver."""
    counts = np.zeros(len(REASONS) + 1, np.int64)
    for b in deduped.map_batches(count_reasons, batch_format="pyarrow", batch_size=None).iter_batches(
            batch_format="pyarrow", batch_size=None):
        np.add.at(counts, b["_reason"].to_numpy(), b["_count"].to_numpy())
    dropped = {name: int(counts[_CODE[name]]) for name in REASONS}
    return int(counts.sum()), dropped, int(counts[0])


def _cap(deduped, urls: int, max_rows: Optional[int], seed: int) -> Optional[np.ndarray]:
    """The max_rows threshold (see cap_threshold), None when there is no cap or it keeps every URL. The driver
    holds the 2^16-bin histogram and the keys of one bin (~urls / 65,536)."""
    if max_rows is None or urls <= max_rows:
        return None
    histogram = np.zeros(2 ** _CAP_BITS, np.int64)
    for b in deduped.map_batches(cap_histogram, batch_format="pyarrow", batch_size=None,
                                 fn_kwargs={"seed": seed}).iter_batches(batch_format="pyarrow", batch_size=None):
        np.add.at(histogram, b["bin"].to_numpy(), b["count"].to_numpy())

    def candidates(bin_: int) -> pa.Table:
        return pa.concat_tables([pa.table({"ck": pa.array([], pa.uint64()), "h1": pa.array([], pa.uint64()),
                                           "h2": pa.array([], pa.uint64())})] + [
            b for b in deduped.map_batches(cap_candidates, batch_format="pyarrow", batch_size=None,
                                           fn_kwargs={"seed": seed, "bin_": bin_}).iter_batches(
                batch_format="pyarrow", batch_size=None)])
    return cap_threshold(histogram, candidates, max_rows)


def _write(deduped, cap: Optional[np.ndarray], seed: int, fs: pafs.FileSystem, tmp: str) -> tuple[list[str], int]:
    """The kept rows → parquet parts in `tmp`, written by the workers; returns (files, rows written)."""
    deduped.map_batches(finalize_batch, batch_format="pyarrow", batch_size=None,
                        fn_kwargs={"cap": cap, "seed": seed}).write_parquet(tmp, filesystem=fs)
    files = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(tmp)) if i.path.endswith(".parquet"))
    if not files:  # nothing kept: an empty part still tells readers the schema
        files = [f"{tmp}/part-empty.parquet"]
        with fs.open_output_stream(files[0]) as f:
            pq.write_table(OUTPUT_SCHEMA.empty_table(), f)
    return files, sum(pq.read_metadata(p, filesystem=fs).num_rows for p in files)


def run_filter(config: FilterConfig | Mapping[str, Any]) -> StageResult:
    """Filter LAION parquet (`input`: file, directory, glob or URI) into `<output>/<fingerprint>`. `config`: a
    FilterConfig, or a mapping checked into one (ValueError naming the key)."""
    t0 = time.perf_counter()
    cfg = dataclass_from(FilterConfig, config)
    params = cfg.params()
    fs, paths = resolve_files(cfg.input)
    groups, rows_total = inspect_inputs(fs, paths, params)
    fp = fingerprint(fs, paths, {"stage": "filter", "format": FORMAT_VERSION, **params})
    out_fs, root = output_root(cfg.output)
    final = f"{root.rstrip('/')}/{fp}"  # a path on out_fs
    where = output_uri(cfg.output, fp)  # for people and the next stage: with its scheme
    if is_complete(out_fs, final) and not cfg.overwrite:
        print(f"filter: {where} is complete for these inputs and parameters; nothing to do (overwrite=true redoes it)")
        return StageResult(output=where, stats=read_json(out_fs, f"{final}/{STATS}"), skipped=True)

    t_inspect = time.perf_counter()
    cfg.ray.init()
    partitions = partition_count(cfg, rows_total)
    t_start = time.perf_counter()
    deduped = _dedup(groups, fs, params, partitions)  # the only read of the input
    t_read = time.perf_counter()
    rows_in, dropped, urls = _counts(deduped)
    cap = _cap(deduped, urls, params["max_rows"], params["seed"])
    dropped["over_max_rows"] = urls - params["max_rows"] if cap is not None else 0
    rows_out = rows_in - sum(dropped.values())
    t_decide = time.perf_counter()

    # where renames are atomic: a temporary directory beside the final one, renamed when complete; on object
    # stores (a rename is a copy of every object): in place, `_SUCCESS` last, after what an earlier run left
    atomic = renames_are_atomic(out_fs)
    tmp = f"{root.rstrip('/')}/.tmp-{fp}-{uuid.uuid4().hex[:8]}" if atomic else final
    if not atomic:
        remove_dir(out_fs, final)
    out_fs.create_dir(tmp)
    try:
        files, written = _write(deduped, cap, params["seed"], out_fs, tmp)
        if written != rows_out:  # the counts and the data must agree; never publish if they do not
            raise RuntimeError(f"filter: wrote {written} rows but the counts say {rows_out} ({dropped})")
        stats = {"stage": "filter", "rows_in": rows_in, "rows_out": rows_out,
                 "dropped": {name: dropped.get(name, 0) for name in REASONS}, "reason_order": list(REASONS),
                 "input": cfg.input, "input_files": paths, "fingerprint": fp, "output": where,
                 "partitions": partitions,
                 "params": params, "config": asdict(cfg), "schema": OUTPUT_SCHEMA.names,
                 "seconds": {"inspect": round(t_inspect - t0, 3), "ray_init": round(t_start - t_inspect, 3),
                             "read_filter_dedup": round(t_read - t_start, 3),
                             "decide": round(t_decide - t_read, 3), "write": round(time.perf_counter() - t_decide, 3)}}
        write_json(out_fs, f"{tmp}/{STATS}", stats)
        mark_success(out_fs, tmp)
        if atomic:
            _publish(out_fs, tmp, final)
    except BaseException:
        remove_dir(out_fs, tmp)
        raise
    del deduped
    run_id = _track(cfg, stats, where, out_fs, [f"{final}/{os.path.basename(p)}" for p in files])
    print(f"filter: {rows_in} rows in, {rows_out} kept → {where}")
    return StageResult(output=where, stats=stats, skipped=False, run_id=run_id)
