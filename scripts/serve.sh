#!/usr/bin/env bash
# Quick start: install into ./.venv (first run only) and serve the embedded default
# (SQLite + local disk under ./data) with a demo product environment whose
# CLOUDINARY_URL is printed. Extra arguments go to `versionstore serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e .
exec .venv/bin/versionstore serve --data-dir "${VERSIONSTORE_DATA_DIR:-./data}" --demo "$@"
