//! `mirrorblk`: the admin CLI. See `mirrorblk --help`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

mod attach;
mod backup;
mod backup_create;
mod certs;
mod demo;
mod demo_etcd;
mod demo_failover;
mod events;
mod primary;
mod restore;
mod snapshot;

use clap::{Parser, Subcommand};
use mirrorblk_admin as admin;
use mirrorblk_server::journal::format::{EntryKind, Superblock};
use mirrorblk_server::journal::recovery::{read_superblock, scan};
use mirrorblk_server::journal::MutationOp;
use mirrorblk_server::units::ByteSize;

/// mirrorblk: manage mirrorblk nodes and their volumes.
///
/// Exit status: 0 on success, 1 when the operation failed, 2 on a usage
/// error. Every error message says what to do next.
#[derive(Debug, Parser)]
#[command(name = "mirrorblk", version, about, long_about, max_term_width = 100)]
struct Cli {
    /// The daemon's admin socket (mirrorblkd --admin-socket).
    #[arg(
        long,
        global = true,
        value_name = "PATH",
        env = "MIRRORBLK_ADMIN_SOCKET",
        default_value = "/run/mirrorblk/admin.sock"
    )]
    admin_socket: PathBuf,

    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run a local demo: a primary (n1) with two replicas (n2, n3) on
    /// loopback in sync mode, serving a 1 GiB file-backed volume on
    /// nbd://127.0.0.1:10809/vol0 (data, journals and logs under --dir), ready
    /// for nbdinfo, qemu-io, fio or nbd-client. Stops cleanly on Ctrl-C.
    Demo {
        /// Folder for the demo's data stores and journals.
        #[arg(long, default_value = "demo-data")]
        dir: PathBuf,
        /// NBD address of the demo node.
        #[arg(long, default_value = "127.0.0.1:10809")]
        listen: String,
        /// Volume size.
        #[arg(long, default_value = "1G")]
        size: String,
        /// Let etcd decide the primary: start etcd (Debian's etcd-server)
        /// in the demo folder and the three nodes with --etcd and no
        /// --role; `kill -9` the primary and watch a replica take over.
        #[arg(long)]
        auto_failover: bool,
        /// Require TLS: certificates from `mirrorblk certs init DIR/pki`,
        /// NBD clients over nbds:// only, replication in mutual TLS.
        #[arg(long)]
        tls: bool,
    },
    /// Show the node's volumes: role, epoch, LSNs, journal fill.
    Status {
        /// Print the daemon's JSON answer instead of a table.
        #[arg(long)]
        json: bool,
        /// Refresh every second until interrupted.
        #[arg(long)]
        watch: bool,
    },
    /// Make this replica node the primary: persists epoch + 1, then the node
    /// restarts serving NBD and connects to its peers as their primary.
    /// Refused while the node is Inconsistent (a resync did not finish).
    Promote {
        /// Promote even an Inconsistent replica (it may lack recent writes).
        #[arg(long)]
        force: bool,
    },
    /// Show or steer resyncs on this primary: --rate sets the bandwidth per
    /// replica (online), --watch shows a progress bar per resyncing replica
    /// (bytes, rate, ETA) until every resync is done.
    Resync {
        /// New bandwidth per replica, e.g. 100M (per second).
        #[arg(long, value_name = "SIZE")]
        rate: Option<ByteSize>,
        /// Follow progress until no resync runs.
        #[arg(long)]
        watch: bool,
    },
    /// Make this primary node a replica; it restarts and resyncs from the
    /// primary that connects to it.
    Demote,
    /// On the primary: compare every 1 MiB region of each volume with every
    /// replica by checksum (xxh3), online, while writes go on (both sides
    /// hash the same moment of the record stream), at the resync rate.
    /// Prints a report. Exit status 0 when all replicas are identical (or
    /// were repaired), 1 when a difference was found and not repaired or
    /// the verify could not run.
    Verify {
        /// Resync the differing regions from the primary.
        #[arg(long)]
        repair: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// On the primary: resize VOLUME to SIZE, here and on every replica
    /// (the resize is a record in the journal and the replication stream,
    /// ordered among the writes, and acknowledged like one). Connections
    /// open now are served up to SIZE, but NBD cannot tell their clients:
    /// `mirrorblk attach` tells the kernel itself (--size-check); new
    /// connections see SIZE; qemu: `block_resize`, or reopen the drive.
    /// Refused while a resync or verify runs.
    ///
    /// Exit status 0 once every replica the mode waits for has it, 1 when
    /// refused or failed, 2 on a usage error.
    Resize {
        /// The volume (its export name).
        volume: String,
        /// New size: bytes, or with a K, M, G or T suffix (powers of
        /// 1024), a multiple of 4 KiB, e.g. 2G.
        size: ByteSize,
        /// Allow shrinking: every byte past SIZE is discarded, on every node.
        #[arg(long)]
        force: bool,
        /// Print the daemon's JSON answer.
        #[arg(long)]
        json: bool,
    },
    /// Print where VOLUME's primary serves NBD clients, as etcd says (for
    /// nodes run with --etcd): its HOST:PORT on one line, or with --json the
    /// leader record {"node", "nbd", "epoch"}. Needs no admin socket, so
    /// scripts and clients on any host can find the primary.
    ///
    /// Exit status 0 with an answer, 1 when the volume has no primary now
    /// (an election is under way, or no replica may take over) or etcd is
    /// unreachable, 2 on a usage error.
    ///
    /// Example: qemu-io -f raw "nbd://$(mirrorblk primary --etcd http://127.0.0.1:2379 vol0)/vol0"
    Primary {
        /// etcd client URLs (http://HOST:PORT; comma-separated or repeated).
        #[arg(
            long,
            value_name = "URL",
            value_delimiter = ',',
            required = true,
            env = "MIRRORBLK_ETCD"
        )]
        etcd: Vec<String>,
        /// Print the leader record as JSON.
        #[arg(long)]
        json: bool,
        /// Wait up to this long for a primary to exist (e.g. 10s).
        #[arg(long, value_name = "DURATION", default_value = "0s")]
        wait: mirrorblk_server::units::Interval,
        /// The volume (export) name.
        volume: String,
    },
    /// Print the node's event log: role changes, leases and fences,
    /// elections, peer and client connections, resyncs and verifies, admin
    /// commands, daemon starts and stops.
    ///
    /// The daemon appends one JSON line per event to its event log
    /// (mirrorblkd --event-log; by default the first volume's journal path
    /// with .events.jsonl appended), fdatasync'd before anything else can
    /// happen to it, and rotates it at --event-log-max-bytes to PATH.1,
    /// keeping PATH.1 to PATH.3. This prints the rotated files, oldest
    /// first, then the live one; with --follow it goes on printing events as
    /// they are appended (across rotations) until interrupted. Without
    /// --file, the daemon's status says where the log is.
    ///
    /// Each event shows as one line, as `drbdsetup events2` prints DRBD's:
    /// time (RFC 3339, UTC, milliseconds), node, event, then key=value fields
    /// (a value with spaces in quotes, a list comma-separated, an absent
    /// field left out):
    ///
    ///   2026-12-04T20:30:16.123Z n2 role-change volume=vol0 from=replica to=primary epoch=3 reason=...
    ///   2026-12-04T20:30:17.480Z n2 peer-disconnect volume=vol0 peer=n1 reason="heartbeat timeout"
    ///
    /// With --json each event is printed as the JSON line the daemon wrote:
    /// "ts", "seq" (one more than the event before it on this node; a gap
    /// means events were dropped), "node", "event" (the kind, kebab-case)
    /// and the kind's fields, e.g.
    ///
    ///   {"ts":"2026-12-04T20:30:16.123Z","seq":7,"node":"n2","event":"campaign-won","volume":"vol0","epoch":3}
    ///
    /// A line that is not an event (a crash tore it while it was written) is
    /// skipped with a warning on stderr. Exit status 0, or 1 when the log
    /// cannot be found or read.
    ///
    /// Examples:
    ///
    ///   mirrorblk --admin-socket /run/mirrorblk/n1.sock events
    ///
    ///   mirrorblk events --follow --json | jq 'select(.event == "writes-held")'
    ///
    ///   mirrorblk events --file /var/lib/mirrorblk/vol0.journal.events.jsonl
    #[command(verbatim_doc_comment)]
    Events {
        /// Keep printing events as they are appended (checked every 200 ms),
        /// across rotations, until interrupted.
        #[arg(long, short = 'f')]
        follow: bool,
        /// Print the JSON lines instead of one human-readable line each.
        #[arg(long)]
        json: bool,
        /// The event log to read, instead of asking the daemon where it is.
        #[arg(long, value_name = "PATH")]
        file: Option<PathBuf>,
    },
    /// Attach a kernel nbd device (/dev/nbdN) to a mirrorblk volume and
    /// keep it attached across failovers and restarts.
    ///
    /// Does the NBD handshake itself, configures the device through the
    /// kernel's generic netlink nbd interface, and keeps running (in the
    /// foreground; see systemd/mirrorblk-attach@.service). When the
    /// connection dies (the node was killed, restarted or lost its role, or
    /// the network broke) the kernel holds the device's I/O and tells
    /// attach, which finds the current primary and hands the kernel a new
    /// connection; the kernel then resends what was in flight. Applications
    /// and file systems see a pause, not an error.
    ///
    /// Where the primary is looked for, each time, in this order: with
    /// --etcd, the address in the volume's leader record (what `mirrorblk
    /// primary` prints); then every --server in the order given. A replica
    /// refuses NBD clients, so listing every node of the volume works
    /// without etcd. Each try is bounded by --connect-timeout; attach
    /// retries (every second at most) until a primary answers.
    ///
    /// Timeouts (whole seconds):
    ///
    ///   --io-timeout (default 10s): a request unanswered this long marks
    ///   the connection dead and is resent on the next one. It bounds the
    ///   stall of requests that were in flight when the server died; set
    ///   it above the slowest healthy request (a flush under load).
    ///
    ///   --dead-conn-timeout (default 120s): how long the kernel holds I/O
    ///   while no connection is alive. Past it, requests fail with EIO
    ///   (and file systems may abort), so set it above the longest failover
    ///   you plan for.
    ///
    /// Online resize: every --size-check (default 5s) attach asks the
    /// server for the export's size (an NBD_OPT_INFO handshake that serves
    /// no client) and, when `mirrorblk resize` changed it, tells the kernel
    /// (the device's capacity changes in place; grow the file system with
    /// resize2fs or xfs_growfs). A size changed while the connection was
    /// down goes to the kernel with the new connection.
    ///
    /// Every reconnect and resize is logged on stderr (which server, how
    /// long it took; with --json also as a line on stdout). Needs root (CAP_SYS_ADMIN)
    /// and the nbd module (modprobe nbd). Stop it with `mirrorblk detach
    /// /dev/nbdN` or SIGTERM: both disconnect the device. The pid file is
    /// /run/mirrorblk/nbdN.attach.pid. Under systemd (Type=notify) it
    /// reports readiness once the device is attached.
    ///
    /// Exit status: 0 after a detach, 1 when attaching failed (no server
    /// serves the export: each tried and why; device in use; no nbd
    /// module), 2 on a usage error.
    ///
    /// Examples:
    ///
    ///   mirrorblk attach --server n1:10809 --server n2:10809 --server n3:10809 --export vol0 /dev/nbd0
    ///
    ///   mirrorblk attach --etcd http://etcd1:2379 --server n1:10809 --export vol0 --json /dev/nbd0
    #[command(verbatim_doc_comment)]
    Attach(AttachOpts),
    /// Detach a kernel nbd device: stops its `mirrorblk attach` process
    /// (found by /run/mirrorblk/nbdN.attach.pid; it disconnects the device
    /// and exits) and disconnects the device in any case, so it also
    /// detaches a device nbd-client attached. Unmount first: a mounted file
    /// system loses its device. Exit status 0 when the device is detached
    /// (or was not attached), 1 on failure.
    Detach {
        /// The kernel device, /dev/nbdN.
        device: PathBuf,
    },
    /// Upgrade or restart the daemon live, without disconnecting a client.
    ///
    /// The daemon starts the --binary PATH (by default the file at its own
    /// path, so installing a new mirrorblkd there and running `mirrorblk
    /// restart` upgrades it) with its own command line, and waits until the new
    /// process has parsed its configuration; meanwhile it serves as usual.
    /// Then it stops taking requests at a request boundary, finishes what is
    /// in flight and writes every reply, closes its volumes durably
    /// (journal applied and checkpointed), and passes its listening sockets
    /// (NBD, admin, replication, metrics) and every NBD connection (socket,
    /// negotiated options, bytes read past the last request) to the new
    /// process over SCM_RIGHTS. The new process recovers the journals and
    /// serves the same connections. Clients see a pause (printed), never an
    /// error or a disconnect; a replica's link reconnects and catches up
    /// from the journal, without a resync.
    ///
    /// If the new binary fails to start (exits, or says nothing within
    /// 15 s), the daemon goes on serving untouched and this command fails
    /// with the reason. If it fails after the hand-over, the daemon hands
    /// the same connections to the binary it runs itself instead, and this
    /// command fails saying so. Under systemd the new process becomes the
    /// service's main process (MAINPID). Not available on a node run with
    /// --etcd yet.
    ///
    /// Exit status 0 once the new process serves, 1 when it does not (the
    /// message says which process serves), 2 on a usage error.
    ///
    /// Examples:
    ///
    ///   install -m 755 target/release/mirrorblkd /usr/local/bin/mirrorblkd
    ///   mirrorblk --admin-socket /run/mirrorblk/admin.sock restart
    ///
    ///   mirrorblk restart --binary /opt/mirrorblk-0.2/mirrorblkd --json
    #[command(verbatim_doc_comment)]
    Restart {
        /// The mirrorblkd binary to run (default: the daemon's own path).
        #[arg(long, value_name = "PATH")]
        binary: Option<PathBuf>,
        /// Print the outcome as JSON: {"from_pid", "pid", "binary",
        /// "connections", "pause_ms"}.
        #[arg(long)]
        json: bool,
    },
    /// Changed-block tracking: the byte ranges of VOLUME changed by records
    /// after LSN --since (the last LSN a previous backup includes), at 64 KiB
    /// granularity. Answers on any node of the volume, the same after a
    /// failover, and after a crash (the table is rebuilt from the journal).
    /// When --since is older than what the node tracks, it prints the whole
    /// volume and says a full backup is needed ("complete": false).
    ///
    /// JSON (--json): {"volume", "uuid", "since", "lsn", "complete",
    /// "known_since", "region_size", "size", "bytes",
    /// "ranges": [{"offset", "length"}, ...]}
    Changes {
        /// The volume.
        volume: String,
        /// The last LSN the base includes (0: every tracked change).
        #[arg(long, value_name = "LSN")]
        since: u64,
        /// Print the daemon's JSON answer.
        #[arg(long)]
        json: bool,
    },
    /// Point-in-time snapshots, served read-only as NBD exports VOLUME@NAME
    /// (docs/OPERATIONS.md, "Snapshots").
    Snapshot {
        #[command(subcommand)]
        command: snapshot::SnapshotCmd,
    },
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        command: ConfigCmd,
    },
    /// Offline journal tools (run on a stopped node).
    Journal {
        #[command(subcommand)]
        command: JournalCmd,
    },
    /// Backups (docs/BACKUP.md): create, list, verify, restore, prune.
    Backup {
        #[command(subcommand)]
        command: BackupCmd,
    },
    /// TLS certificates (docs/OPERATIONS.md, "TLS").
    Certs {
        #[command(subcommand)]
        command: CertsCmd,
    },
}

#[derive(Debug, Subcommand)]
enum CertsCmd {
    /// Write a new CA (ca-cert.pem, ca-key.pem), a server certificate
    /// (server-cert.pem, server-key.pem; also each node's client certificate
    /// for --replication-tls) and a client certificate (client-cert.pem,
    /// client-key.pem) into DIR: the layout mirrorblkd --tls-certificates,
    /// qemu's tls-creds-x509 dir=, nbdkit and libnbd's tls-certificates= read.
    Init {
        /// The directory (created if missing).
        dir: PathBuf,
        /// Host names and IP addresses the server certificate is valid for
        /// (comma-separated or repeated); clients check the one they dial.
        /// [default: localhost, 127.0.0.1, ::1 and this host's name]
        #[arg(long, value_name = "HOST", value_delimiter = ',')]
        hosts: Vec<String>,
        /// Validity of every certificate, in days.
        #[arg(long, default_value_t = 825)]
        days: u32,
        /// Replace certificates already in DIR.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
enum BackupCmd {
    /// Back up VOLUME: a snapshot through the admin socket, read through
    /// its read-only export VOLUME@NAME into the repository (created if
    /// absent), then deleted. Full the first time; incremental after (only
    /// the regions changed since the newest backup of the same volume UUID
    /// are read; a full one when the node's changed-block table does not
    /// reach back that far). Every backup is logically full. A progress bar
    /// shows on a terminal. Exit 1, writing no backup, when the daemon is
    /// unreachable, the volume unknown, the snapshot broke or the
    /// repository cannot be written.
    Create {
        /// The repository: a directory or s3://BUCKET/PREFIX.
        #[arg(long, value_name = "REPO")]
        repo: String,
        /// The volume.
        volume: String,
        /// The bound on old data the backup's snapshot keeps aside while it
        /// is read (the daemon's default when absent); past it the snapshot
        /// breaks and the backup fails, never the volume's writes.
        #[arg(long, value_name = "SIZE")]
        snapshot_space: Option<ByteSize>,
        /// The chunk size of the repository when this creates it: a power
        /// of two from 4K to 16M. Default 64K (the daemon's changed-block
        /// region, so incrementals read and store only what changed), or
        /// larger when VOLUME is over 64 GiB, so that volumes 4 times its
        /// size still fit a backup's index (docs/BACKUP.md). Fixed at
        /// creation: refused when it differs from an existing repository's.
        #[arg(long, value_name = "SIZE", value_parser = parse_chunk_size)]
        chunk_size: Option<ByteSize>,
        /// One JSON object: id, lsn, incremental, bytes_read, bytes_stored,
        /// chunks_reused, seconds.
        #[arg(long)]
        json: bool,
    },
    /// List the backups in a repository.
    List {
        /// The repository: a directory or s3://BUCKET/PREFIX.
        #[arg(long, value_name = "REPO")]
        repo: String,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Check that every chunk of one backup (or of all) is present and
    /// hashes to its name. Exit 1 naming each damaged backup and byte range.
    Verify {
        /// The repository: a directory or s3://BUCKET/PREFIX.
        #[arg(long, value_name = "REPO")]
        repo: String,
        /// The backup (VOLUME/CREATED_MS, as `backup list` prints it).
        id: Option<String>,
    },
    /// Write one backup onto a file, a block device or an NBD export,
    /// checking every chunk against its SHA-256 name before writing it.
    /// A chunk that is damaged or missing is not written: its range keeps
    /// what the target had, and the command exits 1 naming every such
    /// range. The target is made durable (fsync, or an NBD FLUSH) before
    /// the command reports success. A progress bar shows on a terminal.
    Restore {
        /// The repository: a directory or s3://BUCKET/PREFIX.
        #[arg(long, value_name = "REPO")]
        repo: String,
        /// The backup (VOLUME/CREATED_MS, as `backup list` prints it).
        id: String,
        /// Where to: a file path (created, sparse where the backup is zero),
        /// a block device (at least the backup's size),
        /// nbd://HOST:PORT/EXPORT (the port defaults to 10809) or
        /// nbd+unix:///EXPORT?socket=PATH (an export at least the backup's
        /// size; zero stretches are sent as WRITE_ZEROES).
        #[arg(long, value_name = "TARGET")]
        to: String,
        /// Replace an existing regular file that holds data.
        #[arg(long)]
        force: bool,
        /// One JSON object: id, target, size, bytes_written,
        /// chunks_restored, chunks_zero, seconds.
        #[arg(long)]
        json: bool,
    },
    /// Delete all but the newest N backups of each volume, then remove the
    /// chunks no backup references (safe while backups run).
    Prune {
        /// The repository: a directory or s3://BUCKET/PREFIX.
        #[arg(long, value_name = "REPO")]
        repo: String,
        /// How many backups of each volume to keep.
        #[arg(long, value_name = "N")]
        keep_last: usize,
        /// Only this volume's backups.
        #[arg(long, value_name = "VOLUME")]
        volume: Option<String>,
        /// Keep unreferenced chunks younger than this many seconds (for
        /// clocks that disagree, e.g. an S3 server's and this host's).
        #[arg(long, value_name = "SECS", default_value_t = 300)]
        gc_margin: u64,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCmd {
    /// Validate a node configuration file exactly as mirrorblkd would
    /// (without opening any volume), and print what it means.
    Check {
        /// The TOML file.
        file: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum JournalCmd {
    /// Print a journal's superblock and a summary of the records past its
    /// checkpoint (what a restart would replay).
    Inspect {
        /// The journal file or device.
        path: PathBuf,
    },
    /// Like inspect, and list every record past the checkpoint.
    Dump {
        /// The journal file or device.
        path: PathBuf,
    },
}

/// `mirrorblk attach`'s flags (documented on [`Cmd::Attach`]).
#[derive(Debug, clap::Args)]
struct AttachOpts {
    /// A node serving the volume (repeat for every node; tried in order).
    #[arg(long = "server", value_name = "HOST:PORT")]
    pub servers: Vec<String>,
    /// etcd client URLs: the volume's leader record names the primary.
    #[arg(
        long,
        value_name = "URL",
        value_delimiter = ',',
        env = "MIRRORBLK_ETCD"
    )]
    pub etcd: Vec<String>,
    /// The export (volume) name.
    #[arg(long, value_name = "NAME")]
    pub export: String,
    /// I/O timeout: an unanswered request is resent on a new connection after this.
    #[arg(long, value_name = "DURATION", default_value = "10s")]
    pub io_timeout: mirrorblk_server::units::Interval,
    /// How long the kernel holds I/O with no live connection before failing it.
    #[arg(long, value_name = "DURATION", default_value = "120s")]
    pub dead_conn_timeout: mirrorblk_server::units::Interval,
    /// Bound of one TCP connect and of one NBD handshake.
    #[arg(long, value_name = "DURATION", default_value = "3s")]
    pub connect_timeout: mirrorblk_server::units::Interval,
    /// Connections to the primary (more than 1 needs its multi-conn flag).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub connections: u32,
    /// How often to ask the server for the export's size, so an online
    /// `mirrorblk resize` reaches the kernel (0s: never).
    #[arg(long, value_name = "DURATION", default_value = "5s")]
    pub size_check: mirrorblk_server::units::Interval,
    /// Print events (attached, reconnected, resized, detached) as JSON lines on stdout.
    #[arg(long)]
    pub json: bool,
    /// The kernel device, /dev/nbdN.
    pub device: PathBuf,
}

impl From<AttachOpts> for attach::AttachArgs {
    fn from(o: AttachOpts) -> attach::AttachArgs {
        attach::AttachArgs {
            servers: o.servers,
            etcd: o.etcd,
            export: o.export,
            device: o.device,
            io_timeout: o.io_timeout.0,
            dead_conn_timeout: o.dead_conn_timeout.0,
            connect_timeout: o.connect_timeout.0,
            connections: o.connections,
            json: o.json,
            size_check: o.size_check.0,
        }
    }
}

fn daemon_path() -> PathBuf {
    // The daemon is built next to this binary (cargo build --workspace).
    let sibling = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("mirrorblkd")));
    match sibling {
        Some(p) if p.exists() => p,
        _ => PathBuf::from("mirrorblkd"),
    }
}

fn journal_inspect(path: &Path, list: bool) -> ExitCode {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("mirrorblk: cannot open journal {}: {e}", path.display());
            return ExitCode::from(1);
        }
    };
    let sb = match read_superblock(&file, path) {
        Ok(sb) => sb,
        Err(e) => {
            eprintln!("mirrorblk: {e}");
            return ExitCode::from(1);
        }
    };
    print_superblock(path, &sb);
    let mut records = 0u64;
    let mut bytes = 0u64;
    let mut lines = Vec::new();
    let res = scan(&file, &sb, |rec, _data| {
        records += 1;
        bytes += rec.header.length;
        if list {
            let h = &rec.header;
            let op = entry_name(h.kind);
            // A batched record: its place in the batch whose header is at `pos`.
            let batch = rec
                .batch
                .map(|(i, n)| format!("  batch record {}/{n}", i + 1))
                .unwrap_or_default();
            lines.push(format!(
                "  LSN {:>10}  {:<15} offset {:>14} length {:>10}  at area offset {:>12}  epoch {}{batch}",
                h.lsn, op, h.offset, h.length, rec.pos, h.epoch
            ));
        }
        Ok(())
    });
    match res {
        Ok((next, head, stop)) => {
            println!("records          {records} past the checkpoint ({bytes} bytes), next LSN {next}, head at area offset {head}");
            match stop {
                Some(why) => println!("tail             invalid record: {why}"),
                None => println!("tail             clean"),
            }
            for l in lines {
                println!("{l}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mirrorblk: reading journal {} failed: {e}", path.display());
            ExitCode::from(1)
        }
    }
}

/// Prints what the journal's superblock says, one field a line.
fn print_superblock(path: &Path, sb: &Superblock) {
    let uuid: String = sb.volume_uuid.iter().map(|b| format!("{b:02x}")).collect();
    println!("journal          {}", path.display());
    println!(
        "volume           {} ({} bytes, {})",
        sb.volume_name,
        sb.volume_size,
        ByteSize(sb.volume_size)
    );
    println!("volume uuid      {uuid}");
    println!(
        "record area      {} ({} bytes)",
        ByteSize(sb.area_len),
        sb.area_len
    );
    println!("epoch            {}", sb.epoch);
    println!(
        "checkpoint LSN   {} at area offset {}",
        sb.checkpoint_lsn, sb.checkpoint_pos
    );
    println!("session          {}", sb.session);
    println!("generation       {}", sb.generation);
}

fn entry_name(kind: EntryKind) -> &'static str {
    match kind {
        EntryKind::Mutation(MutationOp::Write) => "write",
        EntryKind::Mutation(MutationOp::Trim) => "trim",
        EntryKind::Mutation(MutationOp::WriteZeroes) => "zero",
        EntryKind::Mutation(MutationOp::Resize) => "resize (offset = new size)",
        EntryKind::Pad => "pad",
        EntryKind::WriteInPlace => "write (in place)",
        EntryKind::InPlaceIntent => "in-place intent",
    }
}

fn status_once(socket: &Path, json: bool) -> Result<String, String> {
    let resp = admin::call(socket, &admin::Request::Status).map_err(|e| e.to_string())?;
    if !resp.ok {
        return Err(resp
            .error
            .unwrap_or_else(|| "the daemon refused the request".into()));
    }
    if json {
        return serde_json::to_string_pretty(&resp).map_err(|e| e.to_string());
    }
    let mut out = format!("node {}\n", resp.node);
    out.push_str(&format!(
        "{:<16} {:<8} {:>5} {:>8} {:>10} {:>10} {:>10} {:>22}  {}\n",
        "VOLUME", "ROLE", "EPOCH", "SIZE", "LAST LSN", "DURABLE", "APPLIED", "JOURNAL", "STATE"
    ));
    for v in &resp.volumes {
        out.push_str(&volume_lines(v));
    }
    if let Some(c) = &resp.coordinator {
        out.push_str(&coordinator_line(
            c,
            c.leader.as_deref() == Some(resp.node.as_str()),
        ));
    }
    Ok(out)
}

/// One volume's row of `status`, then its notes and one line per replica.
fn volume_lines(v: &admin::VolumeStatus) -> String {
    let pct = (v.journal_used * 100)
        .checked_div(v.journal_size)
        .unwrap_or(0);
    let journal = format!(
        "{}/{} ({pct}%)",
        ByteSize(mirrorblk_server::units::align_up(v.journal_used)),
        ByteSize(v.journal_size)
    );
    let state = match &v.journal_error {
        Some(e) => format!("FAILED: {e}"),
        None if v.read_only => "ok, read-only".to_string(),
        None => "ok".to_string(),
    };
    let mut out = format!(
        "{:<16} {:<8} {:>5} {:>8} {:>10} {:>10} {:>10} {:>22}  {}\n",
        v.name,
        v.role,
        v.epoch,
        ByteSize(v.size).to_string(),
        v.last_lsn,
        v.durable_lsn,
        v.applied_lsn,
        journal,
        state
    );
    if v.durability != admin::Durability::PerWrite {
        // Acknowledged but not yet durable: what a power cut now could lose.
        out.push_str(&format!(
            "  durability {}: acknowledged up to LSN {}, durable up to LSN {}\n",
            v.durability, v.written_lsn, v.durable_lsn
        ));
    }
    if v.inconsistent {
        out.push_str("  ! Inconsistent: a resync is incomplete; do not promote this node\n");
    }
    for r in &v.replicas {
        out.push_str(&replica_line(r));
    }
    out
}

/// One replica's line under its volume in `status`.
fn replica_line(r: &admin::ReplicaStatus) -> String {
    let mut resync = r
        .resync
        .map(|(d, t)| format!(", resync {}%", (d * 100).checked_div(t).unwrap_or(0)))
        .unwrap_or_default();
    if r.out_of_sync_bytes > 0 {
        resync.push_str(&format!(", {} out of sync", ByteSize(r.out_of_sync_bytes)));
    }
    format!(
        "  replica {:<12} {:<12} durable LSN {:>10}  lag {:>8} LSN {:>8}  rtt {:>6} us{}{}\n",
        r.peer,
        r.state,
        r.durable_lsn,
        r.lag_lsn,
        ByteSize(r.lag_bytes).to_string(),
        r.rtt_us,
        resync,
        r.reason
            .as_ref()
            .map(|x| format!("  ({x})"))
            .unwrap_or_default()
    )
}

/// The coordinator's view in one line (and a second when a replica would
/// not campaign, or replies are held); the in-sync set on the primary.
fn coordinator_line(c: &admin::CoordinatorStatus, primary: bool) -> String {
    let leader = match (&c.leader, &c.leader_nbd, c.epoch) {
        (Some(n), Some(a), Some(e)) => format!("primary {n} at {a}, epoch {e}"),
        _ => "no primary".to_string(),
    };
    let mut out = format!(
        "coordinator: etcd {} ({}), {leader}, lease {} ({} s){}\n",
        c.etcd.join(","),
        if c.reachable {
            "reachable"
        } else {
            "UNREACHABLE"
        },
        c.lease.as_deref().unwrap_or("none"),
        c.lease_ttl_ms / 1000,
        if primary {
            format!(", in sync [{}]", c.in_sync.join(", "))
        } else {
            String::new()
        }
    );
    if c.writes_held {
        out.push_str(
            "  ! replies held: the lease may have lapsed; they resume when etcd renews it\n",
        );
    }
    if let Some(why) = &c.not_candidate {
        out.push_str(&format!("  ! would not take over: {why}\n"));
    }
    out
}

fn config_check(file: &Path) -> ExitCode {
    use mirrorblk_server::config::{Cli as DaemonCli, Config};
    let cli = DaemonCli {
        config: Some(file.to_path_buf()),
        ..Default::default()
    };
    match Config::from_cli(&cli) {
        Ok(c) => {
            println!("{}: ok", file.display());
            println!(
                "node {} listening on {}{}",
                c.node,
                c.listen,
                c.unix
                    .as_ref()
                    .map(|u| format!(" and {}", u.display()))
                    .unwrap_or_default()
            );
            if let Some(a) = &c.advertise {
                println!("advertised to clients (etcd's leader record) as {a}");
            }
            for v in &c.volumes {
                println!(
                    "volume {}: data {} journal {} size {}{}",
                    v.name,
                    v.data.display(),
                    v.journal.display(),
                    v.size
                        .map(|s| ByteSize(s).to_string())
                        .unwrap_or_else(|| "from the data file".into()),
                    if v.read_only { " (read-only)" } else { "" }
                );
            }
            println!(
                "event log {} (rotated at {})",
                c.event_log.display(),
                ByteSize(c.event_log_max_bytes)
            );
            if let Some(r) = &c.replication {
                println!(
                    "replication: mode {:?}, {} peer(s){}, heartbeat timeout {:?}",
                    r.mode,
                    r.peers.len(),
                    r.listen
                        .map(|l| format!(", listening on {l}"))
                        .unwrap_or_default(),
                    r.heartbeat_timeout
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mirrorblk: {}: {e}", file.display());
            ExitCode::from(2)
        }
    }
}

/// Sends `req`; on a refusal or a socket error prints why (`what` names the
/// request) and gives the exit code to return.
fn request(socket: &Path, req: &admin::Request, what: &str) -> Result<admin::Response, ExitCode> {
    match admin::call(socket, req) {
        Ok(r) if r.ok => Ok(r),
        Ok(r) => {
            eprintln!(
                "mirrorblk: {}",
                r.error
                    .unwrap_or_else(|| format!("the daemon refused {what}"))
            );
            Err(ExitCode::from(1))
        }
        Err(e) => {
            eprintln!("mirrorblk: {e}");
            Err(ExitCode::from(1))
        }
    }
}

/// Progress bars of bytes, rate and ETA, labelled by `template`'s prefix.
fn bar_style(template: &str) -> indicatif::ProgressStyle {
    indicatif::ProgressStyle::with_template(template)
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> ")
}

fn resync(socket: &Path, rate: Option<ByteSize>, watch: bool) -> ExitCode {
    if let Some(r) = rate {
        if let Err(code) = request(
            socket,
            &admin::Request::SetResyncRate { rate: r.0 },
            "resync rate",
        ) {
            return code;
        }
        println!("resync rate set to {r}/s");
    }
    let mut view = ResyncView::new(watch);
    let mut seen_any = false;
    loop {
        let resp = match request(socket, &admin::Request::Status, "status") {
            Ok(r) => r,
            Err(code) => return code,
        };
        let mut running = 0;
        for v in &resp.volumes {
            for r in &v.replicas {
                let key = format!("{}/{}", v.name, r.peer);
                if view.show(key, r.resync) {
                    running += 1;
                }
            }
        }
        seen_any |= running > 0;
        if view.last_line.elapsed() >= Duration::from_secs(1) {
            view.last_line = Instant::now();
        }
        if !watch {
            if running == 0 {
                println!("no resync running");
            }
            return ExitCode::SUCCESS;
        }
        if running == 0 {
            if seen_any {
                println!("all resyncs complete");
            } else {
                println!("no resync running");
            }
            return ExitCode::SUCCESS;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// How `mirrorblk resync` shows progress: one line per resync once, or
/// (watching) progress bars on a terminal and a line per resync every
/// second elsewhere (logs, scripts).
struct ResyncView {
    watch: bool,
    tty: bool,
    multi: indicatif::MultiProgress,
    style: indicatif::ProgressStyle,
    bars: std::collections::HashMap<String, indicatif::ProgressBar>,
    last_line: Instant,
    last_done: std::collections::HashMap<String, (u64, Instant)>,
}

impl ResyncView {
    fn new(watch: bool) -> ResyncView {
        use std::io::IsTerminal;
        ResyncView {
            watch,
            tty: std::io::stderr().is_terminal(),
            multi: indicatif::MultiProgress::new(),
            style: bar_style(
                "{prefix:<16} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            ),
            bars: std::collections::HashMap::new(),
            last_line: Instant::now() - Duration::from_secs(1),
            last_done: std::collections::HashMap::new(),
        }
    }

    /// Shows one replica's resync (`done`, `total` bytes, if one runs);
    /// returns whether it runs.
    fn show(&mut self, key: String, resync: Option<(u64, u64)>) -> bool {
        let Some((done, total)) = resync else {
            if let Some(b) = self.bars.remove(&key) {
                b.set_position(b.length().unwrap_or(0));
                b.finish_with_message("done");
            }
            if !self.tty && self.last_done.remove(&key).is_some() {
                println!("{key}: resync complete");
            }
            return false;
        };
        if !self.watch {
            println!(
                "{key}: resync {} of {} ({}%)",
                ByteSize(done),
                ByteSize(total),
                (done * 100).checked_div(total).unwrap_or(0)
            );
        } else if !self.tty {
            self.print_line(key, done, total);
        } else {
            let bar = self.bars.entry(key.clone()).or_insert_with(|| {
                let b = self.multi.add(indicatif::ProgressBar::new(total));
                b.set_style(self.style.clone());
                b.set_prefix(key.clone());
                b
            });
            bar.set_position(done);
        }
        true
    }

    /// A progress line with the rate since the last one, at most one a
    /// second.
    fn print_line(&mut self, key: String, done: u64, total: u64) {
        if self.last_line.elapsed() < Duration::from_secs(1) {
            return;
        }
        let now = Instant::now();
        let (d0, t0) = self.last_done.get(&key).copied().unwrap_or((done, now));
        let secs = now.duration_since(t0).as_secs_f64();
        let rate = if secs > 0.0 {
            (done.saturating_sub(d0)) as f64 / secs
        } else {
            0.0
        };
        println!(
            "{key}: resync {} of {} ({}%) at {}/s",
            ByteSize(done),
            ByteSize(total),
            (done * 100).checked_div(total).unwrap_or(0),
            ByteSize(rate as u64)
        );
        self.last_done.insert(key, (done, now));
    }
}

fn resize(socket: &Path, volume: String, size: ByteSize, force: bool, json: bool) -> ExitCode {
    if size.0 == 0 || size.0 % 4096 != 0 {
        eprintln!(
            "mirrorblk: size {} ({} bytes) is not a non-zero multiple of 4 KiB; choose e.g. {}",
            size,
            size.0,
            ByteSize(mirrorblk_server::units::align_up(size.0.max(1)))
        );
        return ExitCode::from(2);
    }
    let before = admin::call(socket, &admin::Request::Status)
        .ok()
        .and_then(|r| r.volumes.into_iter().find(|v| v.name == volume))
        .map(|v| v.size);
    let req = admin::Request::Resize {
        volume: volume.clone(),
        size: size.0,
        force,
    };
    let resp = match request(socket, &req, "resize") {
        Ok(r) => r,
        Err(code) => return code,
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&resp).unwrap_or_default()
        );
        return ExitCode::SUCCESS;
    }
    let now = resp
        .volumes
        .iter()
        .find(|v| v.name == volume)
        .map(|v| v.size);
    match (before, now) {
        (Some(b), Some(n)) if b == n => println!("volume {volume} is already {} ({n} bytes)", ByteSize(n)),
        (Some(b), Some(n)) => println!(
            "volume {volume} resized from {} to {} ({n} bytes); connections opened before keep their old size: reconnect clients (qemu: block_resize) to see it",
            ByteSize(b),
            ByteSize(n)
        ),
        (_, n) => println!("volume {volume} is {} now", ByteSize(n.unwrap_or(size.0))),
    }
    ExitCode::SUCCESS
}

fn verify(socket: &Path, repair: bool, json: bool) -> ExitCode {
    if let Err(code) = request(socket, &admin::Request::Verify { repair }, "verify") {
        return code;
    }
    let resp = match wait_for_verify(socket) {
        Ok(r) => r,
        Err(code) => return code,
    };
    let mut clean = true;
    let mut report = Vec::new();
    for v in &resp.volumes {
        for r in &v.replicas {
            let Some(vs) = &r.verify else {
                clean = false;
                report.push(serde_json::json!({"volume": v.name, "replica": r.peer, "result": "not verified"}));
                if !json {
                    println!("{}/{}: not verified", v.name, r.peer);
                }
                continue;
            };
            let (result, replica_clean) = verify_outcome(vs);
            clean &= replica_clean;
            if !json {
                println!("{}/{}: {result}", v.name, r.peer);
            }
            report.push(serde_json::json!({
                "volume": v.name,
                "replica": r.peer,
                "identical": vs.aborted.is_none() && vs.differing.is_empty() && vs.busy.is_empty(),
                "repaired": vs.repair && vs.aborted.is_none() && !vs.differing.is_empty(),
                "differing_offsets": vs.differing,
                "busy_offsets": vs.busy,
                "region_bytes": vs.region_bytes,
                "compared_bytes": vs.done_bytes,
                "aborted": vs.aborted,
                "seconds": vs.seconds,
            }));
        }
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    }
    if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Shows each replica's verify progress until none runs; returns the last
/// status.
fn wait_for_verify(socket: &Path) -> Result<admin::Response, ExitCode> {
    let multi = indicatif::MultiProgress::new();
    let style =
        bar_style("verify {prefix:<14} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}");
    let mut bars: std::collections::HashMap<String, indicatif::ProgressBar> =
        std::collections::HashMap::new();
    let resp = loop {
        let resp = request(socket, &admin::Request::Status, "status")?;
        let mut running = 0;
        for v in &resp.volumes {
            for r in &v.replicas {
                let Some(vs) = &r.verify else { continue };
                let key = format!("{}/{}", v.name, r.peer);
                let bar = bars.entry(key.clone()).or_insert_with(|| {
                    let b = multi.add(indicatif::ProgressBar::new(vs.total_bytes));
                    b.set_style(style.clone());
                    b.set_prefix(key.clone());
                    b
                });
                bar.set_position(vs.done_bytes);
                if vs.running {
                    running += 1;
                } else if !bar.is_finished() {
                    bar.finish();
                }
            }
        }
        if running == 0 {
            break resp;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let _ = multi.clear();
    Ok(resp)
}

/// One replica's verify result in words, and whether it leaves the replica
/// clean (identical, or repaired, and nothing left uncompared).
fn verify_outcome(vs: &admin::VerifyStatus) -> (String, bool) {
    let mut clean = true;
    let result = if let Some(why) = &vs.aborted {
        clean = false;
        format!("verify aborted: {why}; run it again once the replica is in sync")
    } else if vs.differing.is_empty() {
        format!(
            "identical ({} compared in {:.1} s)",
            ByteSize(vs.total_bytes),
            vs.seconds
        )
    } else {
        let shown: Vec<String> = vs.differing.iter().take(8).map(|o| o.to_string()).collect();
        let more = if vs.differing.len() > 8 { ", …" } else { "" };
        if !vs.repair {
            clean = false;
        }
        format!(
            "{} differing region(s) of {} at offsets {}{more}{}",
            vs.differing.len(),
            ByteSize(vs.region_bytes),
            shown.join(", "),
            if vs.repair {
                "; repaired (resent from the primary)"
            } else {
                "; run `mirrorblk verify --repair` to resend them from the primary"
            }
        )
    };
    if vs.busy.is_empty() {
        return (result, clean);
    }
    let busy = format!(
        "{result}; {} region(s) under constant writes could not be compared (offsets {}): run verify again when they are quieter",
        vs.busy.len(),
        vs.busy.iter().take(8).map(|o| o.to_string()).collect::<Vec<_>>().join(", ")
    );
    (busy, false)
}

fn role_change(socket: &Path, req: &admin::Request, done: &str) -> ExitCode {
    match request(socket, req, "the role change") {
        Ok(r) => {
            for v in &r.volumes {
                println!("{}: {done} (epoch {})", v.name, v.epoch);
            }
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

/// How long a restart may take: the new process's start, the drain and
/// checkpoint, the hand-over and the journal recovery.
const RESTART_LIMIT: Duration = Duration::from_secs(300);

/// `changes VOLUME --since LSN`: the changed ranges, as JSON or one
/// `OFFSET LENGTH` line each after a summary on stderr.
fn changes(socket: &Path, volume: String, since: u64, json: bool) -> ExitCode {
    let req = admin::Request::Changes { volume, since };
    let c = match request(socket, &req, "changes") {
        Ok(r) => match r.changes {
            Some(c) => c,
            None => {
                eprintln!("mirrorblk: the daemon answered without the changes");
                return ExitCode::from(1);
            }
        },
        Err(code) => return code,
    };
    if json {
        println!("{}", serde_json::to_string(&c).unwrap_or_default());
        return ExitCode::SUCCESS;
    }
    eprintln!(
        "volume {} ({}): {} bytes in {} range(s) changed after LSN {} (up to LSN {})",
        c.volume,
        c.uuid,
        c.bytes,
        c.ranges.len(),
        c.since,
        c.lsn
    );
    if !c.complete {
        eprintln!(
            "not complete: this node tracks changes only after LSN {}; the whole volume is listed, take a full backup",
            c.known_since
        );
    }
    for r in &c.ranges {
        println!("{} {}", r.offset, r.length);
    }
    ExitCode::SUCCESS
}

fn restart(socket: &Path, binary: Option<PathBuf>, json: bool) -> ExitCode {
    let binary = match binary
        .map(|b| std::path::absolute(&b).map_err(|e| (b, e)))
        .transpose()
    {
        Ok(b) => b,
        Err((b, e)) => {
            eprintln!("mirrorblk: --binary {}: {e}", b.display());
            return ExitCode::from(2);
        }
    };
    let req = admin::Request::Restart { binary };
    match admin::call_within(socket, &req, RESTART_LIMIT) {
        Ok(r) if r.ok => {
            let Some(o) = r.restart else {
                eprintln!("mirrorblk: the daemon answered without the restart's outcome");
                return ExitCode::from(1);
            };
            if json {
                println!("{}", serde_json::to_string(&o).unwrap_or_default());
            } else {
                println!(
                    "restarted: pid {} handed {} connection{} over to pid {} ({}); clients paused {} ms",
                    o.from_pid,
                    o.connections,
                    if o.connections == 1 { "" } else { "s" },
                    o.pid,
                    o.binary.display(),
                    o.pause_ms
                );
            }
            ExitCode::SUCCESS
        }
        Ok(r) => {
            eprintln!(
                "mirrorblk: restart failed: {}",
                r.error.unwrap_or_else(|| "the daemon refused".into())
            );
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("mirrorblk: {e}");
            ExitCode::from(1)
        }
    }
}

fn status(socket: &Path, json: bool, watch: bool) -> ExitCode {
    loop {
        match status_once(socket, json) {
            Ok(text) => {
                if watch {
                    // Clear the screen and home the cursor.
                    print!("\x1b[2J\x1b[H");
                }
                print!("{text}");
            }
            Err(e) => {
                eprintln!("mirrorblk: {e}");
                return ExitCode::from(1);
            }
        }
        if !watch {
            return ExitCode::SUCCESS;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Parses `--chunk-size`: a size (`64K`, `4M`) a repository may have.
fn parse_chunk_size(text: &str) -> Result<ByteSize, String> {
    let size: ByteSize = text.parse().map_err(|e| format!("{e}"))?;
    match u32::try_from(size.0) {
        Ok(c) if ::backup::index::valid_chunk_size(c) => Ok(size),
        _ => Err(format!(
            "{text}: a chunk size is a power of two from {} to {}",
            ByteSize(::backup::MIN_CHUNK_SIZE.into()),
            ByteSize(::backup::MAX_CHUNK_SIZE.into())
        )),
    }
}

/// Runs `mirrorblk backup …`.
fn run_backup(admin_socket: &Path, command: BackupCmd) -> ExitCode {
    match command {
        BackupCmd::Create {
            repo,
            volume,
            snapshot_space,
            chunk_size,
            json,
        } => {
            let opts = backup_create::CreateOptions {
                snapshot_space: snapshot_space.map(|s| s.0),
                // parse_chunk_size bounds it to 16 MiB.
                chunk_size: chunk_size.and_then(|c| u32::try_from(c.0).ok()),
                json,
            };
            backup_create::create(admin_socket, &repo, &volume, &opts)
        }
        BackupCmd::List { repo, json } => backup::list(&repo, json),
        BackupCmd::Verify { repo, id } => backup::verify(&repo, id.as_deref()),
        BackupCmd::Restore {
            repo,
            id,
            to,
            force,
            json,
        } => restore::restore(&repo, &id, &to, force, json),
        BackupCmd::Prune {
            repo,
            keep_last,
            volume,
            gc_margin,
        } => backup::prune(
            &repo,
            volume.as_deref(),
            keep_last,
            Duration::from_secs(gc_margin),
        ),
    }
}

/// Runs `mirrorblk certs …`.
fn run_certs(command: CertsCmd) -> ExitCode {
    let CertsCmd::Init {
        dir,
        hosts,
        days,
        force,
    } = command;
    let hosts = if hosts.is_empty() {
        certs::default_hosts()
    } else {
        hosts
    };
    certs::init(&certs::InitArgs {
        dir: &dir,
        hosts: &hosts,
        days,
        force,
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Status { json, watch } => status(&cli.admin_socket, json, watch),
        Cmd::Promote { force } => role_change(
            &cli.admin_socket,
            &admin::Request::Promote { force },
            "promoted; the node restarts as primary",
        ),
        Cmd::Resync { rate, watch } => resync(&cli.admin_socket, rate, watch),
        Cmd::Demote => role_change(
            &cli.admin_socket,
            &admin::Request::Demote,
            "demoted; the node restarts as replica",
        ),
        Cmd::Demo {
            dir,
            listen,
            size,
            auto_failover,
            tls,
        } => demo::run(&dir, &listen, &size, &daemon_path(), (auto_failover, tls)),
        Cmd::Verify { repair, json } => verify(&cli.admin_socket, repair, json),
        Cmd::Resize {
            volume,
            size,
            force,
            json,
        } => resize(&cli.admin_socket, volume, size, force, json),
        Cmd::Restart { binary, json } => restart(&cli.admin_socket, binary, json),
        Cmd::Changes {
            volume,
            since,
            json,
        } => changes(&cli.admin_socket, volume, since, json),
        Cmd::Snapshot { command } => snapshot::run(&cli.admin_socket, command),
        Cmd::Primary {
            etcd,
            json,
            wait,
            volume,
        } => primary::run(&etcd, &volume, json, wait.0),
        Cmd::Attach(o) => attach::attach(o.into()),
        Cmd::Detach { device } => attach::detach(&device),
        Cmd::Events { follow, json, file } => {
            events::run(&cli.admin_socket, &events::Options { follow, json, file })
        }
        Cmd::Config {
            command: ConfigCmd::Check { file },
        } => config_check(&file),
        Cmd::Journal { command } => match command {
            JournalCmd::Inspect { path } => journal_inspect(&path, false),
            JournalCmd::Dump { path } => journal_inspect(&path, true),
        },
        Cmd::Certs { command } => run_certs(command),
        Cmd::Backup { command } => run_backup(&cli.admin_socket, command),
    }
}
