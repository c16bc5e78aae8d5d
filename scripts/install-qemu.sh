#!/usr/bin/env bash
# Install QEMU 7.2's qemu-system-x86_64 privately under $PREFIX (default /opt/colo-qemu).
#
# Why not `apt-get install qemu-system-x86`: on these machines the preinstalled qemu-utils 10.0
# breaks qemu-system-common < 8.0 (see /work/shared/notes/machine.md, "Linux guests"). So:
#   1. apt-get download qemu-system-x86 + qemu-system-common (Debian 12 bookworm, 7.2),
#   2. dpkg -x both into $PREFIX/root,
#   3. apt-get install the runtime libraries named in their Depends fields (only those not already
#      installed at a satisfying version, so nothing already on the machine gets upgraded),
#      plus seabios, ipxe-qemu and qemu-system-data,
#   4. write a wrapper $PREFIX/bin/qemu-system-x86_64 that execs the real binary with
#      -L /usr/share/qemu -L /usr/share/seabios -L /usr/lib/ipxe/qemu and
#      QEMU_MODULE_DIR pointing at the extracted modules (TCG itself is a module in Debian's build:
#      accel-tcg-x86_64.so; QEMU also finds it relative to its own path, the variable makes it
#      explicit). No LD_LIBRARY_PATH: every shared library comes from apt.
# Idempotent: if the wrapper exists, reports the expected version and can start a TCG machine,
# nothing is done. Set COLO_QEMU_FORCE=1 to reinstall anyway.
#
# Usage: sudo scripts/install-qemu.sh          (needs root: apt-get install, writes to /opt)
# Env:   COLO_QEMU_PREFIX (default /opt/colo-qemu)
#        COLO_QEMU_VERSION (default: newest 1:7.2* version apt knows for qemu-system-x86)
set -euo pipefail

PREFIX="${COLO_QEMU_PREFIX:-/opt/colo-qemu}"
ROOT="$PREFIX/root"
WRAPPER="$PREFIX/bin/qemu-system-x86_64"
STAMP="$PREFIX/.installed-version"
REAL_BIN="$ROOT/usr/bin/qemu-system-x86_64"
MODULE_DIR="$ROOT/usr/lib/x86_64-linux-gnu/qemu"
# Packages we extract ourselves (never apt-install them) and data packages we apt-install.
EXTRACTED_PKGS=(qemu-system-x86 qemu-system-common)
DATA_PKGS=(seabios ipxe-qemu qemu-system-data)

log() { printf '[install-qemu] %s\n' "$*"; }
die() { printf '[install-qemu] ERROR: %s\n' "$*" >&2; exit 1; }

export DEBIAN_FRONTEND=noninteractive

# Functional check of an existing install: version string, and a q35 TCG machine that is created
# (-S: vCPUs created but stopped) and quits; this loads the accel-tcg module and the SeaBIOS
# firmware through the -L paths.
install_works() {
    [[ -x "$WRAPPER" && -x "$REAL_BIN" && -f "$STAMP" ]] || return 1
    local want ver
    want="$(cat "$STAMP")"
    ver="$("$WRAPPER" --version 2>/dev/null | sed -n 1p)" || return 1
    [[ "$ver" == *"$want"* ]] || return 1
    printf 'quit\n' | timeout 30 "$WRAPPER" -M q35 -accel tcg -m 64 -nodefaults -display none \
        -S -monitor stdio >/dev/null 2>&1 || return 1
    return 0
}

# Pick the newest 1:7.2* version of a package known to apt ('' if none).
pick_72_version() {
    apt-cache madison "$1" 2>/dev/null | awk -F'|' '{gsub(/ /,"",$2); print $2}' \
        | grep -E '^1:7\.2' | sort -V -r | sed -n 1p || true
}

# Is dependency clause "pkg (op ver)" satisfied by an installed package?
dep_satisfied() {
    local pkg="$1" op="$2" ver="$3" status inst
    status="$(dpkg-query -W -f='${db:Status-Abbrev}' "$pkg" 2>/dev/null || true)"
    [[ "$status" == ii* ]] || return 1
    [[ -z "$op" ]] && return 0
    inst="$(dpkg-query -W -f='${Version}' "$pkg")"
    case "$op" in
        '>=') dpkg --compare-versions "$inst" ge "$ver" ;;
        '<=') dpkg --compare-versions "$inst" le "$ver" ;;
        '>>') dpkg --compare-versions "$inst" gt "$ver" ;;
        '<<') dpkg --compare-versions "$inst" lt "$ver" ;;
        '=')  dpkg --compare-versions "$inst" eq "$ver" ;;
        *) return 1 ;;
    esac
}

if [[ "${COLO_QEMU_FORCE:-0}" != 1 ]] && install_works; then
    log "already installed and working: $WRAPPER ($(cat "$STAMP")); nothing to do"
    "$WRAPPER" --version
    exit 0
fi

[[ "$(id -u)" == 0 ]] || die "must run as root (apt-get install, writes to $PREFIX)"
command -v apt-get >/dev/null || die "apt-get not found (Debian 12 expected)"

VERSION="${COLO_QEMU_VERSION:-$(pick_72_version qemu-system-x86)}"
if [[ -z "$VERSION" ]]; then
    log "no 7.2 version of qemu-system-x86 in the apt lists; running apt-get update"
    apt-get update -q
    VERSION="$(pick_72_version qemu-system-x86)"
fi
[[ -n "$VERSION" ]] || die "apt knows no 1:7.2* version of qemu-system-x86 (Debian 12 bookworm needed)"
log "QEMU package version: $VERSION"

WORK="$(mktemp -d /tmp/colo-qemu-install.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
# apt-get download as root drops privileges to _apt; let it write here (avoids a warning).
chmod 755 "$WORK"
if id _apt >/dev/null 2>&1; then chown _apt "$WORK" || true; fi

download() {
    (cd "$WORK" && apt-get download -q "${EXTRACTED_PKGS[@]/%/=$VERSION}")
}
log "apt-get download ${EXTRACTED_PKGS[*]} (=$VERSION) into $WORK"
if ! download; then
    log "download failed; running apt-get update and retrying"
    apt-get update -q
    download
fi

DEBS=()
for p in "${EXTRACTED_PKGS[@]}"; do
    f="$(ls "$WORK"/"${p}"_*.deb 2>/dev/null | sed -n 1p || true)"
    [[ -n "$f" ]] || die "downloaded .deb for $p not found in $WORK"
    DEBS+=("$f")
done

# Runtime dependencies from the Depends fields of both packages.
# Clauses look like "libfoo1 (>= 1.2)" or "a (>= 1) | b"; the qemu packages themselves and the
# data packages are handled separately.
TO_INSTALL=()
while IFS= read -r clause; do
    clause="$(sed -E 's/^ +//; s/ +$//' <<<"$clause")"
    [[ -z "$clause" ]] && continue
    first_pkg=""
    satisfied=0
    IFS='|' read -r -a alts <<<"$clause"
    for alt in "${alts[@]}"; do
        alt="$(sed -E 's/^ +//; s/ +$//' <<<"$alt")"
        pkg="$(sed -E 's/^([^ (]+).*/\1/; s/:any$//' <<<"$alt")"
        op=""; ver=""
        if [[ "$alt" =~ \(([\<\>=]+)\ *([^\)]+)\) ]]; then
            op="${BASH_REMATCH[1]}"; ver="${BASH_REMATCH[2]// /}"
        fi
        [[ -z "$first_pkg" ]] && first_pkg="$pkg"
        if dep_satisfied "$pkg" "$op" "$ver"; then satisfied=1; break; fi
    done
    case "$first_pkg" in
        qemu-*|seabios|ipxe-qemu) continue ;;
    esac
    if [[ "$satisfied" == 0 ]]; then TO_INSTALL+=("$first_pkg"); fi
done < <(for d in "${DEBS[@]}"; do dpkg-deb -f "$d" Depends | tr ',' '\n'; done | sort -u)

DATA_VERSION="$(pick_72_version qemu-system-data)"
for p in "${DATA_PKGS[@]}"; do
    if [[ "$p" == qemu-system-data && -n "$DATA_VERSION" ]]; then
        if dep_satisfied qemu-system-data '>>' '1:7.2+dfsg~'; then continue; fi
        TO_INSTALL+=("qemu-system-data=$DATA_VERSION")
    elif ! dep_satisfied "$p" '' ''; then
        TO_INSTALL+=("$p")
    fi
done

if ((${#TO_INSTALL[@]})); then
    log "apt-get install --no-install-recommends ${TO_INSTALL[*]}"
    if ! apt-get install -y -q --no-install-recommends "${TO_INSTALL[@]}"; then
        log "apt-get install failed; running apt-get update and retrying"
        apt-get update -q
        apt-get install -y -q --no-install-recommends "${TO_INSTALL[@]}"
    fi
else
    log "all runtime dependencies already installed"
fi

log "extracting into $ROOT"
rm -rf "$ROOT.new"
mkdir -p "$ROOT.new"
for d in "${DEBS[@]}"; do
    log "  dpkg -x $(basename "$d")"
    dpkg -x "$d" "$ROOT.new"
done
rm -rf "$ROOT"
mv "$ROOT.new" "$ROOT"
[[ -x "$REAL_BIN" ]] || die "$REAL_BIN missing after extraction"
[[ -f "$MODULE_DIR/accel-tcg-x86_64.so" ]] || die "TCG module missing in $MODULE_DIR"

# Every library the binary and the TCG module need must now resolve from the system.
missing="$(ldd "$REAL_BIN" "$MODULE_DIR/accel-tcg-x86_64.so" | grep 'not found' || true)"
[[ -z "$missing" ]] || die "unresolved libraries after install:
$missing"

log "writing wrapper $WRAPPER"
mkdir -p "$PREFIX/bin"
cat >"$WRAPPER.new" <<EOF
#!/bin/sh
# Generated by scripts/install-qemu.sh: QEMU $VERSION extracted privately into $ROOT.
# All shared libraries come from the system (apt); modules (incl. TCG) from the private tree.
QEMU_MODULE_DIR="$MODULE_DIR"
export QEMU_MODULE_DIR
exec "$REAL_BIN" -L /usr/share/qemu -L /usr/share/seabios -L /usr/lib/ipxe/qemu "\$@"
EOF
chmod 755 "$WRAPPER.new"
mv "$WRAPPER.new" "$WRAPPER"
upstream="$("$WRAPPER" --version | sed -n 1p | sed -E 's/^QEMU emulator version ([^ ]+).*/\1/')"
printf '%s\n' "$upstream" >"$STAMP"

install_works || die "installed, but the self-test (TCG machine start) failed; try: $WRAPPER -M none -accel tcg -display none -monitor stdio"
log "done: $WRAPPER"
"$WRAPPER" --version
