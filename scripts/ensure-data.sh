#!/usr/bin/env bash
# Make sure Fashion-MNIST is present: already found -> nothing to do; Debian as root ->
# its package dataset-fashion-mnist; anywhere else -> lenet's checksummed download.
set -euo pipefail
bin=${1:-.venv/bin}
found() { "$bin/python" -c "from lenet.data import sources; raise SystemExit(sources.locate('fashion-mnist') is None)"; }
if found; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
   && apt-cache policy dataset-fashion-mnist 2>/dev/null | grep -q Candidate; then
  echo "installing Fashion-MNIST from Debian's package dataset-fashion-mnist"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; }
  found && exit 0
fi
"$bin/lenet" data fetch fashion-mnist
