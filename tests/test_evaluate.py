"""Evaluation: the accumulator's statistics merge exactly, samples are split-invariant, and the Ray job writes the
table, the plots and the MLflow run for reconstruction (encoded shards) and generation (latent files)."""

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from PIL import Image

from infgen.data import photo_pairs
from infgen.distribution_metrics import (FeatureSample, PatchProtocol, RandomConvFeatures, kernel_inception_distance,
                                         patch_priority)
from infgen.evaluation import REFERENCE, Chunk, Decoders, EvalAccumulator
from infgen.models import InfGen
from pipelines.config import dataclass_from
from pipelines.evaluate import EvalConfig, EvalWorker, plan, run_evaluate, select
from pipelines.evaluate.plan import Plan
from pipelines.evaluate.report import evaluation_note
from pipelines.evaluate.scores import psnr_gain
from pipelines.sample_data import write_encoded_shards
from pipelines.shards import read_rows

ROOT = Path(__file__).resolve().parents[1]


# ---- the plain core -------------------------------------------------------------------------------------


def test_feature_sample_is_split_invariant_and_pairs_real_with_fake():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(50, 8)).astype(np.float32)
    prio = patch_priority(0, "img", 50)
    whole = FeatureSample(12).add(feats, prio)
    parts = FeatureSample(12).add(feats[:20], prio[:20]).merge(FeatureSample(12).add(feats[20:], prio[20:]))
    np.testing.assert_array_equal(np.sort(whole.priorities), np.sort(parts.priorities))
    np.testing.assert_array_equal(whole.features[np.argsort(whole.priorities)],
                                  parts.features[np.argsort(parts.priorities)])
    # the same key and patch index give the same priority: real and fake patches are kept together
    np.testing.assert_array_equal(patch_priority(0, "img", 50), prio)
    assert not np.array_equal(patch_priority(1, "img", 50), prio)


def test_kid_near_zero_for_one_distribution_and_grows_with_shift():
    a, b = np.random.default_rng(0).normal(size=(2, 300, 16))
    kids = [kernel_inception_distance(a, b + shift, subsets=20, subset_size=300) for shift in (0, 0.25, 0.5, 1)]
    assert abs(kids[0]) < 0.05 * kids[1]
    assert kids == sorted(kids)
    assert kernel_inception_distance(a, b, 10, 100, seed=3) == kernel_inception_distance(a, b, 10, 100, seed=3)


@pytest.fixture(scope="module")
def pairs(tiny_vae, photos):
    """8 latents (16², of 128² crops) with their crops at 256²."""
    return photo_pairs(list(photos.values())[:4], tiny_vae, crops_per_image=2, input_size=128, hr_size=256, seed=1)


def test_accumulators_merge_to_the_one_shot_result(tiny_vae, pairs):
    latents, hr = pairs
    keys = [f"k{i}" for i in range(len(latents))]
    make = lambda: EvalAccumulator(RandomConvFeatures(), PatchProtocol(size=64, shift=32), [128, 192], 64)
    decoders = Decoders(["vae_bicubic"], None, tiny_vae, None, 512)
    whole = make()
    whole.add_chunk(Chunk(keys, latents, list(hr)), decoders)
    halves = [Chunk(keys[:3], latents[:3], list(hr[:3])), Chunk(keys[3:], latents[3:], list(hr[3:]))]
    a, b = make(), make()
    a.add_chunk(halves[0], decoders)
    b.add_chunk(halves[1], decoders)
    merged = a.merge(b)
    sequential = make()  # the same two chunks into one accumulator: the same float32 batches as the merged pair
    for chunk in halves:
        sequential.add_chunk(chunk, decoders)
    assert set(merged.stats) == set(whole.stats) == set(sequential.stats)
    for key, stats in whole.stats.items():
        assert merged.stats[key].n == stats.n
        # merging is exact (float64 sums); features decoded in batches of another size differ in float32 rounding
        # (oneDNN picks kernels by batch size: up to ~1e-5 of the largest entry on an AVX2 CPU), far under one
        # sample's share of a sum
        np.testing.assert_allclose(merged.stats[key].s, sequential.stats[key].s, rtol=1e-12)
        np.testing.assert_allclose(merged.stats[key].ss, sequential.stats[key].ss, rtol=1e-12)
        np.testing.assert_allclose(merged.stats[key].s, stats.s, rtol=0, atol=1e-4 * np.abs(stats.s).max())
        np.testing.assert_allclose(merged.stats[key].ss, stats.ss, rtol=0, atol=1e-4 * np.abs(stats.ss).max())
    for key, sample in whole.samples.items():
        np.testing.assert_array_equal(np.sort(merged.samples[key].priorities), np.sort(sample.priorities))
    # patch counts follow the protocol: 192² → 3·3 grid + 2·2 shifted grid (shift 32: (192-32)//64 = 2)
    assert whole.counts[("vae_bicubic", 192)]["patches"] == len(keys) * (9 + 4)
    assert whole.counts[(REFERENCE, 128)]["patches"] == len(keys) * (4 + 1)
    assert len(whole.per_image) == 2 * len(keys)


def test_images_smaller_than_a_patch_are_skipped_and_counted(tiny_vae, pairs):
    latents, hr = pairs
    acc = EvalAccumulator(RandomConvFeatures(), PatchProtocol(size=256), [128], 64)
    acc.add_chunk(Chunk(["a", "b"], latents[:2], list(hr[:2])), Decoders(["vae_bicubic"], None, tiny_vae, None, 512))
    assert acc.counts[("vae_bicubic", 128)]["skipped_small"] == 2
    assert ("vae_bicubic", 128, "patch_pool") not in acc.stats
    assert acc.stats[("vae_bicubic", 128, "image_pool")].n == 2  # whole-image FID still has them


def test_config_errors_name_the_problem(tmp_path):
    base = {"model": str(tmp_path), "data": str(tmp_path), "output": str(tmp_path)}
    with pytest.raises(ValueError, match="evaluation config: unknown keys \\['resolution'\\]"):
        dataclass_from(EvalConfig, {**base, "resolution": [512]})
    with pytest.raises(ValueError, match="needs `reference`"):
        dataclass_from(EvalConfig, {**base, "data_kind": "latents"})
    with pytest.raises(ValueError, match="multiples of 8"):
        dataclass_from(EvalConfig, {**base, "resolutions": [500]})
    with pytest.raises(ValueError, match="decoders must be"):
        dataclass_from(EvalConfig, {**base, "decoders": ["vae_nearest"]})
    with pytest.raises(ValueError, match="evaluation config: unknown keys \\['workers.gpus'\\]"):
        dataclass_from(EvalConfig, {**base, "workers": {"gpus": 1}})
    with pytest.raises(ValueError, match="no `model` is set"):
        dataclass_from(EvalConfig, {**base, "model": None})
    # limit_at: on the command line its keys are strings; a key that is no resolution or a bad count is named
    assert dataclass_from(EvalConfig, {**base, "limit_at": {"2048": 12}}).limit_at == {2048: 12}
    with pytest.raises(ValueError, match=r"limit_at.2084=3: keys must be resolutions \(multiples of 8"):
        dataclass_from(EvalConfig, {**base, "limit_at": {2084: 3}})
    with pytest.raises(ValueError, match="limit_at.2048=0"):
        dataclass_from(EvalConfig, {**base, "limit_at": {2048: 0}})


def test_psnr_gain_is_paired_over_the_images_both_decoders_scored():
    per_image = [{"key": k, "decoder": d, "resolution": 128, "psnr": v}
                 for k, d, v in (("a", "infgen", 21.0), ("a", "vae_bicubic", 20.0), ("b", "infgen", 31.0),
                                 ("b", "vae_bicubic", 29.0), ("c", "infgen", 25.0), ("c", "vae_bicubic", 25.0),
                                 ("d", "infgen", 99.0))]  # d: not scored by the baseline, left out
    gain = psnr_gain(per_image, "infgen", 128)
    assert gain["psnr_gain"] == pytest.approx(1.0)  # differences 1, 2, 0
    assert gain["psnr_gain_se"] == pytest.approx(1.0 / 3 ** 0.5)  # std (ddof 1) 1.0 over sqrt(3)
    assert psnr_gain(per_image, "vae_bicubic", 128) == {"psnr_gain": None, "psnr_gain_se": None}
    assert psnr_gain(per_image, "infgen", 256)["psnr_gain"] is None  # nothing scored there


def test_the_note_says_whether_the_scored_samples_were_held_out():
    rows = [{"decoder": d, "resolution": 128, "psnr": v} for d, v in (("infgen", 20.0), ("vae_bicubic", 25.0))]
    note = lambda **held: evaluation_note(rows, Plan([], [], None, 6, [], **held), "features", "lpips")
    assert "PSNR on 6 held-out samples: 128: 20.00 vs 25.00 dB (-5.00)." in note(holdout_source="model record")
    assert "PSNR on 6 samples, 2 of them trained on (allow_trained_rows): 128:" in note(
        holdout_source="model record", trained_rows=2)
    assert "PSNR on 6 samples (no holdout split): 128:" in note(holdout_source="none")


# ---- the Ray job ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_vae):
    """A tiny InfGen (untrained: this tests the evaluation, not the model) exported as training exports it."""
    directory = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    InfGen.from_preset("tiny", scaling_factor=tiny_vae.scaling_factor).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, pairs):
    return write_encoded_shards(tmp_path_factory.mktemp("encoded"), *pairs)


def eval_config(model_dir, data, output, tracking_uri, **overrides):
    cfg = OmegaConf.load(ROOT / "conf/eval/local.yaml")
    cfg.model, cfg.data, cfg.output, cfg.mlflow.tracking_uri = str(model_dir), str(data), str(output), tracking_uri
    cfg.resolutions = [128, 256]
    cfg.grid.count = 2
    cfg.workers.num_actors = 2
    return OmegaConf.merge(cfg, overrides)


def test_reconstruction_on_ray_writes_table_plots_and_mlflow(ray_local, model_dir, encoded, tmp_path, mlflow_server):
    cfg = eval_config(model_dir, encoded, tmp_path / "eval", mlflow_server, limit=6)
    result = run_evaluate(cfg)
    out = Path(result.output)
    names = {p.name for p in out.iterdir()}
    assert {"results.json", "results.csv", "per_image.csv", "metrics_vs_resolution.png", "crops_128.png",
            "crops_256.png", "_SUCCESS"} <= names

    results = json.loads((out / "results.json").read_text())
    rows = {(r["decoder"], r["resolution"]): r for r in results["rows"]}
    # 16² latents: 256 is one 2× step, so the iterative decoder equals infgen there and is not reported
    assert set(rows) == {(d, r) for d in ("infgen", "vae_bicubic", "vae_lanczos") for r in (128, 256)}
    assert results["samples"] == 6 and results["protocol"]["patch_size"] == 64
    assert "NOT Inception" in results["extractor"] and results["lpips"].startswith("not reported")
    for row in rows.values():
        assert row["images"] == 6 and row["reference_images"] == 6
        assert row["patches"] == row["reference_patches"] == 6 * ((4 + 1) if row["resolution"] == 128 else (16 + 9))
        assert row["fidp"] > 0 and row["sfidp"] > 0 and 0 <= row["precisionp"] <= 1 and row["latency_s"] > 0
        assert row["lpips"] is None
    # an untrained infgen is far from the truth; the VAE baseline is close: the metrics see the difference
    for res in (128, 256):
        assert rows[("infgen", res)]["fidp"] > 5 * rows[("vae_bicubic", res)]["fidp"]
        assert rows[("infgen", res)]["psnr"] + 5 < rows[("vae_bicubic", res)]["psnr"]
        # all 6 images scored by both: the paired gain's mean is the difference of the two means
        gain = rows[("infgen", res)]["psnr"] - rows[("vae_bicubic", res)]["psnr"]
        assert rows[("infgen", res)]["psnr_gain"] == pytest.approx(gain, abs=1e-4)
        assert rows[("infgen", res)]["psnr_gain_se"] > 0 and rows[("vae_bicubic", res)]["psnr_gain"] is None
    with open(out / "per_image.csv") as f:
        assert len(list(csv.DictReader(f))) == 6 * 6  # 3 decoders × 2 resolutions × 6 images

    client = MlflowClient(mlflow_server)
    run = client.get_run(result.run_id)
    assert run.data.tags["infgen.stage"] == "evaluate" and run.data.params["patch_mode"] == "grid"
    assert run.data.metrics["fidp/vae_bicubic/256"] == pytest.approx(rows[("vae_bicubic", 256)]["fidp"])
    named = [k for k in run.data.metrics if not k.startswith("system/")]  # system metrics: CPU, memory, ...
    assert not any(k.count("/") == 1 for k in named)  # the resolution is in every metric's name
    note = run.data.tags["mlflow.note.content"]  # the result and its caveats, first thing on the run's page
    assert note.startswith("infgen against VAE decode + bicubic") and "256: " in note and "NOT Inception" in note
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "evaluation")}
    assert {"evaluation/results.csv", "evaluation/metrics_vs_resolution.png", "evaluation/crops_256.png",
            "evaluation/results_table.json"} <= artifacts

    # same config again: the complete output is reused
    assert run_evaluate(cfg).skipped
    # another decoder set on the same data: the reference statistics come from the cache, numbers agree
    cache = sorted((tmp_path / "eval" / "reference_stats").iterdir())
    mtimes = [p.stat().st_mtime_ns for p in cache]
    again = run_evaluate(eval_config(model_dir, encoded, tmp_path / "eval", mlflow_server, limit=6,
                                     decoders=["vae_bicubic"], workers={"num_actors": 1}))
    assert [p.stat().st_mtime_ns for p in cache] == mtimes
    row = next(r for r in again.stats["rows"] if r["resolution"] == 256)
    assert row["fidp"] == pytest.approx(rows[("vae_bicubic", 256)]["fidp"], rel=1e-6)


def test_evaluate_on_s3(ray_local, model_dir, encoded, tmp_path, mlflow_server, s3, capsys):
    """Shards, output and reference cache on an object store (a local S3-API server): the results land there
    with their s3:// URI, MLflow gets the artifacts, nothing is written to a local folder named `s3:`, and a
    second evaluation reads the reference statistics from the cache on S3."""
    import pyarrow.fs as pafs

    bucket = s3("infgen-eval")
    pafs.copy_files(str(encoded), f"{bucket}/encoded")
    run = lambda output: run_evaluate(eval_config(
        model_dir, f"{bucket}/encoded", f"{bucket}/{output}", mlflow_server, limit=4, resolutions=[128],
        decoders=["infgen", "vae_bicubic"], reference_cache=f"{bucket}/reference_stats", workers={"num_actors": 1}))

    result = run("eval")
    assert result.output.startswith(f"{bucket}/eval/") and not result.skipped
    fs, out = pafs.FileSystem.from_uri(result.output)
    names = {i.base_name for i in fs.get_file_info(pafs.FileSelector(out))}
    assert {"results.json", "results.csv", "per_image.csv", "metrics_vs_resolution.png", "crops_128.png",
            "_SUCCESS"} <= names
    with fs.open_input_stream(f"{out}/results.json") as f:
        results = json.loads(f.read())
    assert results["samples"] == 4 and not results["reference_cached"]
    assert {(r["decoder"], r["resolution"]) for r in results["rows"]} == {("infgen", 128), ("vae_bicubic", 128)}
    cache = fs.get_file_info(pafs.FileSelector("infgen-eval/reference_stats", recursive=True))
    assert {i.base_name for i in cache} >= {"counts.json", "patch_pool.npz", "sample.npz"}
    assert "computed in this run" in capsys.readouterr().out

    client = MlflowClient(mlflow_server)
    assert client.get_run(result.run_id).data.tags["infgen.output"] == result.output
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "evaluation")}
    assert {"evaluation/results.json", "evaluation/crops_128.png"} <= artifacts
    assert run("eval").skipped

    again = run("eval-again")  # another output, the same data: the reference statistics come from the cache
    assert again.output.startswith(f"{bucket}/eval-again/") and again.stats["reference_cached"]
    assert "reference statistics cached" in capsys.readouterr().out
    row = next(r for r in again.stats["rows"] if r["decoder"] == "vae_bicubic")
    first = next(r for r in results["rows"] if r["decoder"] == "vae_bicubic")
    assert row["fidp"] == pytest.approx(first["fidp"], rel=1e-6)
    # os.path / Path on a URI would have written a local folder named "s3:"
    assert not (Path.cwd() / "s3:").exists() and not list(tmp_path.rglob("s3:"))


def test_generation_from_latent_files_against_reference_images(ray_local, model_dir, pairs, photos, tmp_path):
    latents, _ = pairs
    directory = tmp_path / "latents"
    directory.mkdir()
    torch.save(latents[:3], directory / "a.pt")  # a batch in one file
    np.save(directory / "b.npy", latents[3].numpy())  # one latent
    from safetensors.torch import save_file
    save_file({"latents": latents[4:6].contiguous()}, str(directory / "c.safetensors"))
    reference = tmp_path / "reference"
    reference.mkdir()
    for name, image in list(photos.items())[:6]:
        image.save(reference / f"{name}.png")
    (reference / "broken.jpg").write_bytes(b"not an image")

    cfg = eval_config(model_dir, directory, tmp_path / "eval", f"sqlite:///{tmp_path}/mlflow.db",
                      data_kind="latents", reference=str(reference), decoders=["infgen", "vae_bicubic"])
    result = run_evaluate(cfg)
    rows = {(r["decoder"], r["resolution"]): r for r in result.stats["rows"]}
    assert set(rows) == {(d, r) for d in ("infgen", "vae_bicubic") for r in (128, 256)}
    for row in rows.values():
        assert row["images"] == 6 and row["reference_images"] == 6 and row["psnr"] is None
        assert row["fidp"] > 0
    assert result.stats["broken_reference_images"] == 1
    assert (Path(result.output) / "metrics_vs_resolution.png").stat().st_size > 10_000


def read_split(section: dict):
    """The Holdout a config section describes, its URL list read (as training and evaluation read it)."""
    from pipelines.holdout import Holdout

    return dataclass_from(Holdout, section).read()


def test_holdout_selects_exactly_the_images_training_leaves_out(encoded):
    import hashlib

    from pipelines.common import resolve_files
    from pipelines.evaluate import plan
    from pipelines.holdout import Holdout
    from pipelines.shards import key_urls

    fs, paths = resolve_files(str(encoded))
    holdout = read_split({"fraction": 0.5, "seed": 3})
    keys = holdout.keys_in(key_urls(fs, paths))
    assert 0 < len(keys) < 8
    assert holdout.training_split(str(encoded), key_urls(fs, paths), [])[0] == keys
    cfg = dataclass_from(EvalConfig, {"model": None, "decoders": ["vae_bicubic"], "data": str(encoded), "output": "x",
                                   "holdout": {"fraction": 0.5, "seed": 3}})
    assert sorted(k for unit in plan(cfg).units for k in unit["keys"]) == sorted(keys)
    split = Holdout(fraction=0.3)
    assert sum(split.held_out(f"http://x/{i}.jpg") for i in range(2000)) == pytest.approx(600, abs=80)
    # the hash of the URL's path and query, as before the URL lists: existing LAION splits do not move
    def before(path: str, seed: int) -> bool:
        return int.from_bytes(hashlib.sha256(f"{seed}\0{path}?".encode()).digest()[:8], "big") < 0.3 * 2 ** 64

    assert all(Holdout(0.3, s).held_out(f"https://host:{s}/{i}.jpg") == before(f"/{i}.jpg", s)
               for s in range(3) for i in range(200))
    assert not Holdout().held_out("http://x/a.jpg") and not Holdout()


def test_holdout_by_file_never_trains_on_a_listed_image_and_evaluates_exactly_its_crops(pairs, tmp_path):
    """The demo's split: a list of held-out URLs (conf/photos.yaml's held-out files). Every crop of a listed
    image is out of training and in the evaluation, whatever host serves it; nothing else is evaluated."""
    from pipelines.common import resolve_files
    from pipelines.evaluate import plan
    from pipelines.shards import key_urls

    latents, hr = pairs  # 8 crops: 2 of each of 4 photos, as the encode stage writes crops_per_image=2
    urls = [f"http://127.0.0.1:18765/photo{i // 2}.jpg" for i in range(len(latents))]
    encoded = write_encoded_shards(tmp_path / "encoded", latents, hr, urls=urls)
    listed = tmp_path / "holdout_urls.txt"
    # another port and a URL that is not in the data: the path is what counts, and an unknown URL selects nothing
    listed.write_text("http://127.0.0.1:9/photo1.jpg\nhttp://127.0.0.1:18765/photo9.jpg\n\n")
    section = {"fraction": 0.0, "seed": 0, "urls": str(listed)}

    fs, paths = resolve_files(str(encoded))
    table = read_rows(fs, paths, ["key", "url"])
    url_of = dict(zip(table.column("key").to_pylist(), table.column("url").to_pylist()))
    held = {k for k, u in url_of.items() if u.endswith("/photo1.jpg")}
    assert len(held) == 2

    excluded, record = read_split(section).training_split(str(encoded), key_urls(fs, paths), ["sample-row"])
    assert excluded[0] == "sample-row" and record.held_out_rows == 2 and record.rows == 8
    training = set(url_of) - set(excluded)
    assert held <= set(excluded) and not held & training and len(training) == 6
    cfg = dataclass_from(EvalConfig, {"model": None, "decoders": ["vae_bicubic"], "data": str(encoded), "output": "x",
                                   "holdout": section})
    assert {k for unit in plan(cfg).units for k in unit["keys"]} == held

    assert read_split(section).held_out("https://mirror.example/photo1.jpg")
    assert not read_split(section).held_out("http://127.0.0.1:18765/photo10.jpg")
    with pytest.raises(ValueError, match="holdout.urls .*missing.txt: no such file"):
        read_split({"urls": str(tmp_path / "missing.txt")})
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="lists no URLs"):
        read_split({"urls": str(tmp_path / "empty.txt")})
    with pytest.raises(ValueError, match="unknown keys \\['holdout.files'\\]"):
        dataclass_from(EvalConfig, {"model": None, "decoders": ["vae_bicubic"], "data": "x", "output": "x",
                                 "holdout": {"files": "a.txt"}})


def test_the_model_record_selects_its_held_out_rows_and_refuses_trained_ones(pairs, model_dir, tmp_path, caplog):
    """The evaluation's default holdout (null) is the split the model was trained with, from the record training
    writes into the model (holdout.json); rows the model trained on are refused, naming the model and the count,
    unless allow_trained_rows; the same images copied elsewhere are still the ones it trained on, other images
    never count; a model without a record scores the rows as selected, with a logged warning."""
    import logging
    import shutil

    from pipelines.common import resolve_files
    from pipelines.evaluate import plan
    from pipelines.holdout import RECORD
    from pipelines.shards import key_urls

    latents, hr = pairs  # 8 crops: 2 of each of 4 photos
    urls = [f"http://127.0.0.1:18765/photo{i // 2}.jpg" for i in range(len(latents))]
    encoded = write_encoded_shards(tmp_path / "encoded", latents, hr, urls=urls)
    fs, paths = resolve_files(str(encoded))
    (tmp_path / "held.txt").write_text("http://127.0.0.1:18765/photo1.jpg\n")
    split = read_split({"urls": str(tmp_path / "held.txt")})  # a split by file, as the demo's
    held = sorted(split.keys_in(key_urls(fs, paths)))
    assert len(held) == 2
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    split.training_split(str(encoded), key_urls(fs, paths), [])[1].write(model)  # what training writes

    def planned(data=encoded, **overrides):
        p = plan(dataclass_from(EvalConfig, {"model": str(model), "decoders": ["infgen", "vae_bicubic"],
                                             "data": str(data), "output": "x", **overrides}))
        return sorted(k for unit in p.units for k in unit["keys"]), p

    (tmp_path / "held.txt").unlink()  # the record carries the listed URLs: the file is not needed any more
    keys, p = planned()  # holdout: null, the model's record of its split
    assert keys == held and (p.holdout_source, p.trained_rows) == ("model record", 0)
    with pytest.raises(ValueError, match=r"was trained on 6 of the 8 rows selected for evaluation \(its holdout.json"):
        planned(holdout={"fraction": 0.0})  # a split of its own that holds nothing out: every row
    for data in (encoded, shutil.copytree(encoded, tmp_path / "copy")):  # a copy holds the same images
        with pytest.raises(ValueError, match=rf"model {model} was trained on {8 - len(held)} of the 8 rows selected"):
            planned(data, holdout={})  # {}: every row
    keys, p = planned(holdout={}, allow_trained_rows=True)
    assert len(keys) == 8 and p.trained_rows == 8 - len(held)
    other = write_encoded_shards(tmp_path / "other", latents, hr, urls=[u.replace("photo", "new") for u in urls])
    assert len(planned(other, holdout={})[0]) == 8  # images the model never saw: nothing to refuse

    (model / RECORD).unlink()
    with caplog.at_level(logging.WARNING, logger="pipelines.evaluate.plan"):
        keys, p = planned(holdout={})
    assert len(keys) == 8 and p.holdout_source == "config"
    assert f"model {model} has no holdout record" in caplog.text
    assert len(planned()[0]) == 8 and planned()[1].holdout_source == "none"  # and no split: every row


def test_ground_truth_is_never_upsampled_when_told(tiny_vae, pairs):
    """upsample_truth=False: a crop whose stored ground truth is under a resolution is skipped there and
    counted; with the default it is upsampled and counted as such."""
    latents, hr = pairs  # ground truth 256²
    decoders = Decoders(["vae_bicubic"], None, tiny_vae, None, 512)
    for upsample in (True, False):
        acc = EvalAccumulator(RandomConvFeatures(), PatchProtocol(size=64, shift=32), [128, 256, 512], 64,
                              upsample_truth=upsample)
        acc.add_chunk(Chunk(["a", "b", "c"], latents[:3], list(hr[:3])), decoders)
        assert acc.counts[("vae_bicubic", 256)]["images"] == acc.counts[(REFERENCE, 256)]["images"] == 3
        at_512 = acc.counts[(REFERENCE, 512)]
        if upsample:
            assert at_512["truth_upsampled"] == 3 and acc.counts[("vae_bicubic", 512)]["images"] == 3
        else:
            assert at_512["truth_skipped"] == 3 and not at_512.get("truth_upsampled")
            assert ("vae_bicubic", 512) not in acc.counts and not acc.counts[(REFERENCE, 512)].get("images")
            assert {r["resolution"] for r in acc.per_image} == {128, 256}


def test_limit_holds_at_each_resolution_with_real_pixels(tiny_vae, pairs, encoded):
    """limit: at each resolution the first `limit` rows whose ground truth reaches it, so the largest resolution
    gets its samples too (the first `limit` rows alone may hold none that large); without a limit every row is
    evaluated everywhere (the accumulator skips and counts a truth too small)."""
    rows = [("a", 300), ("b", 600), ("c", 300), ("d", 1100), ("e", None), ("f", 2048)]
    assert select(rows, [256, 512, 1024], 2, upsample_truth=False) == {
        "a": [256], "b": [256, 512], "d": [512, 1024], "e": [1024]}
    assert select(rows, [256, 1024], 2, upsample_truth=True) == {"a": [256, 1024], "b": [256, 1024]}
    assert select(rows, [256, 2048], None, upsample_truth=False) == {k: [256, 2048] for k, _ in rows}
    # limit_at: another count at one resolution; with no `limit`, every row at the others
    assert select(rows, [256, 1024], 1, upsample_truth=False, limit_at={256: 3}) == {
        "a": [256], "b": [256], "c": [256], "d": [1024]}
    assert select(rows, [256, 2048], None, upsample_truth=False, limit_at={2048: 1}) == {
        **{k: [256] for k, _ in rows}, "e": [256, 2048]}
    assert select(rows, [256], 1, upsample_truth=False, limit_at={2048: 5}) == {"a": [256]}  # unused there
    # a chunk's per-sample resolutions: "b" is decoded at 128 only
    latents, hr = pairs  # ground truth 256²
    acc = EvalAccumulator(RandomConvFeatures(), PatchProtocol(size=64, shift=32), [128, 256], 64)
    acc.add_chunk(Chunk(["a", "b"], latents[:2], list(hr[:2]), [[128, 256], [128]]),
                  Decoders(["vae_bicubic"], None, tiny_vae, None, 512))
    assert acc.counts[(REFERENCE, 128)]["images"] == 2 and acc.counts[(REFERENCE, 256)]["images"] == 1
    assert not acc.counts[(REFERENCE, 256)].get("truth_skipped")
    # planned and run by a worker (ground truth 256²): 512 selects nobody, so nothing is decoded or skipped there
    cfg = eval_config(None, encoded, "unused", None, model=None, decoders=["vae_bicubic"], limit=2,
                      resolutions=[128, 256, 512], upsample_truth=False)
    cfg = dataclass_from(EvalConfig, cfg)
    worker = EvalWorker(cfg, reference_features=True, lpips_ok=False, grid_keys=[], aspect=None)
    assert sum(worker.process(unit) for unit in plan(cfg).units) == 2
    assert worker.acc.counts[("vae_bicubic", 256)]["images"] == 2
    assert not worker.acc.counts[(REFERENCE, 512)].get("truth_skipped") and ("vae_bicubic", 512) not in worker.acc.counts


def test_bad_latents_and_empty_directories_fail_clearly(ray_local, model_dir, tmp_path):
    reference = tmp_path / "reference"
    reference.mkdir()
    Image.new("RGB", (64, 64)).save(reference / "x.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = lambda data: eval_config(model_dir, data, tmp_path / "eval", f"sqlite:///{tmp_path}/mlflow.db",
                                   data_kind="latents", reference=str(reference))
    with pytest.raises(ValueError, match="no .pt / .pth / .npy / .safetensors files found"):
        run_evaluate(cfg(empty))
    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save(torch.randn(2, 3, 16, 16), bad / "wrong.pt")
    with pytest.raises(ValueError, match=r"wrong.pt: latents of shape \(2, 3, 16, 16\); expected \(B, 4, h, w\)"):
        run_evaluate(cfg(bad))
    with pytest.raises(ValueError, match="not an encode-stage shard"):
        pq.write_table(pa.table({"x": [1]}), tmp_path / "other.parquet")
        run_evaluate(eval_config(model_dir, tmp_path / "other.parquet", tmp_path / "eval", None))
