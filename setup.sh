#!/usr/bin/env bash
# Set up oodlab on a fresh machine: data packages (Debian, when root), a virtual environment in
# .venv, and the package. `bash setup.sh` installs what `oodlab bench` needs; `bash setup.sh test`
# adds the test extras and, when root, Chromium for the report's browser test.
# Safe to run again; it skips what is there.
set -euo pipefail
cd "$(dirname "$0")"
case "${1:-}" in
  "") extras=""; debs="dataset-fashion-mnist fonts-dejavu-core fonts-liberation2 fonts-freefont-ttf" ;;
  test) extras="[test]"; debs="dataset-fashion-mnist fonts-dejavu-core fonts-liberation2 fonts-freefont-ttf chromium" ;;
  *) echo "setup: unknown argument '$1' (give nothing, or 'test')" >&2; exit 2 ;;
esac

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  missing=$(for p in $debs; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
  if [ -n "$missing" ]; then
    echo "setup: installing Debian packages:" $missing
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  fi
else
  echo "setup: not root or no apt-get: Fashion-MNIST will be downloaded by torchvision on first use"
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".$extras"
echo "setup: done (.venv ready${extras:+, with the test extras})"
