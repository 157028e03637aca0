"""d2s_nerf_ros: onboard visual relocalisation with D2S (descriptors to scene coordinates).

The onboard runtime in this package must stay importable without the offline stack
(nerfstudio, pycolmap, rosbags): a robot runs the localizer node without it.
"""

__version__ = "0.1.0"
