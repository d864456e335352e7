#!/usr/bin/env bash
# Install what the test node needs from Debian, as root (`make node-setup`; `make test` runs it):
# containerd, runc and the CNI plugins run Pods; buildah and mmdebstrap build the images locally;
# iptables and conntrack are kube-proxy's; iproute2 makes the bridge. Does nothing when all present.
set -euo pipefail

PACKAGES=(containerd runc containernetworking-plugins buildah mmdebstrap iptables conntrack iproute2)
COMMANDS=(containerd runc ctr buildah mmdebstrap iptables conntrack ip)

log() { echo "node-setup: $*" >&2; }

present() {
  local c
  for c in "${COMMANDS[@]}"; do command -v "$c" >/dev/null || return 1; done
  [ -x /usr/lib/cni/bridge ] && [ -x /usr/lib/cni/host-local ]
}

if present; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  log "the node needs root and these Debian packages: ${PACKAGES[*]}"
  exit 1
fi
command -v apt-get >/dev/null || { log "no apt-get: install ${PACKAGES[*]} yourself"; exit 1; }
log "installing ${PACKAGES[*]}"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
present || { log "still missing a command after the install"; exit 1; }
