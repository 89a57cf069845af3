//! The write-ahead journal at run time: LSN assignment, space reservation with
//! backpressure, and group commit.
//!
//! Records are reserved in LSN order (the reservation and the LSN are taken
//! together, on the volume's core, so journal order is LSN order). One
//! appender task writes whatever is queued in one vectored `O_DIRECT | O_DSYNC`
//! write — group commit: while one group is in flight, the next accumulates —
//! and on completion advances the written LSN and hands the group to the
//! applier. Space is released only when the applier has checkpointed.
//!
//! The records a group commit writes share batch headers (see
//! [`format`](mod@format)): a record reserved while the newest batch is still queued
//! joins it (the ring's [`ring::place`] decides), so at queue depth n a
//! group of n 4 KiB writes costs n + 1 journal blocks, not 2n. The
//! appender takes whole batches only and seals the newest when it takes it;
//! a batch is also closed by its entry limit, its payload limit, the end of
//! the area, and a write that may go in place (which keeps a header of its
//! own).
//!
//! With `--durability flush` the records go without `O_DSYNC` (a write is
//! acknowledged once the disk has it) and `sync` makes them durable in
//! groups, when a FLUSH or a FUA write asks, or the applier (under journal
//! pressure or after its interval). Superblocks and
//! intents are always written `O_DSYNC`.

pub mod format;
pub mod mutation;
pub mod recovery;
pub mod ring;
pub mod sync;

pub use mutation::{Mutation, MutationOp};
pub use ring::Retained;
use ring::Ring;
pub use sync::Durability;

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::rc::Rc;

use tokio::sync::{watch, Notify};

use crate::buffer::{AlignedBuf, OutBuf, Payload, SharedSlice, MAX_CHUNK};
use crate::units::{Epoch, Lsn, BLOCK};
use format::{
    BatchEntry, BatchHeader, EntryKind, HeaderBlock, RecordHeader, Superblock, AREA_START,
    HEADER_BLOCK,
};

/// The kernel's `IOV_MAX`: most iovecs in one `writev`.
const IOV_MAX: usize = 1024;

/// The largest payload one record carries: the largest NBD request an
/// export advertises, and the largest RECORD the replication wire takes.
pub const MAX_RECORD_PAYLOAD: u64 = 32 << 20;

/// Iovecs one batch needs at most: a pad header, its header, and per record
/// a chunk per [`MAX_CHUNK`] of payload, plus one for a partial chunk (a
/// batch carries at most [`MAX_RECORD_PAYLOAD`] bytes of payload, as a
/// lone record does).
const MAX_ENTRY_IOVECS: usize =
    2 + format::MAX_BATCH_ENTRIES + MAX_RECORD_PAYLOAD.div_ceil(MAX_CHUNK as u64) as usize;

/// Most iovecs in one group commit: a group takes whole batches up to this
/// many, or a single batch of any size.
const MAX_BATCH_IOVECS: usize = 1000;

const _: () = assert!(MAX_ENTRY_IOVECS <= MAX_BATCH_IOVECS);
const _: () = assert!(MAX_BATCH_IOVECS <= IOV_MAX);

/// Group commits in flight at once (see `run_appender`).
const MAX_COMMITS_IN_FLIGHT: usize = 2;

/// The largest payload one request may carry with a journal record area of
/// `area_len` bytes, so that any record can always be reserved: a quarter
/// of the area less a block for padding, and at most [`MAX_RECORD_PAYLOAD`].
/// The NBD export advertises it as the maximum block size.
pub fn max_payload(area_len: u64) -> u64 {
    crate::units::align_down(area_len / 4)
        .saturating_sub(BLOCK)
        .min(MAX_RECORD_PAYLOAD)
}

/// A mutation to reserve (see [`Journal::reserve`]).
pub struct NewRecord {
    /// What it does.
    pub op: MutationOp,
    /// Op flags (see [`format::FLAG_NO_HOLE`]).
    pub flags: u8,
    /// Volume byte offset.
    pub offset: u64,
    /// Volume bytes affected.
    pub length: u64,
    /// The data of a write.
    pub payload: Option<Rc<Payload>>,
    /// Write the payload to the data store in place (an aligned write only).
    pub in_place: bool,
}

/// Where a write's payload is made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placement {
    /// In the journal, after the header (every record but large writes).
    Journal,
    /// A large write whose payload is being written to the data store in
    /// place: the appender waits for it (records behind it too, so the
    /// journal stays in LSN order).
    Pending,
    /// The payload is durable in the data store; the journal gets only the
    /// header ([`EntryKind::WriteInPlace`]).
    InPlace,
}

/// Where the journal put a record: the journal's own business, never the
/// replication stream's.
struct Slot {
    /// Area offset of the record's header (its batch's, when batched).
    pos: u64,
    /// Its index in its batch (0 when it starts its entry).
    index: u32,
    /// Whether it shares a batch header (else it has its own: a write
    /// that may go in place).
    batched: bool,
    /// Area offset of its payload.
    payload_pos: u64,
    /// Bytes of padding reserved just before its entry (to the end of the
    /// area), 0 if none.
    pad_before: u64,
    /// Journal bytes of the record's own header and padded payload (a
    /// batched record: its padded payload; its batch header is the batch's).
    record_len: u64,
    /// Where the payload goes (always [`Placement::Journal`] but for large writes).
    placement: Cell<Placement>,
}

/// A journaled mutation in its slot, shared by the appender, the applier
/// and the replication window. Immutable once created, but for where a
/// large write's payload goes (decided once its in-place write ends).
/// Dereferences to its [`Mutation`]: what every reader but the journal needs.
pub struct Record {
    mutation: Mutation,
    slot: Slot,
}

impl std::ops::Deref for Record {
    type Target = Mutation;

    fn deref(&self) -> &Mutation {
        &self.mutation
    }
}

impl Record {
    /// The mutation it journals.
    pub fn mutation(&self) -> &Mutation {
        &self.mutation
    }

    /// Whether the payload went to the data store in place (the journal
    /// holds only the header).
    pub fn in_place(&self) -> bool {
        self.slot.placement.get() == Placement::InPlace
    }

    /// Its entry in its batch header.
    fn batch_entry(&self) -> BatchEntry {
        debug_assert!(
            self.slot.batched,
            "batch entry of a record with its own header"
        );
        let m = &self.mutation;
        BatchEntry {
            lsn: m.lsn,
            op: m.op,
            flags: m.flags,
            offset: m.offset,
            length: m.length,
            payload_at: self.slot.payload_pos - self.slot.pos,
            payload_hash: m.payload_hash,
        }
    }

    /// Its own header (a record that is not batched).
    fn header(&self, epoch: Epoch, session: u64) -> RecordHeader {
        debug_assert!(!self.slot.batched, "own header of a batched record");
        let placement = self.slot.placement.get();
        debug_assert_ne!(
            placement,
            Placement::Pending,
            "header of an unplaced record"
        );
        let m = &self.mutation;
        let in_place = placement == Placement::InPlace;
        RecordHeader {
            lsn: m.lsn,
            epoch,
            session,
            kind: if in_place {
                EntryKind::WriteInPlace
            } else {
                EntryKind::Mutation(m.op)
            },
            flags: m.flags,
            offset: m.offset,
            length: m.length,
            payload_len: if in_place { 0 } else { m.payload_len() },
            record_len: self.slot.record_len,
            payload_hash: m.payload_hash,
        }
    }
}

/// A retained record read back from the journal file.
pub enum ReadBack {
    /// Its mutation, payload included.
    Journaled(Mutation),
    /// A write made in place: the journal holds only its header, and its
    /// data only the store has (maybe overwritten since).
    InPlace,
}

/// The journal failed: no further write can be made durable.
#[derive(Debug, Clone, thiserror::Error)]
#[error("journal write failed: {0}")]
pub struct JournalFailed(pub String);

/// Durability progress published by the appender (and the syncer).
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// Every record with an LSN below this is written: acknowledged with
    /// `--durability flush` (equal to `durable_next` per write).
    pub written_next: Lsn,
    /// Every record with an LSN below this is durable.
    pub durable_next: Lsn,
    /// Set when a journal write failed; the volume stops accepting writes.
    pub failed: Option<String>,
}

struct State {
    /// Which area bytes and LSNs are taken; every record not yet released
    /// by a checkpoint (catch-up reads and checkpoints use it).
    ring: Ring,
    /// Records reserved but not yet handed to the appender's in-flight batch.
    queued: VecDeque<Rc<Record>>,
    /// Current superblock (checkpoint fields advance at run time).
    superblock: Superblock,
}

/// Runs of contiguous journal bytes a group commit writes: (start, end,
/// buffers). A run ends wherever the next piece does not start at its end:
/// at a pad, and where an entry ended exactly at the end of the area.
struct Runs {
    area_len: u64,
    runs: Vec<(u64, u64, Vec<OutBuf>)>,
}

impl Runs {
    fn new(area_len: u64) -> Runs {
        Runs {
            area_len,
            runs: Vec::new(),
        }
    }

    fn append(&mut self, pos: u64, len: u64, bufs: Vec<OutBuf>) {
        assert!(
            pos + len <= self.area_len,
            "journal write past the end of the area"
        );
        match self.runs.last_mut() {
            Some(run) if run.1 == pos => {
                run.1 += len;
                run.2.extend(bufs);
            }
            _ => self.runs.push((pos, pos + len, bufs)),
        }
    }

    /// Journal bytes the runs cover.
    fn bytes(&self) -> u64 {
        self.runs.iter().map(|r| r.1 - r.0).sum()
    }
}

/// What [`front_entry_len`] needs of a queued record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct EntryMark {
    /// Its in-place payload write has not ended.
    pending: bool,
    /// It shares a batch header.
    batched: bool,
    /// Its index in its batch.
    index: u32,
}

/// How many records at the front of the queue make up its first entry, 0
/// when none may be written yet (the queue is empty, or its front is a
/// write whose in-place payload write has not ended: nothing passes it, so
/// the journal stays in LSN order). A batch is taken with all its records.
fn front_entry_len(mut queued: impl Iterator<Item = EntryMark>) -> usize {
    let Some(front) = queued.next() else {
        return 0;
    };
    assert_eq!(
        front.index, 0,
        "the queue starts with an entry's first record"
    );
    if front.pending {
        return 0;
    }
    if !front.batched {
        return 1;
    }
    1 + queued.take_while(|m| m.batched && m.index > 0).count()
}

/// What the journal holds of a retained record (see [`stored_entry`]).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Stored {
    /// Its mutation, described as a batch entry (a record with its own
    /// header too), `payload_at` counted from the header read.
    Entry(BatchEntry),
    /// A write made in place: only its header is in the journal.
    InPlace,
}

/// The record `lsn`, index `index` of its entry, from the header found at
/// its entry's position: the header must describe exactly it.
fn stored_entry(header: HeaderBlock, lsn: Lsn, index: u32) -> io::Result<Stored> {
    let mismatch = |found: String| {
        io::Error::other(format!(
            "journal holds {found} where LSN {lsn} was expected"
        ))
    };
    match header {
        HeaderBlock::Batch(b) => match b.entries.get(index as usize) {
            Some(e) if e.lsn == lsn => Ok(Stored::Entry(*e)),
            Some(e) => Err(mismatch(format!("LSN {}", e.lsn))),
            None => Err(mismatch(format!("a batch of {} records", b.entries.len()))),
        },
        HeaderBlock::Record(h) if h.lsn != lsn || index != 0 => {
            Err(mismatch(format!("LSN {} ({:?})", h.lsn, h.kind)))
        }
        HeaderBlock::Record(h) => match h.kind {
            EntryKind::Mutation(op) => Ok(Stored::Entry(BatchEntry {
                lsn,
                op,
                flags: h.flags,
                offset: h.offset,
                length: h.length,
                payload_at: BLOCK,
                payload_hash: h.payload_hash,
            })),
            EntryKind::WriteInPlace | EntryKind::InPlaceIntent => Ok(Stored::InPlace),
            EntryKind::Pad => Err(mismatch("a pad".to_string())),
        },
    }
}

/// A volume's journal on its core.
pub struct Journal {
    /// Where records go: `O_DSYNC` per write, plain with `--durability flush`.
    file: tokio_uring::fs::File,
    /// With `--durability flush`: the journal opened `O_DSYNC` as well, for
    /// superblocks and intents (None per write: `file` is `O_DSYNC`).
    meta_file: Option<tokio_uring::fs::File>,
    durability: Durability,
    area_len: u64,
    epoch: Cell<Epoch>,
    session: u64,
    state: RefCell<State>,
    work: Notify,
    space: Notify,
    progress: watch::Sender<Progress>,
    /// Writers waiting for their record to be written, woken in LSN
    /// order as group commits complete.
    written_gate: crate::lsn_gate::LsnGate,
    /// With `--durability flush`: waiters for durability, woken as syncs complete.
    synced_gate: crate::lsn_gate::LsnGate,
    /// Durability is asked for every LSN below this (flush mode).
    sync_requested: Cell<Lsn>,
    /// Wakes the syncer.
    sync_work: Notify,
    /// What the `fdatasync` under way covers (every LSN below it), if one is.
    sync_running: Cell<Option<Lsn>>,
    /// Syncs done so far.
    syncs: Cell<u64>,
    header_blocks: RefCell<Vec<AlignedBuf>>,
    batches: Cell<u64>,
    /// Bytes of records (headers, payloads and pads) written to the journal so far.
    bytes_written: Cell<u64>,
}

impl Journal {
    /// Takes over a recovered journal. Must run inside the core's runtime.
    pub fn new(opened: recovery::OpenedJournal) -> Journal {
        let sb = opened.superblock;
        let start = sb.checkpoint_lsn;
        let (progress, _) = watch::channel(Progress {
            written_next: sb.checkpoint_lsn,
            durable_next: sb.checkpoint_lsn,
            failed: None,
        });
        let (file, meta_file) = match opened.records_file {
            Some(records) => (records, Some(opened.file)),
            None => (opened.file, None),
        };
        Journal {
            file: tokio_uring::fs::File::from_std(file),
            meta_file: meta_file.map(tokio_uring::fs::File::from_std),
            durability: opened.durability,
            area_len: sb.area_len,
            epoch: Cell::new(sb.epoch),
            session: sb.session,
            state: RefCell::new(State {
                ring: Ring::new(sb.area_len, sb.checkpoint_pos, sb.checkpoint_lsn),
                queued: VecDeque::new(),
                superblock: sb,
            }),
            work: Notify::new(),
            space: Notify::new(),
            progress,
            written_gate: crate::lsn_gate::LsnGate::new(),
            synced_gate: crate::lsn_gate::LsnGate::new(),
            sync_requested: Cell::new(start),
            sync_work: Notify::new(),
            sync_running: Cell::new(None),
            syncs: Cell::new(0),
            header_blocks: RefCell::new(Vec::new()),
            batches: Cell::new(0),
            bytes_written: Cell::new(0),
        }
    }

    /// The volume's UUID.
    pub fn volume_uuid(&self) -> [u8; 16] {
        self.state.borrow().superblock.volume_uuid
    }

    /// A receiver that wakes whenever durability progresses (or fails).
    pub fn subscribe(&self) -> watch::Receiver<Progress> {
        self.progress.subscribe()
    }

    /// This node's epoch for the volume.
    pub fn epoch(&self) -> Epoch {
        self.epoch.get()
    }

    /// Length of the record area.
    pub fn area_len(&self) -> u64 {
        self.area_len
    }

    /// Bytes reserved and not yet checkpointed.
    pub fn used(&self) -> u64 {
        self.state.borrow().ring.used()
    }

    /// The next LSN to be assigned.
    pub fn next_lsn(&self) -> Lsn {
        self.state.borrow().ring.next_lsn()
    }

    /// Group commits done so far.
    pub fn batches(&self) -> u64 {
        self.batches.get()
    }

    /// Journal bytes written for records so far (headers, payloads, pads;
    /// not superblocks or intents).
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written.get()
    }

    /// When a reply promises durability.
    pub fn durability(&self) -> Durability {
        self.durability
    }

    /// Group flushes (`fdatasync`s of the journal) done so far.
    pub fn syncs(&self) -> u64 {
        self.syncs.get()
    }

    /// Where superblocks and intents go: always `O_DSYNC`.
    fn meta(&self) -> &tokio_uring::fs::File {
        self.meta_file.as_ref().unwrap_or(&self.file)
    }

    /// Reserves space and an LSN for a record, or None if the journal is full.
    /// Synchronous, so the caller can update its in-memory state (the
    /// overlay) in the same step, in LSN order. With `in_place`, the record
    /// (an aligned write) starts pending: the appender holds
    /// it, and every record after it, until [`Journal::placed`] is called.
    pub fn try_reserve(&self, new: &NewRecord) -> Option<Rc<Record>> {
        let NewRecord {
            op,
            flags,
            offset,
            length,
            ref payload,
            in_place,
        } = *new;
        let payload = payload.clone();
        assert!(
            !in_place
                || (op == MutationOp::Write
                    && payload.is_some()
                    && offset % BLOCK == 0
                    && length % BLOCK == 0),
            "only aligned writes go in place"
        );
        assert!(
            op.payload_len(length) <= MAX_RECORD_PAYLOAD,
            "record payload larger than {MAX_RECORD_PAYLOAD} bytes"
        );
        let layout = if in_place {
            ring::Layout::Own {
                record_len: RecordHeader::record_len_for(op.payload_len(length)),
            }
        } else {
            ring::Layout::Batched {
                payload: op.payload_len(length),
            }
        };
        let mut st = self.state.borrow_mut();
        let slot = st.ring.try_reserve(layout, (offset, length), in_place)?;
        let payload_hash = payload.as_ref().map(|p| p.xxh3()).unwrap_or(0);
        let rec = Rc::new(Record {
            mutation: Mutation {
                lsn: slot.lsn,
                op,
                flags,
                offset,
                length,
                payload,
                payload_hash,
            },
            slot: Slot {
                pos: slot.pos,
                index: slot.index,
                batched: !in_place,
                payload_pos: slot.payload_pos,
                pad_before: slot.pad_before,
                record_len: match layout {
                    ring::Layout::Own { record_len } => record_len,
                    ring::Layout::Batched { .. } => {
                        slot.len - if slot.index == 0 { BLOCK } else { 0 }
                    }
                },
                placement: Cell::new(if in_place {
                    Placement::Pending
                } else {
                    Placement::Journal
                }),
            },
        });
        st.queued.push_back(rec.clone());
        drop(st);
        self.work.notify_one();
        Some(rec)
    }

    /// Waits until the journal has room, then reserves (see [`Journal::try_reserve`]).
    /// `admit` is asked in the same step (None when it says no: the record
    /// no longer fits the volume); `on_reserved` runs synchronously with the
    /// reservation.
    pub async fn reserve(
        &self,
        new: NewRecord,
        admit: impl Fn() -> bool,
        on_reserved: impl FnOnce(&Rc<Record>),
    ) -> Result<Option<Rc<Record>>, JournalFailed> {
        loop {
            if let Some(f) = &self.progress.borrow().failed {
                return Err(JournalFailed(f.clone()));
            }
            if !admit() {
                return Ok(None);
            }
            let notified = self.space.notified();
            if let Some(r) = self.try_reserve(&new) {
                on_reserved(&r);
                return Ok(Some(r));
            }
            notified.await;
        }
    }

    /// A pending in-place record's payload write ended: `durable` means its
    /// payload is durable in the data store (the journal then writes only
    /// the header); otherwise the payload is journaled as usual. Either way
    /// the appender may now write it and the records behind it.
    pub fn placed(&self, rec: &Record, durable: bool) {
        assert_eq!(
            rec.slot.placement.get(),
            Placement::Pending,
            "record {} placed twice",
            rec.lsn
        );
        rec.slot.placement.set(if durable {
            Placement::InPlace
        } else {
            Placement::Journal
        });
        if !durable {
            // Its payload is journaled after all: catch-up can replay it.
            self.state.borrow_mut().ring.mark_journaled(rec.lsn);
        }
        self.work.notify_one();
    }

    /// Writes, durably, an intent header in the slot of a pending in-place
    /// record (before its payload goes to the store): if the node crashes
    /// before the record's own header replaces it, recovery finds the intent
    /// and marks the range changed (changed-block tracking) and out of sync
    /// for every replica, since the store may then hold data no record names.
    pub async fn write_intent(&self, rec: &Record) -> io::Result<()> {
        assert_eq!(
            rec.slot.placement.get(),
            Placement::Pending,
            "intent for a record that is not pending"
        );
        let mut blk = self.header_block();
        RecordHeader {
            lsn: rec.lsn,
            epoch: self.epoch.get(),
            session: self.session,
            kind: EntryKind::InPlaceIntent,
            flags: rec.flags,
            offset: rec.offset,
            length: rec.length,
            payload_len: 0,
            record_len: rec.slot.record_len,
            payload_hash: rec.payload_hash,
        }
        .encode(blk.as_mut_slice());
        let (res, blk) = self
            .meta()
            .write_all_at(blk, AREA_START + rec.slot.pos)
            .await;
        self.recycle(vec![OutBuf::Block(blk)]);
        res
    }

    /// Whether a retained record from `from` on may hold its payload only in
    /// the data store (so catch-up from the journal cannot replay it).
    pub fn in_place_since(&self, from: Lsn) -> bool {
        let st = self.state.borrow();
        let any = st.ring.retained_since(from).any(|r| r.in_place);
        any
    }

    /// Waits until the record with `lsn` is written: when a write is
    /// acknowledged (durable too, but for `--durability flush`).
    pub async fn wait_written(&self, lsn: Lsn) -> Result<(), JournalFailed> {
        loop {
            {
                let p = self.progress.borrow();
                if p.written_next > lsn {
                    return Ok(());
                }
                if let Some(f) = &p.failed {
                    return Err(JournalFailed(f.clone()));
                }
            }
            self.written_gate.wait(lsn).await;
        }
    }

    /// Waits until the record with `lsn` is durable (with `--durability
    /// flush`, asking the syncer for it once it is written, unless the sync
    /// under way covers it: see [`sync::covering`]).
    pub async fn wait_durable(&self, lsn: Lsn) -> Result<(), JournalFailed> {
        self.wait_written(lsn).await?;
        if self.durability == Durability::PerWrite {
            return Ok(());
        }
        self.wait_synced(lsn, true).await
    }

    /// Waits until the record with `lsn` is durable without asking for a
    /// sync: with `--durability flush` it ends when a sync someone else
    /// asked for (a FLUSH, a FUA write) covers it. For the applier, which
    /// asks only when it must (journal pressure, its interval).
    pub async fn wait_durable_unasked(&self, lsn: Lsn) -> Result<(), JournalFailed> {
        self.wait_written(lsn).await?;
        if self.durability == Durability::PerWrite {
            return Ok(());
        }
        self.wait_synced(lsn, false).await
    }

    /// Flush mode: waits until a sync covers the written record `lsn`; with
    /// `ask`, asks the syncer for one when no sync under way covers it.
    async fn wait_synced(&self, lsn: Lsn, ask: bool) -> Result<(), JournalFailed> {
        let target = lsn.next();
        loop {
            {
                let p = self.progress.borrow();
                let decision = sync::covering(target, p.durable_next, self.sync_running.get());
                if decision == sync::Covering::Done {
                    return Ok(());
                }
                if let Some(f) = &p.failed {
                    return Err(JournalFailed(f.clone()));
                }
                if decision == sync::Covering::Next && ask && self.sync_requested.get() < target {
                    self.sync_requested.set(target);
                    self.sync_work.notify_one();
                }
            }
            self.synced_gate.wait(lsn).await;
        }
    }

    /// Waits until every record written so far is durable: what a FLUSH
    /// needs (every write acknowledged before it is written, on every
    /// connection, as LSNs are the volume's).
    pub async fn sync_written(&self) -> Result<(), JournalFailed> {
        match self.written_next().0.checked_sub(1) {
            Some(last) => self.wait_durable(Lsn(last)).await,
            None => self.failed().map_or(Ok(()), |f| Err(JournalFailed(f))),
        }
    }

    /// Every LSN below this one is durable in the journal.
    pub fn durable_next(&self) -> Lsn {
        self.progress.borrow().durable_next
    }

    /// Every LSN below this one is written to the journal (durable, but for
    /// `--durability flush`).
    pub fn written_next(&self) -> Lsn {
        self.progress.borrow().written_next
    }

    /// With `--durability flush`: the syncer, forever (until the journal
    /// fails). Runs one `fdatasync` at a time, each covering every record
    /// written when it began, whenever a waiter asks for more than is durable.
    pub async fn run_syncer(&self) {
        loop {
            let notified = self.sync_work.notified();
            let plan = {
                let p = self.progress.borrow();
                if p.failed.is_some() {
                    return;
                }
                sync::sync_plan(sync::Frontiers {
                    requested: self.sync_requested.get(),
                    durable: p.durable_next,
                    written: p.written_next,
                })
            };
            let Some(covers) = plan else {
                notified.await;
                continue;
            };
            // Waiters that arrive meanwhile and need no more than `covers`
            // wait for this sync without asking for another.
            self.sync_running.set(Some(covers));
            let res = self.file.sync_data().await;
            self.sync_running.set(None);
            if let Err(e) = res {
                self.fail(format!("fdatasync: {e}"));
                return;
            }
            self.syncs.set(self.syncs.get() + 1);
            self.progress
                .send_modify(|p| p.durable_next = p.durable_next.max(covers));
            self.synced_gate.release_below(covers);
        }
    }

    /// The journal failed: every waiter is woken to see it.
    fn fail(&self, msg: String) {
        tracing::error!("journal write failed, volume stops accepting writes: {msg}");
        self.progress.send_modify(|p| p.failed = Some(msg));
        self.written_gate.release_all();
        self.synced_gate.release_all();
        self.sync_work.notify_one();
    }

    /// Whether a journal write has failed.
    pub fn failed(&self) -> Option<String> {
        self.progress.borrow().failed.clone()
    }

    fn header_block(&self) -> AlignedBuf {
        self.header_blocks
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| AlignedBuf::new(HEADER_BLOCK))
    }

    fn recycle(&self, bufs: Vec<OutBuf>) {
        let mut free = self.header_blocks.borrow_mut();
        for b in bufs {
            if let OutBuf::Block(blk) = b {
                if free.len() < 4096 {
                    free.push(blk);
                }
            }
        }
    }

    /// The appender: writes queued records in batches, forever. Completed
    /// batches go to `done` in LSN order.
    pub async fn run_appender(&self, mut done: impl FnMut(Vec<Rc<Record>>, std::time::Duration)) {
        use futures_util::stream::{FuturesOrdered, StreamExt};
        // Up to MAX_COMMITS_IN_FLIGHT group commits run at once (their
        // flushes overlap), but durability advances strictly in batch
        // order: a later batch that completes first waits for the earlier
        // one, so a torn earlier batch can never hide behind an acknowledged
        // later one.
        let mut inflight = FuturesOrdered::new();
        loop {
            while inflight.len() < MAX_COMMITS_IN_FLIGHT {
                let batch = self.take_batch();
                if batch.is_empty() {
                    break;
                }
                let started = std::time::Instant::now();
                inflight.push_back(async move {
                    let res = self.write_batch(&batch).await;
                    (batch, started, res)
                });
            }
            let notified = self.work.notified();
            if inflight.is_empty() {
                // Nothing to write until a record is queued, or the one in
                // front (an in-place write under way) is placed.
                let ready = self
                    .state
                    .borrow()
                    .queued
                    .front()
                    .is_some_and(|r| r.slot.placement.get() != Placement::Pending);
                if !ready {
                    notified.await;
                }
                continue;
            }
            let room = inflight.len() < MAX_COMMITS_IN_FLIGHT;
            tokio::select! {
                Some((batch, started, res)) = inflight.next() => match res {
                    Ok(()) => {
                        let last = batch.last().map(|r| r.lsn).unwrap_or_default();
                        self.batches.set(self.batches.get() + 1);
                        let per_write = self.durability == Durability::PerWrite;
                        self.progress.send_modify(|p| {
                            p.written_next = last.next();
                            if per_write {
                                p.durable_next = last.next();
                            }
                        });
                        self.written_gate.release_below(last.next());
                        done(batch, started.elapsed());
                    }
                    Err(e) => {
                        self.fail(format!("{e}"));
                        return;
                    }
                },
                _ = notified, if room => {}
            }
        }
    }

    /// Takes queued records for one group commit: whole entries (a batch
    /// with all its records, or a record with its own header) in LSN order,
    /// up to [`MAX_BATCH_IOVECS`] iovecs (or one entry of any size), never
    /// past a record whose in-place payload write has not ended. The newest
    /// batch taken is sealed: a record reserved from now on starts a new one.
    fn take_batch(&self) -> Vec<Rc<Record>> {
        let mut st = self.state.borrow_mut();
        let mut iovecs = 0;
        let mut batch = Vec::new();
        loop {
            let n = front_entry_len(st.queued.iter().map(|r| EntryMark {
                pending: r.slot.placement.get() == Placement::Pending,
                batched: r.slot.batched,
                index: r.slot.index,
            }));
            if n == 0 {
                break;
            }
            let chunks: usize = st
                .queued
                .iter()
                .take(n)
                .map(|r| r.payload.as_ref().map_or(0, |p| p.chunk_count()))
                .sum();
            let n_iovecs = 2 + chunks;
            debug_assert!(n_iovecs <= MAX_ENTRY_IOVECS, "entry of {n_iovecs} iovecs");
            if !batch.is_empty() && iovecs + n_iovecs > MAX_BATCH_IOVECS {
                break;
            }
            iovecs += n_iovecs;
            batch.extend(st.queued.drain(..n));
        }
        if let Some(last) = batch.last() {
            st.ring.seal_through(last.lsn);
        }
        batch
    }

    /// Writes one group commit: contiguous runs, split where a pad wraps the area.
    async fn write_batch(&self, batch: &[Rc<Record>]) -> io::Result<()> {
        let mut runs = Runs::new(self.area_len);
        for entry in batch.chunk_by(|_, next| next.slot.index > 0) {
            let first = &entry[0];
            assert_eq!(first.slot.index, 0, "a group commit starts an entry");
            let slot = &first.slot;
            if slot.pad_before > 0 {
                let mut blk = self.header_block();
                RecordHeader {
                    lsn: first.lsn,
                    epoch: self.epoch.get(),
                    session: self.session,
                    kind: EntryKind::Pad,
                    flags: 0,
                    offset: 0,
                    length: 0,
                    payload_len: 0,
                    record_len: slot.pad_before,
                    payload_hash: 0,
                }
                .encode(blk.as_mut_slice());
                runs.append(
                    self.area_len - slot.pad_before,
                    BLOCK,
                    vec![OutBuf::Block(blk)],
                );
            }
            if slot.batched {
                self.append_batch(&mut runs, entry);
            } else {
                self.append_own(&mut runs, first);
            }
        }
        let bytes = runs.bytes();
        let writes = runs.runs.into_iter().map(|(pos, _, bufs)| async move {
            let (res, bufs) = self.file.writev_at_all(bufs, Some(AREA_START + pos)).await;
            self.recycle(bufs);
            res.map(|_| ())
        });
        for r in futures_util::future::join_all(writes).await {
            r?;
        }
        self.bytes_written.set(self.bytes_written.get() + bytes);
        Ok(())
    }

    /// Adds a batch: its header, then its records' payloads back to back.
    fn append_batch(&self, runs: &mut Runs, entry: &[Rc<Record>]) {
        let header = BatchHeader {
            epoch: self.epoch.get(),
            session: self.session,
            entries: entry.iter().map(|r| r.batch_entry()).collect(),
        };
        let mut blk = self.header_block();
        header.encode(blk.as_mut_slice());
        let payloads = entry.iter().flat_map(|r| {
            r.payload
                .iter()
                .flat_map(|p| SharedSlice::padded_chunks(p).map(OutBuf::Shared))
        });
        let bufs = std::iter::once(OutBuf::Block(blk))
            .chain(payloads)
            .collect();
        runs.append(entry[0].slot.pos, header.batch_len(), bufs);
    }

    /// Adds a record with its own header (a write that may have gone in place).
    fn append_own(&self, runs: &mut Runs, r: &Record) {
        let slot = &r.slot;
        let mut blk = self.header_block();
        r.header(self.epoch.get(), self.session)
            .encode(blk.as_mut_slice());
        if r.in_place() {
            // Only the header: the payload is already home. The rest of
            // the record's space stays unwritten (recovery skips it).
            runs.append(slot.pos, BLOCK, vec![OutBuf::Block(blk)]);
            return;
        }
        let payload = r
            .payload
            .iter()
            .flat_map(|p| SharedSlice::padded_chunks(p).map(OutBuf::Shared));
        let bufs = std::iter::once(OutBuf::Block(blk)).chain(payload).collect();
        runs.append(slot.pos, slot.record_len, bufs);
    }

    /// Whether the store is marked inconsistent (a resync is incomplete).
    pub fn inconsistent(&self) -> bool {
        self.state.borrow().superblock.inconsistent
    }

    /// Persists a new role and epoch (promotion, demotion, adopting a newer
    /// primary's epoch); records written from now on carry the new epoch.
    pub async fn set_role_epoch(
        &self,
        role: format::Role,
        epoch: Epoch,
        inconsistent: bool,
    ) -> io::Result<()> {
        let sb = {
            let mut st = self.state.borrow_mut();
            st.superblock.role = role;
            st.superblock.epoch = epoch;
            st.superblock.inconsistent = inconsistent;
            st.superblock.generation += 1;
            st.superblock.clone()
        };
        self.write_superblock(&sb).await?;
        self.epoch.set(epoch);
        Ok(())
    }

    /// The volume size the superblock records (as of the last applied resize).
    pub fn volume_size(&self) -> u64 {
        self.state.borrow().superblock.volume_size
    }

    /// Records the volume's size in the superblock once its resize record
    /// is applied: durably now with `persist` (a shrink, before the store is
    /// cut, so the superblock never records more than the store holds),
    /// else with the next superblock write (the checkpoint, which never
    /// passes an unapplied record; until then recovery replays the record).
    pub async fn set_volume_size(&self, size: u64, persist: bool) -> io::Result<()> {
        let sb = {
            let mut st = self.state.borrow_mut();
            st.superblock.volume_size = size;
            if !persist {
                return Ok(());
            }
            st.superblock.generation += 1;
            st.superblock.clone()
        };
        self.write_superblock(&sb).await
    }

    /// Persists the inconsistent mark.
    pub async fn set_inconsistent(&self, on: bool) -> io::Result<()> {
        let sb = {
            let mut st = self.state.borrow_mut();
            st.superblock.inconsistent = on;
            st.superblock.generation += 1;
            st.superblock.clone()
        };
        self.write_superblock(&sb).await
    }

    async fn write_superblock(&self, sb: &Superblock) -> io::Result<()> {
        let mut blk = AlignedBuf::new(HEADER_BLOCK);
        sb.encode(blk.as_mut_slice());
        let (res, _) = self
            .meta()
            .write_all_at(blk, Superblock::slot_offset(sb.generation % 2))
            .await;
        res
    }

    /// On a replica taking a full resync: forgets every record (the caller
    /// guarantees all are applied) and continues the LSN sequence at
    /// `start`, marking the store inconsistent until the resync ends.
    pub async fn rebase(&self, start: Lsn, volume_uuid: [u8; 16]) -> io::Result<()> {
        let sb = {
            let mut st = self.state.borrow_mut();
            // From now on this is a copy of the primary's volume.
            st.superblock.volume_uuid = volume_uuid;
            assert!(
                st.queued.is_empty(),
                "rebase with records waiting to be written"
            );
            st.ring.rebase(start);
            st.superblock.checkpoint_lsn = start;
            st.superblock.checkpoint_pos = st.ring.head();
            st.superblock.inconsistent = true;
            st.superblock.generation += 1;
            st.superblock.clone()
        };
        self.write_superblock(&sb).await?;
        self.progress.send_modify(|p| {
            p.written_next = start;
            p.durable_next = start;
        });
        self.sync_requested.set(start);
        self.written_gate.release_all();
        self.synced_gate.release_all();
        self.space.notify_waiters();
        Ok(())
    }

    /// The checkpoint: every record below it is applied and durable in the store.
    pub fn checkpoint_lsn(&self) -> Lsn {
        self.state.borrow().superblock.checkpoint_lsn
    }

    /// The volume extents (offset, length) changed by retained records with
    /// LSNs in `[from, to)`.
    pub fn retained_extents(&self, from: Lsn, to: Lsn) -> Vec<(u64, u64)> {
        let st = self.state.borrow();
        st.ring
            .retained_since(from)
            .take_while(|r| r.lsn < to)
            .filter(|r| r.extent.1 > 0)
            .map(|r| r.extent)
            .collect()
    }

    /// Bytes changed (written, trimmed or zeroed) by retained records from
    /// LSN `from` on: what a replica durable up to `from - 1` still lacks of
    /// the journal.
    pub fn retained_bytes_from(&self, from: Lsn) -> u64 {
        self.state.borrow().ring.retained_bytes_from(from)
    }

    /// Where record `lsn` sits, if it is still retained.
    pub fn retained(&self, lsn: Lsn) -> Option<Retained> {
        self.state.borrow().ring.retained(lsn)
    }

    /// The checkpoint a move to `next` would reach: `next`, or the first
    /// LSN of its batch when `next` falls inside one (a batch is released
    /// whole: its header describes every record in it).
    pub fn checkpoint_floor(&self, next: Lsn) -> Lsn {
        self.state.borrow().ring.checkpoint_floor(next)
    }

    /// Moves the checkpoint to `next` (or to the first LSN of its batch:
    /// see [`Journal::checkpoint_floor`]): the caller guarantees every record
    /// below it is applied and durable in the store (and no longer needed by
    /// a replica). Persists that in the superblock, then releases the space.
    /// Returns false when there was nothing to release.
    pub async fn checkpoint_to(&self, next: Lsn) -> io::Result<bool> {
        assert!(
            next <= self.durable_next(),
            "checkpoint to {next:?} past the durable frontier {:?}",
            self.durable_next()
        );
        let (sb, release) = {
            let mut st = self.state.borrow_mut();
            let Some(release) = st.ring.plan_release(next) else {
                return Ok(false);
            };
            st.superblock.checkpoint_lsn = release.checkpoint_lsn;
            st.superblock.checkpoint_pos = release.checkpoint_pos;
            st.superblock.generation += 1;
            (st.superblock.clone(), release)
        };
        self.write_superblock(&sb).await?;
        self.state.borrow_mut().ring.release(&release);
        self.space.notify_waiters();
        Ok(true)
    }

    /// Reads record `lsn` back from the journal file (replica catch-up when
    /// its payload is no longer in memory), verifying both checksums.
    pub async fn read_record(
        &self,
        lsn: Lsn,
        pool: &crate::buffer::BufPool,
    ) -> io::Result<ReadBack> {
        let Some(r) = self.retained(lsn) else {
            return Err(io::Error::other(format!(
                "record {lsn} is no longer in the journal"
            )));
        };
        let blk = AlignedBuf::new(HEADER_BLOCK);
        let (res, slice) = self
            .file
            .read_exact_at(
                tokio_uring::buf::BoundedBuf::slice(blk, 0..HEADER_BLOCK),
                AREA_START + r.pos,
            )
            .await;
        res?;
        let blk = slice.into_inner();
        let header = HeaderBlock::decode(blk.as_slice())
            .map_err(|e| io::Error::other(format!("record {lsn}: {e}")))?;
        let (entry, payload_pos) = match stored_entry(header, lsn, r.index)? {
            Stored::InPlace => return Ok(ReadBack::InPlace),
            Stored::Entry(e) => (e, r.pos + e.payload_at),
        };
        let payload = if entry.payload_len() == 0 {
            None
        } else {
            Some(Rc::new(self.read_payload(&entry, payload_pos, pool).await?))
        };
        Ok(ReadBack::Journaled(Mutation {
            lsn,
            op: entry.op,
            flags: entry.flags,
            offset: entry.offset,
            length: entry.length,
            payload,
            payload_hash: entry.payload_hash,
        }))
    }

    /// Reads the payload of `entry` at area offset `pos`, checking its hash.
    async fn read_payload(
        &self,
        entry: &BatchEntry,
        pos: u64,
        pool: &crate::buffer::BufPool,
    ) -> io::Result<Payload> {
        let mut payload = pool.payload(entry.payload_len() as usize).await;
        let chunks = payload.take_chunks();
        let mut filled = Vec::with_capacity(chunks.len());
        for (i, chunk) in chunks.into_iter().enumerate() {
            let len = crate::units::align_up(payload.chunk_len(i) as u64) as usize;
            let at = AREA_START + pos + (i * crate::buffer::MAX_CHUNK) as u64;
            let (res, slice) = self
                .file
                .read_exact_at(tokio_uring::buf::BoundedBuf::slice(chunk, 0..len), at)
                .await;
            res?;
            filled.push(slice.into_inner());
        }
        payload.put_chunks(filled);
        if payload.xxh3() != entry.payload_hash {
            return Err(io::Error::other(format!(
                "record {}: payload checksum mismatch in the journal",
                entry.lsn
            )));
        }
        Ok(payload)
    }

    /// Whether writers are waiting for space (the applier then checkpoints sooner).
    pub fn fill_ratio(&self) -> f64 {
        self.state.borrow().ring.used() as f64 / self.area_len as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_commit_takes_whole_entries_and_stops_at_a_pending_write() {
        let m = |pending: bool, batched: bool, index: u32| EntryMark {
            pending,
            batched,
            index,
        };
        let b = |index: u32| m(false, true, index);
        let own = m(false, false, 0);
        let pending = m(true, false, 0);
        // queue → records of its first entry
        let table: &[(&[EntryMark], usize)] = &[
            (&[], 0),
            // A batch with all its records, up to the next entry.
            (&[b(0)], 1),
            (&[b(0), b(1), b(2)], 3),
            (&[b(0), b(1), b(0), b(1)], 2),
            (&[b(0), b(1), own], 2),
            // A record with its own header alone.
            (&[own, b(0)], 1),
            (&[own, own], 1),
            // Nothing passes a write whose in-place payload is under way.
            (&[pending, b(0)], 0),
            (&[b(0), b(1), pending], 2),
        ];
        for (i, &(queue, want)) in table.iter().enumerate() {
            assert_eq!(
                front_entry_len(queue.iter().copied()),
                want,
                "case {i}: {queue:?}"
            );
        }
    }

    #[test]
    fn a_stored_entry_must_be_the_record_asked_for() {
        let entry = |lsn: u64| BatchEntry {
            lsn: Lsn(lsn),
            op: MutationOp::Write,
            flags: 0,
            offset: 0,
            length: 4096,
            payload_at: BLOCK + (lsn - 5) * BLOCK,
            payload_hash: 1,
        };
        let batch = HeaderBlock::Batch(BatchHeader {
            epoch: Epoch(1),
            session: 1,
            entries: vec![entry(5), entry(6)],
        });
        assert_eq!(
            stored_entry(batch.clone(), Lsn(6), 1).unwrap(),
            Stored::Entry(entry(6))
        );
        assert!(stored_entry(batch.clone(), Lsn(7), 1).is_err());
        assert!(stored_entry(batch, Lsn(7), 2).is_err());
        let own = |kind: EntryKind| {
            HeaderBlock::Record(RecordHeader {
                lsn: Lsn(9),
                epoch: Epoch(1),
                session: 1,
                kind,
                flags: 0,
                offset: 0,
                length: 4096,
                payload_len: 4096,
                record_len: 2 * BLOCK,
                payload_hash: 1,
            })
        };
        let write = own(EntryKind::Mutation(MutationOp::Write));
        assert_eq!(
            stored_entry(write.clone(), Lsn(9), 0).unwrap(),
            Stored::Entry(BatchEntry {
                lsn: Lsn(9),
                ..entry(5)
            })
        );
        assert!(stored_entry(write, Lsn(9), 1).is_err());
        assert_eq!(
            stored_entry(own(EntryKind::WriteInPlace), Lsn(9), 0).unwrap(),
            Stored::InPlace
        );
        assert!(stored_entry(own(EntryKind::Pad), Lsn(9), 0).is_err());
    }
}
