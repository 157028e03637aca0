"""Start the d2s_nerf_ros localizer node.

    ros2 launch d2s_nerf_ros localize.launch.py map:=/maps/kitchen
    ros2 launch d2s_nerf_ros localize.launch.py map:=/maps/kitchen image_topic:=/cam/color/image_raw \
        camera_info_topic:=/cam/color/camera_info device:=cuda namespace:=robot1 use_sim_time:=true \
        params_file:=/path/to/my_localizer.yaml

Every parameter lives in ``params_file`` (default: the package's config/localizer.yaml, keyed
``/**`` so a namespaced or renamed node keeps its parameters). The launch arguments below
override it only when given (an empty value keeps the file's).

The node's process gets ``FASTDDS_DEFAULT_PROFILES_FILE`` = ``fastdds_profile`` (the package's
config/fastdds_shm_large.xml: a shared-memory segment large enough for raw camera frames)
unless the environment names a profile already. The camera driver needs the same export: the
publisher's segment is what decides whether a raw frame arrives.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction, SetEnvironmentVariable
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

PACKAGE = "d2s_nerf_ros"
FASTDDS_PROFILE_VARIABLE = "FASTDDS_DEFAULT_PROFILES_FILE"

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
    use_sim_time = LaunchConfiguration("use_sim_time").perform(context).strip().lower()
    if use_sim_time not in ("true", "false"):
        raise RuntimeError(f"launch argument use_sim_time must be true or false, got {use_sim_time!r}")
    overrides["use_sim_time"] = use_sim_time == "true"
    params_file = LaunchConfiguration("params_file").perform(context)
    actions = []
    profile = LaunchConfiguration("fastdds_profile").perform(context).strip()
    if profile and not os.environ.get(FASTDDS_PROFILE_VARIABLE):
        actions.append(SetEnvironmentVariable(FASTDDS_PROFILE_VARIABLE, profile))
    actions.append(
        Node(
            package=PACKAGE,
            executable="localizer",
            name="localizer",
            namespace=LaunchConfiguration("namespace").perform(context).strip(),
            output="screen",
            emulate_tty=True,
            parameters=[params_file, overrides],
        )
    )
    return actions


def generate_launch_description():
    default_params = os.path.join(get_package_share_directory(PACKAGE), "config", "localizer.yaml")
    default_profile = os.path.join(get_package_share_directory(PACKAGE), "config", "fastdds_shm_large.xml")
    return LaunchDescription([
        DeclareLaunchArgument("map", default_value="", description="map bundle directory (parameter map_path)"),
        DeclareLaunchArgument("image_topic", default_value="", description="sensor_msgs/Image topic (empty: from params_file)"),
        DeclareLaunchArgument("camera_info_topic", default_value="", description="sensor_msgs/CameraInfo topic (empty: from params_file)"),
        DeclareLaunchArgument("device", default_value="", description="auto | cuda | cpu (empty: from params_file)"),
        DeclareLaunchArgument("params_file", default_value=default_params, description="YAML file with the node's parameters"),
        DeclareLaunchArgument("namespace", default_value="", description="namespace of the node (its ~/pose, relative topics)"),
        DeclareLaunchArgument("use_sim_time", default_value="false", description="true: the node's clock is /clock (bag playback, simulation)"),
        DeclareLaunchArgument("fastdds_profile", default_value=default_profile,
                              description=f"Fast DDS XML profile exported as {FASTDDS_PROFILE_VARIABLE} unless one is set; empty: none"),
        OpaqueFunction(function=_localizer_node),
    ])
