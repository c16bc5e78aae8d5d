#!/usr/bin/env bash
# Install the Linux guest image the end-to-end tests boot under QEMU TCG, into $PREFIX (default
# /opt/colo-guest). See /work/shared/notes/machine.md, "Linux guests: only under QEMU TCG".
#
#   $PREFIX/bzImage       the Debian 12 cloud kernel (linux-image-6.1.0-NN-cloud-amd64), as shipped
#   $PREFIX/vmlinux       the ELF kernel inside the bzImage (boot-protocol header fields
#                         payload_offset/payload_length, LZ4-decompressed), checked to be an ELF64
#                         with a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); QEMU boots it by PVH,
#                         faster under TCG. If extraction fails, vmlinux is not written and
#                         VERSION says so (tests then boot the bzImage).
#   $PREFIX/modules/*.ko  the virtio/net modules the guest's /init loads, in this order:
#                         virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci
#                         virtio_mmio failover net_failover virtio_net (uncompressed)
#   $PREFIX/busybox       a copy of busybox-static's /bin/busybox (statically linked)
#   $PREFIX/VERSION       key=value lines: kernel package and version, busybox version, vmlinux
#
# The kernel version is not hardcoded: it is the one the metapackage linux-image-cloud-amd64
# depends on (apt's candidate). Idempotent: if $PREFIX/VERSION names that kernel package and every
# file is in place, nothing is done (set COLO_GUEST_FORCE=1 to reinstall). The kernel package is
# only downloaded and unpacked into a temporary directory (`dpkg -x`), never installed.
#
# Usage: sudo scripts/install-guest-image.sh     (root: apt-get, writes to /opt)
# Env:   COLO_GUEST_PREFIX (default /opt/colo-guest)
#        COLO_GUEST_KERNEL_PKG (default: what linux-image-cloud-amd64 depends on)
set -euo pipefail

PREFIX="${COLO_GUEST_PREFIX:-/opt/colo-guest}"
MODULES=(virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_mmio failover
    net_failover virtio_net)
TOOLS=(busybox-static lz4)

log() { printf '[install-guest-image] %s\n' "$*"; }
die() { printf '[install-guest-image] ERROR: %s\n' "$*" >&2; exit 1; }

export DEBIAN_FRONTEND=noninteractive

[[ "$(id -u)" == 0 ]] || die "must run as root (apt-get, writes to $PREFIX)"
command -v apt-get >/dev/null || die "apt-get not found (Debian 12 expected)"

installed() { [[ "$(dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null)" == ii* ]]; }

updated=0
apt_update() {
    if [[ "$updated" == 0 ]]; then
        log "apt-get update"
        apt-get update -q
        updated=1
    fi
}

# Tools: busybox-static (the guest's userland) and lz4 (to unpack the kernel payload).
missing=()
for p in "${TOOLS[@]}"; do installed "$p" || missing+=("$p"); done
if ((${#missing[@]})); then
    log "apt-get install --no-install-recommends ${missing[*]}"
    if ! apt-get install -y -q --no-install-recommends "${missing[@]}"; then
        apt_update
        apt-get install -y -q --no-install-recommends "${missing[@]}"
    fi
fi
[[ -x /bin/busybox ]] || die "/bin/busybox missing after installing busybox-static"
command -v lz4 >/dev/null || die "lz4 missing after installing lz4"

# The kernel package: the dependency of the metapackage (its current candidate).
kernel_pkg() {
    apt-cache depends linux-image-cloud-amd64 2>/dev/null \
        | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9].*-cloud-amd64$/ && !found { print $2; found = 1 }'
}
KPKG="${COLO_GUEST_KERNEL_PKG:-$(kernel_pkg)}"
if [[ -z "$KPKG" ]]; then
    log "apt does not know linux-image-cloud-amd64 yet"
    apt_update
    KPKG="$(kernel_pkg)"
fi
[[ -n "$KPKG" ]] || die "cannot find the kernel package linux-image-cloud-amd64 depends on (Debian 12 bookworm needed)"
KVER="$(apt-cache policy "$KPKG" 2>/dev/null | awk '$1 == "Candidate:" && !found { print $2; found = 1 }')"
log "kernel package: $KPKG ${KVER:+(version $KVER)}"

BB_VERSION="$(dpkg-query -W -f='${Version}' busybox-static)"

complete() {
    [[ -f "$PREFIX/VERSION" && -f "$PREFIX/bzImage" && -x "$PREFIX/busybox" ]] || return 1
    grep -qx "kernel_package=$KPKG" "$PREFIX/VERSION" || return 1
    grep -qx "busybox_version=$BB_VERSION" "$PREFIX/VERSION" || return 1
    if grep -qx 'vmlinux=pvh' "$PREFIX/VERSION"; then [[ -f "$PREFIX/vmlinux" ]] || return 1; fi
    local m
    for m in "${MODULES[@]}"; do [[ -f "$PREFIX/modules/$m.ko" ]] || return 1; done
    cmp -s /bin/busybox "$PREFIX/busybox" || return 1
}

if [[ "${COLO_GUEST_FORCE:-0}" != 1 ]] && complete; then
    log "already installed: $PREFIX ($KPKG); nothing to do"
    cat "$PREFIX/VERSION"
    exit 0
fi

WORK="$(mktemp -d /tmp/colo-guest-install.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
# apt-get download as root drops privileges to _apt; let it write here (avoids a warning).
chmod 755 "$WORK"
if id _apt >/dev/null 2>&1; then chown _apt "$WORK" || true; fi

download() { (cd "$WORK" && apt-get download -q "$KPKG${KVER:+=$KVER}"); }
log "apt-get download $KPKG into $WORK"
if ! download; then
    log "download failed; running apt-get update and retrying"
    updated=0
    apt_update
    KVER="$(apt-cache policy "$KPKG" 2>/dev/null | awk '$1 == "Candidate:" && !found { print $2; found = 1 }')"
    download
fi
DEB="$(ls "$WORK"/"$KPKG"_*.deb 2>/dev/null | sed -n 1p || true)"
[[ -n "$DEB" ]] || die "downloaded .deb for $KPKG not found in $WORK"
KVER="$(dpkg-deb -f "$DEB" Version)"

log "dpkg -x $(basename "$DEB")"
dpkg -x "$DEB" "$WORK/root"
KREL="${KPKG#linux-image-}"
BZ="$WORK/root/boot/vmlinuz-$KREL"
[[ -f "$BZ" ]] || die "kernel $BZ not in the package"

NEW="$PREFIX.new"
rm -rf "$NEW"
mkdir -p "$NEW/modules"
cp "$BZ" "$NEW/bzImage"
log "bzImage: $(stat -c %s "$NEW/bzImage") bytes"

# Installs the package providing a tool if the tool is missing.
need_tool() {
    command -v "$1" >/dev/null && return 0
    log "apt-get install --no-install-recommends $2 (for $1)"
    apt-get install -y -q --no-install-recommends "$2" || { apt_update; apt-get install -y -q --no-install-recommends "$2"; }
}

# Modules: find each by name in the package (plain .ko, or .ko.xz / .ko.zst decompressed).
for m in "${MODULES[@]}"; do
    f="$(find "$WORK/root/lib/modules" -type f \( -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" \) | sed -n 1p)"
    [[ -n "$f" ]] || die "module $m not found in $KPKG"
    case "$f" in
        *.ko) cp "$f" "$NEW/modules/$m.ko" ;;
        *.ko.xz) need_tool xz xz-utils; xz -dc "$f" >"$NEW/modules/$m.ko" ;;
        *.ko.zst) need_tool zstd zstd; zstd -q -dc "$f" >"$NEW/modules/$m.ko" ;;
    esac
    log "module $m.ko ($(stat -c %s "$NEW/modules/$m.ko") bytes) from ${f#"$WORK/root"}"
done
printf '%s\n' "${MODULES[@]}" >"$NEW/modules/order"

# busybox: must be the static one (it runs alone in the initramfs).
if ldd /bin/busybox >/dev/null 2>&1; then
    die "/bin/busybox is dynamically linked (is the 'busybox' package installed instead of busybox-static?)"
fi
cp /bin/busybox "$NEW/busybox"
chmod 755 "$NEW/busybox"

# vmlinux from the bzImage (Documentation/arch/x86/boot.rst): setup_sects at 0x1f1 (0 means 4),
# "HdrS" at 0x202, boot protocol version at 0x206, payload_offset (0x248) and payload_length
# (0x24c) relative to the protected-mode code at (setup_sects + 1) * 512. The payload is the
# compressed vmlinux followed by its uncompressed size (4 bytes, little endian).
u8_at() { od -An -tu1 -j "$2" -N1 "$1" | tr -d ' \n'; }
u16_at() { od -An -tu2 -j "$2" -N2 "$1" | tr -d ' \n'; }
u32_at() { od -An -tu4 -j "$2" -N4 "$1" | tr -d ' \n'; }

# Whether $1 is an ELF64 x86-64 executable with a PVH entry note (Xen note type 18).
check_pvh() {
    local f="$1"
    [[ "$(od -An -tx1 -N4 "$f" | tr -d ' \n')" == 7f454c46 ]] || { log "  not an ELF file"; return 1; }
    if command -v python3 >/dev/null 2>&1; then
        python3 - "$f" <<'PY' || return 1
import struct, sys
data = open(sys.argv[1], "rb").read()
if data[4] != 2 or data[5] != 1 or struct.unpack_from("<H", data, 18)[0] != 62:
    sys.exit("not ELF64 little-endian x86-64")
phoff, = struct.unpack_from("<Q", data, 32)
phentsize, phnum = struct.unpack_from("<HH", data, 54)
for i in range(phnum):
    p_type, _, p_offset, _, _, p_filesz = struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize)
    if p_type != 4:  # PT_NOTE
        continue
    pos, end = p_offset, p_offset + p_filesz
    while pos + 12 <= end:
        namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
        name = data[pos + 12:pos + 12 + namesz].rstrip(b"\0")
        if name == b"Xen" and ntype == 18:  # XEN_ELFNOTE_PHYS32_ENTRY
            entry, = struct.unpack_from("<I", data, pos + 12 + ((namesz + 3) & ~3))
            print("  PVH entry 0x%x" % entry)
            sys.exit(0)
        pos += 12 + ((namesz + 3) & ~3) + ((descsz + 3) & ~3)
sys.exit("no PVH note (Xen note 18)")
PY
    elif command -v readelf >/dev/null 2>&1; then
        readelf -n "$f" | grep -Eq 'PHYS32_ENTRY|note type: \(0x0*12\)' || { log "  no PVH note"; return 1; }
    else
        log "  ELF, but neither python3 nor readelf is here to check the PVH note (not checked)"
    fi
}

extract_vmlinux() {
    local bz="$1" out="$2" magic ver setup payload_off payload_len start size
    magic="$(od -An -c -j $((0x202)) -N4 "$bz" | tr -d ' \n')"
    [[ "$magic" == HdrS ]] || { log "  no HdrS boot header"; return 1; }
    ver="$(u16_at "$bz" $((0x206)))"
    ((ver >= 0x208)) || { log "  boot protocol $ver < 2.08 has no payload fields"; return 1; }
    setup="$(u8_at "$bz" $((0x1f1)))"
    ((setup == 0)) && setup=4
    payload_off="$(u32_at "$bz" $((0x248)))"
    payload_len="$(u32_at "$bz" $((0x24c)))"
    start=$(((setup + 1) * 512 + payload_off))
    log "  boot protocol $(printf '%d.%02d' $((ver >> 8)) $((ver & 255))), setup_sects=$setup," \
        "payload at $start, $payload_len bytes"
    dd if="$bz" of="$WORK/payload" bs=1M iflag=skip_bytes,count_bytes skip="$start" count="$payload_len" status=none
    # LZ4 legacy frame magic 0x184c2102 (the cloud kernel is built with CONFIG_KERNEL_LZ4).
    [[ "$(od -An -tx1 -N4 "$WORK/payload" | tr -d ' \n')" == 02214c18 ]] \
        || { log "  payload is not LZ4 (legacy frame)"; return 1; }
    size="$(tail -c 4 "$WORK/payload" | od -An -tu4 | tr -d ' \n')"
    head -c -4 "$WORK/payload" | lz4 -d -q -c >"$out" || { log "  lz4 -d failed"; return 1; }
    [[ "$(stat -c %s "$out")" == "$size" ]] || { log "  size $(stat -c %s "$out") != expected $size"; return 1; }
    check_pvh "$out"
}

log "extracting vmlinux from the bzImage"
if extract_vmlinux "$NEW/bzImage" "$NEW/vmlinux"; then
    VMLINUX=pvh
    log "vmlinux: $(stat -c %s "$NEW/vmlinux") bytes, PVH-bootable"
else
    VMLINUX=none
    rm -f "$NEW/vmlinux"
    log "WARNING: vmlinux extraction failed; guests will boot the bzImage (slower under TCG)"
fi
rm -f "$WORK/payload"

cat >"$NEW/VERSION" <<EOF
kernel_package=$KPKG
kernel_version=$KVER
kernel_release=$KREL
busybox_version=$BB_VERSION
vmlinux=$VMLINUX
modules=${MODULES[*]}
EOF

rm -rf "$PREFIX"
mv "$NEW" "$PREFIX"
log "done: $PREFIX"
cat "$PREFIX/VERSION"
