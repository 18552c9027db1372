"""Stage 3: encode img2dataset webdataset shards into frozen-VAE latents of random crops + the crops at high resolution.

    python -m jobs.encode --config conf/data/encode.yaml input=outputs/data/download/FINGERPRINT/shards [key=value ...]
    ray job submit --address http://HEAD:8265 --working-dir . -- python -m jobs.encode \\
        --config conf/cluster/encode.yaml input=/mnt/shared/infgen/data/download/FINGERPRINT/shards
"""

from __future__ import annotations

import json
import logging

from jobs.config import run_job
from pipelines.common import StageResult
from pipelines.encode import EncodeConfig, run_encode


def report(result: StageResult) -> None:
    stats = result.stats
    state = "already complete, nothing done" if result.skipped else f"MLflow run {result.run_id}"
    print(f"encode: {stats['encoded']}/{stats['images_in']} images encoded, skipped "
          f"{json.dumps(stats['skipped'], sort_keys=True)} → {result.output} ({state})")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    run_job(__doc__, EncodeConfig, run_encode, report)


if __name__ == "__main__":
    main()
