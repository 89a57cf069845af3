//! `mirrorblkd`: the mirrorblk daemon. See `mirrorblkd --help`.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use mirrorblk_server::config::{Cli, Config, LogFormat};
use mirrorblk_server::node;
use nix::sys::signal::{SigSet, Signal};

fn init_logging(level: &str, format: LogFormat) {
    let filter = std::env::var("MIRRORBLK_LOG").unwrap_or_else(|_| level.to_string());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let cfg = match Config::from_cli(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mirrorblkd: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(&cfg.log_level, cli.log_format);
    // Block the stop signals in every thread (threads inherit the mask), so
    // the main thread alone receives them with sigwait.
    let mut stop = SigSet::empty();
    stop.add(Signal::SIGINT);
    stop.add(Signal::SIGTERM);
    if let Err(e) = stop.thread_block() {
        eprintln!("mirrorblkd: cannot block signals: {e}");
        return ExitCode::from(1);
    }
    let node = match node::start(&cfg) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("mirrorblkd: {e}");
            return ExitCode::from(2);
        }
    };
    mirrorblk_server::notify::notify("READY=1\nSTATUS=serving");
    if let Some(every) = mirrorblk_server::notify::watchdog_interval() {
        // Ping only while every core keeps ticking: a stuck core stops the
        // pings and systemd restarts the node (the journal makes that safe).
        let beats = node.heartbeats();
        let _ = std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || loop {
                if beats.all_fresh(every.max(std::time::Duration::from_secs(2))) {
                    mirrorblk_server::notify::notify("WATCHDOG=1");
                } else {
                    tracing::error!(
                        "a core stopped ticking; withholding the systemd watchdog ping"
                    );
                }
                std::thread::sleep(every);
            });
    }
    match stop.wait() {
        Ok(sig) => tracing::info!("received {sig:?}: finishing in-flight requests, applying and checkpointing the journal"),
        Err(e) => tracing::error!("waiting for signals failed: {e}; stopping"),
    }
    mirrorblk_server::notify::notify("STOPPING=1");
    let restart = mirrorblk_server::lifecycle::take_restart();
    let clean = node.stop(std::time::Duration::from_secs(30));
    if let Some(role) = restart {
        let e = mirrorblk_server::lifecycle::reexec(role);
        eprintln!("mirrorblkd: cannot restart as {role}: {e}");
        return ExitCode::from(1);
    }
    if clean {
        tracing::info!("stopped cleanly");
        ExitCode::SUCCESS
    } else {
        // Acknowledged writes are durable in the journal regardless; the
        // next start replays them.
        tracing::error!(
            "could not finish and checkpoint within 30 s; the next start will replay the journal"
        );
        ExitCode::from(1)
    }
}
