import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


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
