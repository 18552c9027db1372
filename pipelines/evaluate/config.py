"""An evaluation's config: EvalConfig and its sections (`workers`, `grid`); conf/eval/local.yaml documents every
key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from infgen.distribution_metrics import PatchProtocol
from infgen.evaluation import DECODERS
from pipelines.config import MlflowConfig, Number, RayConfig
from pipelines.holdout import Holdout


@dataclass
class EvalWorkers:
    """The `workers` section: the actor pool and how much each unit and batch holds."""

    num_actors: int = 1
    num_gpus: Number = 0.0  # per actor
    cpus_per_actor: Number = 1.0
    torch_threads: Optional[int] = None  # per actor; null: its CPUs
    precision: str = "fp32"  # fp32 | bf16 | fp16: InfGen decodes under this autocast on GPUs
    chunk_rows: int = 16  # samples per work unit (and per decode chunk)
    max_batch_pixels: int = 2 ** 24
    reference_chunk: int = 16  # reference images per work unit

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"workers.precision must be fp32, bf16 or fp16, got {self.precision!r}")
        counts = ("num_actors", "chunk_rows", "max_batch_pixels", "reference_chunk")
        bad = [k for k in counts if getattr(self, k) < 1] + (["cpus_per_actor"] if self.cpus_per_actor <= 0 else [])
        if bad:
            raise ValueError(f"{', '.join(f'workers.{k}={getattr(self, k)}' for k in bad)} must be positive")


@dataclass
class GridConfig:
    """The `grid` section: centre crops side by side at each resolution."""

    count: int = 4  # samples
    crop: int = 256  # pixels per side


@dataclass
class EvalConfig:
    """An evaluation's config; conf/eval/local.yaml documents every key. Checked on construction: a ValueError
    names the key that is wrong."""

    CONFIG_NAME: ClassVar[str] = "evaluation"
    REQUIRED: ClassVar[tuple] = ("data", "output")  # null or "": an error naming them (dataclass_from)
    model: Optional[str]  # local exported model dir, training checkpoint dir (pipelines.checkpoint), runs:/ or models:/
    data: Optional[str] = None  # encoded parquet shards (a path or URI), or a local directory of latent files
    output: Optional[str] = None  # results under <output>/<fingerprint>/ (a path or URI)
    data_kind: str = "encoded"  # encoded (reconstruction) | latents (generation, needs `reference`)
    reference: Optional[str] = None  # data_kind=latents: real images (a directory or glob) for the FID family
    limit: Optional[int] = None  # at most this many samples at each resolution (encoded rows of the smallest key
    #   hashes whose ground truth reaches it: see `select`) or latent files
    limit_at: dict = field(default_factory=dict)  # {resolution: count}: another count there than `limit` (encoded
    #   data), e.g. {2048: 8} with limit 32: a 2048-px decode costs ~25× a 512-px one; unused where not evaluated
    holdout: Optional[Holdout] = None  # which rows (data_kind=encoded): null, the model's record of the split it
    #   was trained with (holdout.json, pipelines.holdout.HoldoutRecord); or a split of its own (listed URLs and/or a
    #   URL-hash fraction; neither: every row)
    allow_trained_rows: bool = False  # score rows the model's record says it trained on (refused otherwise)
    name: str = "eval"
    resolutions: list = field(default_factory=lambda: [512, 1024])  # long side in pixels
    upsample_truth: bool = True  # False: every number compares with real pixels: with a `limit`, each resolution
    #   selects samples whose ground truth reaches it; without, a smaller one is left out there and counted
    decoders: list = field(default_factory=lambda: list(DECODERS))
    vae: str = "tiny"  # the baselines' decoder and the iterative decoder's encoder
    vae_subfolder: Optional[str] = None
    tile: Optional[int] = 512  # infgen decodes sides above tile_above in tiles of this many pixels
    tile_above: int = 2048
    patches: PatchProtocol = field(default_factory=PatchProtocol)  # the patch protocol of FIDp and friends
    extractor: str = "inception"  # inception (clean-fid's weights) | random (offline tests only: not FID)
    inception_weights: Optional[str] = None  # inception-2015-12-05.pt or its directory; default: clean-fid's cache
    feature_batch: int = 64
    pr_k: int = 3
    pr_samples: int = 10_000  # patch features kept per decoder and resolution for precision/recall and KID
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    lpips: bool = True  # reported only with a pretrained backbone; skipped (and said so) when unavailable
    lpips_net: str = "alex"
    lpips_weights: Optional[str] = None  # a torchvision state dict of the backbone; default: torchvision's cache
    grid: GridConfig = field(default_factory=GridConfig)
    reference_cache: Optional[str] = None  # a path or URI; default <output>/reference_stats
    workers: EvalWorkers = field(default_factory=EvalWorkers)
    ray: RayConfig = field(default_factory=RayConfig)
    mlflow: MlflowConfig = field(default_factory=lambda: MlflowConfig(experiment="infgen-eval"))

    def __post_init__(self) -> None:
        if self.data_kind not in ("encoded", "latents"):
            raise ValueError(f"data_kind must be 'encoded' or 'latents', got {self.data_kind!r}")
        if self.data_kind == "latents" and not self.reference:
            raise ValueError("data_kind=latents needs `reference`: a directory of real images for FID")
        unknown = sorted(set(self.decoders) - set(DECODERS))
        if unknown or not self.decoders:
            raise ValueError(f"decoders must be a non-empty subset of {list(DECODERS)}, got {self.decoders}")
        if not self.model and any(d.startswith("infgen") for d in self.decoders):
            raise ValueError(f"decoders {self.decoders} include infgen but no `model` is set")
        bad = [r for r in self.resolutions if not is_resolution(r)]
        if bad or not self.resolutions:
            raise ValueError(f"resolutions must be multiples of 8, at least 64 (long side in pixels), got {bad}")
        self.limit_at = limit_counts(self.limit_at, self.data_kind)
        if self.extractor not in ("inception", "random"):
            raise ValueError(f"extractor must be 'inception' or 'random', got {self.extractor!r}")
        if self.tile is not None and (self.tile < 8 or self.tile % 8):
            raise ValueError(f"tile must be a positive multiple of 8 (or null: untiled), got {self.tile}")


def is_resolution(value: Any) -> bool:
    """Whether `value` can be an evaluated resolution: an int long side in pixels, a multiple of 8, at least 64."""
    return isinstance(value, int) and value >= 64 and value % 8 == 0


def limit_counts(limit_at: dict, data_kind: str) -> dict[int, int]:
    """`limit_at` as {resolution (int): count (int)}; a key from the command line (limit_at.2048=12) is a string.
    An entry for a resolution that is not evaluated is unused (a config can keep it while `resolutions` is
    overridden). Raises ValueError naming the entry when a key is not a resolution (a multiple of 8, at least 64)
    or a count not a positive integer, and when data_kind is not "encoded" (latent files are not selected per
    resolution)."""
    if limit_at and data_kind != "encoded":
        raise ValueError(f"limit_at={limit_at}: per-resolution counts select encoded rows; with data_kind="
                         f"{data_kind} use `limit`")
    counts = {}
    for res, count in limit_at.items():
        key = int(res) if isinstance(res, int) or str(res).isdigit() else None
        if not is_resolution(key) or not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise ValueError(f"limit_at.{res}={count!r}: keys must be resolutions (multiples of 8, at least 64) "
                             f"and counts positive integers")
        counts[key] = count
    return counts


def extractor_id(cfg: EvalConfig) -> str:
    """What the features are, in results and cache keys; a test extractor can never pass for Inception."""
    if cfg.extractor == "random":
        return "random-conv (offline tests only; NOT Inception: not comparable with any published FID)"
    return "clean-fid inception-2015-12-05 (pool_3 2048-d; mixed_6/conv first 7 ch, 2023-d)"
