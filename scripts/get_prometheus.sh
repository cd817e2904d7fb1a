#!/usr/bin/env bash
# Put Debian's `prometheus` and `promtool` binaries into .venv/bin (tests/deploy/test_observability.py checks the
# rules and dashboard in deploy/ with them, against a real Prometheus). No root needed and nothing installed
# system-wide: the package is downloaded with `apt-get download` (apt checks it against the signed package index)
# and unpacked with `dpkg -x`. Idempotent: a second run only checks that both binaries start.
# Exits non-zero when the package cannot be had; setup.sh then carries on and the tests say why they fail (CI) or
# skip (elsewhere).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${PROMETHEUS_BIN_DIR:-.venv/bin}
PACKAGE=prometheus

if "$BIN/prometheus" --version >/dev/null 2>&1 && "$BIN/promtool" --version >/dev/null 2>&1; then
  exit 0
fi
for tool in apt-get dpkg; do
  if ! command -v "$tool" >/dev/null; then
    echo "get_prometheus: $tool not found (needed to fetch Debian's $PACKAGE package)" >&2
    exit 1
  fi
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
apt_options=()
if [ "$(id -u)" = 0 ]; then
  # As root apt downloads as user _apt, which cannot write into a private temporary folder; it would fall back
  # with a warning. The archive is checked against the package index either way.
  apt_options=(-o APT::Sandbox::User=root)
fi

download() { (cd "$work" && apt-get download -q "${apt_options[@]}" "$PACKAGE") >"$work/apt.log" 2>&1; }
if ! download; then
  # A fresh machine may not have read the package index yet; only root can refresh it.
  if [ "$(id -u)" = 0 ] && apt-get update -q >>"$work/apt.log" 2>&1 && download; then
    :
  else
    echo "get_prometheus: could not download Debian's $PACKAGE package:" >&2
    cat "$work/apt.log" >&2
    exit 1
  fi
fi

deb=$(ls "$work"/"$PACKAGE"_*.deb)
dpkg -x "$deb" "$work/root"
mkdir -p "$BIN"
for tool in prometheus promtool; do
  install -m 0755 "$work/root/usr/bin/$tool" "$BIN/$tool"
done
"$BIN/promtool" --version 2>&1 | head -1
