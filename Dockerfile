# syntax=docker/dockerfile:1.7
#
# dispatchd's container image: built with the Rust image, run as a non-root user on
# distroless (glibc, no shell, no package manager).
#
#   docker build -t dispatchd .
#   docker run --rm -p 8080:8080 -v dispatch-data:/var/lib/dispatch \
#       -e DISPATCH_ADMIN_TOKEN="$(openssl rand -hex 32)" --stop-timeout 20 dispatchd
#
# Configure it with DISPATCH_* environment variables (`dispatchd --help` lists them all)
# rather than flags: the HEALTHCHECK reads DISPATCH_ADMIN_LISTEN / DISPATCH_LISTEN to find
# the port that serves /healthz. `--stop-timeout 20` (or `docker stop -t 20`): Docker's
# default of 10 s equals dispatchd's own shutdown bound (--shutdown-timeout-ms), so the
# SIGKILL could land before a graceful stop ends. Nothing acknowledged is lost either way.
#
# BuildKit is needed (the default builder since Docker 23) for the cache mounts and the
# heredoc below. k8s/check.py lints this file with hadolint, parses it with BuildKit's own
# parser, and compiles and runs the health check program against a live dispatchd.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

# ---- build -------------------------------------------------------------------------------
# The builder's Debian release must match the runtime's (cc-debian12 = bookworm): the
# binary links the builder's glibc.
FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS builder
WORKDIR /src

# The HEALTHCHECK program: distroless has no shell and no curl, so the image carries this
# std-only client (about 400 KB). It sends GET /healthz (or the path given as its first
# argument) to this container's own admin port (DISPATCH_ADMIN_LISTEN) or, when that is
# unset, its client port (DISPATCH_LISTEN; else 8080), and exits 0 on a 200 only.
COPY <<'EOF' /src/healthcheck.rs
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::process::exit;
use std::time::Duration;

fn main() {
    let listen = ["DISPATCH_ADMIN_LISTEN", "DISPATCH_LISTEN"]
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
        .unwrap_or_else(|| "127.0.0.1:8080".to_string());
    let path = std::env::args().nth(1).unwrap_or_else(|| "/healthz".to_string());
    let mut addr: SocketAddr = match listen.parse() {
        Ok(a) => a,
        Err(_) => {
            eprintln!("healthcheck: cannot parse listen address {listen:?}");
            exit(2)
        }
    };
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
        });
    }
    let timeout = Duration::from_secs(3);
    let status = (|| -> std::io::Result<Vec<u8>> {
        let mut s = TcpStream::connect_timeout(&addr, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
        let mut buf = vec![0u8; 64];
        let mut n = 0;
        while n < 12 {
            let k = s.read(&mut buf[n..])?;
            if k == 0 {
                break;
            }
            n += k;
        }
        buf.truncate(n);
        Ok(buf)
    })();
    match status {
        Ok(b) if b.len() >= 12 && b.starts_with(b"HTTP/1.") && &b[9..12] == b"200" => exit(0),
        Ok(b) => {
            let line = String::from_utf8_lossy(&b);
            eprintln!("healthcheck: http://{addr}{path} answered {:?}", line.lines().next().unwrap_or(""));
            exit(1)
        }
        Err(e) => {
            eprintln!("healthcheck: http://{addr}{path}: {e}");
            exit(1)
        }
    }
}
EOF

RUN rustc --edition 2021 -C opt-level=s -C strip=symbols -o /usr/local/bin/dispatchd-healthcheck /src/healthcheck.rs

# The whole workspace: cargo needs every member's manifest (and its declared benches) even
# to build one binary. .dockerignore keeps target/, data/ and .git out of the context.
COPY . .
# --locked: exactly the versions in Cargo.lock, or fail. The cache mounts keep the crate
# registry and compiled dependencies between builds; they are not part of the image, so the
# binary is copied out of target/ in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin dispatchd \
 && install -D -m 0755 target/release/dispatchd /usr/local/bin/dispatchd

# The data directory, owned by the runtime user (distroless has no shell to make it there).
RUN install -d -m 0700 -o 65532 -g 65532 /out/var/lib/dispatch

# ---- run ---------------------------------------------------------------------------------
# cc-debian12: glibc and libgcc_s, which is all dispatchd links. :nonroot runs as
# uid/gid 65532. Pin it by digest (image@sha256:...) in your registry for reproducible
# deployments.
FROM gcr.io/distroless/cc-debian12:nonroot

LABEL org.opencontainers.image.title="dispatchd" \
      org.opencontainers.image.description="Real-time ride-hailing dispatch engine" \
      org.opencontainers.image.licenses="Apache-2.0"

COPY --from=builder /usr/local/bin/dispatchd /usr/local/bin/dispatchd
COPY --from=builder /usr/local/bin/dispatchd-healthcheck /usr/local/bin/dispatchd-healthcheck
COPY --from=builder --chown=65532:65532 /out/var/lib/dispatch /var/lib/dispatch

# Everything on one port, as dispatchd does by default: an empty DISPATCH_ADMIN_LISTEN is
# refused, so the image cannot set it and still let `docker run -e` turn it off. Set
# DISPATCH_ADMIN_LISTEN=0.0.0.0:9090 to move /admin/, /metrics and health to their own port
# (the Kubernetes manifests in k8s/ do).
ENV DISPATCH_LISTEN=0.0.0.0:8080 \
    DISPATCH_DATA_DIR=/var/lib/dispatch \
    DISPATCH_LOG_FORMAT=json
EXPOSE 8080 9090
# sled's files; one process per directory (it holds a lock). Without -v Docker makes an
# anonymous volume here, so the state never lives in the container's writable layer.
VOLUME ["/var/lib/dispatch"]
USER 65532:65532

# /healthz is 200 while the process runs, recovery included (/readyz waits for recovery).
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/usr/local/bin/dispatchd-healthcheck", "/healthz"]

# dispatchd handles SIGTERM itself (graceful shutdown), so it runs as PID 1 directly.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/dispatchd"]
