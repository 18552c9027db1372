import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from infgen.cli import main, parse_cli_size
from infgen.io import load_latents
from infgen.models import InfGen


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return InfGen.from_preset("tiny").save_pretrained(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture
def latent():
    return torch.randn(4, 12, 16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_takes_half_precision_latent_files(model_dir, latent, tmp_path, dtype):
    """A latent file saved by an fp16/bf16 pipeline decodes as its float32 values would."""
    torch.save(latent.to(dtype), tmp_path / "z.pt")
    out = tmp_path / "out.png"
    assert main(["decode", "--model", str(model_dir), "--latent", str(tmp_path / "z.pt"), "--size", "64", "--out",
                 str(out)]) == 0
    expected = InfGen.from_pretrained(model_dir).decode(latent.to(dtype).float()[None], 64)
    got = torch.from_numpy(np.asarray(Image.open(out))).permute(2, 0, 1).float() / 127.5 - 1
    assert (got - expected[0]).abs().max() <= 1 / 127.5 + 1e-6


def test_size_is_width_x_height():
    assert parse_cli_size("3840x2160") == (2160, 3840)
    assert parse_cli_size("4096") == (4096, 4096)
    for bad in ("big", "10x", "1x2x3"):
        with pytest.raises(Exception, match="WIDTHxHEIGHT"):
            parse_cli_size(bad)


@pytest.mark.parametrize("suffix", [".pt", ".npy", ".safetensors"])
def test_decode_each_latent_format(model_dir, latent, tmp_path, suffix):
    path = tmp_path / f"z{suffix}"
    if suffix == ".pt":
        torch.save({"latents": latent}, path)
    elif suffix == ".npy":
        np.save(path, latent.numpy())
    else:
        save_file({"latents": latent.contiguous()}, str(path))
    out = tmp_path / "out.png"
    assert main(["decode", "--model", str(model_dir), "--latent", str(path), "--size", "200x120", "--out", str(out)]) == 0
    assert Image.open(out).size == (200, 120)  # PIL sizes are (width, height)
    expected = InfGen.from_pretrained(model_dir).decode(latent[None], (120, 200))
    got = torch.from_numpy(np.asarray(Image.open(out))).permute(2, 0, 1).float() / 127.5 - 1
    assert (got - expected[0]).abs().max() <= 1 / 127.5 + 1e-6  # only 8-bit rounding apart


def test_decode_batch_tiled_and_iterative(model_dir, tmp_path, tiny_vae):
    torch.save(torch.randn(2, 4, 8, 8), tmp_path / "batch.pt")
    args = ["decode", "--model", str(model_dir), "--latent", str(tmp_path / "batch.pt"), "--out", str(tmp_path / "b.png")]
    assert main(args + ["--size", "96", "--tile", "32"]) == 0
    assert [Image.open(tmp_path / f"b_{i}.png").size for i in range(2)] == [(96, 96)] * 2
    assert main(args + ["--size", "300x160", "--iterative", "--vae", "tiny"]) == 0
    assert Image.open(tmp_path / "b_1.png").size == (300, 160)


def test_cli_errors_name_the_problem(model_dir, tmp_path, capsys):
    base = ["decode", "--model", str(model_dir), "--out", str(tmp_path / "o.png"), "--size", "64"]
    torch.save(torch.randn(3, 8, 8), tmp_path / "three.pt")
    assert main(base + ["--latent", str(tmp_path / "three.pt")]) == 2
    assert "3 channels" in capsys.readouterr().err
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    assert main(base + ["--latent", str(tmp_path / "bad.npy")]) == 2
    assert "bad.npy: could not read" in capsys.readouterr().err
    assert main(base + ["--latent", str(tmp_path / "missing.pt")]) == 2
    assert "no such latent file" in capsys.readouterr().err
    torch.save(torch.randn(4, 8, 8), tmp_path / "ok.pt")
    assert main(base + ["--latent", str(tmp_path / "ok.pt"), "--iterative"]) == 2
    assert "--iterative needs --vae" in capsys.readouterr().err
    assert main(["decode", "--model", str(tmp_path), "--latent", str(tmp_path / "ok.pt"), "--size", "64",
                 "--out", str(tmp_path / "o.png")]) == 2
    assert "config.json: not found" in capsys.readouterr().err
    assert main(["setup", "phot"]) == 2  # before any photo is fetched
    assert "setup: 'phot': not an offline VAE (photo, tiny)" in capsys.readouterr().err


def test_load_latents_errors(tmp_path):
    torch.save({"a": torch.zeros(4, 2, 2), "b": torch.zeros(4, 2, 2)}, tmp_path / "two.pt")
    with pytest.raises(ValueError, match="expected one named 'latents'"):
        load_latents(tmp_path / "two.pt")
    np.save(tmp_path / "flat.npy", np.zeros(5, dtype=np.float32))
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        load_latents(tmp_path / "flat.npy")
    np.save(tmp_path / "ints.npy", np.zeros((4, 2, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="floating point"):
        load_latents(tmp_path / "ints.npy")
    (tmp_path / "z.txt").write_text("1 2 3")
    with pytest.raises(ValueError, match="unsupported latent format"):
        load_latents(tmp_path / "z.txt")
    assert load_latents(_save(tmp_path / "one.pt", torch.ones(4, 3, 3))).shape == (1, 4, 3, 3)


def _save(path, tensor):
    torch.save(tensor, path)
    return path


def test_presets_command(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "tiny" in out and "large" in out


def test_decode_a_directory_at_two_sizes_skipping_bad_files(model_dir, tmp_path, capsys):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    torch.save(torch.randn(3, 4, 8, 8), tmp_path / "in" / "batch.pt")
    np.save(tmp_path / "in" / "sub" / "one.npy", np.random.default_rng(0).standard_normal((4, 6, 10), np.float32))
    (tmp_path / "in" / "broken.safetensors").write_bytes(b"not safetensors")
    torch.save(torch.randn(3, 8, 8), tmp_path / "in" / "three_channels.pt")
    out = tmp_path / "out"
    args = ["decode", "--model", str(model_dir), "--latent", str(tmp_path / "in"), "--size", "64", "96x48",
            "--out", str(out), "--format", "webp", "--batch-size", "2", "--dtype", "bf16"]
    assert main(args) == 1  # done, with skips
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([f"batch_{i}_{s}.webp" for i in range(3) for s in ("64x64", "96x48")]
                           + ["one_64x64.webp", "one_96x48.webp"])
    assert Image.open(out / "one_96x48.webp").size == (96, 48)
    err = capsys.readouterr().err
    assert "skipped 2 unreadable file(s)" in err and "broken.safetensors: could not read" in err
    assert "three_channels.pt" in err and "3 channels" in err
