"""Evaluate decoders across resolutions on Ray (FIDp/sFIDp/KIDp/precision-recall, PSNR/SSIM/LPIPS, latency).

    python -m jobs.evaluate --config conf/eval/local.yaml [key=value ...]
"""

from jobs.config import run_job
from pipelines.common import StageResult
from pipelines.evaluate import EvalConfig, run_evaluate


def report(result: StageResult) -> None:
    print(f"results: {result.output}\nMLflow run: {result.run_id}")


def main() -> None:
    run_job(__doc__, EvalConfig, run_evaluate, report)


if __name__ == "__main__":
    main()
