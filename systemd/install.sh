#!/usr/bin/env bash
# Install linegate as a systemd service: a dedicated user, a venv with the runtime only
# (no torch), the unit, its environment file and the bundle directory.
# Usage: sudo systemd/install.sh BUNDLE_DIR
set -euo pipefail
bundle=${1:?usage: install.sh BUNDLE_DIR (made by linegate export onnx RUN)}
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
[ -f "$bundle/manifest.json" ] || { echo "install.sh: $bundle is not a bundle (no manifest.json)" >&2; exit 2; }

id linegate >/dev/null 2>&1 || useradd --system --home-dir /var/lib/linegate --shell /usr/sbin/nologin --groups video linegate
python3 -m venv /opt/linegate/venv
/opt/linegate/venv/bin/pip install --quiet "$repo"
install -d -o linegate -g linegate /var/lib/linegate /etc/linegate
rm -rf /var/lib/linegate/bundle && cp -r "$bundle" /var/lib/linegate/bundle
chown -R linegate:linegate /var/lib/linegate/bundle
[ -f /etc/linegate/linegate.env ] || install -m 0644 "$here/linegate.env" /etc/linegate/linegate.env
install -m 0644 "$here/linegate.service" /etc/systemd/system/linegate.service
systemctl daemon-reload
echo "installed: edit /etc/linegate/linegate.env, then: systemctl enable --now linegate"
