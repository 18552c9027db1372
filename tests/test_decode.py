"""Batch decoding (pipelines/decode.py, `python -m jobs.decode`): a directory of latent files → images at two
sizes, written by Ray Data actors; unreadable files counted and named; a rerun skips what is done. Real local Ray."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from infgen.models import InfGen
from pipelines.decode import run_decode

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    return InfGen.from_preset("tiny").eval().save_pretrained(tmp_path_factory.mktemp("model") / "model")


def write_latents(directory: Path) -> None:
    (directory / "sub").mkdir(parents=True)
    torch.save(torch.randn(3, 4, 8, 8), directory / "batch.pt")
    np.save(directory / "sub" / "one.npy", np.random.default_rng(0).standard_normal((4, 6, 10), np.float32))
    (directory / "broken.safetensors").write_bytes(b"not safetensors")


def test_decode_job_writes_every_size_counts_failures_and_resumes(ray_local, model_dir, tmp_path, monkeypatch,
                                                                  capsys):
    from jobs import decode as job

    write_latents(tmp_path / "latents")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setattr(sys, "argv", [
        "jobs.decode", "--config", str(ROOT / "conf/decode/local.yaml"), f"model={model_dir}",
        f"input={tmp_path / 'latents'}", f"output={tmp_path / 'out'}", "sizes=[64,96x48]", "format=webp",
        "batch_size=2", f"mlflow.tracking_uri={uri}", "workers.num_actors=1"])
    job.main()
    out = tmp_path / "out"
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*.webp"))
    assert names == sorted([f"batch_{i}_{s}.webp" for i in range(3) for s in ("64x64", "96x48")]
                           + ["sub/one_64x64.webp", "sub/one_96x48.webp"])
    assert Image.open(out / "sub" / "one_96x48.webp").size == (96, 48)
    # the images are the model's decode (WebP q95: close, not bit-exact)
    latent = torch.from_numpy(np.load(tmp_path / "latents" / "sub" / "one.npy"))[None]
    expected = ((InfGen.from_pretrained(model_dir).decode(latent, (48, 96))[0] + 1) * 127.5).permute(1, 2, 0)
    assert np.abs(np.asarray(Image.open(out / "sub" / "one_96x48.webp"), np.float32) - expected.numpy()).mean() < 4

    import json
    stats = json.loads((out / "_stats.json").read_text())
    assert (stats["files"], stats["files_decoded"], stats["files_failed"], stats["latents"], stats["images"]) == \
        (3, 2, 1, 4, 8)
    [(bad, problem)] = stats["failed"].items()
    assert bad.endswith("broken.safetensors") and "could not read a .safetensors latent" in problem
    printed = capsys.readouterr().out
    assert "1 failed" in printed and "broken.safetensors" in printed
    run = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("infgen-decode").experiment_id])[0]
    assert run.data.metrics["images"] == 8 and run.data.metrics["files_failed"] == 1
    assert run.info.status == "FINISHED" and run.data.tags["infgen.stage"] == "decode"

    # a rerun decodes only the file that failed (it fails again); nothing done is redone
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.webp")}
    again = run_decode({"model": str(model_dir), "input": str(tmp_path / "latents"), "output": str(out),
                        "sizes": [64, "96x48"], "format": "webp", "mlflow": {"tracking_uri": uri}})
    assert again.stats["files_done_before"] == 2 and again.stats["files_failed"] == 1
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.webp")} == before


def test_decode_config_errors_name_the_key(model_dir, tmp_path):
    base = {"model": str(model_dir), "input": str(tmp_path), "output": str(tmp_path / "o")}
    with pytest.raises(ValueError, match="size '12x' is not N or WIDTHxHEIGHT"):
        run_decode({**base, "sizes": ["12x"]})
    with pytest.raises(ValueError, match="format must be one of"):
        run_decode({**base, "format": "gif"})
    with pytest.raises(ValueError, match=r"decode config: unknown keys \['size'\]"):
        run_decode({**base, "size": [64]})
    with pytest.raises(ValueError, match="no .pt / .pth / .npy / .safetensors files found"):
        run_decode(base)
