# syntax=docker/dockerfile:1.4
#
# migproxy container image.
#
#   docker build -t migproxy .                       # public base images, crates from crates.io
#   podman build --format docker -t migproxy .       # same with podman (docker format keeps HEALTHCHECK)
#
# Offline builds: put the crates in `vendor/` (`cargo vendor`) with the matching `.cargo/config.toml` in the
# build context; the build then runs `cargo build --frozen` and never touches the network.
# scripts/container-smoke.sh does exactly that with locally made base images.
#
# The runtime stage holds one static binary and nothing else: no shell, no package manager, no curl. The
# health check is therefore answered by the binary itself (`migproxy healthcheck`).

# Any image with cargo, rustc, a C linker and glibc's static archives (libc6-dev) will do.
ARG BUILDER_IMAGE=docker.io/library/rust:1-bookworm
# Any image able to run a static binary; distroless/static also brings /etc/passwd (nonroot = 65532) and CA
# certificates. `scratch` works too.
ARG RUNTIME_IMAGE=gcr.io/distroless/static-debian12:nonroot

FROM ${BUILDER_IMAGE} AS build
WORKDIR /src
COPY . .
# The target directory is a build cache mount, so a source edit recompiles migproxy's own crates only.
# `--target <host triple>` keeps `+crt-static` off build scripts and proc macros (they must stay dynamic);
# Static glibc is enough: since glibc 2.34 the `files` and `dns` NSS modules are part of libc itself, so
# upstream host names resolve without any shared library in the runtime image (checked with /etc/hosts names).
RUN --mount=type=cache,id=migproxy-target,target=/src/target,sharing=locked \
    set -eu; \
    host="$(rustc -vV | sed -n 's/^host: //p')"; \
    if [ -d vendor ]; then cargo_net=--frozen; else cargo_net=--locked; fi; \
    RUSTFLAGS="-C target-feature=+crt-static" \
    CARGO_PROFILE_RELEASE_DEBUG=0 \
    CARGO_PROFILE_RELEASE_STRIP=symbols \
        cargo build --release "$cargo_net" --target "$host" -p migproxy; \
    install -D -m 0755 "target/$host/release/migproxy" /out/migproxy; \
    /out/migproxy --version

FROM ${RUNTIME_IMAGE}
LABEL org.opencontainers.image.title="migproxy" \
      org.opencontainers.image.description="Live-migration proxy that repairs ARM64 cpreg lists between QEMU builds" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/migproxy /migproxy
# Numeric, so it works on bases without /etc/passwd (scratch); 65532 is distroless' `nonroot`.
USER 65532:65532
# 4444: migrations in; 9444: admin (/healthz, /readyz, /metrics, /profiles/NAME).
EXPOSE 4444/tcp 9444/tcp
# migproxy drains on SIGTERM: it stops accepting, lets running migrations finish (up to --drain-timeout), then
# exits 0. Give the container a stop timeout longer than the drain timeout (`podman stop -t`, Kubernetes
# terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["/migproxy", "healthcheck"]
ENTRYPOINT ["/migproxy"]
# Inside a container the proxy must listen on all addresses of its network namespace (with --network host:
# the host's). The destination comes from the environment (MIGPROXY_UPSTREAM, MIGPROXY_DEST_PROFILE, ...):
#   podman run --network host -e MIGPROXY_UPSTREAM=tcp:DEST:4444 IMAGE
# These are flags rather than ENV on purpose: `IMAGE run --config FILE` replaces them entirely, whereas an
# ENV MIGPROXY_LISTEN would add a listener to every configuration file. The health check's URL follows
# MIGPROXY_HEALTHCHECK_URL when the admin address is moved.
CMD ["run", "--listen", "tcp:0.0.0.0:4444", "--admin", "tcp:0.0.0.0:9444"]
