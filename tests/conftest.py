import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import pytest

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).parent.parent


def pytest_configure(config: pytest.Config) -> None:
    # pytest-xdist runs one worker per core (pyproject's addopts): each worker, and every command its
    # tests start (they inherit the environment), then gets one thread. Two workers with two OpenMP
    # threads each oversubscribe two cores, and spinning OpenMP threads run many times slower.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)


def monailabel_module(name: str) -> Any:
    """monailabel/lib/NAME.py, imported by path as a module of a package (its relative imports work):
    the app's ``lib`` is not on the project's sys.path. Only modules that do not import MONAI Label."""
    package = "cryosxt_monailabel_lib"
    if package not in sys.modules:
        lib = REPO / "monailabel" / "lib"
        spec = importlib.util.spec_from_file_location(
            package, lib / "__init__.py", submodule_search_locations=[str(lib)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[package] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"{package}.{name}")


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


@pytest.fixture(scope="module")
def one_torch_thread():
    """In-process forward passes on one thread: the CPU is shared, and oversubscribed threads make
    them many times slower. Modules opt in with ``pytestmark = pytest.mark.usefixtures(...)``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
