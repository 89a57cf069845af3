//! Prometheus metrics: names, labels, and the handles the data path updates.
//!
//! Handles are taken once per volume (a registry lookup), so the hot path
//! only does atomic increments and lock-free histogram appends. With no
//! `--metrics-listen`, no recorder is installed and every update is a no-op.

use std::net::SocketAddr;
use std::time::Duration;

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};
use nbd::Command;

/// Latency buckets for every `_seconds` histogram: 10 µs to 10 s.
const LATENCY_BUCKETS: [f64; 19] = [
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Why the exporter could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot serve metrics on {addr}: {reason}; choose another --metrics-listen")]
pub struct MetricsError {
    addr: SocketAddr,
    reason: String,
}

/// Binds the metrics listener on `addr`.
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, MetricsError> {
    std::net::TcpListener::bind(addr).map_err(|e| MetricsError {
        addr,
        reason: e.to_string(),
    })
}

/// How long a scraper may take to send its request.
const SCRAPE_READ_LIMIT: Duration = Duration::from_secs(5);
/// Longest scrape request read.
const MAX_SCRAPE_REQUEST: usize = 8 << 10;

/// Installs the Prometheus recorder and serves `GET /metrics` on
/// `listener` (bound at `addr`). The daemon serves the endpoint itself,
/// rather than letting the exporter bind, so that a live restart can hand
/// the listening socket over like the others: no gap, no port race.
pub fn install(listener: std::net::TcpListener, addr: SocketAddr) -> Result<(), MetricsError> {
    let err = |reason: String| MetricsError { addr, reason };
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&LATENCY_BUCKETS)
        .map_err(|e| err(e.to_string()))?
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full("mirrorblk_journal_batch_records".into()),
            &[
                1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
            ],
        )
        .map_err(|e| err(e.to_string()))?
        .install_recorder()
        .map_err(|e| err(e.to_string()))?;
    describe();
    let upkeep = handle.clone();
    std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(Duration::from_secs(5));
            upkeep.run_upkeep();
        })
        .map_err(|e| err(e.to_string()))?;
    std::thread::Builder::new()
        .name("metrics-http".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(s) => answer_scrape(s, &handle),
                    Err(e) => {
                        tracing::warn!("metrics accept failed: {e}");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        })
        .map_err(|e| err(e.to_string()))?;
    Ok(())
}

/// Answers one HTTP request: the metrics for `GET /metrics` (or `/`), 404
/// for other paths, 405 for other methods; then closes.
fn answer_scrape(
    mut s: std::net::TcpStream,
    handle: &metrics_exporter_prometheus::PrometheusHandle,
) {
    use std::io::{Read, Write};
    let _ = s.set_read_timeout(Some(SCRAPE_READ_LIMIT));
    let _ = s.set_write_timeout(Some(SCRAPE_READ_LIMIT));
    let mut req = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < MAX_SCRAPE_REQUEST {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
    }
    let line = String::from_utf8_lossy(&req);
    let mut words = line.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, body) = match (method, path) {
        ("GET", "/metrics" | "/") => {
            refresh_counted_elsewhere();
            ("200 OK", handle.render())
        }
        ("GET", _) => ("404 Not Found", "not found: scrape /metrics\n".to_string()),
        _ => ("405 Method Not Allowed", "only GET\n".to_string()),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = s
        .write_all(head.as_bytes())
        .and_then(|()| s.write_all(body.as_bytes()));
}

/// Copies the counters kept outside the metrics registry (on hot paths,
/// as plain atomics) into it, before a scrape renders.
fn refresh_counted_elsewhere() {
    counter!("mirrorblk_busy_poll_rounds_total").absolute(crate::busy_poll::rounds());
}

/// Records the pause clients saw at the live restart that started this
/// process.
pub fn restart_pause(ms: u64) {
    gauge!("mirrorblk_restart_pause_seconds").set(ms as f64 / 1000.0);
    counter!("mirrorblk_restarts_taken_over_total").increment(1);
}

/// Registers the help text of every metric the daemon exports.
fn describe() {
    describe_request_metrics();
    describe_journal_metrics();
    describe_snapshot_metrics();
    describe_replica_metrics();
    describe_event_metrics();
    metrics::describe_counter!(
        "mirrorblk_busy_poll_rounds_total",
        "Rounds the cores spent polling instead of sleeping (--busy-poll-us), all cores"
    );
}

/// Metrics of the event log.
fn describe_event_metrics() {
    use metrics::{describe_counter, describe_gauge};
    describe_gauge!(
        "mirrorblk_restart_pause_seconds",
        "How long clients waited at the live restart that started this process (from the old process's last request taken to this one serving)"
    );
    describe_counter!(
        "mirrorblk_restarts_taken_over_total",
        "Live restarts this process took over (1 when it was started by mirrorblk restart)"
    );
    describe_counter!(
        "mirrorblk_events_total",
        "Events recorded in the node's event log, by event (role-change, peer-connect, ...)"
    );
    describe_counter!(
        "mirrorblk_events_dropped_total",
        "Events not written to the event log because its writer fell behind"
    );
}

/// Metrics of NBD requests and connections.
fn describe_request_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        "mirrorblk_requests_total",
        "NBD requests completed, by volume and op"
    );
    describe_counter!(
        "mirrorblk_request_bytes_total",
        Unit::Bytes,
        "Bytes read or written by NBD requests"
    );
    describe_counter!(
        "mirrorblk_request_errors_total",
        "NBD requests answered with an error, by error code"
    );
    describe_histogram!(
        "mirrorblk_request_duration_seconds",
        Unit::Seconds,
        "Whole-request latency, from header read to reply queued"
    );
    describe_counter!(
        "mirrorblk_payload_copies_total",
        "Userspace copies of write payload bytes on the write path (0 is the design)"
    );
    describe_gauge!("mirrorblk_connections", "Open NBD client connections");
}

/// Metrics of the journal, the data store and recovery.
fn describe_journal_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_histogram!(
        "mirrorblk_journal_commit_seconds",
        Unit::Seconds,
        "Duration of one group commit (vectored O_DSYNC write)"
    );
    describe_histogram!(
        "mirrorblk_journal_batch_records",
        "Records per group commit"
    );
    describe_gauge!(
        "mirrorblk_volume_durability",
        "1, labelled with when a reply promises durability (--durability: per-write or flush)"
    );
    describe_gauge!(
        "mirrorblk_journal_used_bytes",
        Unit::Bytes,
        "Journal bytes reserved and not yet checkpointed"
    );
    describe_gauge!(
        "mirrorblk_journal_size_bytes",
        Unit::Bytes,
        "Size of the journal record area"
    );
    describe_gauge!(
        "mirrorblk_apply_lag_records",
        "Records durable in the journal but not yet applied to the data store"
    );
    describe_counter!("mirrorblk_checkpoints_total", "Journal checkpoints taken");
    describe_counter!(
        "mirrorblk_journal_syncs_total",
        "Group flushes of the journal (fdatasync) with --durability flush; 0 with per-write, where every group commit is an O_DSYNC write"
    );
    describe_counter!(
        "mirrorblk_applier_sync_asks_total",
        "Journal syncs the applier asked for itself with --durability flush, by reason: interval (no FLUSH or FUA write within 100 ms), buffers (half the core's buffer pool out), starved (a request waits for a buffer), journal (the journal a quarter full), stop"
    );
    describe_counter!(
        "mirrorblk_journal_written_bytes_total",
        Unit::Bytes,
        "Journal bytes written for records: batch and record headers, padded payloads, pads (not superblocks or in-place intents)"
    );
    describe_counter!(
        "mirrorblk_in_place_write_bytes_total",
        Unit::Bytes,
        "Write payload bytes written durably to the data store in place (large aligned writes: the journal holds only their metadata)"
    );
    describe_counter!(
        "mirrorblk_in_place_fallbacks_total",
        "In-place writes whose data-store write failed and whose payload was journaled instead"
    );
}

/// Metrics of a volume's snapshots and of its last recovery.
fn describe_snapshot_metrics() {
    use metrics::{describe_counter, describe_gauge, Unit};
    describe_gauge!(
        "mirrorblk_snapshots",
        "Point-in-time snapshots of the volume (broken ones included until deleted)"
    );
    describe_gauge!(
        "mirrorblk_snapshot_space_used_bytes",
        Unit::Bytes,
        "Bytes of old data the volume's snapshots keep aside in their side files"
    );
    describe_counter!(
        "mirrorblk_snapshot_broken_total",
        "Snapshots that broke (space bound reached, a resync, a shrink, an I/O error)"
    );
    describe_gauge!(
        "mirrorblk_recovery_records",
        "Records replayed by the last start-up recovery"
    );
    describe_gauge!(
        "mirrorblk_recovery_duration_seconds",
        Unit::Seconds,
        "Duration of the last start-up recovery"
    );
}

/// Metrics of replica links and resyncs.
fn describe_replica_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_histogram!(
        "mirrorblk_replica_wait_seconds",
        Unit::Seconds,
        "Per write, the time from local durability until the replicas' acknowledgement the mode asks for (sync: durable, flush: received; async: the lag bound)"
    );
    describe_gauge!(
        "mirrorblk_replica_state",
        "Replica link state: 0 connecting, 1 catching-up, 2 in-sync, 3 out-of-sync, 4 resyncing (streaming live while a resync runs)"
    );
    describe_gauge!(
        "mirrorblk_replica_lag_lsn",
        "LSNs a replica's durable journal trails the primary by"
    );
    describe_gauge!(
        "mirrorblk_replica_lag_bytes",
        Unit::Bytes,
        "Bytes of journaled changes a replica does not yet have durably (regions already marked out of sync not included)"
    );
    describe_gauge!(
        "mirrorblk_replica_rtt_seconds",
        Unit::Seconds,
        "Last heartbeat round trip to a replica"
    );
    describe_gauge!(
        "mirrorblk_replica_resync_remaining_bytes",
        Unit::Bytes,
        "Bytes a running resync still has to send (0 when none runs)"
    );
    describe_gauge!(
        "mirrorblk_replica_out_of_sync_bytes",
        Unit::Bytes,
        "Bytes of the volume in regions marked out of sync for a replica (persistent bitmap)"
    );
    describe_counter!(
        "mirrorblk_replica_resync_sent_bytes_total",
        Unit::Bytes,
        "Region bytes sent to a replica by resyncs and repairs"
    );
    describe_counter!(
        "mirrorblk_replica_resync_checked_bytes_total",
        Unit::Bytes,
        "Region bytes compared by checksum with a replica (resync and verify)"
    );
    describe_counter!(
        "mirrorblk_replica_retention_dropped_total",
        "Times the primary stopped keeping journal records for a replica that was away with the journal over half full (it then needs a bitmap resync)"
    );
}

/// Handles for one NBD op of one volume.
#[derive(Clone)]
pub struct OpMetrics {
    requests: Counter,
    bytes: Counter,
    duration: Histogram,
}

impl OpMetrics {
    fn new(volume: &str, op: &'static str) -> OpMetrics {
        let v = volume.to_string();
        OpMetrics {
            requests: counter!("mirrorblk_requests_total", "volume" => v.clone(), "op" => op),
            bytes: counter!("mirrorblk_request_bytes_total", "volume" => v.clone(), "op" => op),
            duration: histogram!("mirrorblk_request_duration_seconds", "volume" => v, "op" => op),
        }
    }

    /// Counts one completed request.
    pub fn record(&self, bytes: u64, took: Duration) {
        self.requests.increment(1);
        if bytes > 0 {
            self.bytes.increment(bytes);
        }
        self.duration.record(took.as_secs_f64());
    }
}

/// Every handle of one volume.
#[derive(Clone)]
pub struct VolumeMetrics {
    volume: String,
    read: OpMetrics,
    write: OpMetrics,
    flush: OpMetrics,
    trim: OpMetrics,
    zero: OpMetrics,
    cache: OpMetrics,
    block_status: OpMetrics,
    /// Group commit durations.
    pub journal_commit: Histogram,
    /// Records per group commit.
    pub journal_batch: Histogram,
    /// Waits for replica acknowledgements, per write.
    pub replica_wait: Histogram,
    /// Journal bytes in use.
    pub journal_used: Gauge,
    /// Journal area size.
    pub journal_size: Gauge,
    /// The volume's size (a resize changes it).
    pub volume_size: Gauge,
    /// Resizes carried out on this node.
    pub resizes: Counter,
    /// Durable but unapplied records.
    pub apply_lag: Gauge,
    /// Checkpoints taken.
    pub checkpoints: Counter,
    /// Group flushes of the journal (`--durability flush`).
    pub journal_syncs: Counter,
    /// Journal syncs the flush-mode applier asked for, per entry of
    /// [`SYNC_ASK_REASONS`].
    pub sync_asks: [Counter; 5],
    /// Journal bytes written for records.
    pub journal_written: Counter,
    /// Payload bytes copied in userspace.
    pub payload_copies: Counter,
    /// Write payload bytes that went to the data store in place (journal
    /// holds only their headers).
    pub in_place_bytes: Counter,
    /// In-place writes that failed and fell back to the journal.
    pub in_place_fallbacks: Counter,
    /// Snapshots of the volume.
    pub snapshots: Gauge,
    /// Bytes of old data its snapshots keep aside.
    pub snapshot_space_used: Gauge,
    /// Snapshots that broke.
    pub snapshot_broken: Counter,
    /// Reads a satellite core served from the store itself.
    pub satellite_local_reads: Counter,
    /// Requests satellite cores forwarded to the volume's home core.
    pub forwarded: Counter,
}

/// The `reason` labels of `mirrorblk_applier_sync_asks_total`, in the
/// order of the engine's `SyncAsk`.
pub const SYNC_ASK_REASONS: [&str; 5] = ["stop", "journal", "buffers", "starved", "interval"];

/// The label of an NBD command.
pub fn op_name(c: Command) -> &'static str {
    match c {
        Command::Read => "read",
        Command::Write => "write",
        Command::Flush => "flush",
        Command::Trim => "trim",
        Command::WriteZeroes => "write_zeroes",
        Command::Cache => "cache",
        Command::BlockStatus => "block_status",
        Command::Disc => "disc",
        Command::Unknown(_) => "unknown",
    }
}

impl VolumeMetrics {
    /// Publishes the volume's durability mode as a label.
    pub fn durability(&self, mode: crate::journal::Durability) {
        gauge!("mirrorblk_volume_durability", "volume" => self.volume.clone(), "durability" => mode.as_str())
            .set(1.0);
    }

    /// Registers the handles of `volume`.
    pub fn new(volume: &str) -> VolumeMetrics {
        let v = || volume.to_string();
        VolumeMetrics {
            volume: v(),
            read: OpMetrics::new(volume, "read"),
            write: OpMetrics::new(volume, "write"),
            flush: OpMetrics::new(volume, "flush"),
            trim: OpMetrics::new(volume, "trim"),
            zero: OpMetrics::new(volume, "write_zeroes"),
            cache: OpMetrics::new(volume, "cache"),
            block_status: OpMetrics::new(volume, "block_status"),
            journal_commit: histogram!("mirrorblk_journal_commit_seconds", "volume" => v()),
            journal_batch: histogram!("mirrorblk_journal_batch_records", "volume" => v()),
            replica_wait: histogram!("mirrorblk_replica_wait_seconds", "volume" => v()),
            journal_used: gauge!("mirrorblk_journal_used_bytes", "volume" => v()),
            journal_size: gauge!("mirrorblk_journal_size_bytes", "volume" => v()),
            volume_size: gauge!("mirrorblk_volume_size_bytes", "volume" => v()),
            resizes: counter!("mirrorblk_resizes_total", "volume" => v()),
            apply_lag: gauge!("mirrorblk_apply_lag_records", "volume" => v()),
            checkpoints: counter!("mirrorblk_checkpoints_total", "volume" => v()),
            journal_syncs: counter!("mirrorblk_journal_syncs_total", "volume" => v()),
            sync_asks: SYNC_ASK_REASONS.map(|why| {
                counter!("mirrorblk_applier_sync_asks_total", "volume" => v(), "reason" => why)
            }),
            journal_written: counter!("mirrorblk_journal_written_bytes_total", "volume" => v()),
            payload_copies: counter!("mirrorblk_payload_copies_total", "volume" => v()),
            in_place_bytes: counter!("mirrorblk_in_place_write_bytes_total", "volume" => v()),
            in_place_fallbacks: counter!("mirrorblk_in_place_fallbacks_total", "volume" => v()),
            snapshots: gauge!("mirrorblk_snapshots", "volume" => v()),
            snapshot_space_used: gauge!("mirrorblk_snapshot_space_used_bytes", "volume" => v()),
            snapshot_broken: counter!("mirrorblk_snapshot_broken_total", "volume" => v()),
            satellite_local_reads: counter!("mirrorblk_satellite_local_reads_total", "volume" => v()),
            forwarded: counter!("mirrorblk_forwarded_requests_total", "volume" => v()),
        }
    }

    /// The handles of an op (None for DISC and unknown commands).
    pub fn op(&self, c: Command) -> Option<&OpMetrics> {
        Some(match c {
            Command::Read => &self.read,
            Command::Write => &self.write,
            Command::Flush => &self.flush,
            Command::Trim => &self.trim,
            Command::WriteZeroes => &self.zero,
            Command::Cache => &self.cache,
            Command::BlockStatus => &self.block_status,
            Command::Disc | Command::Unknown(_) => return None,
        })
    }

    /// Counts a journal sync the flush-mode applier asked for itself, for
    /// the reason `SYNC_ASK_REASONS[why]`.
    pub fn sync_asked(&self, why: usize) {
        self.sync_asks[why].increment(1);
    }

    /// Counts a request answered with an error (rare: looked up on use).
    pub fn error(&self, c: Command, code: nbd::ErrorCode) {
        let code = match code {
            nbd::ErrorCode::Perm => "EPERM",
            nbd::ErrorCode::Io => "EIO",
            nbd::ErrorCode::NoMem => "ENOMEM",
            nbd::ErrorCode::Inval => "EINVAL",
            nbd::ErrorCode::NoSpc => "ENOSPC",
            nbd::ErrorCode::Overflow => "EOVERFLOW",
            nbd::ErrorCode::NotSup => "ENOTSUP",
            nbd::ErrorCode::Shutdown => "ESHUTDOWN",
        };
        counter!("mirrorblk_request_errors_total", "volume" => self.volume.clone(), "op" => op_name(c), "error" => code)
            .increment(1);
    }

    /// Records what start-up recovery did.
    pub fn recovery(&self, records: u64, millis: u64) {
        gauge!("mirrorblk_recovery_records", "volume" => self.volume.clone()).set(records as f64);
        gauge!("mirrorblk_recovery_duration_seconds", "volume" => self.volume.clone())
            .set(millis as f64 / 1000.0);
    }
}

/// Handles for one replica link of one volume.
#[derive(Clone)]
pub struct ReplicaMetrics {
    /// Link state code.
    pub state: Gauge,
    /// Durable lag in LSNs.
    pub lag_lsn: Gauge,
    /// Durable lag in bytes.
    pub lag_bytes: Gauge,
    /// Heartbeat round trip.
    pub rtt: Gauge,
    /// Resync bytes left.
    pub resync_remaining: Gauge,
    /// Bytes in out-of-sync regions.
    pub out_of_sync: Gauge,
    /// Region bytes sent.
    pub resync_sent: Counter,
    /// Region bytes compared by checksum.
    pub resync_checked: Counter,
    /// Times the primary stopped keeping journal records for the replica.
    pub retention_dropped: Counter,
}

impl ReplicaMetrics {
    /// Registers the handles of (`volume`, `peer`).
    pub fn new(volume: &str, peer: &str) -> ReplicaMetrics {
        let l = || [("volume", volume.to_string()), ("peer", peer.to_string())];
        ReplicaMetrics {
            state: gauge!("mirrorblk_replica_state", &l()),
            lag_lsn: gauge!("mirrorblk_replica_lag_lsn", &l()),
            lag_bytes: gauge!("mirrorblk_replica_lag_bytes", &l()),
            rtt: gauge!("mirrorblk_replica_rtt_seconds", &l()),
            resync_remaining: gauge!("mirrorblk_replica_resync_remaining_bytes", &l()),
            out_of_sync: gauge!("mirrorblk_replica_out_of_sync_bytes", &l()),
            resync_sent: counter!("mirrorblk_replica_resync_sent_bytes_total", &l()),
            resync_checked: counter!("mirrorblk_replica_resync_checked_bytes_total", &l()),
            retention_dropped: counter!("mirrorblk_replica_retention_dropped_total", &l()),
        }
    }
}

/// Open connections (all volumes).
pub fn connections() -> Gauge {
    gauge!("mirrorblk_connections")
}

/// Counts one event of the event log (rare: looked up on use).
pub fn event_emitted(event: &'static str) {
    counter!("mirrorblk_events_total", "event" => event).increment(1);
}

/// Counts an event the event log had to drop.
pub fn event_dropped() {
    counter!("mirrorblk_events_dropped_total").increment(1);
}
