//! What the metrics cost a check, measured in this process on the policy service's own
//! code: recording one check (a labelled counter and a histogram observation, as every
//! `/v1/check` does), on one thread and on every core at once, and encoding a scrape.
//! In-process rather than the endpoint with and without recording: the service has no
//! switch to turn recording off (none is wanted), and the difference is far below the
//! run-to-run spread of the check-endpoint runs; compare these with their p50.

use std::hint::black_box;
use std::time::{Duration, Instant};

use mcpguard_policy::metrics;

const RECORDS: u32 = 1_000_000;
const SCRAPES: u32 = 2_000;

pub struct Cost {
    /// ns per recorded check, one thread.
    pub record_ns: f64,
    /// ns per recorded check with `threads` threads recording the same series at once.
    pub record_contended_ns: f64,
    pub threads: usize,
    /// µs per `/metrics` body.
    pub scrape_us: f64,
    pub scrape_bytes: usize,
}

fn record(n: u32) {
    for i in 0..n {
        // The label sets a busy service has: allowed, and a refusal code.
        let (decision, code) = if i % 8 == 0 {
            ("deny", "host_disabled")
        } else {
            ("allow", "")
        };
        metrics::get().check(
            "check",
            black_box(decision),
            code,
            Duration::from_micros(u64::from(i % 500)),
        );
    }
}

pub fn measure() -> Cost {
    record(10_000);
    let started = Instant::now();
    record(RECORDS);
    let record_ns = started.elapsed().as_nanos() as f64 / f64::from(RECORDS);

    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| record(RECORDS));
        }
    });
    let record_contended_ns = started.elapsed().as_nanos() as f64 / f64::from(RECORDS);

    let mut scrape_bytes = 0;
    let started = Instant::now();
    for _ in 0..SCRAPES {
        let text = metrics::encode(metrics::Scraped::default()).unwrap_or_default();
        scrape_bytes = black_box(text).len();
    }
    let scrape_us = started.elapsed().as_secs_f64() * 1e6 / f64::from(SCRAPES);
    Cost {
        record_ns,
        record_contended_ns,
        threads,
        scrape_us,
        scrape_bytes,
    }
}

pub fn markdown(c: &Cost) -> String {
    format!(
        "\n## Metrics cost\n\n\
         Measured in the bench process on the policy service's metrics code \
         (`metrics::get().check`, `metrics::encode`); compare with the check endpoint's p50.\n\n\
         | what | cost |\n|---|---|\n\
         | recording one check (counter + histogram), 1 thread | {:.0} ns |\n\
         | the same, {} threads on the same series at once (wall time per check per thread) | {:.0} ns |\n\
         | one `/metrics` body ({} bytes) | {:.1} µs |\n",
        c.record_ns, c.threads, c.record_contended_ns, c.scrape_bytes, c.scrape_us
    )
}
