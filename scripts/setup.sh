#!/usr/bin/env bash
# Set up a Python environment for bmb on a fresh machine.
#
#   bash scripts/setup.sh [EXTRAS]      e.g.  bash scripts/setup.sh test,ffcv,dali,deepspeed
#
# - Uses the active virtualenv/conda env if there is one, else creates ./.venv.
# - When no torch is importable, installs torch==2.13.0 first (the CPU build on CPU-only
#   machines), so that pip never resolves an unpinned torch to a multi-GB CUDA build.
#   A torch you already have (e.g. a CUDA build) is kept.
# - Extras needing system libraries get them from apt when run as root (ffcv: libturbojpeg,
#   OpenCV headers; slurm: slurm-wlm + munge for the SLURM tests).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=${1:-test}
PY=${PYTHON:-python3}

if [[ -n "${VIRTUAL_ENV:-}" || -n "${CONDA_PREFIX:-}" ]]; then
    VPY=$(command -v python)
else
    if [[ ! -x .venv/bin/python ]]; then
        echo "[setup] creating .venv"
        "$PY" -m venv --system-site-packages .venv
    fi
    VPY=.venv/bin/python
fi
pip_install() { "$VPY" -m pip install --disable-pip-version-check -q "$@"; }

apt_install() {
    local missing=()
    for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    if [[ $(id -u) -ne 0 ]]; then
        echo "[setup] please install these system packages first: ${missing[*]}" >&2
        return 1
    fi
    echo "[setup] apt-get install ${missing[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
    echo "[setup] no torch found: installing torch==2.13.0"
    pip_install torch==2.13.0
fi
echo "[setup] torch $("$VPY" -c 'import torch; print(torch.__version__)')"

IFS=, read -ra WANT <<<"$EXTRAS"
PIP_EXTRAS=()
for e in "${WANT[@]}"; do
    case "$e" in
        ffcv) apt_install libturbojpeg0-dev libopencv-dev pkg-config; pip_install numpy pillow cython; PIP_EXTRAS+=(ffcv) ;;
        slurm) apt_install slurm-wlm munge ;;
        "") ;;
        *) PIP_EXTRAS+=("$e") ;;
    esac
done
spec="."
if [[ ${#PIP_EXTRAS[@]} -gt 0 ]]; then spec=".[$(IFS=,; echo "${PIP_EXTRAS[*]}")]"; fi
echo "[setup] pip install -e $spec"
pip_install -e "$spec"
echo "[setup] done: $VPY"
