"""Shared fixtures. The hub-offline variables are set before any Hugging Face import, so an
accidental hub id fails at once instead of hanging on the closed network."""

import os

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_sd15_path(tmp_path_factory) -> Path:
    """A tiny SD1.5-shaped pipeline written with ``save_pretrained`` (load it with ``from_pretrained``)."""
    from psalign.testing import build_tiny_sd15_pipeline

    return build_tiny_sd15_pipeline(tmp_path_factory.mktemp("tiny_sd15"))


@pytest.fixture(scope="session")
def tiny_sdxl_path(tmp_path_factory) -> Path:
    """A tiny SDXL-shaped pipeline written with ``save_pretrained``."""
    from psalign.testing import build_tiny_sdxl_pipeline

    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny_sdxl"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The reference data folder beside the checkout; tests using it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"reference data folder {SHARED_DATA} is not present")
    return SHARED_DATA


@pytest.fixture
def one_torch_thread():
    """Tiny models on a machine with few cores, and other work on them, run many times faster on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reset_accelerate_state() -> None:
    """Accelerate keeps one process-wide state (mixed precision included): reset it between runs."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def fresh_accelerate_state(one_torch_thread):
    """One torch thread and a fresh Accelerate state per test (training modules use it for every test)."""
    yield
    reset_accelerate_state()
