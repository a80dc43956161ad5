#!/usr/bin/env bash
# Real MR images for benchmarks/ssl_quality.py: Debian's mricron-data (Colin27 T1, AAL and other atlases,
# BSD-style licence, 16 MB) in /usr/share/mricron/templates. Not needed by the tests.
set -euo pipefail
if [ -f /usr/share/mricron/templates/ch2.nii.gz ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
echo "[real-data] installing Debian's mricron-data"
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq mricron-data >/dev/null
