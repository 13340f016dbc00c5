#!/usr/bin/env bash
# Install linegate as a systemd service: a dedicated unprivileged user, a venv with the
# runtime only (no torch), the bundle, the config, the unit and its environment file.
#
#   sudo systemd/install.sh BUNDLE_DIR [CONFIG.toml]
#
# Paths: /opt/linegate/venv (the runtime), /var/lib/linegate/bundle (the model),
# /etc/linegate/linegate.toml (settings; an existing one is kept, or backed up when CONFIG
# replaces it), /etc/linegate/linegate.env, /etc/linegate/keys (CURVE keys, readable by the
# service only: make them with `umask 077; linegate keys /etc/linegate/keys --name server`, then
# `chgrp linegate /etc/linegate/keys/server.key_secret; chmod 640 ...`), the unit in
# /etc/systemd/system.
set -euo pipefail
bundle=${1:?usage: install.sh BUNDLE_DIR [CONFIG.toml]  (BUNDLE_DIR made by linegate export onnx RUN)}
config=${2:-}
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
prefix=/opt/linegate
[ "$(id -u)" -eq 0 ] || { echo "install.sh: run as root (sudo)" >&2; exit 2; }
[ -f "$bundle/manifest.json" ] || { echo "install.sh: $bundle is not a bundle (no manifest.json)" >&2; exit 2; }
[ -z "$config" ] || [ -f "$config" ] || { echo "install.sh: no config file $config" >&2; exit 2; }

# A system user with no shell and no home of its own to log in to; video: the cameras.
id linegate >/dev/null 2>&1 || useradd --system --home-dir /var/lib/linegate --no-create-home \
    --shell /usr/sbin/nologin --groups video linegate

python3 -m venv "$prefix/venv"
"$prefix/venv/bin/pip" install --quiet --upgrade pip
"$prefix/venv/bin/pip" install --quiet "$repo"   # the runtime dependencies only

install -d -m 0755 /var/lib/linegate /etc/linegate
install -d -m 0750 -o root -g linegate /etc/linegate/keys /etc/linegate/keys/allowed
rm -rf /var/lib/linegate/bundle.new
cp -rL "$bundle" /var/lib/linegate/bundle.new   # -L: a bundle given as a symlink is copied, not linked
chmod -R a+rX,go-w /var/lib/linegate/bundle.new
rm -rf /var/lib/linegate/bundle.old
[ ! -d /var/lib/linegate/bundle ] || mv /var/lib/linegate/bundle /var/lib/linegate/bundle.old
mv /var/lib/linegate/bundle.new /var/lib/linegate/bundle

if [ -n "$config" ]; then
    if [ -f /etc/linegate/linegate.toml ] && ! cmp -s "$config" /etc/linegate/linegate.toml; then
        cp -p /etc/linegate/linegate.toml "/etc/linegate/linegate.toml.$(date +%Y%m%d-%H%M%S).bak"
        echo "install.sh: the previous /etc/linegate/linegate.toml is kept as linegate.toml.*.bak"
    fi
    install -m 0640 -o root -g linegate "$config" /etc/linegate/linegate.toml
elif [ ! -f /etc/linegate/linegate.toml ]; then
    install -m 0640 -o root -g linegate "$here/linegate.toml" /etc/linegate/linegate.toml
    echo "install.sh: installed the example config: edit /etc/linegate/linegate.toml ([[source]] uris)"
fi
[ -f /etc/linegate/linegate.env ] || install -m 0644 "$here/linegate.env" /etc/linegate/linegate.env
install -m 0644 "$here/linegate.service" /etc/systemd/system/linegate.service
systemctl daemon-reload

# Validate as the service user, so that file permissions are checked too.
if runuser -u linegate -- "$prefix/venv/bin/linegate" check-config /etc/linegate/linegate.toml; then
    echo "installed. Start it with: systemctl enable --now linegate; follow it with: journalctl -fu linegate"
else
    echo "installed, but the config does not validate yet: fix /etc/linegate/linegate.toml, then" \
         "systemctl enable --now linegate" >&2
fi
