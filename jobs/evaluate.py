"""Evaluate decoders across resolutions on Ray (FIDp/sFIDp/KIDp/precision-recall, PSNR/SSIM/LPIPS, latency).

    python -m jobs.evaluate --config conf/eval/local.yaml [key=value ...]
"""

from jobs.config import job_errors, parse_job_args
from pipelines.evaluate import EvalConfig, run_evaluate


def main() -> None:
    cfg = parse_job_args(__doc__, check=EvalConfig.from_mapping)
    with job_errors():
        result = run_evaluate(cfg)
    print(f"results: {result.output}\nMLflow run: {result.run_id}")


if __name__ == "__main__":
    main()
