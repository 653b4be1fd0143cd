#!/usr/bin/env bash
# Build the Debian package and prove it (as root, on Debian):
#
#   scripts/test-package.sh
#
# 1. cargo build --release (tunsec and the preload library), then
#    cargo deb --no-build (cargo-deb is installed first when missing);
# 2. its contents and control data: binary, library, man pages,
#    completions, unit, examples, docs; depends; maintainer scripts;
# 3. systemd-analyze verify of the unit as installed;
# 4. a fresh Debian 12 with systemd (debootstrap --variant=minbase
#    --include=systemd, kept in .cache/debian12-systemd-root.tar.zst): apt-get install of the .deb (pulling
#    iproute2 and nftables), the installed tunsec finds its preload
#    library, checks the example configurations and plans a run
#    (--dry-run) in a network namespace of its own; then apt-get purge
#    leaves no file of the package behind;
# 5. the e2e test of the unit's command line (tests/e2e/test_e2e_service.py)
#    with the binary from the package;
# 6. the unit under a real systemd (tests/e2e/test_e2e_systemd.py): the
#    fresh Debian 12 with the package booted by systemd-nspawn --boot on a
#    volatile overlay (the tree is not changed), in the network namespace
#    of the demo's host A, host B a `tunsec run` started by hand:
#    systemctl start (Type=notify), traffic AH+ESP on the wire, reload, a
#    broken file refused with FILE:LINE, capabilities, systemd-analyze
#    security, systemctl stop restoring the namespace.
#
# scripts/test.sh runs this as root (TUNSEC_TEST_PACKAGE=0 skips it): it
# downloads a Debian base system (about 40 MB) the first time and takes
# about 2.5 minutes then, half a minute later.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$PWD
target=${CARGO_TARGET_DIR:-$repo/target}

if [ "$(id -u)" != 0 ]; then
    echo "scripts/test-package.sh: needs root (debootstrap, chroot, namespaces)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
fail() { echo "test-package: FAIL: $*" >&2; exit 1; }

need=()
for pair in debootstrap:debootstrap zstd:zstd systemd-analyze:systemd systemd-nspawn:systemd-container \
    nsenter:util-linux tcpdump:tcpdump; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null
fi
if ! cargo deb --version >/dev/null 2>&1; then
    echo "test-package: installing cargo-deb"
    cargo install --locked cargo-deb
fi

cargo build --release
# Stripped: the release profile keeps line tables for perf, the package
# does not need them.
deb=$(cargo deb --no-build --strip 2>/dev/null | tail -n 1)
[ -f "$deb" ] || fail "cargo deb wrote no package ($deb)"
echo "test-package: $deb ($(stat -c %s "$deb") bytes)"

# --- contents ------------------------------------------------------------
contents=$(dpkg-deb -c "$deb" | awk '{print $6}' | sed 's|^\./|/|')
for f in /usr/bin/tunsec /usr/lib/tunsec/libtunsec_xfrm.so \
         /usr/lib/systemd/system/tunsec@.service \
         /usr/share/man/man1/tunsec.1.gz /usr/share/man/man1/tunsec-run.1.gz \
         /usr/share/man/man1/tunsec-setkey.1.gz /usr/share/man/man1/tunsec-ike.1.gz \
         /usr/share/man/man5/tunsec.conf.5.gz \
         /usr/share/bash-completion/completions/tunsec \
         /usr/share/zsh/vendor-completions/_tunsec \
         /usr/share/fish/vendor_completions.d/tunsec.fish \
         /usr/share/doc/tunsec/copyright /usr/share/doc/tunsec/README.md \
         /usr/share/doc/tunsec/control-protocol.md /usr/share/doc/tunsec/ike.md \
         /usr/share/doc/tunsec/examples/site1.conf /usr/share/doc/tunsec/examples/site1.env \
         /usr/share/doc/tunsec/examples/seed-linux-windows.conf; do
    grep -qxF "$f" <<<"$contents" || fail "$f is not in the package:
$contents"
done
for page in man/*.1; do
    grep -qxF "/usr/share/man/man1/$(basename "$page").gz" <<<"$contents" || fail "$page is not in the package"
done
control=$(dpkg-deb -f "$deb")
grep -q '^Depends:.*iproute2' <<<"$control" && grep -q '^Depends:.*nftables' <<<"$control" \
    && grep -q '^Depends:.*procps' <<<"$control" \
    && grep -q '^Depends:.*libc6' <<<"$control" || fail "Depends lacks libc6, iproute2, nftables or procps:
$control"
scripts=$(mktemp -d)
trap 'rm -rf "$scripts"' EXIT
dpkg-deb -e "$deb" "$scripts/DEBIAN"
grep -q 'daemon-reload' "$scripts/DEBIAN/postinst" || fail "postinst does not reload systemd"
grep -q 'daemon-reload' "$scripts/DEBIAN/postrm" || fail "postrm does not reload systemd"
grep -q "systemctl stop 'tunsec@\*.service'" "$scripts/DEBIAN/prerm" || fail "prerm does not stop the instances"
echo "test-package: contents, depends and maintainer scripts as expected"

# --- a fresh Debian 12 -----------------------------------------------------
mkdir -p .cache
base=.cache/debian12-systemd-root.tar.zst
if [ ! -f "$base" ]; then
    echo "test-package: debootstrap bookworm (once; cached in $base)"
    tmp=$(mktemp -d /var/tmp/tunsec-deb12.XXXXXX)
    debootstrap --variant=minbase --include=systemd bookworm "$tmp" http://deb.debian.org/debian >/dev/null
    tar -C "$tmp" --zstd -cf "$base.tmp" . && mv "$base.tmp" "$base"
    rm -rf "$tmp"
fi
root=$(mktemp -d /var/tmp/tunsec-pkgroot.XXXXXX)
chmod 755 "$root"   # apt's _apt user reads its lists and archives there
cleanup() {
    for m in proc dev/pts dev; do umount "$root/$m" 2>/dev/null || true; done
    rm -rf "$root" "$scripts"
}
trap cleanup EXIT
tar -C "$root" --zstd -xf "$base"
mount --bind /dev "$root/dev" && mount --bind /dev/pts "$root/dev/pts" && mount -t proc proc "$root/proc"
cp /etc/resolv.conf "$root/etc/resolv.conf"
cp "$deb" "$root/tmp/"
in_root() { chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive "$@"; }
apt() { in_root apt-get -o APT::Sandbox::User=root -y -qq "$@"; }
# Every file and directory, with its mode and owner, but what apt and
# dpkg keep for themselves.
tree() {
    (cd "$root" && find . -xdev \( -path ./proc -o -path ./dev -o -path ./tmp -o -path ./var/cache \
        -o -path ./var/lib/apt -o -path ./var/lib/dpkg -o -path ./var/log \) -prune -o -printf '%M %u %p\n' | sort)
}

# The dependencies first (apt resolves the package's Depends as named), so
# that the snapshot shows the package's own footprint alone.
deps=$(dpkg-deb -f "$deb" Depends | tr ',' '\n' | sed 's/([^)]*)//; s/|.*//' | tr -d ' ')
apt update
apt install --no-install-recommends $deps >/dev/null
before=$(mktemp)
tree > "$before"
apt install "/tmp/$(basename "$deb")" >/dev/null
in_root dpkg -s tunsec | grep -q '^Status: install ok installed' || fail "tunsec is not installed in the chroot"
in_root tunsec --version
[ "$(stat -c %a "$root/etc/tunsec")" = 700 ] || fail "/etc/tunsec is not a 0700 directory"
# `tunsec ike` finds the preload library where the package put it (the
# next thing it checks is the XFRM socket, which does not exist here).
out=$(in_root tunsec ike --xfrm /run/none.xfrm -- true 2>&1 || true)
grep -q 'no XFRM socket at /run/none.xfrm' <<<"$out" || fail "tunsec ike did not find its library: $out"
for c in "$root"/usr/share/doc/tunsec/examples/*.conf; do
    in_root tunsec check "/usr/share/doc/tunsec/examples/$(basename "$c")" >/dev/null \
        || fail "the installed tunsec rejects the example $(basename "$c")"
done
in_root man -w tunsec-run >/dev/null 2>&1 || [ -f "$root/usr/share/man/man1/tunsec-run.1.gz" ] || fail "no man page"
# A dry run of the unit's command line in a namespace of its own: the
# installed ip(8) and nft(8) are what it would run.
# (Its whole output first: `grep -q` may close the pipe before tunsec is
# done writing.)
plan=$(unshare --net chroot "$root" /usr/bin/tunsec run --dry-run --config /usr/share/doc/tunsec/examples/site1.conf \
    --tun ts-site1 --control /run/tunsec/site1.sock) || fail "dry run of the example failed"
grep -q '^nft -f -$' <<<"$plan" || fail "the dry run of the example plans no nftables table:
$plan"
systemd-analyze verify --root="$root" --man=no /usr/lib/systemd/system/tunsec@.service \
    || fail "systemd-analyze verify found problems in the installed unit"
echo "test-package: installed in a fresh Debian 12; unit verified"

# The e2e tests of the unit, with the packaged binary: its command line
# under setpriv, and the unit under systemd booted from the tree (which
# brings its own /proc and /dev).
[ -x .venv/bin/python ] || fail "no .venv: scripts/test.sh makes it (and runs this)"
for m in proc dev/pts dev; do umount "$root/$m"; done
TUNSEC_BIN="$root/usr/bin/tunsec" TUNSEC_SYSTEMD_ROOT="$root" .venv/bin/python -m pytest -q -s \
    tests/e2e/test_e2e_service.py tests/e2e/test_e2e_systemd.py
mount --bind /dev "$root/dev" && mount --bind /dev/pts "$root/dev/pts" && mount -t proc proc "$root/proc"

# apt-get remove takes every file of the package; purge then the
# (empty) /etc/tunsec, and the tree is what it was before the install.
apt remove tunsec >/dev/null
for f in /usr/bin/tunsec /usr/lib/tunsec /usr/lib/systemd/system/tunsec@.service /usr/share/doc/tunsec \
         /usr/share/man/man1/tunsec-run.1.gz /usr/share/bash-completion/completions/tunsec; do
    [ ! -e "$root$f" ] || fail "$f is left after apt-get remove"
done
apt purge tunsec >/dev/null
in_root dpkg -s tunsec >/dev/null 2>&1 && fail "tunsec still known to dpkg after purge"
after=$(mktemp)
tree > "$after"
left=$(diff "$before" "$after" || true)
rm -f "$before" "$after"
[ -z "$left" ] || fail "apt-get purge did not restore the tree:
$left"
echo "test-package: apt-get remove and purge left nothing behind; OK"
