"""Fréchet distance between two sets of image features, with cached reference statistics.

``FD = |mu1 - mu2|² + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^½)``. The trace term is computed as
``Tr((S1^½ S2 S1^½)^½)``, the sum of the square roots of the eigenvalues of a symmetric PSD
matrix, so everything stays real and symmetric (float64 ``eigh``) and no complex square root has
to be cleaned up afterwards.

Features come from any :class:`FeatureExtractor` (a callable ``images -> (N, F)`` with a ``name``).
FID proper uses InceptionV3 pool3 features (2048-d): :class:`InceptionTorchScript` runs the
TorchScript port of the TensorFlow FID Inception network, a file the user downloads once (this
package never downloads weights).

How images reach that network at 299x299 px (:data:`FID_RESIZES`) moves FID by more than most
method differences, so it is a named choice:

* ``pil_bicubic`` (psalign's default): PIL bicubic resize of the 8-bit image, then the network's
  own scaling ``(v - 128) / 128`` (as StyleGAN2-ADA and clean-fid's legacy mode feed it);
* ``pytorch_fid`` (what the PSA paper's numbers used): the float image in [0, 1] resized with
  ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`` without antialiasing,
  then ``2x - 1``.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from psalign.io import InputError, InputProblem, atomic_path
from psalign.metrics.images import batched, list_images, load_images

#: Feature dimension of InceptionV3 pool3.
INCEPTION_FEATURE_DIM = 2048
#: Input size of the FID Inception network, pixels per side.
INCEPTION_IMAGE_SIZE = 299
#: How images are resized to the Inception input (see the module docstring); the first is the default.
FID_RESIZES: tuple[str, ...] = ("pil_bicubic", "pytorch_fid")


class FeatureExtractor(Protocol):
    """A callable mapping a list of RGB images to an ``(N, F)`` float array of features; ``name``
    identifies the extractor in cache files."""

    name: str

    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray: ...


def sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    """Principal square root of a symmetric positive semi-definite matrix (float64).

    Eigenvalues that round-off made slightly negative are clipped to 0.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    symmetric = (matrix + matrix.T) / 2
    eigenvalues, eigenvectors = np.linalg.eigh(symmetric)
    roots = np.sqrt(np.clip(eigenvalues, 0.0, None))
    return (eigenvectors * roots) @ eigenvectors.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """``Tr((S1 S2)^½)`` for symmetric PSD ``S1``, ``S2``, via the similar symmetric matrix
    ``S1^½ S2 S1^½``."""
    root1 = sqrtm_psd(sigma1)
    product = root1 @ np.asarray(sigma2, dtype=np.float64) @ root1
    eigenvalues = np.linalg.eigvalsh((product + product.T) / 2)
    return float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2), in squared
    feature units. Shapes: ``mu`` (F,), ``sigma`` (F, F)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    dim = mu1.shape[0]
    for name, array, shape in (("mu2", mu2, (dim,)), ("sigma1", sigma1, (dim, dim)), ("sigma2", sigma2, (dim, dim))):
        if array.shape != shape:
            raise ValueError(f"{name} has shape {array.shape}, expected {shape} (mu1 has {dim} features)")
    diff = mu1 - mu2
    distance = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2)
    return max(float(distance), 0.0)


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (F,) and unbiased covariance (F, F) of ``features`` (N, F), in float64; N >= 2."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"feature statistics need an (N >= 2, F) array, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def extract_features(
    paths: Sequence[Path], extractor: FeatureExtractor, batch_size: int, desc: str = "features"
) -> np.ndarray:
    """Run ``extractor`` over the images at ``paths`` in batches; returns (N, F) float64."""
    chunks = []
    with tqdm(total=len(paths), desc=desc, unit="img") as progress:
        for batch in batched(list(paths), batch_size):
            features = np.asarray(extractor(load_images(batch)), dtype=np.float64)
            if features.ndim != 2 or features.shape[0] != len(batch):
                raise ValueError(
                    f"feature extractor {extractor.name!r} returned shape {features.shape} for {len(batch)} images"
                )
            chunks.append(features)
            progress.update(len(batch))
    return np.concatenate(chunks)


def save_statistics(path: str | Path, mu: np.ndarray, sigma: np.ndarray, extractor: str, key: str = "") -> None:
    """Write ``mu``, ``sigma``, the extractor name and an optional content key to ``path`` (.npz)."""
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, mu=mu, sigma=sigma, extractor=np.array(extractor), key=np.array(key))


def load_statistics(path: str | Path, extractor: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read ``(mu, sigma)`` from an .npz holding arrays ``mu`` (F,) and ``sigma`` (F, F).

    Files written by other FID tools (only ``mu`` and ``sigma``) are accepted; a file that names
    its extractor must name ``extractor`` when that is given. Never unpickles.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError) as error:
        raise InputError([InputProblem(str(path), 0, f"not a readable .npz file: {error}")]) from error
    problems = [InputProblem(str(path), 0, f"missing array {name!r}") for name in ("mu", "sigma") if name not in arrays]
    if not problems:
        mu, sigma = arrays["mu"], arrays["sigma"]
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            problems.append(InputProblem(str(path), 0, f"mu {mu.shape} / sigma {sigma.shape} are not (F,) / (F, F)"))
        stored = str(arrays["extractor"]) if "extractor" in arrays else None
        if extractor is not None and stored is not None and stored != extractor:
            problems.append(InputProblem(str(path), 0, f"statistics of extractor {stored!r}, expected {extractor!r}"))
    if problems:
        raise InputError(problems)
    return mu.astype(np.float64), sigma.astype(np.float64)


def folder_key(paths: Sequence[Path], extractor: str) -> str:
    """Content key of an image folder for the statistics cache: hex SHA-256 over the extractor
    name and each file's name, size and modification time."""
    digest = hashlib.sha256(extractor.encode())
    for path in paths:
        stat = path.stat()
        digest.update(f"\0{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def statistics_cache_path(folder: Path, extractor: str, key: str, cache_dir: Path) -> Path:
    """Where the cached statistics of ``folder`` under ``extractor`` live inside ``cache_dir``."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{folder.name}-{extractor}")
    return Path(cache_dir) / f"{safe}-{key[:16]}.npz"


def reference_statistics(
    reference: str | Path, extractor: FeatureExtractor, batch_size: int, cache_dir: str | Path
) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` of the reference: read from an .npz file, or computed from an image folder
    and cached in ``cache_dir`` (keyed by :func:`folder_key`, so a changed folder is recomputed)."""
    reference = Path(reference)
    if reference.is_file():
        return load_statistics(reference, extractor.name)
    paths = list_images(reference)
    key = folder_key(paths, extractor.name)
    cache = statistics_cache_path(reference, extractor.name, key, Path(cache_dir))
    if cache.exists():
        return load_statistics(cache, extractor.name)
    mu, sigma = feature_statistics(extract_features(paths, extractor, batch_size, desc=f"reference {reference.name}"))
    save_statistics(cache, mu, sigma, extractor.name, key)
    return mu, sigma


def pil_bicubic_pixels(images: Sequence[Image.Image]) -> torch.Tensor:
    """``pil_bicubic`` resizing: (N, 3, 299, 299) float32 holding 8-bit values in [0, 255]."""
    size = (INCEPTION_IMAGE_SIZE, INCEPTION_IMAGE_SIZE)
    pixels = np.stack([np.asarray(image.convert("RGB").resize(size, Image.BICUBIC)) for image in images])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float()


def pytorch_fid_pixels(images: Sequence[Image.Image]) -> torch.Tensor:
    """``pytorch_fid`` resizing: (N, 3, 299, 299) float32 in [-1, 1], bilinear without antialias
    from the image as floats in [0, 1] (each image resized on its own, so sizes may differ)."""
    size = (INCEPTION_IMAGE_SIZE, INCEPTION_IMAGE_SIZE)
    resized = []
    for image in images:
        unit = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
        resized.append(torch.nn.functional.interpolate(unit[None], size=size, mode="bilinear", align_corners=False))
    return 2 * torch.cat(resized) - 1


def inception_extractor_name(resize: str) -> str:
    """Name of the Inception features under ``resize`` (cache files and statistics record it):
    the default keeps the plain ``inception_pool3``."""
    if resize not in FID_RESIZES:
        raise ValueError(f"unknown FID resize {resize!r}; choose from {list(FID_RESIZES)}")
    return "inception_pool3" if resize == FID_RESIZES[0] else f"inception_pool3({resize})"


class InceptionTorchScript:
    """InceptionV3 pool3 features (N, 2048) from a TorchScript file of the FID Inception network.

    Expects the TorchScript port of the TensorFlow 2015-12-05 Inception graph published with
    StyleGAN2-ADA's metrics (file ``inception-2015-12-05.pt``; also what clean-fid loads), whose
    ``forward(x, return_features=True)`` takes pixel values (N, 3, H, W) in [0, 255], resizes
    them to 299x299 unless they already are, scales them by ``(v - 128) / 128`` and returns pool3
    features. ``resize`` (one of :data:`FID_RESIZES`) says how images become 299x299 here; for
    ``pytorch_fid`` the [-1, 1] pixels are passed as ``128 (x + 1)``, so the network's scaling
    gives back exactly ``x``. Download the file on a machine with internet access and pass its
    path; ``torch.jit.load`` reads TorchScript archives, not arbitrary pickles.
    """

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", resize: str = FID_RESIZES[0]):
        path = Path(path)
        self.name = inception_extractor_name(resize)
        if not path.is_file():
            raise InputError([InputProblem(str(path), 0, "Inception TorchScript file does not exist")])
        self.resize = resize
        self.device = torch.device(device)
        with warnings.catch_warnings():  # TorchScript is deprecated, but it is the format this network ships in
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            self.model = torch.jit.load(str(path), map_location=self.device).eval()

    def network_input(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, 3, 299, 299) float32 values the network reads as [0, 255] pixels."""
        if self.resize == "pytorch_fid":
            return 128.0 * (pytorch_fid_pixels(images) + 1)
        return pil_bicubic_pixels(images)

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        features = self.model(self.network_input(images).to(self.device), return_features=True)
        return features.float().reshape(len(images), -1).cpu().numpy()
