# keygate's container image: built with the Rust toolchain, run as a non-root user from a
# minimal runtime image (glibc only: no shell, no package manager).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY migrations migrations
COPY src src
COPY vendor vendor
RUN cargo build --release --locked --bin keygate

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/keygate /usr/local/bin/keygate
USER 65532:65532
# gRPC (KeyAdmin, Authorize, Envoy ext_authz, health, reflection) and Prometheus metrics.
EXPOSE 50051 9090
ENTRYPOINT ["/usr/local/bin/keygate"]
CMD ["serve"]
