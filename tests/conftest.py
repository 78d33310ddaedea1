import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
# scripts run as processes by the distributed tests, not test modules (nor doctests)
collect_ignore = ["training/distributed_worker.py", "training/peer_killed_worker.py"]
# one thread per worker under pytest-xdist (the README runs the suite on all cores)
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def mnist_dir() -> Path:
    path = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
    if not path.exists():
        pytest.skip(f"real MNIST not found at {path}")
    return path
