#!/usr/bin/env bash
# Sets up (Debian packages, npm dependencies) and runs a development cluster: `orchard dev`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec ./bin/orchard dev "$@"
