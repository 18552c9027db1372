import os

# Offline by design: a hub id must fail fast instead of hanging on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

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
