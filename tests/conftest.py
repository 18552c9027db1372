import os

# Offline by design: a hub id must fail fast instead of hanging on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from pipelines.services import free_port  # noqa: E402

# Object-store tests talk to a local S3-API server (the `s3` fixture), never to a real account: every process of
# the session (Ray workers, subprocesses) inherits these, and pyarrow, boto3 and s3fs all read AWS_ENDPOINT_URL.
S3_ENDPOINT = f"http://127.0.0.1:{free_port()}"
os.environ.update(AWS_ENDPOINT_URL=S3_ENDPOINT, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                  AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
for _name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
    os.environ.pop(_name, None)

from infgen.data import photo_pairs  # noqa: E402
from infgen.images import shipped_photos  # noqa: E402
from infgen.vae import load_vae  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_vae():
    # fitted once per machine (~1 min) and cached under INFGEN_CACHE (default ~/.cache/infgen)
    return load_vae("tiny")


@pytest.fixture(scope="session")
def photos():
    return shipped_photos()


@pytest.fixture(scope="session")
def photo_latents(tiny_vae, photos):
    """(latents 16×16 of 128² crops, the same crops at 256²) from real photos: 8 crops per photo."""
    return photo_pairs(list(photos.values()), tiny_vae, crops_per_image=8, input_size=128, hr_size=256, seed=0)


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray on this machine's 2 CPUs, shared by the whole session."""
    import tempfile

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no ~/.ray/auth_token
    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: socket paths
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (SQLite backend) on 127.0.0.1; yields its URI."""
    from pipelines.services import mlflow_server as serve

    with serve(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3-API server (moto) on 127.0.0.1, where AWS_ENDPOINT_URL points; yields `bucket(name)`, which
    creates a bucket and returns its s3:// URI."""
    import boto3

    from pipelines.services import s3_server

    with s3_server(tmp_path_factory.mktemp("s3"), int(S3_ENDPOINT.rsplit(":", 1)[1])):
        client = boto3.client("s3")

        def bucket(name: str) -> str:
            client.create_bucket(Bucket=name)
            return f"s3://{name}"

        yield bucket
