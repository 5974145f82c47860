# syntax=docker/dockerfile:1
# The isthmus/vm-agent image: the workload agent, which an injected pod runs twice, as the
# isthmus-init container (`capture-init`: the pod's nftables capture rules, as root with
# NET_ADMIN and NET_RAW) and as the isthmus-proxy sidecar (`sidecar`, uid 1337, the uid the
# capture rules exempt).
#
#   docker build -f deploy/docker/vm-agent.Dockerfile -t isthmus/vm-agent:0.1.0 .
#
# Unlike the other images its runtime is Debian slim, not distroless: the agent programs
# the capture by running the `nft` binary (package nftables), which needs its shared
# libraries (libnftables, libjansson, libmnl, libnftnl) that a distroless base does not
# have. The image runs as 1337 by default; the pod spec runs the init container as root.
# Its build is the `dist-agent` profile, optimized for size where the agent spends little
# CPU (Cargo.toml says which crates keep full optimization, and what it saves).
#
# Run from the repository root (vm-agent.Dockerfile.dockerignore keeps target/ and .git
# out of the context). The base images are named without a registry host: set RUST_IMAGE
# and RUNTIME_IMAGE (--build-arg) to your mirror's names.
ARG RUST_IMAGE=rust:1.88-slim-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --profile dist-agent --locked -p isthmus-vm-agent --bin isthmus-vm-agent \
 && mkdir -p /out && cp target/dist-agent/isthmus-vm-agent /out/

FROM ${RUNTIME_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends nftables ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 1337 isthmus-proxy \
 && useradd --system --uid 1337 --gid 1337 --no-create-home --shell /usr/sbin/nologin isthmus-proxy
COPY --from=build /out/isthmus-vm-agent /usr/local/bin/isthmus-vm-agent
USER 1337:1337
ENTRYPOINT ["/usr/local/bin/isthmus-vm-agent"]
