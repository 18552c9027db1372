"""Stage 2: download the filter stage's URLs with img2dataset into webdataset shards (resumable, retryable).

    python -m jobs.download --config conf/data/download.yaml input=<filter output dir> [key=value ...]
    python -m jobs.download --config conf/data/download.yaml input=<filter output dir> retry_failed=true
"""

from __future__ import annotations

import sys

from jobs.config import parse_job_args
from pipelines.download import check_config, run_download


def main() -> int:
    cfg = parse_job_args(__doc__, check=check_config)
    try:
        result = run_download(cfg)
    except ValueError as e:  # bad config or input: say what, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # shards left unfinished: the message says to rerun
        print(f"error: {e}", file=sys.stderr)
        return 1
    s = result.stats
    state = "already complete" if result.skipped else "done"
    print(f"download {state}: {result.output}\n  {s['success']} of {s['rows']} rows downloaded, "
          f"{s['failed']} failed {s['failures']}\n  shards: {len(s['shards'])}, retry rounds: {len(s['rounds'])}"
          + (f"\n  failed rows: {result.output}/failed.parquet (retry with retry_failed=true)" if s["failed"] else ""))
    return 0


if __name__ == "__main__":  # img2dataset's spawned workers import this module: nothing runs on import
    sys.exit(main())
