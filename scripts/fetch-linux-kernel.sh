#!/usr/bin/env bash
# Fetches a real Linux kernel for the Linux boot protocol tests (crates/vmm/tests/linux_boot.rs).
#
# Usage: scripts/fetch-linux-kernel.sh [DEST_DIR]     (default: <repo>/target/linux-kernel)
#
# Produces, in DEST_DIR:
#   vmlinuz     the bzImage of Debian's current linux-image-*-cloud-amd64 package
#   vmlinux     the ELF kernel decompressed from that bzImage's payload
#   initrd.img  a small initrd (a text pattern whose every line differs, not page-sized)
#   package     the Debian package they came from
#
# Idempotent: if DEST_DIR already holds the files of the current package, nothing is downloaded.
# Runs on Debian as root (it may call apt-get update and install a missing decompressor).
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dest=${1:-"$repo_root/target/linux-kernel"}
meta=linux-image-cloud-amd64

die() {
    echo "fetch-linux-kernel: $*" >&2
    exit 1
}

for tool in apt-get apt-cache dpkg-deb od dd seq truncate; do
    command -v "$tool" >/dev/null || die "needs $tool (run on Debian)"
done

# The versioned package the metapackage points at, e.g. linux-image-6.1.0-56-cloud-amd64.
resolve_package() {
    apt-cache depends "$meta" 2>/dev/null |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9].*-cloud-amd64$/ { print $2; exit }'
}

pkg=$(resolve_package || true)
if [[ -z $pkg ]]; then
    echo "fetch-linux-kernel: $meta not in the package lists, running apt-get update" >&2
    apt-get update -qq
    pkg=$(resolve_package || true)
fi
[[ -n $pkg ]] || die "cannot resolve the kernel package from $meta (apt-cache depends $meta)"

summary() {
    echo "package:    $(cat "$dest/package")"
    for f in vmlinuz vmlinux initrd.img; do
        printf '%-11s %s (%s bytes)\n' "$f:" "$dest/$f" "$(stat -c %s "$dest/$f")"
    done
}

if [[ -f $dest/vmlinuz && -f $dest/vmlinux && -f $dest/initrd.img && -f $dest/package ]] &&
    [[ $(cat "$dest/package") == "$pkg" ]]; then
    echo "fetch-linux-kernel: $dest is up to date"
    summary
    exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "fetch-linux-kernel: downloading $pkg"
# The sandbox user _apt cannot write into a private temp dir; download as the caller instead.
(cd "$tmp" && apt-get download -q -o APT::Sandbox::User="$(id -un)" "$pkg")
deb=$(find "$tmp" -maxdepth 1 -name "${pkg}_*.deb" -print -quit)
[[ -n $deb ]] || die "apt-get download produced no .deb for $pkg"
dpkg-deb -x "$deb" "$tmp/root"
vmlinuz=$(find "$tmp/root/boot" -maxdepth 1 -name 'vmlinuz-*' -print -quit)
[[ -n $vmlinuz ]] || die "$deb has no boot/vmlinuz-*"

# Little-endian unsigned integer of $2 bytes at offset $1 of file $3.
le() {
    od -An -t "u$2" -j "$1" -N "$2" --endian=little "$3" | tr -d ' \n'
}
hex_at() {
    od -An -t x1 -j "$1" -N "$2" "$3" | tr -d ' \n'
}

[[ $(hex_at 0x202 4 "$vmlinuz") == 48647253 ]] || die "$vmlinuz is not a bzImage (no HdrS)"
version=$(le 0x206 2 "$vmlinuz")
((version >= 0x208)) || die "$vmlinuz uses boot protocol $version < 2.08: no payload_offset"
setup_sects=$(le 0x1f1 1 "$vmlinuz")
((setup_sects != 0)) || setup_sects=4
# payload_offset is relative to the protected-mode code, which follows the setup sectors.
payload_offset=$(($(le 0x248 4 "$vmlinuz") + (setup_sects + 1) * 512))
payload_length=$(le 0x24c 4 "$vmlinuz")
dd if="$vmlinuz" of="$tmp/payload" iflag=skip_bytes,count_bytes skip="$payload_offset" \
    count="$payload_length" status=none
# The kernel build appends the decompressed size (le32) to every payload (gzip's trailer holds it).
expected_size=$(le $((payload_length - 4)) 4 "$tmp/payload")

magic=$(hex_at 0 6 "$tmp/payload")
case $magic in
fd377a585a00) fmt=xz tool=xz debpkg=xz-utils cmd=(xz -dc) ;;
28b52ffd*) fmt=zstd tool=zstd debpkg=zstd cmd=(zstd -dcq) ;;
1f8b08*) fmt=gzip tool=gzip debpkg=gzip cmd=(gzip -dc) ;;
5d0000*) fmt=lzma tool=xz debpkg=xz-utils cmd=(xz --format=lzma -dc) ;;
02214c18*) fmt=lz4 tool=lz4 debpkg=lz4 cmd=(lz4 -dc) ;;
425a68*) fmt=bzip2 tool=bzip2 debpkg=bzip2 cmd=(bzip2 -dc) ;;
894c5a4f*) fmt=lzo tool=lzop debpkg=lzop cmd=(lzop -dc) ;;
*) die "unknown compression of the bzImage payload (magic $magic at offset $payload_offset)" ;;
esac
if ! command -v "$tool" >/dev/null; then
    echo "fetch-linux-kernel: installing $debpkg to decompress the $fmt payload" >&2
    apt-get install -y -qq --no-install-recommends "$debpkg" >/dev/null ||
        { apt-get update -qq && apt-get install -y -qq --no-install-recommends "$debpkg" >/dev/null; }
fi
# The appended size word is trailing garbage to most decompressors, which then exit non-zero
# after writing the whole kernel: judge the result by its size and ELF magic instead.
"${cmd[@]}" <"$tmp/payload" >"$tmp/vmlinux" 2>"$tmp/decompress.log" || true
actual_size=$(stat -c %s "$tmp/vmlinux")
if [[ $(hex_at 0 4 "$tmp/vmlinux") != 7f454c46 || $actual_size != "$expected_size" ]]; then
    cat "$tmp/decompress.log" >&2
    die "decompressing the $fmt payload gave $actual_size bytes (expected an ELF of $expected_size)"
fi

# A deterministic initrd whose lines all differ, so a misplaced copy cannot compare equal; its
# size is not a multiple of the page size on purpose.
seq -f 'cowvm linux boot test initrd line %07g' 1 10000 >"$tmp/initrd.img"
truncate -s $((300 * 1024 + 123)) "$tmp/initrd.img"

mkdir -p "$dest"
cp "$vmlinuz" "$tmp/vmlinuz"
for f in vmlinuz vmlinux initrd.img; do
    mv -f "$tmp/$f" "$dest/$f"
done
echo "$pkg" >"$dest/package"
echo "fetch-linux-kernel: $(basename "$vmlinuz"), boot protocol $(printf '%#x' "$version"), $fmt payload"
summary
