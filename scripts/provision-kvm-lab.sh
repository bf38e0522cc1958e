#!/usr/bin/env bash
# Provision the KVM lab: emulated ARM64 KVM hosts (outer QEMU under TCG, -M virt,virtualization=on)
# running three Debian arm64 kernels, each with an initramfs that holds busybox, trixie's arm64
# qemu-system-aarch64 10.0 (the inner QEMU, -accel kvm) and a cross-compiled aarch64 migproxy.
#
#   kernels   6.1  (bookworm-security, linux-image-6.1.0-N-arm64-unsigned, newest N)
#             6.12 (trixie, linux-image-6.12.N+deb13-arm64-unsigned, newest N)
#             7.3  (trixie-backports, linux-binary-unsigned-7.3.N+deb13-arm64 + linux-modules-*)
#   base      busybox-static + qemu-system-arm (trixie, 10.0) + the shared libraries it needs
#             (DT_NEEDED closure read with readelf -d) + the lab's /init, as one gzipped cpio
#   modules   per kernel: virtio_pci/virtio_net and what they depend on (modules.dep), as a cpio
#   migproxy  cargo build --target aarch64-unknown-linux-gnu (linked dynamically against the
#             base's glibc, which the inner QEMU needs anyway)
#
# arm64 packages come from a private apt configuration (own sources list, state and cache under
# the cache dir): the machine's dpkg state is never touched and nothing arm64 runs on this side.
# Cached and idempotent: every product is built in a temp dir and renamed into place, keyed by
# the exact package versions. A series the archive no longer carries fails by name.
#
# Prints on its last line: KVMLAB=<dir>, the directory holding manifest.txt, which lists one line
# per kernel (series, exact version, Image, modules cpio) and the base and migproxy paths.
set -euo pipefail
# A failure inside $(...) must stop the script too.
shopt -s inherit_errexit
cd "$(dirname "$0")/.."

cache="${MIGPROXY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/migproxy}/kvm-lab"
mkdir -p "$cache"
log() { printf 'provision-kvm-lab: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

for tool in readelf cpio gzip xz zstd aarch64-linux-gnu-gcc aarch64-linux-gnu-objcopy dpkg-deb; do
    command -v "$tool" >/dev/null || die "missing $tool (scripts/debian-packages.txt lists the packages; run scripts/provision.sh)"
done

# --- private apt configuration -------------------------------------------------------------
apt_root="$cache/apt"
mkdir -p "$apt_root/etc/apt/sources.list.d" "$apt_root/etc/apt/preferences.d" \
    "$apt_root/etc/apt/apt.conf.d" "$apt_root/state/lists/partial" "$apt_root/cache/archives/partial"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
cat >"$apt_root/etc/apt/sources.list" <<EOF
deb [arch=arm64 signed-by=$keyring] http://deb.debian.org/debian trixie main
deb [arch=arm64 signed-by=$keyring] http://deb.debian.org/debian trixie-backports main
deb [arch=arm64 signed-by=$keyring] http://deb.debian.org/debian-security bookworm-security main
EOF
touch "$apt_root/state/status"
cat >"$apt_root/apt.conf" <<EOF
APT::Architecture "arm64";
APT::Architectures "arm64";
Dir::Etc "$apt_root/etc/apt";
Dir::State "$apt_root/state";
Dir::State::status "$apt_root/state/status";
Dir::Cache "$apt_root/cache";
Debug::NoLocking "true";
APT::Sandbox::User "root";
EOF
export APT_CONFIG="$apt_root/apt.conf"
# Refresh the package lists once a day: new kernel builds replace old ones in the archive.
stamp="$apt_root/state/updated"
if [ ! -e "$stamp" ] || [ -n "$(find "$stamp" -mmin +1440)" ]; then
    log "apt-get update (private arm64 configuration)"
    apt-get update -qq >&2 || die "apt-get update of the private arm64 sources failed"
    touch "$stamp"
fi

# download PKG=VERSION... into $1 (a cache folder keyed by the caller), skipping what is there.
download() {
    local dir=$1
    shift
    mkdir -p "$dir"
    local want=()
    local spec name ver
    for spec in "$@"; do
        name=${spec%%=*}
        ver=${spec#*=}
        ls "$dir/${name}_${ver//:/%3a}_"*.deb >/dev/null 2>&1 || want+=("$spec")
    done
    if [ "${#want[@]}" -gt 0 ]; then
        log "downloading ${#want[@]} arm64 package(s) into $dir"
        (cd "$dir" && apt-get download -qq "${want[@]}" >&2) || die "apt-get download failed: ${want[*]}"
    fi
}

# newest package name matching an extended regex, by version sort of the name.
newest_package() {
    apt-cache search --names-only "$1" | awk '{print $1}' | grep -E "$1" | sort -V | tail -n1
}
candidate() { apt-cache policy "$1" | awk '/Candidate:/ {print $2}'; }

# --- kernels --------------------------------------------------------------------------------
# series -> package-name patterns (image; optional separate modules package)
kernel_image_pattern() {
    case $1 in
    6.1) echo '^linux-image-6\.1\.0-[0-9]+-arm64-unsigned$' ;;
    6.12) echo '^linux-image-6\.12\.[0-9]+\+deb13-arm64-unsigned$' ;;
    7.3) echo '^linux-binary-unsigned-7\.3\.[0-9]+\+deb13-arm64$' ;;
    esac
}

# Modules the emulated host needs for its virtio-net-pci NIC (anything not built in).
wanted_modules="virtio_pci virtio_net"

provision_kernel() {
    local series=$1
    local image_pkg ver kdir tmp extract
    image_pkg=$(newest_package "$(kernel_image_pattern "$series")")
    [ -n "$image_pkg" ] || die "kernel series $series: no package matches $(kernel_image_pattern "$series") (gone from the archive?)"
    ver=$(candidate "$image_pkg")
    kdir="$cache/kernel-$series-$image_pkg-$ver"
    if [ -e "$kdir/done" ]; then
        echo "$kdir"
        return
    fi
    local pkgs=("$image_pkg=$ver")
    if [ "$series" = 7.3 ]; then
        # 7.3 splits the image from its modules.
        local uname=${image_pkg#linux-binary-unsigned-}
        local mod_pkg="linux-modules-$uname"
        local mod_ver
        mod_ver=$(candidate "$mod_pkg")
        [ -n "$mod_ver" ] && [ "$mod_ver" != "(none)" ] || die "kernel series $series: no $mod_pkg"
        pkgs+=("$mod_pkg=$mod_ver")
        # linux-base holds modules.builtin (what needs no insmod).
        local base_pkg="linux-base-$uname"
        pkgs+=("$base_pkg=$(candidate "$base_pkg")")
    fi
    download "$cache/debs/kernel-$series" "${pkgs[@]}"
    tmp=$(mktemp -d "$cache/.kernel-$series.XXXXXX")
    extract="$tmp/x"
    mkdir -p "$extract"
    local spec
    for spec in "${pkgs[@]}"; do
        local name=${spec%%=*} v=${spec#*=}
        dpkg-deb -x "$cache/debs/kernel-$series/${name}_${v//:/%3a}_arm64.deb" "$extract"
    done
    # /boot/vmlinuz-RELEASE, or (7.3's split packages) /usr/lib/modules/RELEASE/vmlinuz.unsigned.
    local vmlinuz release
    vmlinuz=$(ls "$extract"/boot/vmlinuz-* 2>/dev/null | head -n1 || true)
    if [ -n "$vmlinuz" ]; then
        release=${vmlinuz##*/vmlinuz-}
    else
        vmlinuz=$(ls "$extract"/usr/lib/modules/*/vmlinuz* 2>/dev/null | head -n1 || true)
        [ -n "$vmlinuz" ] || die "kernel series $series: no vmlinuz in $image_pkg"
        release=$(basename "$(dirname "$vmlinuz")")
    fi
    cp "$vmlinuz" "$tmp/Image"
    # The modules the NIC needs, in load order (dependencies first, read from each module's
    # .modinfo "depends=" since the packages ship no modules.dep), decompressed: busybox insmod
    # hands the bytes to init_module, which takes no compressed modules.
    local moddir="$extract/lib/modules/$release"
    [ -d "$moddir" ] || moddir="$extract/usr/lib/modules/$release"
    [ -d "$moddir" ] || die "kernel series $series: no modules folder for $release in the packages"
    local out="$tmp/mods/lib/kvmlab"
    mkdir -p "$out"
    : >"$out/modules.order"
    add_module() {
        local name=$1 file dep
        grep -qx "$name.ko" "$out/modules.order" && return
        file=$(find "$moddir" -name "$name.ko" -o -name "$name.ko.xz" -o -name "$name.ko.zst" -o -name "$name.ko.gz" | head -n1)
        if [ -z "$file" ]; then
            # modules.builtin names paths with dashes or underscores as in the source tree.
            grep -qE "/(${name}|${name//_/-})\.ko$" "$moddir/modules.builtin" ||
                die "kernel series $series: module $name neither shipped nor built in"
            return
        fi
        case $file in
        *.xz) xz -dc "$file" >"$out/$name.ko" ;;
        *.zst) zstd -dc "$file" >"$out/$name.ko" ;;
        *.gz) gzip -dc "$file" >"$out/$name.ko" ;;
        *) cp "$file" "$out/$name.ko" ;;
        esac
        aarch64-linux-gnu-objcopy -O binary --only-section=.modinfo "$out/$name.ko" "$tmp/modinfo"
        for dep in $(tr '\0' '\n' <"$tmp/modinfo" | sed -n 's/^depends=//p' | tr ',' ' '); do
            add_module "${dep//-/_}"
        done
        echo "$name.ko" >>"$out/modules.order"
    }
    local m
    for m in $wanted_modules; do add_module "$m"; done
    (cd "$tmp/mods" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) | gzip -9 >"$tmp/modules.cpio.gz"
    printf '%s\n' "$image_pkg $ver" >"$tmp/package"
    printf '%s\n' "$release" >"$tmp/release"
    rm -rf "$extract" "$tmp/mods" "$tmp/modinfo"
    touch "$tmp/done"
    rm -rf "$kdir"
    mv "$tmp" "$kdir"
    echo "$kdir"
}

# --- base initramfs: busybox + inner QEMU + libraries + /init -------------------------------
provision_base() {
    local qemu_ver bb_ver key bdir tmp
    qemu_ver=$(apt-cache madison qemu-system-arm | awk -F'|' '$2 ~ / 1:10\.0\./ && $3 ~ /trixie\// {gsub(/ /,"",$2); print $2}' | sort -V | tail -n1)
    [ -n "$qemu_ver" ] || die "no qemu-system-arm 10.0 for arm64 in trixie"
    bb_ver=$(candidate busybox-static)
    # Keyed by the package versions, /init and this function's own text.
    key=$({ printf '%s\n' "$qemu_ver" "$bb_ver"; cat integration-tests/kvm-lab/init; declare -f provision_base; } |
        sha256sum | cut -c1-16)
    bdir="$cache/base-$key"
    if [ -e "$bdir/done" ]; then
        echo "$bdir"
        return
    fi
    # The full dependency closure as apt resolves it on an empty arm64 system; only the shared
    # libraries the binaries really load (readelf) go into the image.
    local specs
    specs=$(apt-get -s install --no-install-recommends "qemu-system-arm=$qemu_ver" "busybox-static=$bb_ver" 2>/dev/null |
        awk '/^Inst / {gsub(/[()]/, "", $3); print $2 "=" $3}')
    [ -n "$specs" ] || die "apt could not resolve qemu-system-arm=$qemu_ver for arm64"
    # shellcheck disable=SC2086
    download "$cache/debs/base" $specs
    tmp=$(mktemp -d "$cache/.base.XXXXXX")
    local x="$tmp/x" root="$tmp/root" spec deb
    mkdir -p "$x" "$root"/{bin,sbin,usr/bin,lib,lib64,proc,sys,dev,tmp,etc,root,run}
    for spec in $specs; do
        deb=$(ls "$cache/debs/base/${spec%%=*}_"*_{arm64,all}.deb 2>/dev/null | head -n1 || true)
        [ -n "$deb" ] || die "downloaded package missing: $spec"
        dpkg-deb -x "$deb" "$x"
    done
    cp "$x/usr/bin/busybox" "$root/bin/busybox" 2>/dev/null || cp "$x/bin/busybox" "$root/bin/busybox"
    cp "$x/usr/bin/qemu-system-aarch64" "$root/usr/bin/"
    # DT_NEEDED closure of the inner QEMU (busybox-static needs nothing), plus libgcc_s for the
    # Rust binary that rides in the top layer (its unwinder).
    cp -L "$x/usr/lib/aarch64-linux-gnu/libgcc_s.so.1" "$root/lib/libgcc_s.so.1" 2>/dev/null ||
        cp -L "$x/lib/aarch64-linux-gnu/libgcc_s.so.1" "$root/lib/libgcc_s.so.1"
    local queue=("$root/usr/bin/qemu-system-aarch64" "$root/lib/libgcc_s.so.1") seen=" " lib found f dir
    while [ "${#queue[@]}" -gt 0 ]; do
        f=${queue[0]}
        queue=("${queue[@]:1}")
        for lib in $(readelf -d "$f" | awk '/NEEDED/ {gsub(/[\[\]]/, "", $5); print $5}'); do
            case $seen in *" $lib "*) continue ;; esac
            seen="$seen$lib "
            found=""
            for dir in lib/aarch64-linux-gnu usr/lib/aarch64-linux-gnu lib usr/lib; do
                if [ -e "$x/$dir/$lib" ]; then found="$x/$dir/$lib"; break; fi
            done
            [ -n "$found" ] || die "inner QEMU needs $lib, which no downloaded package holds"
            cp -L "$found" "$root/lib/$lib"
            queue+=("$root/lib/$lib")
        done
    done
    # The dynamic loader at the path the binaries name (PT_INTERP).
    cp -L "$x/lib/ld-linux-aarch64.so.1" "$root/lib/ld-linux-aarch64.so.1" 2>/dev/null ||
        cp -L "$x/usr/lib/ld-linux-aarch64.so.1" "$root/lib/ld-linux-aarch64.so.1"
    # glibc looks in /lib/aarch64-linux-gnu by default; one folder with a link keeps it simple.
    ln -s . "$root/lib/aarch64-linux-gnu"
    install -m 0755 integration-tests/kvm-lab/init "$root/init"
    local applet
    # busybox is arm64: its applet list cannot be asked here, so link the ones /init and the
    # harness use.
    for applet in sh ash mount mkdir cat echo ls insmod ip nc sleep kill ps uname grep sed awk \
        head tail rm mv cp poweroff reboot sync dd base64 gzip wc tr seq date setsid true false \
        printf test '[' env chmod ln sort uniq cut hexdump od; do
        ln -sf busybox "$root/bin/$applet"
    done
    (cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) | gzip -6 >"$tmp/base.cpio.gz"
    printf '%s\n' "qemu-system-arm $qemu_ver" "busybox-static $bb_ver" >"$tmp/package"
    ls "$root/lib" >"$tmp/libs"
    rm -rf "$x" "$root"
    touch "$tmp/done"
    rm -rf "$bdir"
    mv "$tmp" "$bdir"
    log "base initramfs: qemu-system-arm $qemu_ver, busybox-static $bb_ver, $(wc -l <"$bdir/libs") libraries, $(du -h "$bdir/base.cpio.gz" | cut -f1)"
    echo "$bdir"
}

# --- migproxy for aarch64 -------------------------------------------------------------------
provision_migproxy() {
    local target=aarch64-unknown-linux-gnu
    if ! rustup target list --installed | grep -q "^$target\$"; then
        rustup target add "$target" >&2 || die "rustup target add $target failed"
    fi
    log "cross-building migproxy for $target"
    # The dev profile without debug info: the quickest build, and small enough for an initrd.
    CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
        CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc \
        CARGO_PROFILE_DEV_DEBUG=0 \
        cargo build -q -p migproxy --target "$target" >&2 || die "cross build of migproxy failed"
    local bin="${CARGO_TARGET_DIR:-$PWD/target}/$target/debug/migproxy"
    [ -x "$bin" ] || die "no $bin after the cross build"
    # Every library it loads must be in the base initramfs.
    local lib
    for lib in $(readelf -d "$bin" | awk '/NEEDED/ {gsub(/[\[\]]/, "", $5); print $5}'); do
        grep -qx "$lib" "$base_dir/libs" || die "aarch64 migproxy needs $lib, which the base initramfs lacks"
    done
    echo "$bin"
}

manifest_tmp=$(mktemp "$cache/.manifest.XXXXXX")
base_dir=$(provision_base)
echo "base $base_dir/base.cpio.gz $(tr '\n' ' ' <"$base_dir/package")" >>"$manifest_tmp"
for series in 6.1 6.12 7.3; do
    kdir=$(provision_kernel "$series")
    echo "kernel $series $(cat "$kdir/release") $kdir/Image $kdir/modules.cpio.gz $(cat "$kdir/package")" >>"$manifest_tmp"
    log "kernel $series: $(cat "$kdir/package") (uname $(cat "$kdir/release"))"
done
migproxy_bin=$(provision_migproxy)
echo "migproxy $migproxy_bin" >>"$manifest_tmp"
mv "$manifest_tmp" "$cache/manifest.txt"
# Keep the cache bounded: products the manifest no longer names (older builds) go.
for old in "$cache"/base-* "$cache"/kernel-*; do
    [ -d "$old" ] || continue
    grep -qF "$old/" "$cache/manifest.txt" || rm -rf "$old"
done
cat "$cache/manifest.txt" >&2
echo "KVMLAB=$cache"
