#!/usr/bin/env bash
# CI's second job: the whole test suite against real timm. timm needs torchvision, and the main
# job's CPU torch 2.13.0 has no matching torchvision, so this job has its own virtual environment
# with the torch, torchvision and timm pinned in .ci/requirements-timm.txt. It builds tokred there
# (CPU kernels only) from a copy of the checkout, runs `pytest tests`, and fails if any test of
# tests/test_timm_patch.py was skipped: a timm test that skips has not tested anything.
#
#   bash .ci/timm_job.sh     (the venv and the build live in a temp dir, removed on exit)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
export MAX_JOBS=${MAX_JOBS:-2}
export PIP_DISABLE_PIP_VERSION_CHECK=1
step() { echo; echo "--- timm job: $* ($(date +%T))"; }
# Runs a command with its output in a log, shown only if it fails (pip's install log is long).
quiet() { local log=$1; shift; "$@" > "$log" 2>&1 || { tail -60 "$log"; return 1; }; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
py=$work/venv/bin/python
pins=$root/.ci/requirements-timm.txt
# The pinned versions, read back from the requirements file so that it is the one place they live.
pin() { sed -n "s/^$1==//p" "$pins"; }

step "venv: torch $(pin torch), torchvision $(pin torchvision), timm $(pin timm), test dependencies"
python3 -m venv "$work/venv"
# The venv first on PATH, as if activated: the tests run `tokred` (the console script) and must
# find this install's, not the main job's.
export PATH="$work/venv/bin:$PATH"
quiet "$work/pip-install.log" "$py" -m pip install -r "$pins"

step "build and install tokred (CPU kernels) from a copy of the checkout"
# A copy, so that no build/ or _build_config.py of the main job (built against another torch)
# is reused here, and none of this build is left in the checkout.
mkdir "$work/src"
git ls-files -z | xargs -0 cp --parents -t "$work/src"
# --no-deps: tokred's torch>=2.4 is met by the pinned torch; nothing else may be installed.
(cd "$work/src" && export TOKRED_FORCE_CPU=1 \
  && quiet "$work/build.log" "$py" -m pip install -v --no-build-isolation --no-deps .)
# From outside any checkout, so Python imports the installed package (a _C built against another
# torch would fail to load here); the versions must still be the pinned ones (nothing above may
# have replaced torch).
(cd "$work" && "$py" - "$(pin torch)" "$(pin torchvision)" "$(pin timm)" <<'EOF'
import json, sys
import timm, torch, torchvision
import tokred_ext
want = dict(zip(("torch", "torchvision", "timm"), sys.argv[1:]))
have = {m.__name__: m.__version__.split("+")[0] for m in (torch, torchvision, timm)}
if have != want:
    sys.exit(f"the venv has {have}, not the pinned {want}")
info = tokred_ext.build_info()
print(json.dumps(dict(info, package=tokred_ext.__file__), indent=1))
EOF
)

step "tests (the whole suite; no test of tests/test_timm_patch.py may skip)"
# Run as the main job does (pytest, here the venv's, not `python -m`, so the copy's unbuilt
# source tree is not first on the path); -rs lists every skip with its file, which is checked below.
cd "$work/src"
status=0
pytest -q -rs -p no:cacheprovider tests 2>&1 | tee "$work/pytest.log" || status=$?
if grep -E '^SKIPPED .*tests/test_timm_patch\.py' "$work/pytest.log"; then
  echo "timm job: tests of tests/test_timm_patch.py were skipped (listed above); this job must run them"
  exit 1
fi
exit "$status"
