//! `mirrorblkd`: the mirrorblk daemon. See `mirrorblkd --help`.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use mirrorblk_server::config::{Cli, Config, LogFormat};
use mirrorblk_server::{events, handover, node};
use nix::sys::signal::{SigSet, Signal};

/// Changes the log filter at run time (SIGHUP).
type Reload = Box<dyn Fn(&str) -> Result<(), String>>;

fn init_logging(level: &str, format: LogFormat) -> Reload {
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::{fmt, reload, EnvFilter};
    let env = std::env::var("MIRRORBLK_LOG").ok();
    let filter = EnvFilter::try_new(env.as_deref().unwrap_or(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let layer = fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => tracing_subscriber::registry()
            .with(filter)
            .with(layer)
            .init(),
        LogFormat::Json => tracing_subscriber::registry()
            .with(filter)
            .with(layer.json())
            .init(),
    }
    Box::new(move |lvl: &str| {
        if env.is_some() {
            return Err("MIRRORBLK_LOG is set and takes precedence".into());
        }
        let f = EnvFilter::try_new(lvl).map_err(|e| format!("log level '{lvl}': {e}"))?;
        handle.reload(f).map_err(|e| e.to_string())
    })
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
    let reload_log = init_logging(&cfg.log_level, cli.log_format);
    raise_fd_limit(&cfg);
    let stop = match block_stop_signals() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("mirrorblkd: cannot block signals: {e}");
            return ExitCode::from(1);
        }
    };
    let predecessor = match take_over_channel() {
        Ok(p) => p,
        Err(code) => return code,
    };
    let node = match start_node(&cfg, predecessor.as_ref()) {
        Ok(n) => n,
        Err(code) => return code,
    };
    if let Some(p) = &predecessor {
        // The old process makes this one systemd's main process (MAINPID).
        if let Err(e) = p.serving() {
            tracing::error!("cannot tell the old process this one serves: {e}");
        }
    } else {
        mirrorblk_server::notify::notify("READY=1\nSTATUS=serving");
    }
    if let Some(every) = mirrorblk_server::notify::watchdog_interval() {
        spawn_watchdog(node.heartbeats(), every);
    }
    let why = wait_for_stop(&stop, &cli, &node, &reload_log);
    if let Some(order) = mirrorblk_server::handover::take_hand_over() {
        return ExitCode::from(mirrorblk_server::restart::complete(node, order));
    }
    mirrorblk_server::notify::notify("STOPPING=1");
    let restart = mirrorblk_server::lifecycle::take_restart();
    events::emit(events::EventKind::DaemonStop {
        reason: restart.map_or(why, |role| format!("restart as {role}")),
    });
    let clean = node.stop(std::time::Duration::from_secs(30));
    // The next run (or nobody) must find every event of this one durable.
    if !events::flush() {
        tracing::error!("the event log's last events may not be durable");
    }
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

/// Blocks the stop signals in this thread before any other starts (threads
/// inherit the mask), so the main thread alone receives them with sigwait.
fn block_stop_signals() -> nix::Result<SigSet> {
    let mut stop = SigSet::empty();
    stop.add(Signal::SIGINT);
    stop.add(Signal::SIGTERM);
    stop.add(Signal::SIGHUP);
    stop.thread_block()?;
    Ok(stop)
}

/// Descriptors the daemon holds besides its client connections: volumes,
/// journals, the event log, listeners, runtimes, replication links.
const FD_RESERVE: u64 = 256;

/// Raises the soft open-file limit to the hard one (systemd starts services
/// with a soft limit of 1024 and a hard one of 524288): every serving
/// connection (three descriptors with TLS: the socket and the relay's
/// pair) and every connection still negotiating on each port holds one.
/// Warns when even the hard limit is below what the configuration allows.
fn raise_fd_limit(cfg: &Config) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let per_conn = if cfg.tls.is_some() { 3 } else { 1 };
    let need =
        cfg.max_connections as u64 * per_conn + 2 * cfg.handshake.max_pending as u64 + FD_RESERVE;
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!("cannot read the open-file limit: {e}");
            return;
        }
    };
    let mut limit = soft;
    if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => limit = hard,
            Err(e) => tracing::warn!("cannot raise the open-file limit from {soft} to {hard}: {e}"),
        }
    }
    if limit < need {
        tracing::warn!(
            "open-file limit {limit} is below the {need} descriptors --max-connections {} and --max-handshakes {} may need: accepts will fail with EMFILE before those bounds; raise LimitNOFILE= (systemd) or `ulimit -n`, or lower the bounds",
            cfg.max_connections,
            cfg.handshake.max_pending
        );
    }
}

/// The channel to the old process, when this one was started by a live
/// restart: HELLO is said at once (the configuration parsed).
fn take_over_channel() -> Result<Option<handover::Predecessor>, ExitCode> {
    let Some(p) = handover::Predecessor::from_env() else {
        return Ok(None);
    };
    let p = p.map_err(|e| {
        eprintln!("mirrorblkd: {e}");
        ExitCode::from(2)
    })?;
    if let Err(e) = p.hello() {
        eprintln!("mirrorblkd: {e}");
        return Err(ExitCode::from(2));
    }
    Ok(Some(p))
}

/// Starts the node: plainly, or (with a predecessor) once the old process
/// handed its listeners and connections over. A failure is told to the old
/// process, which then hands over to its own binary.
fn start_node(
    cfg: &Config,
    predecessor: Option<&handover::Predecessor>,
) -> Result<node::RunningNode, ExitCode> {
    let inherited = match predecessor.map(|p| p.receive()).transpose() {
        Ok(i) => i,
        Err(e) => {
            eprintln!("mirrorblkd: {e}");
            if let Some(p) = predecessor {
                p.failed(&e.to_string());
            }
            return Err(ExitCode::from(2));
        }
    };
    if let Some(i) = &inherited {
        tracing::info!(
            "taking over from pid {}: {} listeners, {} NBD connections",
            i.state.from_pid,
            i.state.listeners.len(),
            i.state.conns.len()
        );
    }
    node::start_with(cfg, inherited).map_err(|e| {
        eprintln!("mirrorblkd: {e}");
        if let Some(p) = predecessor {
            p.failed(&e.to_string());
        }
        ExitCode::from(2)
    })
}

/// Pings the systemd watchdog only while every core keeps ticking: a stuck
/// core stops the pings and systemd restarts the node (the journal makes
/// that safe).
fn spawn_watchdog(beats: node::Heartbeats, every: std::time::Duration) {
    let _ = std::thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || loop {
            if beats.all_fresh(every.max(std::time::Duration::from_secs(2))) {
                mirrorblk_server::notify::notify("WATCHDOG=1");
            } else {
                tracing::error!("a core stopped ticking; withholding the systemd watchdog ping");
            }
            std::thread::sleep(every);
        });
}

/// Serves SIGHUP reloads until a stop signal (or a failure to wait for
/// one); returns why it stopped.
fn wait_for_stop(
    stop: &SigSet,
    cli: &Cli,
    node: &node::RunningNode,
    reload_log: &Reload,
) -> String {
    loop {
        match stop.wait() {
            Ok(Signal::SIGHUP) => reload(cli, node, reload_log),
            Ok(_) if handover::hand_over_pending() => return "live restart".into(),
            Ok(sig) => {
                tracing::info!("received {sig:?}: finishing in-flight requests, applying and checkpointing the journal");
                return sig.as_str().to_string();
            }
            Err(e) => {
                tracing::error!("waiting for signals failed: {e}; stopping");
                return format!("waiting for signals failed: {e}");
            }
        }
    }
}

/// Reloads what can change online (log level, resync rate); keeps
/// everything on error.
fn reload(cli: &Cli, node: &node::RunningNode, reload_log: &Reload) {
    match Config::from_cli(cli) {
        Ok(new) => {
            let log = reload_log(&new.log_level);
            let rate = new.replication.as_ref().map(|r| r.resync_rate);
            if let Some(rate) = rate {
                node.set_resync_rate(rate);
            }
            tracing::info!(
                "SIGHUP: reloaded configuration (log level {}{}{})",
                new.log_level,
                rate.map(|r| format!(", resync rate {}/s", mirrorblk_server::units::ByteSize(r)))
                    .unwrap_or_default(),
                log.err()
                    .map(|e| format!("; log level not changed: {e}"))
                    .unwrap_or_default()
            );
        }
        Err(e) => tracing::error!("SIGHUP: configuration not reloaded: {e}"),
    }
}
