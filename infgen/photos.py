"""Real high-resolution photos, offline: Debian's wallpaper packages, listed with authors, licences and a fixed
train/holdout split BY FILE in `conf/photos.yaml`.

`fetch_photos()` runs `apt-get download PACKAGE` and `dpkg-deb -x` into `<cache>/photos/` (no install, no root
needed once apt's lists exist) and is a no-op when the files are there. `load_photos(split)` returns them as
`Photo`s; where apt is missing it falls back, LOUDLY, to the small photos that scikit-image, scikit-learn and
matplotlib ship (with their own fixed split), so code keeps running but every number says which set it used.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from PIL import Image

from .images import SHIPPED_PHOTOS, shipped_photo_path, to_rgb
from .paths import cache_dir

log = logging.getLogger(__name__)

CATALOGUE = Path(__file__).resolve().parents[1] / "conf" / "photos.yaml"
BACKGROUNDS = "usr/share/backgrounds"
SPLITS = ("train", "holdout")
# the fallback's split, by file as well: 8 shipped photos to fit on, 3 held out
SHIPPED_HOLDOUT = ("coffee", "chelsea", "flower")


@dataclass(frozen=True)
class Photo:
    """One image file and where it comes from. `path` is local; `name` is its file name without folders."""

    name: str
    path: Path
    kind: str  # photo | render
    split: str  # train | holdout
    author: str
    licence: str
    source: str  # the Debian package, or the Python package that ships it

    def credit(self) -> str:
        """'<name> by <author> (<licence>, Debian package <source>)': what a figure that shows it must say."""
        return f"{self.name} by {self.author} ({self.licence}, {self.source})"


def read_catalogue(path: Union[str, Path] = CATALOGUE) -> dict:
    """The catalogue as a dict with `packages` and `photos` (each with file, package, kind, split, author,
    licence). Raises ValueError naming the entry and field that is missing or wrong."""
    from omegaconf import OmegaConf

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: photo catalogue not found (it lives in the repository's conf/)")
    raw = OmegaConf.to_container(OmegaConf.load(path))
    for i, entry in enumerate(raw.get("photos") or []):
        for field in ("file", "package", "kind", "split", "author", "licence"):
            if not entry.get(field):
                raise ValueError(f"{path}: photos[{i}] ({entry.get('file')}) has no {field!r}")
        if entry["split"] not in SPLITS:
            raise ValueError(f"{path}: photos[{i}] ({entry['file']}): split {entry['split']!r} is not one of {SPLITS}")
        if entry["package"] not in raw["packages"]:
            raise ValueError(f"{path}: photos[{i}] ({entry['file']}): package {entry['package']!r} is not listed")
    return raw


def photos_dir() -> Path:
    return cache_dir() / "photos"


def fetch_photos(directory: Optional[Path] = None, catalogue: Union[str, Path] = CATALOGUE) -> Path:
    """Download and unpack the catalogue's Debian packages into `directory` (default `<cache>/photos`), once.

    Each package lands in `directory/<package>/` (its backgrounds and its copyright file), written to a
    temporary folder and renamed, so an interrupted fetch leaves nothing half-done. Raises RuntimeError with
    apt's own message when a package cannot be downloaded or unpacked.
    """
    raw = read_catalogue(catalogue)
    directory = Path(directory or photos_dir())
    directory.mkdir(parents=True, exist_ok=True)
    for package in raw["packages"]:
        target = directory / package
        if target.is_dir():
            continue
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            _run(["apt-get", "download", package], tmp, retry_after_update=True)
            debs = sorted(Path(tmp).glob(f"{package}_*.deb"))
            if not debs:
                raise RuntimeError(f"apt-get download {package} wrote no .deb into {tmp}")
            _run(["dpkg-deb", "-x", str(debs[-1]), str(Path(tmp) / "x")], tmp)
            unpacked = Path(tmp) / "x"
            keep = Path(tmp) / "keep"
            shutil.move(str(unpacked / BACKGROUNDS), str(keep))
            shutil.copy(unpacked / "usr/share/doc" / package / "copyright", keep / "copyright")
            keep.rename(target)
        log.info("fetched %s into %s", package, target)
    return directory


def _run(cmd: list[str], cwd: str, retry_after_update: bool = False) -> None:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if done.returncode and retry_after_update and "Unable to locate" in done.stderr and os.geteuid() == 0:
        log.warning("apt's package lists are empty: running `apt-get update` once")
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True)
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"`{' '.join(cmd)}` failed: {done.stderr.strip()[-500:]}")


def load_photos(split: Optional[str] = None, catalogue: Union[str, Path] = CATALOGUE,
                fetch: bool = True) -> list[Photo]:
    """The catalogue's photos of one split ('train', 'holdout', or None for both), in catalogue order.

    Fetches the packages first when `fetch` and they are missing. Where that is impossible (no apt-get or
    dpkg-deb, or apt fails), warns loudly and returns the shipped photos instead; `Photo.source` says which.
    Raises ValueError for an unknown split or a catalogue file that is absent after a successful fetch.
    """
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    raw = read_catalogue(catalogue)
    directory = photos_dir()
    try:
        if fetch:
            fetch_photos(directory, catalogue)
        elif not all((directory / p).is_dir() for p in raw["packages"]):
            raise RuntimeError(f"the photo packages are not in {directory} (run `make setup`)")
    except (RuntimeError, FileNotFoundError) as e:
        return _fallback(split, e)
    photos = []
    for entry in raw["photos"]:
        path = directory / entry["package"] / entry["file"]
        if not path.is_file():
            raise ValueError(f"{catalogue}: {entry['file']} is not in package {entry['package']} ({path})")
        if split in (None, entry["split"]):
            photos.append(Photo(Path(entry["file"]).stem, path, entry["kind"], entry["split"], entry["author"],
                                str(entry["licence"]), f"Debian package {entry['package']}"))
    return photos


def _fallback(split: Optional[str], why: Exception) -> list[Photo]:
    msg = (f"THE WALLPAPER PHOTOS ARE UNAVAILABLE ({why}); falling back to the {len(SHIPPED_PHOTOS)} small photos "
           f"that scikit-image, scikit-learn and matplotlib ship (all under 2 MP): held-out numbers from them are "
           f"not comparable with the published figures")
    warnings.warn(msg, stacklevel=3)
    log.warning(msg)
    return load_shipped_photos(split)


def load_shipped_photos(split: Optional[str] = None) -> list[Photo]:
    """The small photos scikit-image, scikit-learn and matplotlib ship (all under 2 MP), as `Photo`s of one
    split ('train', 'holdout', or None for both) with their own fixed split by file (SHIPPED_HOLDOUT held out):
    what `load_photos` falls back to, and what fast tests use instead of the wallpapers."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    photos = []
    for name, (package, _) in SHIPPED_PHOTOS.items():
        side = "holdout" if name in SHIPPED_HOLDOUT else "train"
        if split in (None, side):
            photos.append(Photo(name, shipped_photo_path(name), "photo", side, f"shipped by {package}",
                                f"see the {package} package", package))
    return photos


def open_rgb(path: Union[str, Path], max_side: Optional[int] = None) -> Image.Image:
    """Open an image as RGB the one way every stage does (`infgen.images.to_rgb`: EXIF orientation, alpha on
    white as img2dataset, high bit depths scaled by their range).

    max_side: reduce (antialiased, Lanczos) so the long side is at most this; JPEGs are first decoded at
    the nearest larger DCT scale (Pillow's draft mode), which makes a 24 MP photo ~4× faster to open.
    """
    image = Image.open(path)
    if max_side and image.format == "JPEG":
        scale = max(image.size) / max_side
        image.draft("RGB", (round(image.size[0] / scale), round(image.size[1] / scale)))
    image = to_rgb(image)
    if max_side and max(image.size) > max_side:
        scale = max_side / max(image.size)
        image = image.resize((max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale))),
                             Image.LANCZOS)
    return image

