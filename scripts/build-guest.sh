#!/usr/bin/env bash
# Build the tiny QEMU test guest used by the end-to-end tests and the demo:
#   $SERIALMUXD_GUEST_DIR/vmlinuz    Debian cloud kernel (8250 UART, serial console, SysRq built in)
#   $SERIALMUXD_GUEST_DIR/initrd.gz  static busybox + scripts/guest/init
# Default directory: <repo>/.cache/guest. Idempotent and fast when up to date:
# the kernel is fetched once; the initramfs is rebuilt only when its inputs
# (this script, scripts/guest/*, the busybox binary) change.
# Set SERIALMUXD_GUEST_REFRESH=1 to fetch the newest kernel again.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
src="$repo/scripts/guest"
out=${SERIALMUXD_GUEST_DIR:-$repo/.cache/guest}
busybox=/bin/busybox

log() { printf 'build-guest: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

mkdir -p "$out"
out=$(cd "$out" && pwd)
# Several test processes may call this at once; one builds, the others wait.
exec 9>"$out/.lock"
flock 9

apt_get() { apt-get -q -y -o DPkg::Lock::Timeout=600 "$@"; }

# --- busybox ---------------------------------------------------------------
# The initramfs has no libc, so the busybox must be the static one from
# busybox-static (the plain `busybox` package installs a dynamic /bin/busybox).
if [[ $(dpkg-query -W -f='${Status}' busybox-static 2>/dev/null) != "install ok installed" ]]; then
	log "installing busybox-static"
	apt_get install busybox-static >&2 || { apt_get update >&2 && apt_get install busybox-static >&2; }
fi
[[ -x $busybox ]] || die "$busybox missing after installing busybox-static"

# --- kernel ----------------------------------------------------------------
kernel_package() {
	apt-cache depends linux-image-cloud-amd64 2>/dev/null |
		awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }'
}

if [[ ! -s $out/vmlinuz || ${SERIALMUXD_GUEST_REFRESH:-0} == 1 ]]; then
	pkg=$(kernel_package)
	if [[ -z $pkg ]]; then
		log "apt-cache knows no linux-image-cloud-amd64; running apt-get update"
		apt_get update >&2
		pkg=$(kernel_package)
	fi
	[[ -n $pkg ]] || die "no kernel package found for linux-image-cloud-amd64"
	if [[ -s $out/vmlinuz && $(cat "$out/kernel-package" 2>/dev/null) == "$pkg" ]]; then
		log "kernel $pkg is current"
	else
		log "fetching $pkg"
		tmp=$(mktemp -d "$out/.kernel.XXXXXX")
		trap 'rm -rf "$tmp"' EXIT
		# Download as root into our own directory: the _apt sandbox user
		# cannot write to a mktemp directory.
		(cd "$tmp" && apt-get -q download -o APT::Sandbox::User=root "$pkg") >&2
		dpkg -x "$tmp"/*.deb "$tmp/x"
		vmlinuz=$(find "$tmp/x/boot" -maxdepth 1 -name 'vmlinuz-*' | head -n 1)
		[[ -n $vmlinuz ]] || die "$pkg holds no boot/vmlinuz-*"
		cp "$vmlinuz" "$out/vmlinuz.new"
		mv -f "$out/vmlinuz.new" "$out/vmlinuz"
		printf '%s\n' "$pkg" >"$out/kernel-package"
		printf '%s\n' "${vmlinuz##*/vmlinuz-}" >"$out/kernel-version"
		dpkg-deb -f "$tmp"/*.deb Version >"$out/kernel-deb-version"
		rm -rf "$tmp"
		trap - EXIT
	fi
fi

# --- initramfs -------------------------------------------------------------
stamp=$(cat "${BASH_SOURCE[0]}" "$src/init" "$src/profile" "$busybox" | sha256sum | cut -d' ' -f1)
if [[ -s $out/initrd.gz && $(cat "$out/initrd.stamp" 2>/dev/null) == "$stamp" ]]; then
	exit 0
fi

log "building initrd.gz"
root=$(mktemp -d "$out/.initrd.XXXXXX")
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,dev,etc,proc,sys,tmp,root}
cp "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list); do
	[[ $applet == busybox ]] || ln -s busybox "$root/bin/$applet"
done
ln -s bin "$root/sbin"
install -m 0755 "$src/init" "$root/init"
install -m 0644 "$src/profile" "$root/etc/profile"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
printf 'root:x:0:\n' >"$root/etc/group"
printf 'guest\n' >"$root/etc/hostname"
chmod 1777 "$root/tmp"
# The kernel opens /dev/console before /init runs; without the node it warns
# "unable to open an initial console" (init re-opens it after devtmpfs anyway).
mknod -m 600 "$root/dev/console" c 5 1 2>/dev/null || true
(cd "$root" && find . | "$busybox" cpio -o -H newc 2>/dev/null | gzip -n) >"$out/initrd.gz.new"
mv -f "$out/initrd.gz.new" "$out/initrd.gz"
printf '%s\n' "$stamp" >"$out/initrd.stamp"
rm -rf "$root"
trap - EXIT
log "built $out/initrd.gz ($(stat -c %s "$out/initrd.gz") bytes)"
