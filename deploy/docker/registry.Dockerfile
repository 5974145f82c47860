# syntax=docker/dockerfile:1
# The isthmus/registry image: isthmus-registry and isthmusctl built from this workspace in a Rust
# builder, on a distroless runtime (glibc, CA certificates, no shell, no package manager),
# run as the distroless nonroot user (65532).
#
#   docker build -f deploy/docker/registry.Dockerfile -t isthmus/registry:0.1.0 .
#
# Run from the repository root (the whole workspace is the build context;
# registry.Dockerfile.dockerignore keeps target/ and .git out of it). The base images are
# named without a registry host: set RUST_IMAGE and RUNTIME_IMAGE (--build-arg) to your
# mirror's names.
ARG RUST_IMAGE=rust:1.88-slim-bookworm
ARG RUNTIME_IMAGE=distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --profile dist --locked -p isthmus-registry --bin isthmus-registry --bin isthmusctl \
 && mkdir -p /out && cp target/dist/isthmus-registry target/dist/isthmusctl /out/

FROM ${RUNTIME_IMAGE}
COPY --from=build /out/isthmus-registry /usr/local/bin/isthmus-registry
COPY --from=build /out/isthmusctl /usr/local/bin/isthmusctl
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/isthmus-registry"]
