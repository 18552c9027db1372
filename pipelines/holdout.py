"""The train/evaluation split: which images training leaves out and the evaluation scores."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional
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

    fraction: float = 0.0
    seed: int = 0
    urls: Optional[str] = None  # a text file of held-out URLs, one per line

    def __post_init__(self) -> None:
        fraction = self.fraction or 0.0
        if not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
            raise ValueError(f"holdout.fraction must be a number in [0, 1), got {fraction!r}")
        object.__setattr__(self, "fraction", float(fraction))
        object.__setattr__(self, "seed", int(self.seed or 0))
        object.__setattr__(self, "urls", self.urls or None)
        object.__setattr__(self, "_listed", None)  # url_id of each URL in `urls`, once read

    @classmethod
    def from_config(cls, section: Any) -> "Holdout":
        """The split a `holdout` section ({fraction, seed, urls}; missing keys default; None: nothing held out)
        describes, its URL file read. Raises ValueError naming the key, or the URL file, that is wrong."""
        return dataclass_from(cls, section or {}).read()

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
