# outbox-tailer's images, from one file:
#
#   docker build -t outbox-tailer .                         # the tailer (the last stage, `runtime`)
#   docker build --target migrate -t outbox-tailer-migrate .   # alembic upgrade head, as a one-shot job
#   docker build --target chat -t outbox-chat .             # the reference chat endpoint (demo traffic)
#
# With podman, add `--format docker`: the OCI format has no HEALTHCHECK.
# tests/it/container.rs builds `runtime` for real with podman, on a local
# Debian 12 base (RUNTIME_BASE) and with the host's binary standing in for the
# `builder` stage (`--build-context builder=<dir holding out/outbox-tailer>`).

ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_BASE=debian:bookworm-slim
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: both binaries, release profile, exactly the locked dependencies ---
# (one cargo invocation: the dependencies are compiled once, for both)
FROM ${RUST_IMAGE} AS builder
WORKDIR /src
# Dependencies first, in a layer of their own: only the manifests and empty
# sources of every workspace member, so this layer is rebuilt only when
# Cargo.toml or Cargo.lock change, not on every source edit.
COPY Cargo.toml Cargo.lock ./
COPY crates/outbox-producer/Cargo.toml crates/outbox-producer/
COPY crates/outbox-testkit/Cargo.toml crates/outbox-testkit/
COPY crates/outbox-chat/Cargo.toml crates/outbox-chat/
RUN mkdir -p src crates/outbox-producer/src crates/outbox-testkit/src crates/outbox-chat/src/bin \
 && echo 'fn main() {}' > src/main.rs \
 && echo 'fn main() {}' > crates/outbox-chat/src/bin/outbox-chat.rs \
 && touch src/lib.rs crates/outbox-producer/src/lib.rs crates/outbox-testkit/src/lib.rs crates/outbox-chat/src/lib.rs \
 && cargo build --locked --release -p outbox-tailer -p outbox-chat --bin outbox-tailer --bin outbox-chat
# The real sources. COPY keeps their (older) modification times, so touch
# them: cargo must not take the empty sources' artifacts for up to date.
COPY src src
COPY crates crates
RUN find src crates -name '*.rs' -exec touch {} + \
 && cargo build --locked --release -p outbox-tailer -p outbox-chat --bin outbox-tailer --bin outbox-chat \
 && mkdir /out \
 && cp target/release/outbox-tailer target/release/outbox-chat /out/

# --- what both runtime images share: Debian slim, CA roots, a non-root user ---
FROM ${RUNTIME_BASE} AS runtime-base
# CA roots: NATS over tls:// without a custom CA, and sslmode=verify-full
# with a public CA, trust the system store.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 outbox \
 && useradd --system --uid 10001 --gid outbox --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin outbox

# --- the reference chat endpoint (docker-compose.yml's demo traffic) ---
FROM runtime-base AS chat
COPY --from=builder /out/outbox-chat /usr/local/bin/outbox-chat
USER 10001:10001
ENV CHAT_LISTEN=0.0.0.0:8080
EXPOSE 8080
ENTRYPOINT ["outbox-chat"]

# --- the migrations: a one-shot job that runs before the tailer ---
FROM ${PYTHON_IMAGE} AS migrate
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY alembic/requirements.txt alembic/requirements.txt
RUN pip install --no-cache-dir -r alembic/requirements.txt \
 && groupadd --system --gid 10001 outbox \
 && useradd --system --uid 10001 --gid outbox --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin outbox
COPY alembic.ini ./
COPY alembic alembic
USER 10001:10001
# DATABASE_URL comes from the environment (alembic/env.py).
CMD ["alembic", "upgrade", "head"]

# --- the tailer: the last stage, so a plain `docker build .` gives it ---
FROM runtime-base AS runtime
COPY --from=builder /out/outbox-tailer /usr/local/bin/outbox-tailer
# Numeric, so Kubernetes' runAsNonRoot can check it without /etc/passwd.
USER 10001:10001
# A smoke test at build time: the binary starts in this image, as this user,
# and knows the health check command used below.
RUN ["outbox-tailer", "--version"]
RUN ["outbox-tailer", "healthcheck", "--help"]
ENV METRICS_ADDR=0.0.0.0:9599
EXPOSE 9599
# Exec form: `healthcheck` GETs /healthz on METRICS_ADDR; no shell or curl needed.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
  CMD ["outbox-tailer", "healthcheck"]
ENTRYPOINT ["outbox-tailer"]
CMD ["run"]
