"""Errors shared by the onboard modules (no torch, no ROS imports)."""


class FrameRejected(Exception):
    """A frame that cannot be localised; the message is the reason (shown in diagnostics and results)."""
