#!/usr/bin/env bash
# The whole test suite: installs the package and its test dependencies into ./.venv,
# then runs pytest (functional tests in-process, end-to-end tests against
# `versionstore serve` started as a process). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
exec .venv/bin/python -m pytest -q "$@"
