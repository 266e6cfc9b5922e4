#!/usr/bin/env bash
# Installs what Orchard needs on a Debian/Ubuntu machine: the Debian packages for the QEMU runtime and
# its guest images, then the npm dependencies (which include the pinned Node.js 24).
# Runs as root, or as a user with sudo (it says so before using it). Idempotent.
# --test: also what only the tests use (scripts/test.sh passes it).
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS=(qemu-system-x86 qemu-utils busybox-static dropbear-bin openssh-sftp-server openssh-client cpio
      e2fsprogs kmod zstd xz-utils iproute2 procps fakeroot passt socat rsync)
if [ "${1:-}" = --test ]; then
  # systemd-analyze, systemd-sysusers: test/deploy.test.ts checks deploy/ with them; vncsnapshot and
  # tesseract: test/connect-cli.test.ts reads the VM's screen through `orchard vnc`; zsh and fish:
  # test/completion.test.ts loads `orchard completion zsh|fish` into them (bash and script(1) are essential);
  # docker-registry, skopeo and apache2-utils (htpasswd): test/oci-*.test.ts pull from and push to a
  # real registry on loopback, with images skopeo copies in and inspects; strace: test/oci-pull.test.ts
  # checks that a pull fsyncs before each rename that publishes an image; chromium and fonts-liberation
  # (its text, which --no-install-recommends would leave out): test/console-*.test.ts drive the web
  # console in it through playwright-core.
  PKGS+=(systemd vncsnapshot tesseract-ocr tesseract-ocr-eng zsh fish docker-registry skopeo apache2-utils strace chromium fonts-liberation)
fi
command -v npm >/dev/null 2>&1 || PKGS+=(nodejs npm)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=(); else
    command -v sudo >/dev/null 2>&1 || { echo "setup: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
    echo "setup: using sudo to install Debian packages: ${missing[*]}" >&2
    SUDO=(sudo)
  fi
  echo "setup: installing ${missing[*]}" >&2
  "${SUDO[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# npm ci installs exactly the lock file; `node` (an npm package) brings Node.js 24.
if [ ! -x node_modules/node/bin/node ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  echo "setup: installing npm dependencies" >&2
  npm ci --no-audit --no-fund --loglevel=error
fi
node_modules/node/bin/node --version >/dev/null
