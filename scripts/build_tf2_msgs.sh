#!/usr/bin/env bash
# Generate tf2_msgs/msg/TFMessage from interfaces/tf2_msgs with the rosidl wheels and
# install it into a venv that already holds the ROS 2 (Kilted) wheels.
#
# Why: PyPI has no tf2_msgs wheel, and /tf must carry the standard tf2_msgs/msg/TFMessage
# type. The wheels' prefix (the venv itself) is an ament prefix, so a plain CMake build
# with CMAKE_INSTALL_PREFIX=$VENV lands the Python package in site-packages and the
# typesupport libraries in $VENV/lib, where the wheels' loader (ros_wheels_bootstrapper
# puts $VENV/lib on LD_LIBRARY_PATH) finds them.
#
# Usage: scripts/build_tf2_msgs.sh [VENV]     (default: $VENV or <repo>/.venv)
# Idempotent: a stamp in $VENV/share/tf2_msgs records the hash of the sources and of
# this script; a second run with nothing changed only checks the import.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$(realpath -m "${1:-${VENV:-$REPO_ROOT/.venv}}")"
PY="$VENV/bin/python"
SRC="$REPO_ROOT/interfaces/tf2_msgs"
STAMP="$VENV/share/tf2_msgs/.d2s_build_stamp"

say() { echo "[build_tf2_msgs] $*"; }

[[ -x "$PY" ]] || { echo "[build_tf2_msgs] no python at $PY (run scripts/setup_env.sh first)" >&2; exit 1; }
for tool in cmake make c++ cc; do
  command -v "$tool" >/dev/null || { echo "[build_tf2_msgs] '$tool' not found: install cmake and a C/C++ compiler (apt-get install cmake build-essential)" >&2; exit 1; }
done

# The generated code links against geometry_msgs, the rosidl runtime and numpy: a change of
# any of their versions asks for a rebuild too.
installed_versions() {
  "$PY" -c 'import importlib.metadata as m
for name in ("ros-geometry-msgs", "ros-rosidl-generator-py", "ros-rosidl-runtime-c", "ros-rmw-fastrtps-cpp", "numpy"):
    try:
        print(name, m.version(name))
    except m.PackageNotFoundError:
        print(name, "missing")'
}
source_hash="$( (cd "$REPO_ROOT" && cat scripts/build_tf2_msgs.sh interfaces/tf2_msgs/package.xml \
  interfaces/tf2_msgs/CMakeLists.txt interfaces/tf2_msgs/msg/*.msg; installed_versions) | sha256sum | cut -d' ' -f1)"

import_check() {
  "$PY" -c "import tf2_msgs.msg; tf2_msgs.msg.TFMessage(); import rclpy.type_support; rclpy.type_support.check_is_valid_msg_type(tf2_msgs.msg.TFMessage)" 2>/dev/null
}

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$source_hash" ]] && import_check; then
  say "tf2_msgs already built and importable in $VENV (stamp matches): nothing to do"
  exit 0
fi

# The wheels were built in a manylinux container: their exported rosidl_generator_py
# targets name that container's Python and numpy include dirs, which CMake refuses
# (non-existent include path). Point them at this interpreter's and numpy's include
# dirs. Idempotent: only /opt/python/... paths are rewritten.
say "repointing *rosidl_generator_pyExport.cmake include dirs to this interpreter"
"$PY" - "$VENV" <<'PYEOF'
import glob, os, re, sys, sysconfig
import numpy

venv = sys.argv[1]
python_include = sysconfig.get_paths()["include"]
numpy_include = numpy.get_include()
pattern_numpy = re.compile(r"/opt/python/cp3\d+-cp3\d+/lib/python3\.\d+/site-packages/numpy/(?:_core|core)/include")
pattern_python = re.compile(r"/opt/python/cp3\d+-cp3\d+/include/python3\.\d+")
changed = 0
for path in sorted(glob.glob(os.path.join(venv, "share", "*", "cmake", "*rosidl_generator_pyExport.cmake"))):
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    new_text = pattern_python.sub(python_include, pattern_numpy.sub(numpy_include, text))
    if new_text != text:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(new_text)
        changed += 1
print(f"[build_tf2_msgs]   {changed} file(s) rewritten (python: {python_include}, numpy: {numpy_include})")
PYEOF

BUILD_DIR="$(mktemp -d "${TMPDIR:-/tmp}/tf2_msgs-build.XXXXXX")"
trap 'rm -rf "$BUILD_DIR"' EXIT

export AMENT_PREFIX_PATH="$VENV"
export CMAKE_PREFIX_PATH="$VENV"
export PATH="$VENV/bin:$PATH"
export LD_LIBRARY_PATH="$VENV/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

say "configuring $SRC (build dir $BUILD_DIR, install prefix $VENV)"
start=$SECONDS
cmake -S "$SRC" -B "$BUILD_DIR" \
  -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_INSTALL_PREFIX="$VENV" \
  -DCMAKE_PREFIX_PATH="$VENV" \
  -DCMAKE_INSTALL_RPATH="$VENV/lib" \
  -DPython3_EXECUTABLE="$PY" \
  -DPython3_FIND_VIRTUALENV=ONLY \
  -DBUILD_TESTING=OFF \
  > "$BUILD_DIR/configure.log" 2>&1 || { cat "$BUILD_DIR/configure.log" >&2; exit 1; }
say "building"
cmake --build "$BUILD_DIR" -j "$(nproc)" > "$BUILD_DIR/build.log" 2>&1 || { tail -n 80 "$BUILD_DIR/build.log" >&2; exit 1; }
say "installing into $VENV"
cmake --install "$BUILD_DIR" > "$BUILD_DIR/install.log" 2>&1 || { cat "$BUILD_DIR/install.log" >&2; exit 1; }

if ! import_check; then
  echo "[build_tf2_msgs] built, but 'import tf2_msgs.msg' fails in $VENV:" >&2
  "$PY" -c "import tf2_msgs.msg; tf2_msgs.msg.TFMessage()" >&2 || true
  exit 1
fi
echo "$source_hash" > "$STAMP"
say "tf2_msgs built and installed in $((SECONDS - start)) s"
