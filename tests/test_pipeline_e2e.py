"""filter → download → encode, end to end: LAION-style metadata in the real V2 schema, img2dataset
downloading from 127.0.0.1, the tiny VAE on a Ray actor pool; exact counts carried through every stage."""

from mlflow.tracking import MlflowClient

from pipelines.common import resolve_files
from pipelines.download import run_download
from pipelines.encode import run_encode
from pipelines.filter import run_filter
from pipelines.sample_data import LARGE_PHOTOS, MISSING, serve, write_laion_parquet, write_photos
from pipelines.shards import read_rows, tensor_column

BROKEN_ROWS = ["truncated.jpg", "html.jpg", "empty.jpg", "bomb.png", "tiny.jpg", MISSING]


def test_filter_download_encode(ray_local, tmp_path, tiny_vae):
    sizes = write_photos(tmp_path / "www")
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    with serve(tmp_path / "www") as base:
        rows = [{"url": f"{base}/{name}", "text": f"photo {name}", "width": w, "height": h, "aesthetic": 6.5}
                for name, (w, h) in sizes.items()]
        rows += [  # dropped by the filter, one reason each
            {"url": f"{base}/small.jpg", "text": "small", "width": 800, "height": 600, "aesthetic": 6.5},
            {"url": f"{base}/ugly.jpg", "text": "ugly", "width": 2000, "height": 1500, "aesthetic": 3.0},
            {"url": f"{base}/astronaut.jpg", "text": "again", "width": 1600, "height": 1600, "aesthetic": 6.5},
            {"url": "ftp://example.org/a.jpg", "text": "ftp", "width": 2000, "height": 1500, "aesthetic": 6.5},
        ]
        write_laion_parquet(tmp_path / "laion" / "part-0.parquet", rows[:9], "aesthetics_v2")
        write_laion_parquet(tmp_path / "laion" / "part-1.parquet", rows[9:], "aesthetics_v2")

        filtered = run_filter({"input": str(tmp_path / "laion"), "output": str(tmp_path / "filter"),
                               "allow_private_hosts": True, "min_aesthetic": 5.0, "min_short_side": 1024,
                               "mlflow": {"tracking_uri": tracking, "experiment": "e2e"}})
        kept = len(LARGE_PHOTOS) + len(BROKEN_ROWS)
        assert filtered.stats["rows_in"] == kept + 4 and filtered.stats["rows_out"] == kept
        assert {k: v for k, v in filtered.stats["dropped"].items() if v} == {
            "too_small": 1, "low_aesthetic": 1, "bad_url": 1, "duplicate_url": 1}

        downloaded = run_download({"input": filtered.output, "output": str(tmp_path / "download"),
                                   "number_sample_per_shard": 8, "processes_count": 1, "timeout": 5, "retries": 0,
                                   "mlflow": {"tracking_uri": tracking, "experiment": "e2e"}})
    assert downloaded.stats["rows"] == kept and downloaded.stats["success"] == len(LARGE_PHOTOS)
    assert downloaded.stats["failures"] == {"decode": 2, "empty": 1, "too_large": 1, "too_small": 1, "http_404": 1}

    encoded = run_encode({"input": f"{downloaded.output}/shards", "output": str(tmp_path / "encoded"),
                          "vae": "tiny", "input_size": 256, "min_side": 512, "hr_max_side": 1024,
                          "mlflow": {"tracking_uri": tracking, "experiment": "e2e"}})
    assert encoded.stats["images_in"] == len(LARGE_PHOTOS) and encoded.stats["encoded"] == len(LARGE_PHOTOS)
    table = read_rows(*resolve_files(encoded.output))
    assert table.num_rows == len(LARGE_PHOTOS) and len(set(table.column("key").to_pylist())) == table.num_rows
    latents = tensor_column(table, "latent")  # as stored
    assert latents.shape == (len(LARGE_PHOTOS), 4, 32, 32) and str(latents.dtype) == "float16"
    assert sorted(u.rsplit("/", 1)[1] for u in table.column("url").to_pylist()) == sorted(f"{n}.jpg" for n in LARGE_PHOTOS)

    # reruns of every stage are no-ops
    assert run_encode({"input": f"{downloaded.output}/shards", "output": str(tmp_path / "encoded"), "vae": "tiny",
                       "input_size": 256, "min_side": 512, "hr_max_side": 1024,
                       "mlflow": {"enabled": False}}).skipped

    runs = MlflowClient(tracking).search_runs([MlflowClient(tracking).get_experiment_by_name("e2e").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["download", "encode", "filter"]
