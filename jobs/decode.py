"""Decode a directory (glob, URI) of latent files to images at one or more sizes, on Ray Data actors.

    python -m jobs.decode --config conf/decode/local.yaml model=DIR_OR_URI input=latents/ output=images/
    ray job submit --address http://HEAD:8265 --working-dir . -- python -m jobs.decode --config conf/cluster/decode.yaml
"""

from __future__ import annotations

from jobs.config import job_errors, parse_job_args
from pipelines.common import dataclass_from
from pipelines.decode import DecodeConfig, run_decode


def main() -> None:
    cfg = parse_job_args(__doc__, check=lambda cfg: dataclass_from(DecodeConfig, cfg))
    with job_errors():
        result = run_decode(cfg)
    print(f"images: {result.output}\nMLflow run: {result.run_id}")


if __name__ == "__main__":
    main()
