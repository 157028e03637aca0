"""The launch file, the parameter file and the node's declared parameters agree.

launch / launch_ros are not installable in the pip environment, so the launch file is
checked statically: parsed with ``ast``, and every name it refers to (executable,
parameters, params file, launch arguments) is resolved against the package itself.
"""

from __future__ import annotations

import ast
import configparser
import fnmatch
import importlib
from pathlib import Path

import pytest
import yaml

from d2s_nerf_ros import node as localizer_node

LAUNCH_FILE = Path("launch/localize.launch.py")
PACKAGE = "d2s_nerf_ros"


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def module_constants(tree: ast.Module) -> dict[str, object]:
    """Module-level NAME = <literal> assignments."""
    out = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            try:
                out[stmt.targets[0].id] = ast.literal_eval(stmt.value)
            except ValueError:
                pass
    return out


def calls_named(tree: ast.AST, name: str) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)
            and ((isinstance(n.func, ast.Name) and n.func.id == name) or (isinstance(n.func, ast.Attribute) and n.func.attr == name))]


def value_of(node: ast.AST, constants: dict[str, object]) -> object:
    if isinstance(node, ast.Name):
        return constants[node.id]
    return ast.literal_eval(node)


def console_scripts(repo_root: Path) -> dict[str, str]:
    """name -> "module:function" from setup.py's entry_points and setup.cfg's [options.entry_points]."""
    scripts: dict[str, str] = {}
    setup_py = repo_root / "setup.py"
    if setup_py.is_file():
        for call in calls_named(parse(setup_py), "setup"):
            for kw in call.keywords:
                if kw.arg == "entry_points":
                    for line in ast.literal_eval(kw.value).get("console_scripts", []):
                        name, target = (part.strip() for part in line.split("=", 1))
                        scripts[name] = target
    setup_cfg = repo_root / "setup.cfg"
    if setup_cfg.is_file():
        cfg = configparser.ConfigParser()
        cfg.read(setup_cfg)
        if cfg.has_option("options.entry_points", "console_scripts"):
            for line in cfg.get("options.entry_points", "console_scripts").strip().splitlines():
                name, target = (part.strip() for part in line.split("=", 1))
                scripts[name] = target
    return scripts


def installed_data_patterns(repo_root: Path) -> dict[str, list[str]]:
    """setup.py data_files: install dir -> glob patterns / files it lists."""
    out: dict[str, list[str]] = {}
    for call in calls_named(parse(repo_root / "setup.py"), "setup"):
        for kw in call.keywords:
            if kw.arg != "data_files":
                continue
            for entry in kw.value.elts:
                dest, files = entry.elts
                dest_text = ast.unparse(dest).strip("f\"'").replace("{PACKAGE_NAME}", PACKAGE)
                patterns = [c.value for c in ast.walk(files) if isinstance(c, ast.Constant) and isinstance(c.value, str)]
                patterns = [p.replace("{PACKAGE_NAME}", PACKAGE) for p in patterns]
                out[dest_text] = patterns
    return out


@pytest.fixture(scope="module")
def launch_tree(repo_root: Path) -> ast.Module:
    return parse(repo_root / LAUNCH_FILE)


def test_launch_file_defines_generate_launch_description(launch_tree: ast.Module):
    functions = {n.name for n in launch_tree.body if isinstance(n, ast.FunctionDef)}
    assert "generate_launch_description" in functions


def test_every_executable_is_a_console_script_of_this_package(launch_tree: ast.Module, repo_root: Path):
    constants = module_constants(launch_tree)
    scripts = console_scripts(repo_root)
    nodes = calls_named(launch_tree, "Node")
    assert nodes, "the launch file starts no Node"
    for call in nodes:
        kwargs = {kw.arg: kw.value for kw in call.keywords}
        assert value_of(kwargs["package"], constants) == PACKAGE
        executable = value_of(kwargs["executable"], constants)
        assert executable in scripts, f"{executable!r} is not a console script in setup.py/setup.cfg ({sorted(scripts)})"
        module_name, function_name = scripts[executable].split(":")
        assert callable(getattr(importlib.import_module(module_name), function_name))
        # The YAML is keyed by the node name, so the launch name, the node's own and the file's must agree.
        assert value_of(kwargs["name"], constants) == localizer_node.NODE_NAME


def test_launch_arguments_are_declared_and_map_to_node_parameters(launch_tree: ast.Module):
    constants = module_constants(launch_tree)
    declared = {value_of(c.args[0], constants) for c in calls_named(launch_tree, "DeclareLaunchArgument")}
    assert {"map", "image_topic", "camera_info_topic", "device", "params_file"} <= declared
    used = {value_of(c.args[0], constants) for c in calls_named(launch_tree, "LaunchConfiguration") if c.args
            and not isinstance(c.args[0], ast.Name)}
    # LaunchConfiguration(argument) inside the override loop: its names are the OVERRIDES keys.
    used |= set(constants["OVERRIDES"])
    assert used <= declared, f"launch configurations {sorted(used - declared)} are never declared"
    node_parameters = {p.name for p in localizer_node.PARAMETERS}
    assert set(constants["OVERRIDES"].values()) <= node_parameters


def test_default_params_and_dds_profile_exist_and_are_installed(launch_tree: ast.Module, repo_root: Path):
    # os.path.join(get_package_share_directory(PACKAGE), "config", "localizer.yaml" | "fastdds_shm_large.xml")
    constants = module_constants(launch_tree)
    joins = [c for c in calls_named(launch_tree, "join")
             if c.args and isinstance(c.args[0], ast.Call) and getattr(c.args[0].func, "id", "") == "get_package_share_directory"]
    relatives = []
    for join in joins:
        assert value_of(join.args[0].args[0], constants) == PACKAGE
        relatives.append(Path(*[value_of(a, constants) for a in join.args[1:]]))
    assert sorted(r.as_posix() for r in relatives) == ["config/fastdds_shm_large.xml", "config/localizer.yaml"]
    installed = installed_data_patterns(repo_root)
    for relative in relatives:
        source = repo_root / relative
        assert source.is_file(), f"default file {relative} is not in the repository"
        share_dir = f"share/{PACKAGE}/{relative.parent.as_posix()}"
        assert any(fnmatch.fnmatch(relative.as_posix(), p) for p in installed.get(share_dir, [])), \
            f"setup.py does not install {relative} into {share_dir}"
    assert any(fnmatch.fnmatch(LAUNCH_FILE.as_posix(), p) for p in installed.get(f"share/{PACKAGE}/launch", []))


def test_the_dds_profile_is_a_fast_dds_profile_with_a_large_shared_memory_segment(repo_root: Path):
    import xml.etree.ElementTree as ET

    ns = {"dds": "http://www.eprosima.com"}
    root = ET.parse(repo_root / "config" / "fastdds_shm_large.xml").getroot()
    shm = [t for t in root.iterfind(".//dds:transport_descriptor", ns) if t.findtext("dds:type", namespaces=ns) == "SHM"]
    assert len(shm) == 1
    # 32 MB: a raw 640x480 rgb8 frame is 0.9 MB, 1920x1080 rgb8 6.2 MB; Fast DDS's default is 0.5 MB.
    assert int(shm[0].findtext("dds:segment_size", namespaces=ns)) >= 32 * 1024 * 1024
    participant = root.find(".//dds:participant", ns)
    assert participant.get("is_default_profile") == "true"
    used = [t.text for t in participant.iterfind(".//dds:userTransports/dds:transport_id", ns)]
    assert shm[0].findtext("dds:transport_id", namespaces=ns) in used
    assert participant.findtext(".//dds:useBuiltinTransports", namespaces=ns) == "false"


def test_namespace_and_sim_time_reach_the_node(launch_tree: ast.Module, repo_root: Path):
    constants = module_constants(launch_tree)
    declared = {value_of(c.args[0], constants) for c in calls_named(launch_tree, "DeclareLaunchArgument")}
    assert {"namespace", "use_sim_time", "fastdds_profile"} <= declared
    node_kwargs = {kw.arg for call in calls_named(launch_tree, "Node") for kw in call.keywords}
    assert "namespace" in node_kwargs
    # "/**" matches the node under any namespace (and name): a namespaced node keeps the file's parameters.
    doc = yaml.safe_load((repo_root / "config" / "localizer.yaml").read_text())
    assert list(doc) == ["/**"]


def load_params(repo_root: Path) -> dict:
    doc = yaml.safe_load((repo_root / "config" / "localizer.yaml").read_text())
    assert list(doc) == ["/**"]
    return doc["/**"]["ros__parameters"]


def test_yaml_parameters_are_exactly_the_declared_ones_with_the_same_defaults(repo_root: Path):
    params = load_params(repo_root)
    declared = {p.name: p.default for p in localizer_node.PARAMETERS}
    assert set(params) - set(declared) == set(), "the YAML sets parameters the node does not declare"
    assert set(declared) - set(params) == set(), "the YAML does not document every parameter"
    for name, default in declared.items():
        assert type(params[name]) is type(default), f"{name}: YAML type {type(params[name]).__name__}, node {type(default).__name__}"
        assert params[name] == default, f"{name}: YAML {params[name]!r} differs from the node default {default!r}"


def test_yaml_values_pass_the_node_validation(repo_root: Path):
    params = dict(load_params(repo_root), map_path="/maps/kitchen")
    settings = localizer_node.settings_from_values(params)
    assert settings.map_frame == "map" and settings.device == "auto"
    # REP-105 by default: map -> odom, the pose of base_link.
    assert settings.odom_frame == "odom" and settings.base_frame == "base_link" and not settings.allow_tf_without_odom


def test_every_parameter_has_a_description():
    names = [p.name for p in localizer_node.PARAMETERS]
    assert len(names) == len(set(names))
    for p in localizer_node.PARAMETERS:
        assert len(p.description) > 20, p.name


GOOD = {"map_path": "/maps/kitchen"}


@pytest.mark.parametrize("name, value, message", [
    ("map_path", "", "map_path is required"),
    ("map_path", "   ", "map_path is required"),
    ("device", "tpu", "device must be auto, cuda or cpu"),
    ("max_keypoints", 0, "max_keypoints must be an integer >= 4"),
    ("max_keypoints", 2.5, "max_keypoints must be an integer"),
    ("max_keypoints", True, "max_keypoints must be an integer"),
    ("reliability_threshold", 1.5, r"reliability_threshold must be a number in \[0.0, 1.0\]"),
    ("reliability_threshold", float("nan"), "reliability_threshold must be a number"),
    ("ransac_threshold_px", 0.0, r"ransac_threshold_px must be a number in \(0.0"),
    ("ransac_iterations", -1, "ransac_iterations must be an integer >= 1"),
    ("min_inliers", 3, "min_inliers must be an integer >= 4"),
    ("map_frame", "", "map_frame must not be empty"),
    ("odom_frame", "map", "odom_frame must differ from map_frame"),
    ("base_frame", "map", "base_frame 'map' must differ"),
    ("publish_tf", "yes", "publish_tf must be true or false"),
    ("transform_tolerance", -0.1, "transform_tolerance must be a number"),
    ("tf_publish_rate", -1.0, "tf_publish_rate must be a number"),
    ("max_jump_translation_m", 0.0, "max_jump_translation_m must be a number"),
    ("min_consistent_frames", 0, "min_consistent_frames must be an integer >= 1"),
    ("allow_tf_without_odom", 1, "allow_tf_without_odom must be true or false"),
    ("mode", "sometimes", "mode must be continuous or on_demand"),
    ("pose_durability", "forever", "pose_durability must be volatile or transient_local"),
    ("relocalize_timeout", 0.0, "relocalize_timeout must be a number"),
    ("autostart", "yes", "autostart must be true or false"),
    ("image_topic", "", "image_topic must not be empty"),
    ("no_such_parameter", 1, "unknown parameter"),
])
def test_bad_values_name_the_parameter(name: str, value: object, message: str):
    with pytest.raises(ValueError, match=message):
        localizer_node.settings_from_values(dict(GOOD, **{name: value}))


def test_initial_pose_needs_the_base_frame():
    with pytest.raises(ValueError, match="publish_initial_pose needs base_frame"):
        localizer_node.settings_from_values(dict(GOOD, publish_initial_pose=True, base_frame=""))


def test_integers_are_accepted_for_doubles_and_frames_lose_leading_slashes():
    s = localizer_node.settings_from_values(dict(GOOD, transform_tolerance=1, ransac_threshold_px=8, odom_frame="/odom"))
    assert s.transform_tolerance == 1.0 and isinstance(s.transform_tolerance, float)
    assert s.ransac_threshold_px == 8.0 and s.odom_frame == "odom"
