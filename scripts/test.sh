#!/usr/bin/env bash
# Run the whole test suite (README's second command; .ci/run calls exactly this).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh
ruff check peerstar tests bench
mypy  # over peerstar/ ([tool.mypy] in pyproject.toml)
exec python3 -m pytest -q -ra "$@"
