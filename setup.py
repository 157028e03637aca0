"""Build/install script of the ROS 2 ament_python package d2s_nerf_ros.

colcon (`colcon build`) and pip (`pip install -e .`, done by `make setup`) both use it.
Dependencies are not declared here: they come from rosdep (package.xml) on a robot and
from the pinned files in requirements/ in the development venv.
"""

from glob import glob

from setuptools import find_packages, setup

PACKAGE_NAME = "d2s_nerf_ros"

setup(
    name=PACKAGE_NAME,
    version="0.1.0",
    description="D2S + NeRF visual relocalisation: ROS 2 localizer node and offline map tools",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["d2s_nerf_ros", "d2s_nerf_ros.*", "offline", "offline.*"]),
    include_package_data=False,
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE_NAME}"]),
        (f"share/{PACKAGE_NAME}", ["package.xml"]),
        (f"share/{PACKAGE_NAME}/launch", sorted(glob("launch/*.launch.py"))),
        (f"share/{PACKAGE_NAME}/config", sorted(glob("config/*.yaml") + glob("config/*.xml"))),
    ],
    install_requires=["setuptools"],
    zip_safe=False,
    entry_points={
        "console_scripts": [
            "localizer = d2s_nerf_ros.node:main",
            "d2s-nerf = offline.cli:main",
        ],
    },
)
