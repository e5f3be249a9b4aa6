#!/usr/bin/env bash
# Quick start: install into ./.venv (first run, or when pyproject.toml changed) and serve this
# checkout (SQLite + local disk under ./data, next to this script's repository) with a demo
# product environment whose CLOUDINARY_URL is printed. Extra arguments go to
# `versionstore serve` (e.g. --port 8766); VERSIONSTORE_DATA_DIR or --data-dir choose another
# data directory (relative paths are taken from the current directory).
set -euo pipefail
here=$(dirname "$0")/..
root=$(cd "$here" && pwd)
# shellcheck source=scripts/venv.sh
source "$root/scripts/venv.sh"
(cd "$root" && ensure_venv base)
export VERSIONSTORE_DATA_DIR=${VERSIONSTORE_DATA_DIR:-$here/data}
# This checkout's code, whatever the venv's editable install points at.
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$root/.venv/bin/python" -m versionstore serve --demo "$@"
