import pytest

from infgen import photos as photos_module
from infgen.photos import SPLITS, load_photos, open_rgb, read_catalogue


def test_catalogue_splits_by_file_with_credits():
    raw = read_catalogue()
    files = [p["file"] for p in raw["photos"]]
    assert len(files) == len(set(files)) >= 40
    by_split = {s: [p for p in raw["photos"] if p["split"] == s] for s in SPLITS}
    assert len(by_split["holdout"]) >= 10 and len(by_split["train"]) >= 30
    # photographs on both sides, and every entry names its author and licence
    assert {p["kind"] for p in by_split["holdout"]} == {p["kind"] for p in by_split["train"]} == {"photo", "render"}
    assert all(p["author"] and p["licence"] for p in raw["photos"])


def test_catalogue_errors_name_the_entry(tmp_path):
    bad = tmp_path / "photos.yaml"
    bad.write_text("packages: [pkg]\nphotos:\n  - {file: a.jpg, package: pkg, kind: photo, split: test, "
                   "author: A, licence: CC0-1.0}\n")
    with pytest.raises(ValueError, match=r"photos\[0\] \(a.jpg\): split 'test'"):
        read_catalogue(bad)
    bad.write_text("packages: [pkg]\nphotos:\n  - {file: a.jpg, package: pkg, kind: photo, split: train}\n")
    with pytest.raises(ValueError, match=r"photos\[0\] \(a.jpg\) has no 'author'"):
        read_catalogue(bad)


def test_unfetched_photos_fall_back_loudly_to_shipped(monkeypatch, tmp_path):
    monkeypatch.setattr(photos_module, "photos_dir", lambda: tmp_path / "none")
    with pytest.warns(UserWarning, match="WALLPAPER PHOTOS ARE UNAVAILABLE"):
        held_out = load_photos("holdout", fetch=False)
    assert {p.name for p in held_out} == set(photos_module.SHIPPED_HOLDOUT)
    assert all(p.path.is_file() for p in held_out)


def test_fetched_photos_are_real_and_over_a_megapixel():
    """`make setup` fetched them (apt-get download + dpkg-deb -x); where apt is missing this test says so."""
    photos = load_photos()
    if photos[0].source != "Debian package " + read_catalogue()["photos"][0]["package"]:
        pytest.skip("the wallpaper packages could not be fetched here (the fallback is tested above)")
    assert len(photos) == len(read_catalogue()["photos"])
    image = open_rgb(photos[0].path, max_side=512)
    assert image.mode == "RGB" and max(image.size) == 512
    from infgen.photos import photos_dir

    assert all((photos_dir() / p.source.removeprefix("Debian package ") / "copyright").is_file() for p in photos)
    with pytest.raises(ValueError, match="split must be one of"):
        load_photos("validation")
