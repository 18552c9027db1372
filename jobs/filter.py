"""Filter LAION metadata parquet into the rows worth downloading (stage 1 of the data pipeline).

    python -m jobs.filter --config conf/data/filter.yaml [key=value ...]
    ray job submit --address http://HEAD:8265 --working-dir . -- python -m jobs.filter --config conf/data/filter.yaml
"""

from __future__ import annotations

import json

from jobs.config import job_errors, parse_job_args
from pipelines.filter import check_config, run_filter


def main() -> None:
    cfg = parse_job_args(__doc__, check=check_config)
    with job_errors():
        result = run_filter(cfg)
    stats = result.stats
    print(json.dumps({"output": result.output, "skipped": result.skipped, "run_id": result.run_id,
                      "rows_in": stats["rows_in"], "rows_out": stats["rows_out"], "dropped": stats["dropped"]}, indent=2))


if __name__ == "__main__":
    main()
