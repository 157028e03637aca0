"""The one CameraInfo -> CameraIntrinsics converter (``d2s_nerf_ros.camera``), on real rclpy and
rosbags messages: every supported distortion model, rectified input (P, D ignored), bad messages.
The undistortion each model implies is checked against OpenCV's own projection."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from d2s_nerf_ros.camera import CameraInfoError, CameraIntrinsics, camera_from_camera_info, rectification_hint
from offline.replay import camera_info_fields

K_FIELDS = [525.0, 0.0, 319.5, 0.0, 520.0, 239.5, 0.0, 0.0, 1.0]
P_FIELDS = [500.0, 0.0, 321.0, 0.0, 0.0, 502.0, 238.0, 0.0, 0.0, 0.0, 1.0, 0.0]
MODELS = {
    "plumb_bob": [0.12, -0.21, 0.001, -0.002, 0.05],
    "rational_polynomial": [0.12, -0.21, 0.001, -0.002, 0.05, 0.01, -0.02, 0.003],
    "rational_polynomial_12": [0.12, -0.21, 0.001, -0.002, 0.05, 0.01, -0.02, 0.003, 0.001, -0.001, 0.0005, 0.0002],
    "rational_polynomial_14": [0.12, -0.21, 0.001, -0.002, 0.05, 0.01, -0.02, 0.003, 0.001, -0.001, 0.0005, 0.0002,
                               0.001, -0.002],
    "equidistant": [0.05, 0.01, -0.004, 0.001],
}


def ros_info(model: str = "plumb_bob", d=None, k=None, p=None, r=None, width=640, height=480, **extra):
    from sensor_msgs.msg import CameraInfo

    msg = CameraInfo(width=width, height=height, distortion_model=model, d=[0.0] * 5 if d is None else list(d),
                     k=K_FIELDS if k is None else k, p=P_FIELDS if p is None else p,
                     r=[1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0] if r is None else r)
    for name, value in extra.items():
        setattr(msg, name, value)
    return msg


@pytest.mark.parametrize("name", sorted(MODELS))
def test_each_distortion_model_undistorts_like_opencv(name):
    coefficients = MODELS[name]
    ros_model = name.split("_1")[0]
    camera = camera_from_camera_info(ros_info(ros_model, coefficients))
    expected_model = "equidistant" if name == "equidistant" else ros_model
    assert camera.distortion_model == expected_model and camera.distortion == tuple(coefficients)
    assert (camera.fx, camera.fy, camera.cx, camera.cy) == (525.0, 520.0, 319.5, 239.5)
    # Ideal pixels -> distorted with OpenCV's own projection -> back through the converter's camera.
    rng = np.random.default_rng(0)
    ideal = rng.uniform([80, 60], [560, 420], (50, 2))
    rays = np.concatenate([cv2.undistortPoints(ideal.reshape(-1, 1, 2), camera.K, None).reshape(-1, 2),
                           np.ones((50, 1))], axis=1)
    D = np.asarray(coefficients)
    if name == "equidistant":
        distorted = cv2.fisheye.projectPoints(rays.reshape(-1, 1, 3), np.zeros(3), np.zeros(3), camera.K, D)[0]
    else:
        distorted = cv2.projectPoints(rays, np.zeros(3), np.zeros(3), camera.K, D)[0]
    distorted = distorted.reshape(-1, 2)
    assert np.abs(distorted - ideal).max() > 1.0  # the model really distorts
    np.testing.assert_allclose(camera.undistort_points(distorted), ideal, atol=0.05)


def test_rectified_uses_p_and_ignores_d():
    msg = ros_info("plumb_bob", MODELS["plumb_bob"])
    camera = camera_from_camera_info(msg, rectified=True)
    assert (camera.fx, camera.fy, camera.cx, camera.cy) == (500.0, 502.0, 321.0, 238.0)
    assert camera.distortion_model == "none" and not camera.has_distortion
    # Raw (the default) reads K and D from the same message.
    raw = camera_from_camera_info(msg)
    assert (raw.fx, raw.cx) == (525.0, 319.5) and raw.has_distortion
    # Even an unsupported distortion model is irrelevant once the images are rectified.
    assert camera_from_camera_info(ros_info("kannala_brandt", [0.1] * 9), rectified=True).fx == 500.0


def test_rosbags_messages_convert_the_same():
    from rosbags.typesys import Stores, get_typestore

    types = get_typestore(Stores.ROS2_HUMBLE).types
    roi = types["sensor_msgs/msg/RegionOfInterest"](x_offset=0, y_offset=0, height=0, width=0, do_rectify=False)
    header = types["std_msgs/msg/Header"](stamp=types["builtin_interfaces/msg/Time"](sec=1, nanosec=0), frame_id="cam")
    msg = types["sensor_msgs/msg/CameraInfo"](
        header=header, height=0, width=0, distortion_model="rational_polynomial",
        d=np.array(MODELS["rational_polynomial"]), k=np.array(K_FIELDS), r=np.eye(3).reshape(-1),
        p=np.array(P_FIELDS), binning_x=0, binning_y=0, roi=roi)
    # A driver that leaves the size 0: the image gives it.
    camera = camera_from_camera_info(msg, image_size=(640, 480))
    assert camera == camera_from_camera_info(ros_info("rational_polynomial", MODELS["rational_polynomial"]))
    assert camera_from_camera_info(msg, rectified=True, image_size=(640, 480)).fx == 500.0


def test_round_trip_through_replay_fields():
    from sensor_msgs.msg import CameraInfo

    for camera in (CameraIntrinsics(640, 480, 525.0, 520.0, 319.5, 239.5),
                   CameraIntrinsics(640, 480, 500.0, 500.0, 320.0, 240.0, "plumb_bob", (0.1, -0.2, 0.001, 0.002, 0.05)),
                   CameraIntrinsics(640, 480, 500.0, 500.0, 320.0, 240.0, "rational_polynomial", tuple(MODELS["rational_polynomial_14"])),
                   CameraIntrinsics(1280, 720, 400.0, 400.0, 640.0, 360.0, "equidistant", (0.1, 0.01, -0.01, 0.001))):
        assert camera_from_camera_info(CameraInfo(**camera_info_fields(camera))) == camera


def test_maps_with_eight_plumb_bob_coefficients_still_load():
    # Maps written before rational_polynomial had its own name store 8 coefficients as plumb_bob.
    old = CameraIntrinsics.from_dict({"width": 640, "height": 480, "fx": 500, "fy": 500, "cx": 320, "cy": 240,
                                      "distortion_model": "plumb_bob", "distortion": MODELS["rational_polynomial"]})
    assert old.has_distortion


@pytest.mark.parametrize("msg_kwargs, rectified, fragment", [
    (dict(model="kannala_brandt", d=[0.1] * 9), False, "distortion model 'kannala_brandt' is not supported"),
    (dict(model="kannala_brandt", d=[0.0] * 9), False, "distortion model 'kannala_brandt' is not supported"),
    (dict(model="rational_polynomial", d=[0.1] * 5), False, "rational_polynomial distortion needs 8 or 12 or 14"),
    (dict(model="equidistant", d=[0.1] * 5), False, "equidistant distortion needs 4 coefficients"),
    (dict(model="plumb_bob", d=[0.1] * 3), False, "plumb_bob distortion needs 4 or 5 or 8"),
    (dict(k=[0.0] * 9), False, "focal lengths must be positive"),
    (dict(k=[float("nan")] + K_FIELDS[1:]), False, "must be finite"),
    (dict(width=0, height=0), False, "has no image size"),
    (dict(p=[0.0] * 12), True, "need a calibrated projection matrix P"),
    (dict(r=[0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]), True, "R is not the identity"),
    (dict(binning_x=2, binning_y=2), False, "binning 2x2 is not supported"),
])
def test_bad_messages_say_what_is_wrong(msg_kwargs, rectified, fragment):
    with pytest.raises(CameraInfoError, match=fragment):
        camera_from_camera_info(ros_info(**msg_kwargs), rectified=rectified)


def test_not_a_camera_info():
    with pytest.raises(CameraInfoError, match="not a CameraInfo"):
        camera_from_camera_info(object())


def test_topic_name_is_only_a_hint():
    assert "looks rectified" in rectification_hint("/camera/image_rect", rectified=False)
    assert "looks raw" in rectification_hint("/camera/image_raw", rectified=True)
    assert rectification_hint("/camera/image_rect_color", rectified=True) == ""
    assert rectification_hint("/camera/image_raw", rectified=False) == ""
