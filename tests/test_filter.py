"""Stage 1 (pipelines/filter.py): exact per-reason counts on every LAION schema variant, idempotent reruns,
fingerprinted outputs, clear errors, deterministic dedup and max_rows, MLflow logging. Real local Ray."""

from __future__ import annotations

import math
import re
import sys
from collections import Counter
from dataclasses import fields
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from pipelines.sample_data import write_laion_parquet
from pipelines.filter import (OUTPUT_SCHEMA, REASONS, FilterConfig, cap_key, cap_threshold, column_mapping,
                              count_reasons, dedup_partition, filter_batch, host_verdict, normalize_urls, run_filter)

ROOT = Path(__file__).resolve().parents[1]
PARAMS = dict(min_pixels=2_000_000, min_short_side=1000, max_aspect_ratio=2.5, min_aesthetic=5.0,
              max_punsafe=0.5, max_pwatermark=0.8, allow_private_hosts=False)


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory):
    """One SQLite tracking store for the file (creating its tables takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


def config(input, output, mlflow_uri, **overrides) -> dict:
    return {"input": str(input), "output": str(output), "overwrite": False, **PARAMS,
            "max_rows": None, "seed": 0, "ray": {"address": None, "num_cpus": None},
            "mlflow": {"tracking_uri": mlflow_uri, "experiment": "test-filter"}, **overrides}


def labelled_parts(variant: str, tag: str) -> list[list[tuple[dict, str]]]:
    """Two parquet parts of (row, expected outcome): 'keep' or the reason it is counted under."""
    has_score = variant != "high_resolution"

    def row(name, outcome, **kw):
        base = dict(url=f"https://img.example.com/{tag}/{name}.jpg", text=f"{tag} {name}", width=2000,
                    height=1500, aesthetic=6.0, punsafe=0.01, pwatermark=0.05)
        return {**base, **kw}, outcome

    twin = dict(url=f"https://twin.example.com/{tag}.jpg", text="the same row twice")
    part0 = [
        row("twin", "keep", **twin),  # index 0 in both parts: identical rows (LAION's hash is the index here)
        row("k1", "keep"),
        row("k2", "keep", url=f"HTTP://IMG.example.com/{tag}/k2.jpg"),
        row("k3", "keep", url=f"https://user:pw@cdn.example.org:8443/{tag}/k3.jpg?size=large#top"),
        row("k4", "keep", url=f"http://93.184.216.34/{tag}/k4.jpg"),  # a public IP
        row("k5", "keep", url=f"https://[2606:4700::6810:85e5]/{tag}/k5.jpg"),
        row("k6", "keep", url=f"https://cafe.de/{tag}/k6.jpg"),  # looks like hex, is a name
        row("edge", "keep", width=2000, height=1000),  # exactly min_pixels, min_short_side, aspect 2
        row("no_width", "bad_size", width=None),
        row("zero", "bad_size", width=0),
        row("negative", "bad_size", height=-1500),
        row("small", "too_small", width=1000, height=1000),
        row("small_ftp", "too_small", url="ftp://example.com/a.jpg", width=10, height=10),  # first reason wins
        row("narrow", "short_side", width=4000, height=900),  # also too wide: counted once, here
        row("wide", "aspect_ratio", width=3000, height=1100),
        row("ugly", "low_aesthetic" if has_score else "keep", aesthetic=4.9),
        row("private_ugly", "low_aesthetic" if has_score else "private_host", url="http://10.1.2.3/a.jpg",
            aesthetic=4.0),
        row("nsfw", "unsafe", punsafe=0.9),
        row("nsfw_unknown", "unsafe", punsafe=None),
        row("watermark", "watermark", pwatermark=0.95),
        row("ftp", "bad_url", url="ftp://example.com/b.jpg"),
        row("no_scheme", "bad_url", url="example.com/c.jpg"),
        row("empty", "bad_url", url=""),
        row("null", "bad_url", url=None),
        row("no_host", "bad_url", url="https:///nohost.jpg"),
        row("js", "bad_url", url="javascript:alert(1)"),
        row("bad_v6", "bad_url", url="http://[zz::1]/a.jpg"),
    ]
    part0 += [row(f"p{i}", "private_host", url=u) for i, u in enumerate([
        "http://127.0.0.1:8000/a.jpg", "http://10.0.0.5/a.jpg", "https://192.168.1.1/a.jpg",
        "http://169.254.169.254/latest/meta-data", "http://[::1]/a.jpg", "http://localhost/a.jpg",
        "http://2130706433/a.jpg", "http://[::ffff:127.0.0.1]/x.jpg", "http://127.1/a.jpg", "http://LOCALHOST./x"])]
    part1 = [
        row("twin", "duplicate_url", **twin),
        row("k1", "duplicate_url", text="another caption of k1"),
        row("k2_small", "too_small", url=f"HTTP://IMG.example.com/{tag}/k2.jpg", width=100, height=100),
        *[row("trio", "keep" if i == 0 else "duplicate_url", url=f"https://img.example.com/{tag}/trio.jpg",
              text=f"caption {c}") for i, c in enumerate("abc")],
    ]
    if variant == "aesthetics_v2":  # float sizes: NaN and sizes beyond int32 exist only here
        part1 += [row("nan", "bad_size", width=math.nan), row("huge", "bad_size", width=3e9)]
        part0 += [row("no_score", "low_aesthetic", aesthetic=None)]
    return [part0, part1]


def write_parts(directory: Path, variant: str, parts) -> list[Path]:
    return [write_laion_parquet(directory / f"part-{i:05d}.parquet", [r for r, _ in part], variant)
            for i, part in enumerate(parts)]


def expectation(parts) -> tuple[dict, set]:
    rows = [r for part in parts for r in part]
    counts = Counter(outcome for _, outcome in rows)
    kept = pa.array([r["url"] for r, o in rows if o == "keep"], pa.string())
    # kept URLs as they are fetched: the #fragment dropped (pipelines.filter.normalize_urls)
    return {reason: counts.get(reason, 0) for reason in REASONS}, set(normalize_urls(kept).to_pylist())


def read_output(result) -> pa.Table:
    files = sorted(Path(result.output.removeprefix("file://")).glob("*.parquet"))
    assert files, result.output
    return pq.ParquetDataset([str(f) for f in files]).read()


@pytest.mark.parametrize("variant, form", [("aesthetics_v2", "directory"), ("aesthetic_v1", "glob"),
                                           ("high_resolution", "glob")])
def test_exact_counts_and_kept_urls(ray_local, tmp_path, mlflow_uri, variant, form):
    parts = labelled_parts(variant, variant)
    write_parts(tmp_path / "in", variant, parts)
    spec = tmp_path / "in" if form == "directory" else tmp_path / "in" / "part-*.parquet"
    params = {} if variant != "high_resolution" else {"min_aesthetic": None}
    result = run_filter(OmegaConf.create(config(spec, tmp_path / "out", mlflow_uri, **params)))

    dropped, kept = expectation(parts)
    assert result.stats["dropped"] == dropped
    assert result.stats["rows_in"] == sum(map(len, parts))
    assert result.stats["rows_out"] == len(kept) == result.stats["rows_in"] - sum(dropped.values())
    table = read_output(result)
    assert table.schema.remove_metadata() == OUTPUT_SCHEMA
    assert sorted(table["url"].to_pylist()) == sorted(kept)  # every URL once
    trio = table.filter(pc.equal(table["url"], f"https://img.example.com/{variant}/trio.jpg"))
    assert trio["caption"].to_pylist()[0] in {"caption a", "caption b", "caption c"}
    assert (table["aesthetic"].null_count == table.num_rows) == (variant == "high_resolution")
    assert {w for w in table["width"].to_pylist()} == {2000}
    out = Path(result.output)
    assert out.parent == tmp_path / "out" and (out / "_SUCCESS").is_file() and (out / "_stats.json").is_file()
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary directory left behind

    if variant == "aesthetics_v2":  # MLflow: config as params, counts as metrics, stats + plot as artifacts
        from mlflow.tracking import MlflowClient

        client = MlflowClient(mlflow_uri)
        run = client.get_run(result.run_id)
        assert run.data.params["min_pixels"] == "2000000" and run.data.params["mlflow.experiment"] == "test-filter"
        assert run.data.metrics["rows_out"] == len(kept)
        assert run.data.metrics["dropped_private_host"] == dropped["private_host"]
        assert run.data.tags["infgen.output"] == result.output and run.data.tags["infgen.input"] == str(spec)
        assert len(run.data.tags["infgen.config_hash"]) == 16
        assert {a.path for a in client.list_artifacts(result.run_id)} >= {"_stats.json", "filter_histograms.png"}
        assert run.data.tags["mlflow.note.content"].startswith(f"{result.stats['rows_in']} metadata rows in")


def test_rerun_is_a_noop_other_thresholds_elsewhere_overwrite_replaces(ray_local, tmp_path, mlflow_uri, capsys):
    parts = labelled_parts("aesthetics_v2", "rerun")
    write_parts(tmp_path / "in", "aesthetics_v2", parts)
    cfg = config(tmp_path / "in", tmp_path / "out", mlflow_uri)
    first = run_filter(cfg)
    mtimes = {p: p.stat().st_mtime_ns for p in Path(first.output).iterdir()}

    again = run_filter(cfg)
    assert again.skipped and again.output == first.output and again.stats == first.stats
    assert "nothing to do" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in Path(first.output).iterdir()} == mtimes

    private_ok = run_filter({**cfg, "allow_private_hosts": True})
    assert not private_ok.skipped and private_ok.output != first.output
    assert private_ok.stats["dropped"]["private_host"] == 0
    assert private_ok.stats["rows_out"] == first.stats["rows_out"] + first.stats["dropped"]["private_host"]
    assert is_complete(first.output)  # the first output is untouched

    kept = sorted(read_output(first)["url"].to_pylist())
    replaced = run_filter({**cfg, "overwrite": True})
    assert not replaced.skipped and replaced.output == first.output and is_complete(replaced.output)
    assert replaced.stats["dropped"] == first.stats["dropped"] and sorted(read_output(replaced)["url"].to_pylist()) == kept
    assert all(p not in mtimes or p.stat().st_mtime_ns != mtimes[p] for p in Path(first.output).iterdir())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([Path(first.output).name,
                                                                          Path(private_ok.output).name])


def is_complete(directory: str) -> bool:
    return (Path(directory) / "_SUCCESS").is_file()


def test_mixed_variants_in_one_input(ray_local, tmp_path, mlflow_uri):
    v2, v1 = labelled_parts("aesthetics_v2", "mix2"), labelled_parts("aesthetic_v1", "mix1")
    write_laion_parquet(tmp_path / "in" / "a.parquet", [r for r, _ in v2[0]], "aesthetics_v2")
    write_laion_parquet(tmp_path / "in" / "b.parquet", [r for r, _ in v1[0]], "aesthetic_v1")
    # URIs: what resolve_files / output_root give for s3:// or gs:// goes the same way with file://
    result = run_filter(config(f"file://{tmp_path / 'in'}", f"file://{tmp_path / 'out'}", mlflow_uri))
    assert result.output.startswith(f"file://{tmp_path / 'out'}/") and is_complete(result.output[len("file://"):])
    dropped, kept = expectation([v2[0], v1[0]])
    assert result.stats["dropped"] == dropped and sorted(read_output(result)["url"].to_pylist()) == sorted(kept)


def crashing_once(filter_fn, directory: Path):
    """`filter_fn` (filter_batch) whose first attempt at each batch kills its worker after all the work is done (a
    marker per batch in `directory` lets the retry return), so Ray retries the task. Defined in a function:
    cloudpickle sends it to the workers by value, where the real pipelines.filter is unpatched."""
    import os
    import uuid

    def crashing_filter_batch(batch, *args, **kwargs):
        out = filter_fn(batch, *args, **kwargs)
        if batch.num_rows:
            marker = directory / f"{batch.num_rows}-{uuid.uuid5(uuid.NAMESPACE_URL, str(batch[0][0]))}"
            try:
                open(marker, "x").close()
            except FileExistsError:
                return out
            os._exit(1)
        return out

    return crashing_filter_batch


def test_counts_stay_exact_when_tasks_are_retried(ray_local, tmp_path, mlflow_uri, monkeypatch):
    """Each batch's first attempt dies after doing its work; Ray retries it. A side-effect counter would
    count those batches twice; counts carried in the dataset do not."""
    import pipelines.filter

    parts = labelled_parts("aesthetics_v2", "retry")
    write_parts(tmp_path / "in", "aesthetics_v2", parts)
    (tmp_path / "crashes").mkdir()
    # run_filter looks filter_batch up at call time: the patched one goes into the map_batches
    monkeypatch.setattr(pipelines.filter, "filter_batch", crashing_once(filter_batch, tmp_path / "crashes"))
    result = run_filter(config(tmp_path / "in", tmp_path / "out", mlflow_uri))
    assert list((tmp_path / "crashes").iterdir())  # the tasks did die once (and were retried)
    dropped, kept = expectation(parts)
    assert result.stats["dropped"] == dropped
    assert sorted(read_output(result)["url"].to_pylist()) == sorted(kept)


def test_max_rows_and_dedup_are_deterministic(ray_local, tmp_path, mlflow_uri):
    rows = [dict(url=f"https://img.example.com/{i}.jpg", text=f"caption {i}", width=2000, height=1500)
            for i in range(40)]
    rows += [dict(url=f"https://img.example.com/{i}.jpg", text=f"other caption {i}", width=2000, height=1500)
             for i in range(0, 40, 4)]  # 10 duplicated URLs with a different caption
    write_laion_parquet(tmp_path / "in" / "part-0.parquet", rows[:25], "aesthetics_v2")
    write_laion_parquet(tmp_path / "in" / "part-1.parquet", rows[25:], "aesthetics_v2")
    cfg = config(tmp_path / "in", tmp_path / "out", mlflow_uri, max_rows=15)
    first = run_filter(cfg)
    kept = sorted(zip(*read_output(first).select(["url", "caption"]).to_pydict().values()))
    assert len(kept) == 15 and len({u for u, _ in kept}) == 15
    assert first.stats["dropped"]["duplicate_url"] == 10 and first.stats["dropped"]["over_max_rows"] == 25

    # another run on the same rows in the other order, in files of other names: the same rows survive
    write_laion_parquet(tmp_path / "swapped" / "x.parquet", rows[25:], "aesthetics_v2")
    write_laion_parquet(tmp_path / "swapped" / "y.parquet", rows[:25], "aesthetics_v2")
    swapped = run_filter({**cfg, "input": str(tmp_path / "swapped")})
    assert swapped.output != first.output
    assert sorted(zip(*read_output(swapped).select(["url", "caption"]).to_pydict().values())) == kept

    other_seed = run_filter({**cfg, "seed": 1})
    assert sorted(read_output(other_seed)["url"].to_pylist()) != [u for u, _ in kept]
    none = run_filter({**cfg, "max_rows": 0})
    assert none.stats["rows_out"] == 0 and read_output(none).num_rows == 0
    assert none.stats["dropped"]["over_max_rows"] == 40


def test_schema_errors_name_the_file_and_column(tmp_path):
    good = write_laion_parquet(tmp_path / "in" / "good.parquet", [dict(url="https://a/b.jpg", width=1, height=1)],
                               "aesthetics_v2")
    bad = tmp_path / "in" / "bad.parquet"
    pq.write_table(pq.read_table(good).drop_columns(["HEIGHT"]), bad)
    with pytest.raises(ValueError, match=rf"{re.escape(str(bad))}: required column 'HEIGHT'"):
        run_filter({"input": str(tmp_path / "in"), "output": str(tmp_path / "out")})

    table = pq.read_table(good)
    pq.write_table(table.set_column(table.schema.get_field_index("WIDTH"), "WIDTH", pa.array(["1"])), bad)
    with pytest.raises(ValueError, match=rf"{re.escape(str(bad))}: column 'WIDTH' has type string, expected a number"):
        run_filter({"input": str(tmp_path / "in"), "output": str(tmp_path / "out")})

    hr = write_laion_parquet(tmp_path / "hr" / "p.parquet", [dict(url="https://a/b.jpg", width=1, height=1)],
                             "high_resolution")
    with pytest.raises(ValueError, match=rf"{re.escape(str(hr))}: min_aesthetic=5.0 .*AESTHETIC_SCORE or aesthetic"):
        run_filter({"input": str(hr), "output": str(tmp_path / "out"), "min_aesthetic": 5.0})

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .parquet files found"):
        run_filter({"input": str(tmp_path / "empty"), "output": str(tmp_path / "out")})
    with pytest.raises(ValueError, match="no such file"):
        run_filter({"input": str(tmp_path / "nowhere" / "x.parquet"), "output": str(tmp_path / "out")})
    with pytest.raises(ValueError, match="unknown keys.*min_pixel'"):
        run_filter({"input": str(hr), "output": str(tmp_path / "out"), "min_pixel": 5})
    assert not (tmp_path / "out").exists()


def test_dedup_partition_keeps_the_smallest_content_hash_and_counts_the_rest(tmp_path):
    """One hash partition (what map_groups hands over): whatever the row order, one row per URL, the same one."""
    rows = [dict(url=f"https://img.example.com/{i % 5}.jpg", text=f"caption {i}", width=2000, height=1500)
            for i in range(12)]
    path = write_laion_parquet(tmp_path / "p.parquet", rows, "aesthetics_v2")
    table = pq.read_table(path)
    params = FilterConfig(input="-", output="-", min_aesthetic=None, max_punsafe=None, max_pwatermark=None).params()
    passed = filter_batch(table, column_mapping(str(path), table.schema, params), params)
    kept = dedup_partition(passed)
    shuffled = dedup_partition(passed.take(np.random.default_rng(0).permutation(passed.num_rows)))
    assert kept.equals(shuffled)  # sorted by URL hash: the same rows in the same order
    data = kept.filter(pc.equal(kept["_reason"], 0))
    assert sorted(data["url"].to_pylist()) == [f"https://img.example.com/{i}.jpg" for i in range(5)]
    for url, caption in zip(data["url"].to_pylist(), data["caption"].to_pylist()):
        copies = passed.filter(pc.equal(passed["url"], url))
        assert caption == copies["caption"][int(np.argmin(copies["_rowkey"].to_numpy()))].as_py()
    counts = dict(zip(*count_reasons(kept).to_pydict().values()))
    assert counts == {0: 5, REASONS.index("duplicate_url") + 1: 7}
    assert dedup_partition(passed.slice(0, 0)).num_rows == 0


def test_cap_threshold_is_the_exact_kth_url():
    rng = np.random.default_rng(0)
    h1, h2 = rng.integers(0, 2**63, 50_000, dtype=np.uint64), rng.integers(0, 2**63, 50_000, dtype=np.uint64)
    ck = cap_key(h1, h2, seed=3)
    histogram = np.bincount((ck >> np.uint64(48)).astype(np.int64), minlength=2**16)

    def candidates(bin_):
        sel = (ck >> np.uint64(48)).astype(np.int64) == bin_
        return pa.table({"ck": ck[sel], "h1": h1[sel], "h2": h2[sel]})

    order = np.lexsort((h2, h1, ck))
    for k in (1, 17, 25_000, 50_000 - 1):
        t = cap_threshold(histogram, candidates, k)
        assert tuple(t) == (ck[order[k - 1]], h1[order[k - 1]], h2[order[k - 1]])
    assert len(cap_threshold(histogram, candidates, 0)) == 0


def test_host_verdicts():
    for host in ("127.0.0.1", "10.0.0.1", "172.16.5.4", "192.168.0.1", "169.254.169.254", "0.0.0.0", "100.64.0.1",
                 "127.1", "2130706433", "0x7f000001", "[::1]", "[fe80::1%eth0]", "[fc00::1]", "[::ffff:10.0.0.1]",
                 "localhost", "api.localhost"):
        assert host_verdict(host) == "private_host", host
    for host in ("93.184.216.34", "8.8.8.8", "[2606:4700::6810:85e5]", "example.com", "cafe.de", "face.b00c"):
        assert host_verdict(host) is None, host
    assert host_verdict("[zz::1]") == "bad_url"


def test_job_entry_point_with_the_shipped_config(ray_local, tmp_path, mlflow_uri, monkeypatch, capsys):
    from jobs import filter as job

    yaml = OmegaConf.load(ROOT / "conf" / "data" / "filter.yaml")
    assert set(yaml) == {f.name for f in fields(FilterConfig)}
    single = write_laion_parquet(tmp_path / "in" / "p.parquet",
                                 [dict(url=f"https://a.example.com/{i}.jpg", width=2400, height=1600) for i in range(3)],
                                 "aesthetic_v1")
    monkeypatch.setattr(sys, "argv", ["jobs.filter", "--config", str(ROOT / "conf" / "data" / "filter.yaml"),
                                      f"input={single}", f"output={tmp_path / 'out'}",
                                      f"mlflow.tracking_uri={mlflow_uri}"])
    job.main()
    assert '"rows_out": 3' in capsys.readouterr().out


def test_mlflow_server(ray_local, tmp_path, mlflow_server):
    from mlflow.tracking import MlflowClient

    write_laion_parquet(tmp_path / "in" / "p.parquet",
                        [dict(url=f"https://a.example.com/{i}.jpg", width=2400, height=1600) for i in range(5)],
                        "aesthetics_v2")
    result = run_filter(config(tmp_path / "in", tmp_path / "out", mlflow_server, max_rows=3))
    client = MlflowClient(mlflow_server)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.params["max_rows"] == "3"
    assert run.data.metrics["rows_in"] == 5 and run.data.metrics["dropped_over_max_rows"] == 2
    assert {a.path for a in client.list_artifacts(result.run_id)} >= {"_stats.json", "filter_histograms.png"}
    assert client.get_experiment(run.info.experiment_id).name == "test-filter"


def test_odd_parquet_and_urls_from_the_field(ray_local, tmp_path, mlflow_uri):
    """A part whose TEXT is all null (arrow type null) beside a normal one; dictionary-encoded and large strings;
    URLs that differ only by a #fragment or by a raw space (the same file on the server): one row each, the URL
    as it is fetched."""
    good = dict(width=2400, height=1600)
    normal = [dict(url="https://img.example.com/a b.jpg", text="first", **good),
              dict(url="https://img.example.com/c.jpg#top", text="second", **good)]
    odd = [dict(url="https://img.example.com/a%20b.jpg", text=None, **good),
           dict(url="https://img.example.com/c.jpg", text=None, **good),
           dict(url="https://img.example.com/d.jpg", text=None, **good)]
    write_laion_parquet(tmp_path / "in" / "normal.parquet", normal, "aesthetics_v2")
    table = pq.read_table(write_laion_parquet(tmp_path / "tmp" / "odd.parquet", odd, "aesthetics_v2"))
    table = table.set_column(table.schema.get_field_index("TEXT"), "TEXT", pa.nulls(3))  # arrow type null
    table = table.set_column(table.schema.get_field_index("URL"), "URL",
                             pc.cast(table["URL"], pa.large_string()).dictionary_encode())
    pq.write_table(table, tmp_path / "in" / "odd.parquet")
    assert pq.read_schema(tmp_path / "in" / "odd.parquet").field("TEXT").type == pa.null()

    result = run_filter(config(tmp_path / "in", tmp_path / "out", mlflow_uri, min_aesthetic=None,
                               max_punsafe=None, max_pwatermark=None))
    assert result.stats["rows_in"] == 5 and result.stats["dropped"]["duplicate_url"] == 2
    assert sorted(read_output(result)["url"].to_pylist()) == [
        "https://img.example.com/a%20b.jpg", "https://img.example.com/c.jpg", "https://img.example.com/d.jpg"]
