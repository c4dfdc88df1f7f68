from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).parent.parent


@pytest.fixture
def fixtures_dir() -> Path:
    return DATA / "deep_sxt"


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    """Random width-4 weights: small enough that every runner test is quick."""
    import torch

    from scripts.network.double_decoder import DoubleDecoderNet

    torch.manual_seed(0)
    path = tmp_path / "w4.pt"
    torch.save(DoubleDecoderNet(width=4).state_dict(), path)
    return path
