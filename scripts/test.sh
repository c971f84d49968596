#!/usr/bin/env bash
# The test command: sets everything up (scripts/setup.sh), then runs the whole suite.
#   bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
# Every optional backend is installed and tested (CPU paths); BMB_TEST_EXTRAS=test for a quick set-up.
bash scripts/setup.sh "${BMB_TEST_EXTRAS:-test,ffcv,dali,deepspeed,slurm}"
if [[ -n "${VIRTUAL_ENV:-}" || -n "${CONDA_PREFIX:-}" ]]; then VPY=python; else VPY=.venv/bin/python; fi
set +e
"$VPY" -m pytest "$@"
rc=$?
set -e
# pytest exits 5 when it collected no tests: that is not a failure of the code under test.
if [[ $rc -eq 5 ]]; then echo "[test] no tests collected"; exit 0; fi
exit $rc
