#!/usr/bin/env bash
# Sets up (Debian packages, npm dependencies) and runs every check: lint, type-check, all tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
exec npm test
