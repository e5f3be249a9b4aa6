#!/usr/bin/env bash
# The whole test suite: installs the package and its test dependencies into ./.venv and
# the pinned Node SDK into tests/e2e/node, then runs pytest (functional tests in-process,
# end-to-end tests against `versionstore serve` started as a process, driven by the official
# Python and Node SDKs). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
# The official Node SDK, pinned by tests/e2e/node/package-lock.json (Node ships with the machine).
if command -v npm >/dev/null; then
  (cd tests/e2e/node && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
else
  echo "npm not found: tests/e2e/test_node_sdk.py will fail" >&2
fi
exec .venv/bin/python -m pytest -q "$@"
