#!/usr/bin/env bash
# build-debian-dev.sh IMAGE_DIR BUILD_DIR — build Orchard's "debian-dev" Linux guest from Debian
# packages only (no internet besides the Debian archive). Driven by src/worker/images.ts.
#
# IMAGE_DIR receives (replaced as a whole, atomically, only when something changed):
#   vmlinux      the Debian kernel uncompressed (ELF with a PVH entry: skips the slow in-guest
#                decompressor under TCG); vmlinuz: the same kernel as shipped
#   initrd.img   the whole root fs (busybox, dropbear sshd, bash, sftp-server, rsync, virtio modules); it
#                switches to the disk when the kernel command line has root=/dev/vdX
#   base.qcow2   the same root fs as ext4 ($DISK_SIZE virtual; the guest grows it to its disk on boot)
#   cmdline      kernel command line;  id_ed25519(.pub): SSH client key for root and admin
#   known_hosts  the guest's SSH host keys (stable across rebuilds);  image.json: metadata
# BUILD_DIR keeps what survives rebuilds: the lock, the input stamp, the kernel .deb, the keys.
#
# Output protocol (read by images.ts): "step: TEXT" lines are progress, the last line is
# "result: built" or "result: cached". Everything else goes to stderr.
# Env: KERNEL_FLAVOUR=amd64 (has 9p for shared dirs), DISK_SIZE=2G, GUEST_PASSWORD=admin.
# Runs as root; without root it needs the packages already installed and uses fakeroot.
set -euo pipefail
# depmod, modprobe, mke2fs live in sbin, which a non-root user's PATH lacks on Debian.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
IMG=${1:?usage: build-debian-dev.sh IMAGE_DIR BUILD_DIR}
BUILD=${2:?usage: build-debian-dev.sh IMAGE_DIR BUILD_DIR}
FLAVOUR=${KERNEL_FLAVOUR:-amd64} DISK_SIZE=${DISK_SIZE:-2G} PASSWORD=${GUEST_PASSWORD:-admin}
SELF=$(readlink -f "$0")
die() { echo "build-debian-dev: $*" >&2; exit 1; }
exec 3>&1 1>&2          # tools print to stderr; progress goes to the original stdout (fd 3)
step() { echo "step: $*" >&3; }

# Packages used to build the guest and to run it (qemu). Nothing here starts a service.
PKGS="qemu-system-x86 qemu-utils busybox-static dropbear-bin openssh-sftp-server openssh-client
      cpio e2fsprogs kmod zstd xz-utils rsync"

mkdir -p "$BUILD"
if [ -z "${ORCHARD_IN_FAKEROOT:-}" ]; then
  exec 9>"$BUILD/lock"
  flock 9                    # one build per store at a time
  installed=$(dpkg-query -W -f='${db:Status-Status} ${Package}\n' $PKGS 2>/dev/null || true)
  missing=
  for p in $PKGS; do grep -qx "installed $p" <<<"$installed" || missing="$missing $p"; done
  missing=${missing# }
  if [ -n "$missing" ]; then
    [ "$(id -u)" = 0 ] || die "missing Debian packages: $missing. Install them with: sudo apt-get install -y --no-install-recommends $missing (or run this as root)"
    step "installing Debian packages: $missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      -o DPkg::Lock::Timeout=300 $missing >/dev/null
  fi
fi

# Which kernel: linux-image-$FLAVOUR depends on the versioned package, e.g. linux-image-6.1.0-56-amd64
# (= 6.1.192-2). Asked again only when the apt lists changed; apt-cache gets a private package cache
# because Debian's container images disable the shared one (each call would take a second).
APT_CACHE=(apt-cache -o Dir::Cache::pkgcache="$BUILD/pkgcache.bin" -o Dir::Cache::srcpkgcache="$BUILD/srcpkgcache.bin")
lists_mtime() { stat -c %Y /var/lib/apt/lists 2>/dev/null || echo 0; }
kernel_pkg() {
  "${APT_CACHE[@]}" show --no-all-versions "linux-image-$FLAVOUR" 2>/dev/null |
    awk '/^Depends:/{ if (match($0, /linux-image-[0-9][^ ,]*( \(= [^)]*\))?/)) { d=substr($0, RSTART, RLENGTH);
      gsub(/[()=]/, "", d); print d; exit } }'
}
read -r LISTS KPKG KDEBVER 2>/dev/null <"$BUILD/kernel.pkg" || true
if [ "${LISTS:-}" != "$(lists_mtime)" ] || [ -z "${KDEBVER:-}" ]; then
  read -r KPKG KDEBVER <<<"$(kernel_pkg)" || true
  if [ -z "${KDEBVER:-}" ]; then
    [ "$(id -u)" = 0 ] || die "apt knows no linux-image-$FLAVOUR: run 'sudo apt-get update' first"
    step "apt-get update (no package list for linux-image-$FLAVOUR)"
    apt-get update -qq
    read -r KPKG KDEBVER <<<"$(kernel_pkg)" || true
    [ -n "${KDEBVER:-}" ] || die "no package linux-image-$FLAVOUR in the configured Debian archive"
  fi
  echo "$(lists_mtime) $KPKG $KDEBVER" >"$BUILD/kernel.pkg"
fi
KVER=${KPKG#linux-image-}

STAMP=$( { cat "$SELF"; echo "$KPKG $KDEBVER $FLAVOUR $DISK_SIZE $PASSWORD"
           dpkg-query -W busybox-static dropbear-bin openssh-sftp-server bash e2fsprogs libc6 rsync; } | sha256sum | cut -c1-16)
if [ "$(cat "$BUILD/stamp" 2>/dev/null)" = "$STAMP" ] && [ -f "$IMG/base.qcow2" ] && [ -f "$IMG/image.json" ]; then
  echo "result: cached" >&3; exit 0
fi

mkdir -p "$BUILD/cache" "$BUILD/keys"
BUILD=$(cd "$BUILD" && pwd)
# 1. The kernel .deb (kept for rebuilds; unpacked below, never installed on the host).
ARCH=$(dpkg --print-architecture)
DEB=$BUILD/cache/${KPKG}_${KDEBVER//:/%3a}_$ARCH.deb
if [ ! -f "$DEB" ]; then
  step "downloading $KPKG $KDEBVER"
  rm -f "$BUILD"/cache/*.deb
  if [ "$(id -u)" = 0 ]; then sandbox=(-o APT::Sandbox::User=root); else sandbox=(); fi
  (cd "$BUILD/cache" && apt-get download -qq "${sandbox[@]}" "$KPKG=$KDEBVER" >/dev/null)
  f=$(ls "$BUILD"/cache/"${KPKG}"_*.deb 2>/dev/null | head -1)
  [ -n "$f" ] || die "apt-get download $KPKG produced no .deb"
  [ "$f" = "$DEB" ] || mv "$f" "$DEB"
fi

# Without root: the root fs must still be owned by root inside the image, so run the rest under
# fakeroot (chown and mke2fs -d then see fake ownership). Packages are all present at this point.
if [ "$(id -u)" != 0 ] && [ -z "${ORCHARD_IN_FAKEROOT:-}" ]; then
  command -v fakeroot >/dev/null || die "building as non-root needs fakeroot (apt-get install fakeroot), or run as root"
  ORCHARD_IN_FAKEROOT=1 exec fakeroot -- bash "$SELF" "$@" 1>&3
fi

STAGE=$BUILD/stage R=$BUILD/root K=$BUILD/kernel
rm -rf "$STAGE" "$R" "$K"; mkdir -p "$STAGE"
trap 'rm -rf "$STAGE" "$R" "$K" "$BUILD/root.img"' EXIT

step "unpacking kernel $KVER"
dpkg-deb -x "$DEB" "$K"
depmod -b "$K" "$KVER"

# 2. Root file system tree (usr-merged, like Debian 12).
step "assembling root file system"
mkdir -p "$R"/usr/{bin,sbin,lib,lib64}
for d in bin sbin lib lib64; do ln -s usr/$d "$R/$d"; done
mkdir -p "$R"/{dev,proc,sys,run,tmp,mnt,etc/dropbear,etc/acpi/PWRF,root/.ssh,home/admin/.ssh,var/log}
chmod 1777 "$R/tmp"; chmod 700 "$R/root"
cp /bin/busybox "$R/usr/bin/busybox"
# Applets go where busybox puts them; sbin ones (ip, ifconfig, ...) also in /usr/bin, because
# dropbear gives non-root users PATH=/usr/bin:/bin.
for a in $(/bin/busybox --list-full); do
  for l in "$a" "usr/bin/${a##*/}"; do [ -e "$R/$l" ] || [ -L "$R/$l" ] || ln -s /usr/bin/busybox "$R/$l"; done
done
add_program() { # a dynamically linked program plus the shared libraries it loads
  local f l
  for f in "$@"; do
    install -D "$f" "$R$f"
    for l in $(ldd "$f" | grep -o '/[^ ]*'); do [ -e "$R$l" ] || install -D "$l" "$R$l"; done
  done
}
add_program /usr/sbin/dropbear /usr/bin/dropbearkey /usr/lib/openssh/sftp-server /usr/bin/bash /usr/sbin/resize2fs /usr/bin/rsync
ln -sf openssh/sftp-server "$R/usr/lib/sftp-server"   # dropbear's default sftp path
# Modules for the virtual hardware and their dependencies; the guest loads them by modalias.
# bochs: QEMU's standard VGA as a framebuffer, so the login console shows on the VM's screen (VNC);
# the kernel, entered directly (PVH), never sets up the VGA text console itself.
MODS="virtio_pci virtio_mmio virtio_net virtio_blk virtio_rng virtio_console virtio_balloon ext4
      button evdev vmw_vsock_virtio_transport 9pnet_virtio 9p virtiofs bochs"
for m in $MODS; do modprobe -d "$K" -S "$KVER" --show-depends "$m" 2>/dev/null || true; done |
  awk '$1=="insmod"{print $2}' | sort -u | while read -r f; do install -D -m644 "$f" "$R/usr${f#"$K"}"; done
cp "$K/lib/modules/$KVER/modules.order" "$K/lib/modules/$KVER/modules.builtin" "$K/lib/modules/$KVER/modules.builtin.modinfo" "$R/usr/lib/modules/$KVER/"
depmod -b "$R/usr" "$KVER"

# 3. Users, keys, init.
step "configuring users, SSH keys and init scripts"
HASH=$(/bin/busybox mkpasswd -m sha512 "$PASSWORD")
printf 'root:x:0:0:root:/root:/bin/bash\nadmin:x:1000:1000:admin:/home/admin:/bin/bash\n' >"$R/etc/passwd"
printf 'root:%s:19000::::::\nadmin:%s:19000::::::\n' "$HASH" "$HASH" >"$R/etc/shadow"
chmod 600 "$R/etc/shadow"
printf 'root:x:0:\nadmin:x:1000:\n' >"$R/etc/group"
printf '/bin/sh\n/bin/ash\n/bin/bash\n/usr/bin/bash\n' >"$R/etc/shells"
echo orchard-vm >"$R/etc/hostname"
printf '127.0.0.1 localhost\n' >"$R/etc/hosts"
printf 'export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n' >"$R/etc/profile"
KEYS=$BUILD/keys
[ -f "$KEYS/id_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -C orchard-debian-dev -f "$KEYS/id_ed25519"
for t in ed25519 ecdsa rsa; do
  [ -f "$KEYS/dropbear_${t}_host_key" ] || dropbearkey -t "$t" -f "$KEYS/dropbear_${t}_host_key" >/dev/null 2>&1
  install -m600 "$KEYS/dropbear_${t}_host_key" "$R/etc/dropbear/"
  dropbearkey -y -f "$KEYS/dropbear_${t}_host_key" | awk '/^(ssh|ecdsa)-/{print "* "$1" "$2}'
done >"$STAGE/known_hosts"
cp "$KEYS/id_ed25519" "$KEYS/id_ed25519.pub" "$STAGE/"
for h in root home/admin; do install -m600 "$KEYS/id_ed25519.pub" "$R/$h/.ssh/authorized_keys"; chmod 700 "$R/$h/.ssh"; done
chown -R 1000:1000 "$R/home/admin"; chmod 755 "$R/home/admin"

cat >"$R/init" <<'EOF'
#!/bin/sh
# PID 1 in the initramfs: load virtio drivers, then switch to root=/dev/vdX or run from RAM.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
modprobe -a virtio_pci virtio_mmio
for a in /sys/bus/virtio/devices/*/modalias; do modprobe -q "$(cat "$a")"; done
modprobe -qa button evdev
for a in $(cat /proc/cmdline); do case $a in root=*) root=${a#root=};; esac; done
if [ -n "$root" ]; then
  modprobe -q ext4
  for i in $(seq 100); do [ -b "$root" ] && break; sleep 0.05; done
  mkdir -p /newroot
  if mount -t ext4 "$root" /newroot; then
    for d in dev proc sys; do mount --move /$d /newroot/$d; done
    exec switch_root /newroot /sbin/init
  fi
  echo "init: cannot mount root=$root, running from RAM" >/dev/console
fi
exec /sbin/init
EOF
cat >"$R/etc/inittab" <<'EOF'
::sysinit:/etc/rcS
ttyS0::respawn:/sbin/getty -L 115200 ttyS0 vt100
tty1::respawn:/sbin/getty 38400 tty1
::ctrlaltdel:/sbin/reboot
::shutdown:/etc/rcK
EOF
cat >"$R/etc/rcS" <<'EOF'
#!/bin/sh
# Boot: mounts, network (DHCP from QEMU user-net, or orchard.ip=ADDR/PFX,GW), hostname
# (orchard.hostname=NAME), grow the root fs, mount shared dirs at /mnt/shared/TAG, acpid, sshd.
[ -e /proc/self ] || mount -t proc proc /proc
[ -d /sys/kernel ] || mount -t sysfs sys /sys
[ -e /dev/null ] || mount -t devtmpfs dev /dev
modprobe -q bochs &   # the screen (VNC): in the background, as SSH does not need it (0.4 s under TCG)
mkdir -p /dev/pts /dev/shm; mount -t devpts -o gid=5,mode=620 devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm; mount -t tmpfs tmpfs /run; mount -t tmpfs tmpfs /tmp
for a in $(cat /proc/cmdline); do case $a in
  orchard.hostname=*) echo "${a#*=}" >/etc/hostname;; orchard.ip=*) ip=${a#*=};; esac; done
hostname -F /etc/hostname
ip link set lo up; ip link set eth0 up
if [ -n "$ip" ]; then ip addr add "${ip%,*}" dev eth0; ip route add default via "${ip#*,}"
else udhcpc -i eth0 -s /etc/udhcpc.sh -t 20 -T 1 -A 1 -b -q >/dev/null 2>&1; fi
rootdev=$(awk '$2=="/" && $3=="ext4" {print $1}' /proc/mounts)
[ -n "$rootdev" ] && resize2fs "$rootdev" >/dev/null 2>&1
for t in /sys/bus/virtio/drivers/9pnet_virtio/virtio*/mount_tag; do [ -f "$t" ] || continue
  tag=$(tr -d '\0' <"$t"); mkdir -p "/mnt/shared/$tag"
  mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 "$tag" "/mnt/shared/$tag"; done
for t in /sys/fs/virtiofs/*/tag; do [ -f "$t" ] || continue
  tag=$(cat "$t"); mkdir -p "/mnt/shared/$tag"; mount -t virtiofs "$tag" "/mnt/shared/$tag"; done
acpid
# The worker's agent, before sshd (orchard.agent=1): on a port whose host side is not connected a
# read ends at once, so it keeps running only in a warm-start template, whose port the worker
# connects before the guest boots.
case " $(cat /proc/cmdline) " in *" orchard.agent=1 "*)
  for p in /sys/class/virtio-ports/*; do
    [ "$(cat "$p/name" 2>/dev/null)" = org.orchard.agent ] && setsid sh /etc/orchard-agent <>"/dev/${p##*/}" >&0 2>&0 &
  done;;
esac
dropbear -p 22 -P /run/dropbear.pid
[ -x /etc/rc.local ] && /etc/rc.local
echo "rcS: up in $(cut -d' ' -f1 /proc/uptime)s, $(ip -4 -o addr show eth0 | awk '{print $4}')" >/dev/console
EOF
cat >"$R/etc/orchard-agent" <<'EOF'
#!/bin/sh
# The worker's agent (see rcS and the worker's guest-identity.ts): scripts from the worker on the
# virtio-serial port org.orchard.agent, one after another, each ended by a line
# orchard-identity-end and answered by a line "orchard-identity-exit CODE"; it ends when the
# worker's side of the port closes.
while :; do
  s=""; e=""
  while IFS= read -r l; do [ "$l" = orchard-identity-end ] && { e=1; break; }; s="$s$l
"; done
  [ -n "$e" ] || exit 0
  (eval "$s"); echo "orchard-identity-exit $?"
done
EOF
cat >"$R/etc/rcK" <<'EOF'
#!/bin/sh
kill $(cat /run/dropbear.pid) 2>/dev/null; sync; umount -a -r 2>/dev/null; mount -o remount,ro / 2>/dev/null; sync
EOF
cat >"$R/etc/udhcpc.sh" <<'EOF'
#!/bin/sh
case $1 in bound|renew)
  ip addr flush dev "$interface"; ip addr add "$ip/${mask:-24}" dev "$interface"
  for r in $router; do ip route add default via "$r" dev "$interface"; break; done
  : >/etc/resolv.conf; for d in $dns; do echo "nameserver $d" >>/etc/resolv.conf; done;;
esac
EOF
printf '#!/bin/sh\npoweroff\n' >"$R/etc/acpi/PWRF/00000080"   # ACPI power button -> poweroff
chmod +x "$R/init" "$R/etc/rcS" "$R/etc/rcK" "$R/etc/udhcpc.sh" "$R/etc/acpi/PWRF/00000080"
chown -R 0:0 "$R"; chown -R 1000:1000 "$R/home/admin"

# 4. Artefacts.
step "writing kernel and initramfs"
cp "$K/boot/vmlinuz-$KVER" "$STAGE/vmlinuz"
extract_vmlinux() { # like the kernel's scripts/extract-vmlinux: find the compressed payload, check ELF
  local pair off
  for pair in '\xfd7zXZ\x00:xz' '\x28\xb5\x2f\xfd:zstd' '\x1f\x8b\x08:gzip' '\x02\x21\x4c\x18:lz4'; do
    command -v "${pair#*:}" >/dev/null || continue
    for off in $(LC_ALL=C grep -aboP "${pair%:*}" "$1" | cut -d: -f1); do
      tail -c +$((off + 1)) "$1" | "${pair#*:}" -dc >"$2" 2>/dev/null || true
      [ "$(head -c4 "$2" | od -An -c | tr -d ' ')" = 177ELF ] && return 0
    done
  done
  rm -f "$2"; return 1
}
extract_vmlinux "$STAGE/vmlinuz" "$STAGE/vmlinux" || echo "note: no vmlinux extracted; vmlinuz will be booted" >&2
(cd "$R" && find . | LC_ALL=C sort | cpio -o -H newc --quiet | zstd -q -3 -T0 >"$STAGE/initrd.img")
step "writing base.qcow2 ($DISK_SIZE ext4)"
rm -f "$BUILD/root.img"
mke2fs -q -t ext4 -L orchard-root -d "$R" "$BUILD/root.img" "$DISK_SIZE"
qemu-img convert -f raw -O qcow2 "$BUILD/root.img" "$STAGE/base.qcow2"
# orchard.agent=1: the guest starts the worker's agent at boot (rcS), and the worker knows it can
# give a VM resumed from this image's snapshot its own identity with no SSH key (pulled images have none).
echo "console=ttyS0 panic=-1 quiet orchard.agent=1" >"$STAGE/cmdline"
printf '{"name":"debian-dev","kind":"kernel","created":"%s","source":"Debian packages (%s %s)"}\n' \
  "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$KPKG" "$KDEBVER" >"$STAGE/image.json"

# 5. Swap the image directory in. VMs made from the old one keep hard links to its files.
OLD=
if [ -e "$IMG" ]; then OLD=$(dirname "$IMG")/.old-$(basename "$IMG")-$$; mv "$IMG" "$OLD"; fi
mv "$STAGE" "$IMG"
[ -n "$OLD" ] && rm -rf "$OLD"
echo "$STAMP" >"$BUILD/stamp"
echo "result: built" >&3
