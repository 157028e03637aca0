"""Shared fixtures. Data lives beside the checkout (../shared/data) and is never copied in."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("D2S_DATA_ROOT", REPO_ROOT.parent / "shared" / "data"))

# Every test process keeps DDS on loopback and on a domain of its own, and uses the package's
# Fast DDS profile (raw camera frames fit its shared-memory segment) before any rclpy.init.
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ.setdefault("ROS_DOMAIN_ID", str(random.Random(os.getpid()).randint(20, 99)))
os.environ.setdefault("FASTDDS_DEFAULT_PROFILES_FILE", str(REPO_ROOT / "config" / "fastdds_shm_large.xml"))


@pytest.fixture(scope="session")
def redkitchen_dir() -> Path:
    path = DATA_ROOT / "7scenes_redkitchen"
    if not (path / "seq-01").is_dir():
        message = f"RedKitchen data not found at {path} (set D2S_DATA_ROOT)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI always has ../shared beside the clone: missing data is a failure
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT
