"""Distribution metrics (infgen.distribution_metrics): patch protocol, streaming stats, FID, precision/recall,
extractor plumbing."""

import numpy as np
import pytest
import torch

from infgen.distribution_metrics import (InceptionFeatures, PatchProtocol, RandomConvFeatures, RunningStats,
                                         frechet_distance, image_stats, precision_recall)
from infgen.images import shipped_photos, to_tensor


@pytest.fixture(scope="module")
def photo_tensors():
    return {name: to_tensor(im) for name, im in shipped_photos().items()}


@pytest.fixture(scope="module")
def extractor():
    return RandomConvFeatures(pool_dim=32)


def test_running_stats_match_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(503, 12)) * rng.uniform(0.1, 3, 12) + rng.uniform(-5, 5, 12)
    a = RunningStats(12).update(x[:100]).update(x[100:101]).update(x[101:300])
    b = RunningStats(12).update(x[300:450]).update(torch.from_numpy(x[450:]))
    a.merge(b)
    assert a.n == 503
    np.testing.assert_allclose(a.mean, x.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(a.cov, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError):
        a.update(x[:, :5])


def test_npz_round_trip(tmp_path):
    x = np.random.default_rng(1).normal(size=(40, 6))
    stats = RunningStats(6).update(x)
    path = stats.to_npz(tmp_path / "ref" / "stats.npz")
    assert path == tmp_path / "ref" / "stats.npz" and path.is_file()
    back = RunningStats.from_npz(path)
    assert back.n == 40 and back.dim == 6
    np.testing.assert_array_equal(back.mean, stats.mean)
    np.testing.assert_array_equal(back.cov, stats.cov)


def test_fid_self_is_zero():
    x = np.random.default_rng(2).normal(size=(200, 8))
    a, b = RunningStats(8).update(x), RunningStats(8).update(x)
    assert abs(frechet_distance(a, b)) < 1e-6
    shifted = RunningStats(8).update(x + 1.0)  # same covariance, mean shifted by 1 in each of 8 dims
    assert frechet_distance(a, shifted) == pytest.approx(8.0, rel=1e-6)


@pytest.mark.parametrize("hw, expected", [
    # grid A = floor(H/256)·floor(W/256); grid B = floor((H-128)/256)·floor((W-128)/256) iff H ≥ 384 and W ≥ 384
    ((256, 256), 1),     # A 1·1
    ((300, 700), 2),     # A 1·2, H < 384 → no B
    ((383, 383), 1),     # A 1·1, no B
    ((384, 384), 2),     # A 1·1 + B 1·1
    ((512, 512), 5),     # A 2·2 + B 1·1
    ((640, 640), 8),     # A 2·2 + B 2·2
    ((383, 1000), 3),    # A 1·3, no B
    ((384, 1000), 6),    # A 1·3 + B 1·3
    ((872, 1000), 15),   # A 3·3 + B 2·3
    ((255, 1000), 0),    # smaller than a patch: skipped
])
def test_grid_counts(hw, expected):
    protocol = PatchProtocol("grid")
    assert protocol.count(*hw) == expected
    image = torch.rand(3, *hw) * 2 - 1
    patches = protocol.patches(image)
    assert patches.shape == (expected, 3, 256, 256)
    for patch, (y, x) in zip(patches, protocol.corners(*hw)):
        assert y + 256 <= hw[0] and x + 256 <= hw[1]
        assert torch.equal(patch, image[:, y:y + 256, x:x + 256])


def test_grid_corners_exact():
    assert PatchProtocol("grid").corners(512, 640) == [(0, 0), (0, 256), (256, 0), (256, 256), (128, 128), (128, 384)]


def test_random_mode_deterministic_by_key_and_seed():
    image = torch.rand(3, 400, 500) * 2 - 1
    p = PatchProtocol("random", k=5, seed=7)
    a, b = p.patches(image, "img-1"), p.patches(image, "img-1")
    assert a.shape == (5, 3, 256, 256) and p.count(400, 500) == 5
    assert torch.equal(a, b)
    assert p.corners(400, 500, "img-1") != p.corners(400, 500, "img-2")
    assert p.corners(400, 500, "img-1") != PatchProtocol("random", k=5, seed=8).corners(400, 500, "img-1")
    assert all(0 <= y <= 144 and 0 <= x <= 244 for y, x in p.corners(400, 500, "img-1"))


def test_small_images_skipped():
    for protocol in (PatchProtocol("grid"), PatchProtocol("random", k=3)):
        assert protocol.patches(torch.zeros(3, 200, 900), "k").shape == (0, 3, 256, 256)
        assert protocol.count(200, 900) == 0
        assert protocol.count_skipped([(200, 900), (256, 256), (900, 255), (1000, 1000)]) == 2


def test_protocol_dict_round_trip():
    p = PatchProtocol("random", size=128, shift=64, k=9, seed=3)
    d = p.to_dict()
    assert d == {"patch_mode": "random", "patch_size": 128, "patch_shift": 64, "patch_shift_min_factor": 1.5,
                 "patch_k": 9, "patch_seed": 3}
    assert PatchProtocol.from_dict(d) == p
    with pytest.raises(ValueError):
        PatchProtocol("tiles")


def test_precision_recall():
    x = np.random.default_rng(3).normal(size=(300, 16)).astype(np.float32)
    assert precision_recall(x, x, k=3, batch=64) == (1.0, 1.0)
    far = x + 100.0
    assert precision_recall(x, far, k=3, batch=64) == (0.0, 0.0)
    # fake = half the real set: every fake point is real (precision 1), half the real points are missed
    p, r = precision_recall(x, x[:150], k=3, batch=64)
    assert p == 1.0 and 0.4 < r < 1.0


def test_extractor_interface(extractor):
    images = torch.rand(3, 3, 256, 300) * 2 - 1
    feats = extractor.features(images)
    assert feats["pool"].shape == (3, 32) and feats["spatial"].shape == (3, 2023)
    np.testing.assert_array_equal(extractor.pool(images), feats["pool"])
    np.testing.assert_array_equal(extractor.spatial(images), feats["spatial"])


def test_fid_grows_with_noise(photo_tensors, extractor):
    protocol = PatchProtocol("grid")
    patches = torch.cat([protocol.patches(img, name) for name, img in photo_tensors.items()])
    assert len(patches) == sum(protocol.count(*img.shape[1:]) for img in photo_tensors.values())
    real_pool, real_spatial = image_stats(extractor, patches.split(32))
    assert (real_pool.n, real_pool.dim, real_spatial.n, real_spatial.dim) == (len(patches), 32, len(patches), 2023)
    # sFID (2023-d sqrtm) takes about a minute per call on 2 cores: only the 32-d pool FID is computed here
    noise = torch.randn(patches.shape, generator=torch.Generator().manual_seed(0))
    fids = []
    for sigma in (0.0, 0.05, 0.15, 0.4):
        pool, _ = image_stats(extractor, (patches + sigma * noise).clamp(-1, 1).split(32))
        fids.append(frechet_distance(real_pool, pool))
    assert abs(fids[0]) < 1e-6
    assert all(a < b for a, b in zip(fids, fids[1:])), fids


def test_inception_missing_path(tmp_path):
    missing = tmp_path / "nowhere" / "inception-2015-12-05.pt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        InceptionFeatures.from_path(missing)
    with pytest.raises(FileNotFoundError, match="inception-2015-12-05.pt"):
        InceptionFeatures.from_path(tmp_path)  # a directory without the file


class _Mixed6(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 12, 1)

    def forward(self, x):
        return torch.cat([self.conv(x), x], 1)


class _TinyInception(torch.nn.Module):
    """Same layout as clean-fid's TorchScript Inception where it matters: `layers` children incl. mixed_6.conv."""

    def __init__(self):
        super().__init__()
        from collections import OrderedDict
        self.layers = torch.nn.Sequential(OrderedDict(
            conv=torch.nn.Conv2d(3, 8, 3, 2), pool1=torch.nn.AdaptiveAvgPool2d(17), mixed_6=_Mixed6(),
            mixed_10=torch.nn.Conv2d(20, 2048, 1), pool2=torch.nn.AdaptiveAvgPool2d(1)))

    def forward(self, x):
        return self.layers(x)


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_inception_from_path_taps_mixed_6_conv(tmp_path):
    torch.jit.script(_TinyInception()).save(str(tmp_path / "inception-2015-12-05.pt"))
    model = InceptionFeatures.from_path(tmp_path)  # a directory holding the file, like clean-fid's download dir
    images = torch.rand(2, 3, 256, 256) * 2 - 1
    feats = model.features(images)
    assert feats["pool"].shape == (2, 2048) and feats["spatial"].shape == (2, 2023)
    x = model.preprocess(images)
    with torch.no_grad():
        tapped = model.layers.mixed_6.conv(model.layers.pool1(model.layers.conv(x)))
        pooled = model.layers(x).reshape(2, -1)
    np.testing.assert_allclose(feats["spatial"], tapped[:, :7].permute(0, 2, 3, 1).reshape(2, -1).numpy(), atol=1e-6)
    np.testing.assert_allclose(feats["pool"], pooled.numpy(), atol=1e-6)
