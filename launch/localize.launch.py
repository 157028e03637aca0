"""Start the d2s_nerf_ros localizer node.

    ros2 launch d2s_nerf_ros localize.launch.py map:=/maps/kitchen
    ros2 launch d2s_nerf_ros localize.launch.py map:=/maps/kitchen image_topic:=/cam/color/image_raw \
        camera_info_topic:=/cam/color/camera_info device:=cuda params_file:=/path/to/my_localizer.yaml

Every parameter lives in ``params_file`` (default: the package's config/localizer.yaml).
The launch arguments below override it only when given (an empty value keeps the file's).
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

PACKAGE = "d2s_nerf_ros"

# launch argument -> node parameter it overrides when non-empty
OVERRIDES = {
    "map": "map_path",
    "image_topic": "image_topic",
    "camera_info_topic": "camera_info_topic",
    "device": "device",
}


def _localizer_node(context, *args, **kwargs):
    overrides = {}
    for argument, parameter in OVERRIDES.items():
        value = LaunchConfiguration(argument).perform(context).strip()
        if value:
            overrides[parameter] = value
    params_file = LaunchConfiguration("params_file").perform(context)
    return [
        Node(
            package=PACKAGE,
            executable="localizer",
            name="localizer",
            output="screen",
            emulate_tty=True,
            parameters=[params_file, overrides],
        )
    ]


def generate_launch_description():
    default_params = os.path.join(get_package_share_directory(PACKAGE), "config", "localizer.yaml")
    return LaunchDescription([
        DeclareLaunchArgument("map", default_value="", description="map bundle directory (parameter map_path)"),
        DeclareLaunchArgument("image_topic", default_value="", description="sensor_msgs/Image topic (empty: from params_file)"),
        DeclareLaunchArgument("camera_info_topic", default_value="", description="sensor_msgs/CameraInfo topic (empty: from params_file)"),
        DeclareLaunchArgument("device", default_value="", description="auto | cuda | cpu (empty: from params_file)"),
        DeclareLaunchArgument("params_file", default_value=default_params, description="YAML file with the node's parameters"),
        OpaqueFunction(function=_localizer_node),
    ])
