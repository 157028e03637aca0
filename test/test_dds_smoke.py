"""Two real processes talk over DDS: a publisher subprocess and this test process.

The publisher sends tf2_msgs/msg/TFMessage on /tf (the type generated into the venv by
scripts/build_tf2_msgs.sh) and a std_msgs/msg/String; this process subscribes with rclpy and
checks that what arrives is exactly what was sent (a per-run nonce in every field that can
carry one), and that the ROS graph names /tf with the standard type.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

pytestmark = pytest.mark.dds

WAIT_S = 60.0  # upper bound; on a quiet machine both arrive in a few seconds

PUBLISHER_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import rclpy
    from geometry_msgs.msg import TransformStamped
    from std_msgs.msg import String
    from tf2_msgs.msg import TFMessage

    nonce, tf_topic, text_topic, run_s = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    rclpy.init()
    node = rclpy.create_node("dds_smoke_publisher_" + nonce)
    tf_pub = node.create_publisher(TFMessage, tf_topic, 10)
    text_pub = node.create_publisher(String, text_topic, 10)

    def transform(child, x, y, z, qw, qx, qy, qz):
        t = TransformStamped()
        t.header.stamp.sec, t.header.stamp.nanosec = 1234, 5678
        t.header.frame_id = "map"
        t.child_frame_id = child
        t.transform.translation.x, t.transform.translation.y, t.transform.translation.z = x, y, z
        t.transform.rotation.w, t.transform.rotation.x = qw, qx
        t.transform.rotation.y, t.transform.rotation.z = qy, qz
        return t

    message = TFMessage(transforms=[
        transform("odom_" + nonce, 1.5, -2.25, 0.125, 1.0, 0.0, 0.0, 0.0),
        transform("camera_" + nonce, 0.0, 3.0, -4.0, 0.5, 0.5, -0.5, 0.5),
    ])
    print("publisher ready", flush=True)
    deadline = time.monotonic() + run_s
    while time.monotonic() < deadline:
        tf_pub.publish(message)
        text_pub.publish(String(data="hello " + nonce))
        rclpy.spin_once(node, timeout_sec=0.1)
    node.destroy_node()
    rclpy.shutdown()
    """
)


def test_tf_and_string_cross_process_over_dds(tmp_path) -> None:
    import rclpy
    from rclpy.context import Context
    from rclpy.executors import SingleThreadedExecutor
    from std_msgs.msg import String
    from tf2_msgs.msg import TFMessage

    assert os.environ.get("ROS_AUTOMATIC_DISCOVERY_RANGE") == "LOCALHOST", "DDS must stay on loopback"
    assert os.environ.get("ROS_DOMAIN_ID"), "tests run on a private ROS_DOMAIN_ID"

    nonce = uuid.uuid4().hex[:8]
    tf_topic = "/tf"
    text_topic = f"/dds_smoke_{nonce}/text"
    script = tmp_path / "publisher.py"
    script.write_text(PUBLISHER_SCRIPT)
    log_path = tmp_path / "publisher.log"

    context = Context()
    rclpy.init(context=context)
    publisher = None
    node = rclpy.create_node(f"dds_smoke_listener_{nonce}", context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    try:
        tf_received: list[TFMessage] = []
        text_received: list[str] = []

        def on_tf(message: TFMessage) -> None:
            # /tf is shared with anything else on this domain: keep only this run's message.
            if any(t.child_frame_id.endswith(nonce) for t in message.transforms):
                tf_received.append(message)

        node.create_subscription(TFMessage, tf_topic, on_tf, 10)
        node.create_subscription(String, text_topic, lambda m: text_received.append(m.data), 10)

        with open(log_path, "w") as log:
            publisher = subprocess.Popen(
                [sys.executable, str(script), nonce, tf_topic, text_topic, str(WAIT_S + 10)],
                stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy(),
            )
        deadline = time.monotonic() + WAIT_S
        while (not tf_received or not text_received) and time.monotonic() < deadline:
            if publisher.poll() is not None:
                break
            executor.spin_once(timeout_sec=0.1)

        topic_types = dict(node.get_topic_names_and_types())
        publisher_log = log_path.read_text()
        if publisher.poll() is not None and (not tf_received or not text_received):
            pytest.fail(f"publisher process exited early (code {publisher.returncode}):\n{publisher_log}")
        assert tf_received, (
            f"no tf2_msgs/TFMessage from the publisher process on {tf_topic} within {WAIT_S:.0f} s "
            f"(ROS_DOMAIN_ID={os.environ.get('ROS_DOMAIN_ID')}); publisher log:\n{publisher_log}"
        )
        assert text_received, (
            f"no std_msgs/String on {text_topic} within {WAIT_S:.0f} s; publisher log:\n{publisher_log}"
        )
        assert topic_types.get(tf_topic) == ["tf2_msgs/msg/TFMessage"]
        assert topic_types.get(text_topic) == ["std_msgs/msg/String"]
    finally:
        if publisher is not None and publisher.poll() is None:
            publisher.terminate()
            try:
                publisher.wait(timeout=10)
            except subprocess.TimeoutExpired:
                publisher.kill()
                publisher.wait()
        executor.shutdown()
        node.destroy_node()
        rclpy.shutdown(context=context)

    assert text_received[0] == f"hello {nonce}"
    transforms = tf_received[0].transforms
    assert [t.child_frame_id for t in transforms] == [f"odom_{nonce}", f"camera_{nonce}"]
    assert all(t.header.frame_id == "map" for t in transforms)
    assert (transforms[0].header.stamp.sec, transforms[0].header.stamp.nanosec) == (1234, 5678)
    first, second = transforms[0].transform, transforms[1].transform
    assert (first.translation.x, first.translation.y, first.translation.z) == (1.5, -2.25, 0.125)
    assert (second.translation.x, second.translation.y, second.translation.z) == (0.0, 3.0, -4.0)
    assert (second.rotation.w, second.rotation.x, second.rotation.y, second.rotation.z) == (0.5, 0.5, -0.5, 0.5)
