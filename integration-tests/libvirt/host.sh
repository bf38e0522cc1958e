#!/bin/sh
# One libvirt "host" of the test lab (integration-tests/src/libvirt.rs): run inside its own network
# namespace and a private mount namespace (`ip netns exec NS unshare -m --propagation private`),
# it gives libvirtd a private /run, /var and /etc/libvirt, a `libvirt-qemu` user that exists only
# here, and this host's QEMU build at the lab's fixed <emulator> path, then becomes libvirtd.
#
# usage: host.sh HOST_DIR QEMU_BINARY [LIBVIRT_ROOT]
#   HOST_DIR holds etc-libvirt/ (libvirtd.conf, qemu.conf), passwd, group, and receives var/ and
#   sock/; QEMU_BINARY is this host's real QEMU; LIBVIRT_ROOT, if given, is a privately unpacked
#   libvirt (scripts/provision-libvirt.sh) to run instead of the system's.
set -eu
host_dir=$1
qemu=$2
libvirt_root=${3:-}

mount -t tmpfs -o mode=0755 lab-run /run
mkdir -p "$host_dir/var/upper" "$host_dir/var/work"
mount -t overlay lab-var -o "lowerdir=/var,upperdir=$host_dir/var/upper,workdir=$host_dir/var/work" /var
mount --bind "$host_dir/etc-libvirt" /etc/libvirt
mount --bind "$host_dir/passwd" /etc/passwd
mount --bind "$host_dir/group" /etc/group

# The <emulator> of every lab domain. libvirt 9.0 passes -no-acpi, which QEMU 10.0 removed;
# `-machine acpi=off` says the same to every QEMU since 7.x.
mkdir -p /run/migproxy-lab
cat > /run/migproxy-lab/qemu-system-aarch64 <<WRAPPER
#!/bin/sh
for arg do
    shift
    if [ "\$arg" = -no-acpi ]; then
        set -- "\$@" -machine acpi=off
    else
        set -- "\$@" "\$arg"
    fi
done
exec '$qemu' "\$@"
WRAPPER
chmod 0755 /run/migproxy-lab/qemu-system-aarch64

if [ -n "$libvirt_root" ]; then
    # The unpacked libvirtd finds its driver modules and data (CPU maps, schemas) at the paths it
    # was built for; only this namespace sees them replaced.
    multiarch=usr/lib/x86_64-linux-gnu
    mount --bind "$libvirt_root/$multiarch/libvirt" "/$multiarch/libvirt"
    mount --bind "$libvirt_root/usr/share/libvirt" /usr/share/libvirt
    export LD_LIBRARY_PATH="$libvirt_root/$multiarch"
    exec "$libvirt_root/usr/sbin/libvirtd" --config "$host_dir/etc-libvirt/libvirtd.conf"
fi
exec libvirtd --config "$host_dir/etc-libvirt/libvirtd.conf"
