"""Fréchet distance against closed forms and scipy; feature statistics and their cache; the
TorchScript Inception wrapper with a stand-in TorchScript module."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from psalign.io import InputError
from psalign.metrics.fid import (
    InceptionTorchScript,
    feature_statistics,
    frechet_distance,
    load_statistics,
    reference_statistics,
    save_statistics,
    sqrtm_psd,
    trace_sqrt_product,
)
from tests.metrics_support import write_images

scipy_linalg = pytest.importorskip("scipy.linalg")


def random_psd(dim: int, rng: np.random.Generator, rank: int | None = None) -> np.ndarray:
    factor = rng.normal(size=(dim, rank or dim))
    return factor @ factor.T / dim


def scipy_frechet(mu1, sigma1, mu2, sigma2) -> float:
    covmean = scipy_linalg.sqrtm(sigma1 @ sigma2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean).real)


def test_sqrtm_psd_matches_scipy_and_squares_back():
    rng = np.random.default_rng(0)
    matrix = random_psd(12, rng)
    root = sqrtm_psd(matrix)
    np.testing.assert_allclose(root, scipy_linalg.sqrtm(matrix).real, atol=1e-10)
    np.testing.assert_allclose(root @ root, matrix, atol=1e-10)


def test_trace_sqrt_product_matches_scipy_for_non_commuting_matrices():
    rng = np.random.default_rng(1)
    sigma1, sigma2 = random_psd(10, rng), random_psd(10, rng)
    assert not np.allclose(sigma1 @ sigma2, sigma2 @ sigma1)
    expected = np.trace(scipy_linalg.sqrtm(sigma1 @ sigma2)).real
    assert trace_sqrt_product(sigma1, sigma2) == pytest.approx(expected, rel=1e-9)


def test_identical_statistics_give_zero():
    rng = np.random.default_rng(2)
    features = rng.normal(size=(50, 8))
    mu, sigma = feature_statistics(features)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)


def test_shifted_gaussians_with_equal_covariance_give_squared_shift():
    rng = np.random.default_rng(3)
    sigma = random_psd(6, rng)
    mu1 = rng.normal(size=6)
    shift = np.array([1.0, -2.0, 0.5, 0.0, 3.0, 1.5])
    assert frechet_distance(mu1, sigma, mu1 + shift, sigma) == pytest.approx(shift @ shift, rel=1e-9)


def test_diagonal_gaussians_have_the_closed_form():
    # For commuting (here diagonal) covariances: FD = |mu1-mu2|² + sum_i (sqrt(a_i) - sqrt(b_i))².
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    mu1, mu2 = np.zeros(3), np.array([3.0, 0.0, 4.0])
    expected = 25.0 + (1 - 2) ** 2 + (2 - 1) ** 2 + (3 - 0.5) ** 2
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_general_case_matches_scipy():
    rng = np.random.default_rng(4)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    sigma1, sigma2 = random_psd(16, rng), random_psd(16, rng)
    expected = scipy_frechet(mu1, sigma1, mu2, sigma2)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-8)


def test_rank_deficient_covariances_stay_finite_and_match_scipy():
    # Fewer samples than features (as with small FID sets): singular covariances.
    rng = np.random.default_rng(5)
    mu1, sigma1 = feature_statistics(rng.normal(size=(10, 32)))
    mu2, sigma2 = feature_statistics(rng.normal(size=(10, 32)) + 0.3)
    value = frechet_distance(mu1, sigma1, mu2, sigma2)
    assert np.isfinite(value) and value > 0
    assert value == pytest.approx(scipy_frechet(mu1, sigma1, mu2, sigma2), rel=1e-5)


def test_sampled_shifted_gaussians_approach_the_known_value():
    rng = np.random.default_rng(6)
    shift = np.array([2.0, 0.0, -1.0, 0.0])
    mu1, sigma1 = feature_statistics(rng.normal(size=(20000, 4)))
    mu2, sigma2 = feature_statistics(rng.normal(size=(20000, 4)) + shift)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(shift @ shift, abs=0.05)


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="sigma2"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))


class CountingExtractor:
    """Mean colour and its square per image, counting calls."""

    name = "mean_rgb"

    def __init__(self):
        self.images_seen = 0

    def __call__(self, images):
        self.images_seen += len(images)
        means = np.stack([np.asarray(image, dtype=np.float64).mean(axis=(0, 1)) for image in images])
        return np.concatenate([means, means**2 / 255], axis=1)


def test_reference_statistics_are_cached_and_recomputed_when_the_folder_changes(tmp_path):
    reference = tmp_path / "ref"
    write_images(reference, 5)
    extractor = CountingExtractor()
    cache = tmp_path / "cache"
    mu, sigma = reference_statistics(reference, extractor, batch_size=2, cache_dir=cache)
    assert extractor.images_seen == 5 and len(list(cache.glob("*.npz"))) == 1
    mu2, sigma2 = reference_statistics(reference, extractor, batch_size=2, cache_dir=cache)
    assert extractor.images_seen == 5  # served from the cache
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(sigma, sigma2)
    write_images(reference, 1, seed=9, prefix="new")
    reference_statistics(reference, extractor, batch_size=2, cache_dir=cache)
    assert extractor.images_seen == 11


def test_statistics_files_round_trip_and_are_checked(tmp_path):
    mu, sigma = np.arange(3.0), np.eye(3)
    save_statistics(tmp_path / "a.npz", mu, sigma, "mean_rgb")
    loaded_mu, loaded_sigma = load_statistics(tmp_path / "a.npz", "mean_rgb")
    np.testing.assert_array_equal(loaded_mu, mu)
    with pytest.raises(InputError, match="extractor 'mean_rgb'"):
        load_statistics(tmp_path / "a.npz", "inception_pool3")
    np.savez(tmp_path / "other_tool.npz", mu=mu, sigma=sigma)  # only mu and sigma: accepted
    load_statistics(tmp_path / "other_tool.npz", "inception_pool3")
    np.savez(tmp_path / "bad.npz", mu=mu)
    with pytest.raises(InputError, match="bad.npz.*missing array 'sigma'"):
        load_statistics(tmp_path / "bad.npz")


class _FakeInception(torch.nn.Module):
    """Same call signature as the FID Inception TorchScript: forward(x, return_features)."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        pooled = x.float().mean(dim=(2, 3))
        return torch.cat([pooled, pooled.new_full((x.shape[0], 1), float(x.shape[-1]))], dim=1)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_inception_torchscript_wrapper_feeds_299px_uint8_images(tmp_path):
    path = tmp_path / "fake_inception.pt"
    torch.jit.script(_FakeInception()).save(str(path))
    extractor = InceptionTorchScript(path)
    from PIL import Image

    image = Image.new("RGB", (50, 30), (10, 200, 30))
    features = extractor([image, image])
    assert features.shape == (2, 4)
    np.testing.assert_allclose(features[0], [10, 200, 30, 299], atol=0.5)
    with pytest.raises(InputError, match="does not exist"):
        InceptionTorchScript(tmp_path / "missing.pt")
