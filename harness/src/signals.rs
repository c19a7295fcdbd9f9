//! SIGINT and SIGTERM for the binaries (mcpguard-run, mcpguard-bench), which decide what
//! a signal does; library code never calls this (the tests run inside their own
//! runtimes and keep the default handlers).

use std::sync::mpsc::{Receiver, channel};

/// Catches SIGINT and SIGTERM from now on and sends each as its exit code (130, 143)
/// on the returned channel. Its own runtime on its own thread, so a synchronous
/// program can wait on the channel.
pub fn exit_codes() -> std::io::Result<Receiver<u8>> {
    use tokio::signal::unix::{SignalKind, signal};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    let (mut int, mut term) = runtime.block_on(async {
        Ok::<_, std::io::Error>((
            signal(SignalKind::interrupt())?,
            signal(SignalKind::terminate())?,
        ))
    })?;
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        runtime.block_on(async {
            loop {
                let code = tokio::select! {
                    _ = int.recv() => 130,
                    _ = term.recv() => 143,
                };
                if tx.send(code).is_err() {
                    return;
                }
            }
        });
    });
    Ok(rx)
}
