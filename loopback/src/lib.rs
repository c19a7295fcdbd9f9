//! Loopback ports for the processes the end-to-end tests and the benchmark start.
//!
//! Asking the kernel for port 0 and passing the number on is a race: until the child
//! binds it, the port is back in the kernel's ephemeral range, where any outgoing
//! connection (a test's HTTP client, Envoy's upstream pool, a PostgreSQL client) may
//! take it as its source port. CI lost a run to exactly that. The ports handed out here
//! lie outside the ephemeral range (`net.ipv4.ip_local_port_range`), which the kernel
//! never picks on its own, and one process hands out a port again only after going
//! round the whole band (12,768 ports with Linux's default range). Another process
//! choosing ports the same way could still collide; each process starts at its own
//! place in the band, and a port found bound is skipped.

use std::io;
use std::net::TcpListener;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// Where the band starts when it lies below the ephemeral range: clear of the
/// commonly configured service ports, and of `make run`'s (8080–10000).
const BAND_FLOOR: u16 = 20_000;
/// A band narrower than this is not worth using.
const MIN_BAND: u32 = 1_000;
/// Linux's default, for when `/proc` cannot be read.
const DEFAULT_EPHEMERAL: (u16, u16) = (32_768, 60_999);

/// A loopback port that is free now and that no outgoing connection will take.
pub fn free_port() -> io::Result<u16> {
    let band = band()?;
    for _ in 0..band.len {
        let port = band.next();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        format!(
            "every loopback port from {} to {} is taken",
            band.start,
            u32::from(band.start) + band.len - 1
        ),
    ))
}

struct Band {
    start: u16,
    len: u32,
    /// Ports handed out so far, offset by where this process starts in the band.
    cursor: AtomicU32,
}

impl Band {
    fn next(&self) -> u16 {
        let step = self.cursor.fetch_add(1, Ordering::Relaxed);
        // `start + (step % len)` stays within the band, which stays below 65,536.
        (u32::from(self.start) + step % self.len) as u16
    }
}

fn band() -> io::Result<&'static Band> {
    static BAND: OnceLock<Option<Band>> = OnceLock::new();
    BAND.get_or_init(|| {
        let (start, len) = band_outside(ephemeral_range())?;
        Some(Band {
            start,
            len,
            cursor: AtomicU32::new(std::process::id().wrapping_mul(7_919) % len),
        })
    })
    .as_ref()
    .ok_or_else(|| {
        io::Error::other(
            "the ephemeral port range (net.ipv4.ip_local_port_range) leaves no band of \
             loopback ports for tests",
        )
    })
}

fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| parse_range(&text))
        .unwrap_or(DEFAULT_EPHEMERAL)
}

fn parse_range(text: &str) -> Option<(u16, u16)> {
    let mut fields = text.split_whitespace().map(str::parse::<u16>);
    match (fields.next(), fields.next()) {
        (Some(Ok(low)), Some(Ok(high))) if low <= high => Some((low, high)),
        _ => None,
    }
}

/// The band below the ephemeral range, else the one above it: `(start, len)`.
fn band_outside((low, high): (u16, u16)) -> Option<(u16, u32)> {
    let below = (BAND_FLOOR, u32::from(low.saturating_sub(BAND_FLOOR)));
    let above = (high.saturating_add(1), u32::from(u16::MAX - high));
    [below, above].into_iter().find(|&(_, len)| len >= MIN_BAND)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_band_avoids_the_ephemeral_range() {
        assert_eq!(band_outside((32_768, 60_999)), Some((20_000, 12_768)));
        // Ephemeral ports from low down: the band goes above them.
        assert_eq!(band_outside((1_024, 50_000)), Some((50_001, 15_535)));
        assert_eq!(band_outside((1_024, 65_000)), None);
    }

    #[test]
    fn the_range_is_read_as_the_kernel_writes_it() {
        assert_eq!(parse_range("32768\t60999\n"), Some((32_768, 60_999)));
        assert_eq!(parse_range("60999 32768"), None);
        assert_eq!(parse_range(""), None);
    }

    #[test]
    fn ports_are_free_distinct_and_outside_the_ephemeral_range() {
        let (low, high) = ephemeral_range();
        let ports: Vec<u16> = (0..200).map(|_| free_port().unwrap()).collect();
        let mut distinct = ports.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), ports.len());
        for port in ports {
            assert!(!(low..=high).contains(&port), "{port} is ephemeral");
            TcpListener::bind(("127.0.0.1", port)).unwrap();
        }
    }
}
