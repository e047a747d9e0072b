//! `tollgate-healthcheck`: the container's HEALTHCHECK, for a final image with no shell and no
//! curl (distroless). It sends `GET PATH` to `ADDR` over plain HTTP/1.1 and exits 0 on a `200`,
//! 1 on anything else (another status, a refused connection, a timeout).
//!
//! Usage: `tollgate-healthcheck [ADDR] [PATH]`, by default `127.0.0.1:9090 /readyz` (the admin
//! listener of deploy/docker/tollgate.toml). Standard library only, so the builder compiles it
//! with a bare `rustc` and it adds a few hundred KB to the image.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

/// Short enough that a wedged listener fails the check well inside Docker's own timeout.
const TIMEOUT: Duration = Duration::from_secs(2);

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:9090".to_owned());
    let path = args.next().unwrap_or_else(|| "/readyz".to_owned());
    match probe(&addr, &path) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("healthcheck: GET http://{addr}{path}: {err}");
            ExitCode::FAILURE
        }
    }
}

fn probe(addr: &str, path: &str) -> Result<(), String> {
    let target = addr
        .to_socket_addrs()
        .map_err(|e| format!("bad address: {e}"))?
        .next()
        .ok_or_else(|| "the address resolves to nothing".to_owned())?;
    let mut stream = TcpStream::connect_timeout(&target, TIMEOUT).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(TIMEOUT)))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: tollgate-healthcheck\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    // The status line is all we need: "HTTP/1.1 200 OK".
    let mut head = Vec::with_capacity(64);
    let mut buf = [0u8; 64];
    while head.len() < 12 {
        let n = stream.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let line = line.lines().next().unwrap_or_default();
    match line.split(' ').nth(1) {
        Some("200") => Ok(()),
        _ => Err(format!("unhealthy answer: {line:?}")),
    }
}
