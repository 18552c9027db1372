"""Filter LAION metadata parquet into the rows worth downloading (stage 1 of the data pipeline).

    python -m jobs.filter --config conf/data/filter.yaml [key=value ...]
    ray job submit --address http://HEAD:8265 --working-dir . -- python -m jobs.filter --config conf/data/filter.yaml
"""

from __future__ import annotations

import json

from jobs.config import run_job
from pipelines.common import StageResult
from pipelines.filter import FilterConfig, run_filter


def report(result: StageResult) -> None:
    stats = result.stats
    print(json.dumps({"output": result.output, "skipped": result.skipped, "run_id": result.run_id,
                      "rows_in": stats["rows_in"], "rows_out": stats["rows_out"], "dropped": stats["dropped"]}, indent=2))


def main() -> None:
    run_job(__doc__, FilterConfig, run_filter, report)


if __name__ == "__main__":
    main()
