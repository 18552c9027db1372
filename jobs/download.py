"""Stage 2: download the filter stage's URLs with img2dataset into webdataset shards (resumable, retryable).

    python -m jobs.download --config conf/data/download.yaml input=outputs/data/filter/FINGERPRINT [key=value ...]
    python -m jobs.download --config conf/data/download.yaml input=outputs/data/filter/FINGERPRINT retry_failed=true
"""

from __future__ import annotations

from jobs.config import BAD_INPUT, run_job
from pipelines.common import StageResult
from pipelines.download import DownloadConfig, run_download


def report(result: StageResult) -> None:
    s = result.stats
    state = "already complete" if result.skipped else "done"
    print(f"download {state}: {result.output}\n  {s['success']} of {s['rows']} rows downloaded, "
          f"{s['failed']} failed {s['failures']}\n  shards: {len(s['shards'])}, retry rounds: {len(s['rounds'])}"
          + (f"\n  failed rows: {result.output}/failed.parquet (retry with retry_failed=true)" if s["failed"] else ""))


def main() -> None:
    # RuntimeError: shards left unfinished, and the message says to rerun
    run_job(__doc__, DownloadConfig, run_download, report, exit_codes={**BAD_INPUT, RuntimeError: 1})


if __name__ == "__main__":  # img2dataset's spawned workers import this module: nothing runs on import
    main()
