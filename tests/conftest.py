import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one CPU thread is fastest, and avoids thrashing when the machine is shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """One end-to-end `chatforge demo --config tiny` run, shared by the end-to-end tests."""
    from chatforge.cli import main

    run_dir = tmp_path_factory.mktemp("e2e") / "tiny"
    assert main(["demo", "--config", "tiny", "--run-dir", str(run_dir)]) == 0
    return run_dir
