"""A real `colcon build` of this repository as a ROS 2 package in a temporary workspace.

The workspace's src/ holds what a clone holds (git's tracked and not-ignored files), so the
test sees the package exactly as a robot's workspace would. colcon (colcon-core, colcon-ros,
colcon-python-setup-py) runs from the venv; it must find one package, d2s_nerf_ros (colcon
does not look for packages inside a package, so interfaces/tf2_msgs, which only feeds the
pip venv, stays out of a robot's workspace), and install the console scripts into lib/d2s_nerf_ros (for `ros2 run`), launch/ and config/ into share/d2s_nerf_ros,
the package manifest and the ament index marker.
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytestmark = pytest.mark.builds  # maps or colcon: left out of make test-fast

PACKAGE = "d2s_nerf_ros"
EXECUTABLES = {"localizer": "d2s_nerf_ros.node", "d2s-nerf": "offline.cli"}
# The onboard runtime must run on a robot without the offline stack.
OFFLINE_ONLY_MODULES = ("nerfstudio", "pycolmap", "rosbags")


def _clone_files(repo_root: Path) -> list[str]:
    """Files a fresh clone would have: tracked plus untracked-but-not-ignored."""
    result = subprocess.run(
        ["git", "-C", str(repo_root), "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        check=True, capture_output=True,
    )
    return [name for name in result.stdout.decode().split("\0") if name and (repo_root / name).is_file()]


@pytest.fixture(scope="module")
def colcon_workspace(repo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    workspace = tmp_path_factory.mktemp("colcon_ws")
    source = workspace / "src" / PACKAGE
    for name in _clone_files(repo_root):
        target = source / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo_root / name, target)

    colcon = Path(sys.executable).parent / "colcon"
    assert colcon.exists(), f"colcon is not installed beside {sys.executable} (run make setup)"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COLCON_", "AMENT_"))}
    env["COLCON_HOME"] = str(workspace / ".colcon_home")  # no user defaults/mixins
    result = subprocess.run(
        [str(colcon), "--log-base", "log", "build", "--base-paths", "src",
         "--event-handlers", "console_direct+"],
        cwd=workspace, env=env, capture_output=True, text=True, timeout=600,
    )
    return {"workspace": workspace, "result": result, "install": workspace / "install" / PACKAGE}


def test_colcon_builds_exactly_this_package(colcon_workspace: dict) -> None:
    result = colcon_workspace["result"]
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"colcon build failed (exit {result.returncode}):\n{output[-6000:]}"
    built = sorted(p.name for p in (colcon_workspace["workspace"] / "install").iterdir() if p.is_dir())
    assert built == [PACKAGE], f"colcon installed {built}: only {PACKAGE} should be a package here"


def test_executables_installed_for_ros2_run(colcon_workspace: dict) -> None:
    lib_dir = colcon_workspace["install"] / "lib" / PACKAGE
    for name, module in EXECUTABLES.items():
        path = lib_dir / name
        assert path.is_file(), f"{path} missing: console script '{name}' is not installed into lib/{PACKAGE}"
        assert os.access(path, os.X_OK), f"{path} is not executable"
        assert path.read_text().startswith("#!"), f"{path} has no interpreter line"
    # setuptools' scripts look their target up in the installed entry points.
    site_packages = colcon_workspace["install"] / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    entry_points = [p / "entry_points.txt" for p in site_packages.glob("d2s_nerf_ros*-info")]
    assert len(entry_points) == 1 and entry_points[0].is_file(), f"no installed metadata in {site_packages}"
    parser = configparser.ConfigParser(delimiters=("=",))
    parser.read(entry_points[0])
    scripts = {name: target.strip() for name, target in parser["console_scripts"].items()}
    assert scripts == {name: f"{module}:main" for name, module in EXECUTABLES.items()}


def test_share_files_installed(colcon_workspace: dict) -> None:
    install = colcon_workspace["install"]
    share = install / "share" / PACKAGE
    for relative in ("launch/localize.launch.py", "config/localizer.yaml", "package.xml"):
        assert (share / relative).is_file(), f"share/{PACKAGE}/{relative} is not installed"
    marker = install / "share" / "ament_index" / "resource_index" / "packages" / PACKAGE
    assert marker.is_file(), "ament index marker missing: `ros2 pkg` / get_package_share_directory will not find the package"
    manifest = ET.parse(share / "package.xml").getroot()
    assert manifest.get("format") == "3"
    assert manifest.findtext("name") == PACKAGE
    assert manifest.findtext("export/build_type") == "ament_python"


def test_python_packages_installed_and_runtime_is_light(colcon_workspace: dict, tmp_path: Path) -> None:
    install = colcon_workspace["install"]
    site_packages = install / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    for package in ("d2s_nerf_ros", "offline"):
        assert (site_packages / package / "__init__.py").is_file(), f"{package} not installed in {site_packages}"
    assert not (site_packages / "test").exists(), "the test folder must not be installed as a package"

    # Import the node module from the install space (not the checkout) and check that it
    # pulled in none of the offline stack.
    probe = (
        "import sys, d2s_nerf_ros.node as node\n"
        f"assert node.__file__.startswith({str(site_packages)!r}), node.__file__\n"
        f"heavy = [m for m in {OFFLINE_ONLY_MODULES!r} if m in sys.modules]\n"
        "assert not heavy, f'd2s_nerf_ros.node imports the offline stack: {heavy}'\n"
        "assert callable(node.main)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site_packages)}
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"importing the installed node failed:\n{result.stdout}{result.stderr}"


def test_installed_offline_cli_answers_help(colcon_workspace: dict, tmp_path: Path) -> None:
    install = colcon_workspace["install"]
    site_packages = install / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    env = {**os.environ, "PYTHONPATH": str(site_packages)}
    result = subprocess.run([str(install / "lib" / PACKAGE / "d2s-nerf"), "--help"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, f"d2s-nerf --help failed:\n{result.stdout}{result.stderr}"
    assert "usage" in result.stdout.lower()


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, separator, version = line.partition("==")
            assert separator and version, f"{path.name}: '{line}' is not pinned with =="
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def test_every_requirement_is_pinned_and_agrees_with_the_lock(repo_root: Path) -> None:
    requirements = repo_root / "requirements"
    lock = _pins(requirements / "lock.txt")
    assert len(lock) > 100, "lock.txt should hold the full pin set of a working venv (make lock)"
    for name in ("torch.txt", "ros.txt", "offline.txt", "nodeps.txt", "test.txt", "onboard.txt"):
        for package, version in _pins(requirements / name).items():
            assert lock.get(package) == version, (
                f"requirements/{name} pins {package}=={version}, lock.txt has {lock.get(package)}: "
                "run make setup, then make lock"
            )
    assert "opencv-python" not in lock, "opencv-python must not sit beside opencv-python-headless"
    assert "d2s-nerf-ros" not in lock, "the project itself is installed from the repository, not the lock"


def test_versions_agree(repo_root: Path) -> None:
    import re

    manifest_version = ET.parse(repo_root / "package.xml").getroot().findtext("version")
    setup_version = re.search(r'version="([^"]+)"', (repo_root / "setup.py").read_text()).group(1)
    import d2s_nerf_ros

    assert manifest_version == setup_version == d2s_nerf_ros.__version__
