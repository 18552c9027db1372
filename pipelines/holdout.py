"""The train/evaluation split: which images training leaves out and the evaluation scores (Holdout), and the
record of it that training keeps with the model (HoldoutRecord, `holdout.json`)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Collection, Optional, Sequence
from urllib.parse import urlsplit

from pipelines.config import dataclass_from


def url_id(url: Optional[str]) -> str:
    """What the split compares: the URL's path and query. The host is left out: mirrors of one image fall on
    the same side, and a server's port does not move it."""
    parts = urlsplit(url or "")
    return f"{parts.path}?{parts.query}"


@dataclass(frozen=True)
class Holdout:
    """The `holdout` section of the training and evaluation configs. Training leaves out exactly the images
    `held_out` selects and the evaluation scores exactly those, so both must use the same split.

    An image is held out when its URL is listed in the file `urls` (one URL per line: a fixed split by file,
    as the demo's from conf/photos.yaml) or when a hash of its URL falls in `fraction` (a random split that
    needs no list, as on LAION), either or both. Every crop of an image has its URL, so all fall on one side.
    The section is checked without reading the URL file (workers on other nodes need not see it); `read`
    reads it, on the driver.
    """

    fraction: Optional[float] = 0.0  # null: 0.0 (__post_init__)
    seed: Optional[int] = 0  # null: 0
    urls: Optional[str] = None  # a text file of held-out URLs, one per line

    def __post_init__(self) -> None:
        fraction = self.fraction or 0.0
        if not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
            raise ValueError(f"holdout.fraction must be a number in [0, 1), got {fraction!r}")
        object.__setattr__(self, "fraction", float(fraction))
        object.__setattr__(self, "seed", int(self.seed or 0))
        object.__setattr__(self, "urls", self.urls or None)
        object.__setattr__(self, "_listed", None)  # url_id of each URL in `urls`, once read

    def read(self) -> "Holdout":
        """This split with its URL file read (a copy; itself when it lists none). Raises ValueError when the
        file is missing or lists no URL."""
        if not self.urls or self._listed is not None:
            return self
        path = Path(self.urls)
        if not path.is_file():
            raise ValueError(f"holdout.urls {self.urls}: no such file (a list of held-out URLs, one per line)")
        listed = frozenset(url_id(line.strip()) for line in path.read_text().splitlines() if line.strip())
        if not listed:
            raise ValueError(f"holdout.urls {self.urls}: the file lists no URLs")
        return self._with_listed(listed)

    def _with_listed(self, listed: frozenset) -> "Holdout":
        copy = replace(self)
        object.__setattr__(copy, "_listed", frozenset(listed))
        return copy

    @property
    def listed(self) -> frozenset:
        """url_id of every URL the file `urls` lists. Raises RuntimeError before `read`: an unread list would
        hold nothing out."""
        if self._listed is None and self.urls:
            raise RuntimeError(f"holdout.urls {self.urls} was not read (Holdout.read)")
        return self._listed or frozenset()

    def __bool__(self) -> bool:
        return bool(self.fraction or self.listed)

    def held_out(self, url: Optional[str]) -> bool:
        """True for an image never to train on: its URL is listed, or its hash falls in `fraction`."""
        key = url_id(url)
        if key in self.listed:
            return True
        if not self.fraction:
            return False
        digest = hashlib.sha256(f"{self.seed}\0{key}".encode()).digest()
        return int.from_bytes(digest[:8], "big") < self.fraction * 2 ** 64

    def describe(self) -> str:
        """For logs and fingerprints: the fraction, the seed and the listed URLs (sorted), hashed."""
        listed = hashlib.sha256("\n".join(sorted(self.listed)).encode()).hexdigest()[:12]
        return (f"fraction {self.fraction} seed {self.seed}"
                + (f", {len(self.listed)} URLs listed in {self.urls} (sha256 {listed})" if self.listed else ""))

    def keys_in(self, files: Sequence[tuple[Sequence[str], Sequence[Optional[str]]]]) -> list[str]:
        """Keys of the rows this split holds out, in file order; `files`: each shard's (keys, urls), as
        pipelines.shards.key_urls reads them."""
        return [k for keys, urls in files for k, u in zip(keys, urls) if self.held_out(u)]

    def training_split(self, data: str, files: Sequence[tuple[Sequence[str], Sequence[Optional[str]]]],
                       sample_keys: Sequence[str]) -> tuple[list[str], "HoldoutRecord"]:
        """What training on `files` (each shard's (keys, urls), as for `keys_in`) with this split (its URL list
        read) leaves out, and the record of it: (the keys training never reads: the sample grid's rows, then every
        row the split holds out, in file order; the HoldoutRecord of `data`). Each URL is hashed once."""
        held = self.keys_in(files)
        record = HoldoutRecord(self, data, tuple(rows_fingerprint(keys, urls) for keys, urls in files),
                               sum(len(keys) for keys, _ in files), len(held), tuple(sample_keys))
        return list(sample_keys) + held, record


# ---- the split recorded with a model ------------------------------------------------------------------------

RECORD = "holdout.json"  # in an exported model's directory and a training run's: the split it was trained with


def rows_fingerprint(keys: Sequence[str], urls: Sequence[Optional[str]]) -> str:
    """A shard's rows as the split sees them, (key, url) in file order, hashed: the same for the same images in
    the same shard, however their crops were encoded or wherever the file was copied."""
    h = hashlib.sha256()
    for key, url in zip(keys, urls):
        h.update(f"{key}\0{url or ''}\n".encode())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class HoldoutRecord:
    """The split a model was trained with and the data it split: training writes it as RECORD next to the
    exported model (and in its MLflow run); the evaluation reads it to score only rows the model never trained
    on. The listed URLs travel in it, so the split is known without its `urls` file."""

    holdout: Holdout  # its URL list read
    data: str  # the training data as configured
    shard_fingerprints: tuple[str, ...]  # rows_fingerprint of each shard trained from, in file order
    rows: int
    held_out_rows: int
    sample_keys: tuple[str, ...] = ()  # the sample grid's rows: never trained on either

    @property
    def data_fingerprint(self) -> str:
        """The training data's fingerprint: its shards' fingerprints, hashed."""
        return hashlib.sha256("\n".join(self.shard_fingerprints).encode()).hexdigest()[:16]

    def trained_keys(self, files: Sequence[tuple[Sequence[str], Sequence[Optional[str]]]],
                     among: Collection[str]) -> list[str]:
        """Keys in `among` of rows the model trained on: rows of a shard it was trained from (the same
        fingerprint) that its split does not hold out and that were not its sample grid's. Rows of other data
        are not known to it and never count."""
        trained_shards, samples = set(self.shard_fingerprints), set(self.sample_keys)
        return [k for keys, urls in files if rows_fingerprint(keys, urls) in trained_shards
                for k, u in zip(keys, urls) if k in among and k not in samples and not self.holdout.held_out(u)]

    def params(self) -> dict[str, Any]:
        """MLflow params beside the config's holdout.fraction / seed / urls."""
        return {"holdout.data_fingerprint": self.data_fingerprint, "holdout.rows": self.rows,
                "holdout.held_out_rows": self.held_out_rows, "holdout.listed_urls": len(self.holdout.listed)}

    def write(self, directory: str | Path) -> Path:
        """RECORD in `directory` (created if needed); returns its path."""
        path = Path(directory) / RECORD
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"holdout": asdict(self.holdout), "listed_urls": sorted(self.holdout.listed), "data": self.data,
                  "data_fingerprint": self.data_fingerprint, "shard_fingerprints": list(self.shard_fingerprints),
                  "rows": self.rows, "held_out_rows": self.held_out_rows, "sample_keys": list(self.sample_keys)}
        path.write_text(json.dumps(record, indent=2))
        return path

    @classmethod
    def read(cls, path: str | Path) -> "HoldoutRecord":
        """A RECORD file. Raises ValueError naming the file when it is not one."""
        try:
            record = json.loads(Path(path).read_text())
            holdout = dataclass_from(Holdout, record["holdout"])._with_listed(frozenset(record["listed_urls"]))
            return cls(holdout, record["data"], tuple(record["shard_fingerprints"]), int(record["rows"]),
                       int(record["held_out_rows"]), tuple(record["sample_keys"]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a holdout record ({type(e).__name__}: {e})") from None
