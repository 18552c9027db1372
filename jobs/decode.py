"""Decode a directory (glob, URI) of latent files to images at one or more sizes, on Ray Data actors.

    python -m jobs.decode --config conf/decode/local.yaml model=DIR_OR_URI input=latents/ output=images/
    ray job submit --address http://HEAD:8265 --working-dir . -- python -m jobs.decode --config conf/cluster/decode.yaml
"""

from __future__ import annotations

from jobs.config import run_job
from pipelines.common import StageResult
from pipelines.decode import DecodeConfig, run_decode


def report(result: StageResult) -> None:
    print(f"images: {result.output}\nMLflow run: {result.run_id}")


def main() -> None:
    run_job(__doc__, DecodeConfig, run_decode, report)


if __name__ == "__main__":
    main()
