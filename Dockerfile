# syntax=docker/dockerfile:1
# kvrouter's container image: the `kvrouter` binary (etcd and Kubernetes discovery and the
# NATS event plane built in) on a slim Debian, as a non-root user, with the vendored Qwen3 tokenizer.
#
#   docker build -t kvrouter .
#   docker run --rm -p 8000:8000 kvrouter up --http-host 0.0.0.0      # frontend + 4 mock workers
#   docker run --rm -p 8000:8000 kvrouter frontend --workers-file ...  # the default command
#
# Kubernetes manifests using it: deploy/kubernetes/ (README "Deploy on Kubernetes").

# The toolchain the workspace is built and tested with (rust-version in Cargo.toml is the floor).
ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
# protoc: the etcd client's build generates its gRPC code. gcc/g++ (libzmq and oniguruma are
# built from source) come with the image.
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler \
 && rm -rf /var/lib/apt/lists/*
# The path the runtime stage places the tokenizer under: the binary looks for it at
# <this>/server/../models/qwen3 (kvrouter_server::vendored_model_dir, fixed at compile time).
WORKDIR /usr/src/kvrouter
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/src/kvrouter/target \
    cargo build --release --locked -p kvrouter --features etcd,nats,kubernetes \
 && install -m 0755 target/release/kvrouter /usr/local/bin/kvrouter

FROM debian:bookworm-slim AS runtime
# libstdc++ (libzmq is C++) and bash (the health check) are part of the slim image.
RUN groupadd --system --gid 10001 kvrouter \
 && useradd --system --uid 10001 --gid kvrouter --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin kvrouter
COPY --from=build /usr/local/bin/kvrouter /usr/local/bin/kvrouter
# The vendored tokenizer where the binary expects it; `server/` must exist for the `..` in
# that path to resolve. `--model-path DIR` (DYN_MODEL_PATH) serves another model's tokenizer.
COPY models/qwen3 /usr/src/kvrouter/models/qwen3
RUN mkdir -p /usr/src/kvrouter/server
USER 10001:10001
WORKDIR /tmp
# Containers serve the network: the OpenAI API (`frontend`, `up`) and the standalone router's
# API (`router`) listen on every interface; the admin API stays on 127.0.0.1 unless given
# --admin-host and a token.
ENV DYN_HTTP_HOST=0.0.0.0 \
    DYN_HTTP_PORT=8000 \
    KVROUTER_ROUTER_HTTP_HOST=0.0.0.0 \
    KVROUTER_ROUTER_HTTP_PORT=8090
EXPOSE 8000 8090
# Healthy while /live answers 200 on the frontend's port or the standalone router's (whichever
# this container runs). No curl in the image: bash's /dev/tcp.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["bash", "-c", "for p in ${DYN_HTTP_PORT:-8000} ${KVROUTER_ROUTER_HTTP_PORT:-8090}; do (exec 3<>/dev/tcp/127.0.0.1/$p && printf 'GET /live HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n' >&3 && head -n 1 <&3 | grep -q ' 200 ') 2>/dev/null && exit 0; done; exit 1"]
ENTRYPOINT ["kvrouter"]
CMD ["frontend"]
