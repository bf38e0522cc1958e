#!/usr/bin/env bash
# Build the migproxy container image on this machine and smoke-test it.
#
#   scripts/container-smoke.sh               build, run, health check, drain on `podman stop`
#   scripts/container-smoke.sh --build-only  build (or reuse) the image and print IMAGE=... on the last line
#   scripts/container-smoke.sh --e2e         the smoke test, then the real-QEMU migrations through the image
#                                            (integration-tests/tests/container.rs, needs QEMU 10.0 and 7.2)
#
# Why it looks like this (see the operators guide, deploy/README.md):
# - no registry pulls and no crates.io during the build: the base images are made here (mmdebstrap, plus the
#   host's own Rust toolchain for the builder, because Debian 12's rustc is too old), the crates are vendored
#   into a temporary build context, and the build runs with `--network none`;
# - podman needs `--runtime runc` (crun rejects hybrid cgroups) and explicit ulimits (setrlimit is denied);
# - `--format docker` keeps the HEALTHCHECK (OCI image format has none).
#
# The build goes through the Dockerfile's default path (a real in-container `cargo build`); only the base
# images are swapped via build arguments.
#
# Caches (reruns are fast): ~/.cache/migproxy/container/ holds the base tarball and vendored crates; podman's
# own storage holds the imported base images, the layer cache and the cargo target cache mount.
#
# Environment: MIGPROXY_IMAGE (tag to build, default localhost/migproxy:smoke), MIGPROXY_CACHE (default
# ~/.cache/migproxy), MIGPROXY_SOURCE_REV (build a git revision instead of the working tree).
set -euo pipefail
shopt -s inherit_errexit

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${MIGPROXY_CACHE:-$HOME/.cache/migproxy}/container"
IMAGE="${MIGPROXY_IMAGE:-localhost/migproxy:smoke}"
DEBIAN_SUITE=bookworm
# The builder needs a C linker and glibc's static archives (for +crt-static).
BUILDER_PACKAGES="ca-certificates,gcc,libc6-dev"
PODMAN=(podman --runtime runc)
RUN_LIMITS=(--ulimit nofile=1024:1024 --ulimit nproc=1024:1024)

BUILD_ONLY=0
E2E=0
case "${1:-}" in
    --build-only) BUILD_ONLY=1 ;;
    --e2e) E2E=1 ;;
    "") ;;
    *) echo "usage: $0 [--build-only|--e2e]" >&2; exit 2 ;;
esac

T0=$SECONDS
log() { printf '[container-smoke %4ss] %s\n' "$((SECONDS - T0))" "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }

# scripts/provision.sh installs these (scripts/debian-packages.txt); the script also runs on its own.
ensure_tools() {
    local missing=()
    for tool in podman buildah runc mmdebstrap python3; do
        command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
    done
    [ "${#missing[@]}" -eq 0 ] && return
    log "installing ${missing[*]}"
    apt-get -o DPkg::Lock::Timeout=600 update -qq >&2 || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends \
        podman buildah runc mmdebstrap uidmap python3 >&2 || die "apt-get install ${missing[*]} failed"
}

sha() { sha256sum | cut -c1-12; }

image_exists() { podman image exists "$1"; }

# Debian minbase with the builder packages, as a cached tarball.
debian_tarball() {
    local key tarball
    key="$(printf '%s %s' "$DEBIAN_SUITE" "$BUILDER_PACKAGES" | sha)"
    tarball="$CACHE/debian-$DEBIAN_SUITE-build-$key.tar"
    if [ ! -s "$tarball" ]; then
        log "mmdebstrap $DEBIAN_SUITE (minbase + $BUILDER_PACKAGES)"
        rm -rf "$tarball.tmp"
        mmdebstrap --quiet --format=tar --variant=minbase --include="$BUILDER_PACKAGES" "$DEBIAN_SUITE" "$tarball.tmp" >&2
        mv "$tarball.tmp" "$tarball"
    fi
    printf '%s\n' "$tarball"
}

# Builder image: Debian minbase + the host's active Rust toolchain unpacked into /usr/local (a rustup
# toolchain directory has the layout of a prefix: bin/, lib/, lib/rustlib/...).
builder_image() {
    local tarball sysroot version tag ctr toolchain_tar
    tarball="$(debian_tarball)"
    sysroot="$(rustc --print sysroot)"
    version="$(rustc -V | awk '{print $2}')"
    tag="localhost/migproxy-builder:rust-$version-$(basename "$tarball" .tar | sed 's/.*-//')"
    if ! image_exists "$tag"; then
        log "making $tag from $sysroot"
        local base="localhost/migproxy-debian:$DEBIAN_SUITE-build"
        podman import --quiet "$tarball" "$base" >/dev/null
        toolchain_tar="$(mktemp --tmpdir migproxy-toolchain.XXXXXX.tar)"
        tar -C "$sysroot" -cf "$toolchain_tar" \
            --exclude=./share/doc --exclude=./share/man --exclude=./share/zsh \
            --exclude=./lib/rustlib/src --exclude=./bin/rust-analyzer .
        ctr="$(buildah from --pull=never "$base")"
        buildah add --quiet "$ctr" "$toolchain_tar" /usr/local >/dev/null
        rm -f "$toolchain_tar"
        buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
            --label "org.migproxy.rust=$version" "$ctr"
        buildah commit --quiet --rm "$ctr" "$tag" >/dev/null
    fi
    printf '%s\n' "$tag"
}

# Runtime base shaped like distroless/static: no shell, just /etc/passwd with `nonroot` (65532), /etc/group,
# CA certificates and a /tmp.
runtime_image() {
    local tarball tag stage
    tarball="$(debian_tarball)"
    tag="localhost/migproxy-static:$DEBIAN_SUITE"
    if ! image_exists "$tag"; then
        log "making $tag"
        stage="$(mktemp -d --tmpdir migproxy-static.XXXXXX)"
        mkdir -p "$stage/etc" "$stage/tmp" "$stage/home/nonroot"
        chmod 1777 "$stage/tmp"
        printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' \
            >"$stage/etc/passwd"
        printf 'root:x:0:\nnonroot:x:65532:\n' >"$stage/etc/group"
        tar -C "$stage" -xf "$tarball" ./etc/ssl/certs/ca-certificates.crt
        tar -C "$stage" --numeric-owner -cf "$stage.tar" . \
            && podman import --quiet "$stage.tar" "$tag" >/dev/null
        rm -rf "$stage" "$stage.tar"
    fi
    printf '%s\n' "$tag"
}

# Vendored crates for the context's Cargo.lock, cached by its hash. `cargo vendor` needs every crate of
# the lock file for every platform (windows-sys ...), more than a build fetches: scripts/provision.sh
# runs `cargo fetch --locked` so this works offline; run on its own, the script fetches what is missing.
vendor_dir() {
    local ctx="$1" key dir errors
    key="$(sha <"$ctx/Cargo.lock")"
    dir="$CACHE/vendor-$key"
    if [ ! -d "$dir/vendor" ]; then
        log "cargo vendor (offline, from the local cargo cache)"
        rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
        errors="$dir.tmp/cargo-vendor.log"
        if ! (cd "$ctx" && cargo vendor --locked --offline "$dir.tmp/vendor" >/dev/null 2>"$errors"); then
            log "some crates are not in the local cargo cache: cargo fetch --locked"
            (cd "$ctx" && cargo fetch --locked >&2) || die "cargo fetch --locked failed"
            (cd "$ctx" && cargo vendor --locked --offline "$dir.tmp/vendor" >/dev/null 2>"$errors") || {
                tail -n 20 "$errors" >&2
                die "cargo vendor failed (cargo's last lines above)"
            }
        fi
        rm -f "$errors"
        rm -rf "$dir" && mv "$dir.tmp" "$dir"
    fi
    printf '%s\n' "$dir"
}

# A temporary build context: the working tree's files (tracked and untracked, minus .gitignore'd ones; or
# the tree of $MIGPROXY_SOURCE_REV), the vendored crates and a .cargo/config.toml that points cargo at them.
make_context() {
    local ctx="$1" vendored
    if [ -n "${MIGPROXY_SOURCE_REV:-}" ]; then
        git -C "$ROOT" archive --format=tar "$MIGPROXY_SOURCE_REV" | tar -C "$ctx" -xf -
    else
        (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
            | tar --null --ignore-failed-read -T - -cf -) 2>/dev/null | tar -C "$ctx" -xf -
    fi
    vendored="$(vendor_dir "$ctx")"
    cp -al "$vendored/vendor" "$ctx/vendor" 2>/dev/null || cp -a "$vendored/vendor" "$ctx/vendor"
    mkdir -p "$ctx/.cargo"
    # Relative to the directory holding .cargo/, i.e. the build context root (WORKDIR /src in the image).
    cat >>"$ctx/.cargo/config.toml" <<'TOML'
[source.crates-io]
replace-with = "vendored-sources"

[source.vendored-sources]
directory = "vendor"
TOML
}

build_image() {
    local builder runtime ctx
    builder="$(builder_image)"
    runtime="$(runtime_image)"
    ctx="$(mktemp -d --tmpdir migproxy-context.XXXXXX)"
    make_context "$ctx"
    log "podman build $IMAGE (builder $builder, runtime $runtime, --network none)"
    "${PODMAN[@]}" build --format docker --pull=never --network none \
        --build-arg BUILDER_IMAGE="$builder" --build-arg RUNTIME_IMAGE="$runtime" \
        -t "$IMAGE" "$ctx" >&2 || { rm -rf "$ctx"; die "podman build failed"; }
    rm -rf "$ctx"
    # Superseded build-stage images (each holds a copy of the context): they inherit the builder's label.
    podman image prune -f --filter label=org.migproxy.rust >/dev/null
    podman image prune -f --filter label=org.opencontainers.image.title=migproxy >/dev/null
    local config
    config="$(podman image inspect --format '{{.Config.User}} {{.Config.StopSignal}} {{json .Config.Healthcheck.Test}}' "$IMAGE")"
    log "image config: $config"
    case "$config" in
        '65532:65532 SIGTERM ["CMD","/migproxy","healthcheck"]') ;;
        *) die "unexpected image config: $config" ;;
    esac
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Run the image as operators do (host network, default user), answer the health check, drain on stop.
smoke_run() {
    local name="migproxy-smoke-$$" listen admin upstream status code
    listen="$(free_port)"
    admin="$(free_port)"
    upstream="$(free_port)"
    trap 'podman rm -f -t 0 '"$name"' >/dev/null 2>&1 || true' EXIT
    log "podman run $name (listen $listen, admin $admin)"
    "${PODMAN[@]}" run -d --name "$name" --network host "${RUN_LIMITS[@]}" \
        -e "MIGPROXY_HEALTHCHECK_URL=http://127.0.0.1:$admin/healthz" \
        "$IMAGE" run --listen "tcp:127.0.0.1:$listen" --admin "tcp:127.0.0.1:$admin" \
        --upstream "tcp:127.0.0.1:$upstream" >/dev/null

    local deadline=$((SECONDS + 30))
    until podman healthcheck run "$name" >/dev/null 2>&1; do
        status="$(podman inspect --format '{{.State.Status}}' "$name" 2>/dev/null || echo gone)"
        if [ "$status" != running ] || [ "$SECONDS" -ge "$deadline" ]; then
            podman logs "$name" >&2 || true
            die "health check not answered (container $status)"
        fi
        sleep 0.5
    done
    log "health check answered: $(podman inspect --format '{{.State.Health.Status}}' "$name")"
    # The same binary answers from inside the image without any other tool (distroless has no curl).
    podman exec "$name" /migproxy healthcheck --url "http://127.0.0.1:$admin/readyz" >&2 \
        || die "/readyz not ready"

    log "podman stop (SIGTERM, drain)"
    "${PODMAN[@]}" stop -t 30 "$name" >/dev/null 2>&1
    code="$(podman inspect --format '{{.State.ExitCode}}' "$name")"
    podman logs "$name" 2>&1 | tail -n 5 >&2
    [ "$code" = 0 ] || die "container exited with $code after podman stop (expected 0: drained)"
    log "drained, exit code 0"
    podman rm -f -t 0 "$name" >/dev/null 2>&1 || true
    trap - EXIT
}

main() {
    mkdir -p "$CACHE"
    ensure_tools
    # One build at a time (the tests may call --build-only while CI runs the smoke): they share the caches
    # and the 2 cores.
    exec 9>"$CACHE/build.lock"
    flock 9
    build_image
    flock -u 9
    log "image built"
    if [ "$BUILD_ONLY" = 0 ]; then
        smoke_run
        log "smoke OK"
    fi
    if [ "$E2E" = 1 ]; then
        log "cargo test -p migproxy-integration-tests --test container"
        (cd "$ROOT" && MIGPROXY_IMAGE="$IMAGE" cargo test -p migproxy-integration-tests --test container \
            -- --test-threads=1 --nocapture) >&2 || die "container end-to-end tests failed"
        log "end-to-end OK"
    fi
    printf 'IMAGE=%s\n' "$IMAGE"
}

main
