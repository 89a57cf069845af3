//! A connection of a volume's plain export served on a core other than the
//! volume's home (a *satellite*), and the home core's side of it.
//!
//! A satellite reads the data store itself when the volume's
//! [`ReadGate`](crate::engine::ReadGate) shows nothing unapplied (see
//! `engine::read_gate` for why that read sees every acknowledged write);
//! every other request (writes, trims, zeroes, flushes, block status, reads
//! while mutations are pending) goes to the home core over a bounded
//! channel, is carried out there by the same [`Volume`] calls a home
//! connection makes, and is answered back. The write path, its ordering
//! and the multi-conn rule therefore stay on the home core: a FLUSH
//! forwarded from any connection covers every write completed through the
//! home engine, which is every write.
//!
//! Pool buffers are registered with one core's ring, so data crosses cores
//! by copy: a write's payload is read into the satellite's pool, copied
//! into bytes, and copied again into the home core's pool; a forwarded
//! read's data comes back as bytes, copied into satellite pool buffers
//! taken before it was asked for. The satellite holds its pool buffers
//! (the write's payload, the read's destination) until the answer
//! arrives, so the bytes in flight across cores stay bounded by its pool.

use std::rc::Rc;
use std::sync::Arc;

use nbd::reply::ExtentExt;
use nbd::ErrorCode;
use tokio::sync::{mpsc, oneshot};

use crate::buffer::{BufPool, Payload};
use crate::engine::{PieceBuffers, ReadData, ReadRoute, ReadShare, StoreReader};
use crate::lease_fence::LeaseFence;
use crate::telemetry::VolumeMetrics;
use crate::units::SharedSize;
use crate::volume::Volume;

/// How many forwarded requests of one volume may wait for its home core
/// before satellites wait (each satellite connection also has its own
/// in-flight bound).
pub const FORWARD_QUEUE: usize = 1024;

/// A request a satellite forwards to the volume's home core.
#[derive(Debug)]
pub enum Ask {
    /// READ (the satellite could not serve it from the store).
    Read {
        /// Volume offset.
        offset: u64,
        /// Bytes.
        len: u64,
    },
    /// WRITE of `data` (a copy of the payload).
    Write {
        /// Volume offset.
        offset: u64,
        /// The payload.
        data: Vec<u8>,
        /// NBD_CMD_FLAG_FUA.
        fua: bool,
    },
    /// TRIM.
    Trim {
        /// Volume offset.
        offset: u64,
        /// Bytes.
        len: u64,
        /// NBD_CMD_FLAG_FUA.
        fua: bool,
    },
    /// WRITE_ZEROES.
    Zeroes {
        /// Volume offset.
        offset: u64,
        /// Bytes.
        len: u64,
        /// NBD_CMD_FLAG_NO_HOLE.
        no_hole: bool,
        /// NBD_CMD_FLAG_FUA.
        fua: bool,
    },
    /// FLUSH: every write completed before it, on any connection.
    Flush,
    /// BLOCK_STATUS extents of the contexts the connection negotiated.
    Extents {
        /// Volume offset.
        offset: u64,
        /// Bytes.
        len: u64,
        /// Whether `base:allocation` was negotiated.
        allocation: bool,
        /// The LSN of a negotiated `qemu:dirty-bitmap:since-LSN`.
        dirty_since: Option<u64>,
    },
}

/// The home core's answer to an [`Ask`].
#[derive(Debug)]
pub enum Answer {
    /// A write, trim, zeroes or flush completed (or why not).
    Done(Result<(), ErrorCode>),
    /// The bytes of a read (or why not).
    Data(Result<Vec<u8>, ErrorCode>),
    /// Block status: `base:allocation` extents, dirty-bitmap extents (each
    /// empty when not asked for).
    Extents(Vec<ExtentExt>, Vec<ExtentExt>),
}

/// A forwarded request with where to answer it.
#[derive(Debug)]
pub struct Forwarded {
    /// The request.
    pub ask: Ask,
    /// Where the home core answers.
    pub reply: oneshot::Sender<Answer>,
}

/// What a satellite core needs to serve one connection of a volume,
/// made on the home core and sent to the satellite's thread.
pub struct SatelliteSeed {
    read: ReadShare,
    home: mpsc::Sender<Forwarded>,
    metrics: VolumeMetrics,
    fence: Arc<LeaseFence>,
    name: String,
}

impl SatelliteSeed {
    /// A seed for one connection of `vol`, forwarding through `home`.
    pub fn new(vol: &Volume, home: mpsc::Sender<Forwarded>) -> std::io::Result<SatelliteSeed> {
        Ok(SatelliteSeed {
            read: vol.engine().read_share()?,
            home,
            metrics: vol.metrics().clone(),
            fence: vol.fence().clone(),
            name: vol.info().name.clone(),
        })
    }

    /// The volume's name.
    pub fn volume(&self) -> &str {
        &self.name
    }
}

/// A volume as one satellite connection serves it, on the satellite core.
pub struct Satellite {
    reader: StoreReader,
    size: SharedSize,
    home: mpsc::Sender<Forwarded>,
    /// The satellite core's pool (its read buffers and write payloads).
    pub(super) pool: Rc<BufPool>,
    pub(super) metrics: VolumeMetrics,
    fence: Arc<LeaseFence>,
    pub(super) name: String,
}

impl Satellite {
    /// Binds a seed to the current (satellite) core and its `pool`.
    pub fn new(seed: SatelliteSeed, pool: Rc<BufPool>) -> Satellite {
        let size = seed.read.size.clone();
        Satellite {
            reader: StoreReader::new(seed.read),
            size,
            home: seed.home,
            pool,
            metrics: seed.metrics,
            fence: seed.fence,
            name: seed.name,
        }
    }

    /// The volume's size now.
    pub(super) fn size(&self) -> u64 {
        self.size.get()
    }

    /// Sends `ask` to the home core and waits for its answer; ESHUTDOWN
    /// when the home core no longer serves the volume.
    async fn ask(&self, ask: Ask) -> Result<Answer, ErrorCode> {
        let (reply, answer) = oneshot::channel();
        self.metrics.forwarded.increment(1);
        self.home
            .send(Forwarded { ask, reply })
            .await
            .map_err(|_| ErrorCode::Shutdown)?;
        answer.await.map_err(|_| ErrorCode::Shutdown)
    }

    /// A request that completes with no data (write, trim, zeroes, flush).
    pub(super) async fn done(&self, ask: Ask) -> Result<(), ErrorCode> {
        match self.ask(ask).await? {
            Answer::Done(r) => r,
            other => unreachable_answer(&other),
        }
    }

    /// Forwards a write, copying its payload (kept until answered, so the
    /// copies in flight stay bounded by this core's pool).
    pub(super) async fn write(&self, offset: u64, p: &Payload, fua: bool) -> Result<(), ErrorCode> {
        let mut data = vec![0u8; p.len()];
        p.copy_out(0, &mut data);
        self.metrics.payload_copies.increment(data.len() as u64);
        self.done(Ask::Write { offset, data, fua }).await
    }

    /// BLOCK_STATUS extents from the home core: `base:allocation` ones
    /// when `allocation`, dirty-bitmap ones since `dirty_since` (each
    /// empty when not asked for).
    pub(super) async fn extents(
        &self,
        offset: u64,
        len: u64,
        allocation: bool,
        dirty_since: Option<u64>,
    ) -> Result<(Vec<ExtentExt>, Vec<ExtentExt>), ErrorCode> {
        let ask = Ask::Extents {
            offset,
            len,
            allocation,
            dirty_since,
        };
        match self.ask(ask).await? {
            Answer::Extents(a, d) => Ok((a, d)),
            other => unreachable_answer(&other),
        }
    }

    /// Reads `[offset, offset + len)` (`len` > 0) into this core's pool:
    /// from the store here when the gate allows, else on the home core
    /// (its answer copied into the buffers taken first, so the data in
    /// flight stays bounded by the pool). Held like a home read while the
    /// lease may have lapsed.
    pub(super) async fn read(&self, offset: u64, len: u64) -> Result<ReadData, ErrorCode> {
        let bufs = PieceBuffers::take(&self.pool, offset, len).await;
        // Decided once the buffers are here: the gate as of the read itself.
        let data = match self.reader.route(offset, len) {
            ReadRoute::Local => {
                self.metrics.satellite_local_reads.increment(1);
                self.reader.read(bufs).await?
            }
            ReadRoute::OutOfRange => return Err(ErrorCode::Inval),
            ReadRoute::Forward => match self.ask(Ask::Read { offset, len }).await? {
                Answer::Data(r) => {
                    let bytes = r?;
                    self.metrics.payload_copies.increment(bytes.len() as u64);
                    bufs.fill(&bytes)
                }
                other => unreachable_answer(&other),
            },
        };
        self.fence.wait_valid().await;
        Ok(data)
    }
}

/// The home core answers every ask with its kind of answer: anything else
/// is a bug here, not input.
fn unreachable_answer(a: &Answer) -> ! {
    panic!("the home core answered with the wrong kind of answer: {a:?}")
}

/// On the home core: answers what satellites forward for `vol` until every
/// sender is gone (each request as its own task, as a home connection
/// runs them).
///
/// It ends once every satellite connection of the volume ended, and each
/// waits for its answers before it ends: then nothing forwarded is left.
pub async fn serve_forwarded(vol: Rc<Volume>, mut rx: mpsc::Receiver<Forwarded>) {
    while let Some(f) = rx.recv().await {
        let vol = vol.clone();
        tokio_uring::spawn(async move {
            let answer = answer(&vol, f.ask).await;
            // A satellite that went away no longer waits for it.
            let _ = f.reply.send(answer);
        });
    }
}

/// Carries out one forwarded request on the home core.
async fn answer(vol: &Volume, ask: Ask) -> Answer {
    match ask {
        Ask::Read { offset, len } => Answer::Data(vol.read(offset, len).await.map(|d| {
            let bytes = to_bytes(&d);
            vol.metrics().payload_copies.increment(bytes.len() as u64);
            bytes
        })),
        Ask::Write { offset, data, fua } => {
            let p = payload_of(vol, &data).await;
            Answer::Done(vol.write(offset, p, fua).await)
        }
        Ask::Trim { offset, len, fua } => Answer::Done(vol.trim(offset, len, fua).await),
        Ask::Zeroes {
            offset,
            len,
            no_hole,
            fua,
        } => Answer::Done(vol.write_zeroes(offset, len, no_hole, fua).await),
        Ask::Flush => Answer::Done(vol.flush().await),
        Ask::Extents {
            offset,
            len,
            allocation,
            dirty_since,
        } => {
            let alloc = if allocation {
                super::allocation_runs(vol, None, offset, len)
            } else {
                Vec::new()
            };
            let dirty = dirty_since
                .map(|since| super::dirty_runs(vol, since, offset, len))
                .unwrap_or_default();
            Answer::Extents(alloc, dirty)
        }
    }
}

/// The bytes of read data, in order.
fn to_bytes(d: &ReadData) -> Vec<u8> {
    let len = d.parts.iter().map(|(_, s, e)| e - s).sum();
    let mut out = Vec::with_capacity(len);
    for (b, s, e) in &d.parts {
        out.extend_from_slice(&b[*s..*e]);
    }
    out
}

/// A write payload in the home core's pool, copied from `data`.
async fn payload_of(vol: &Volume, data: &[u8]) -> Payload {
    let mut p = vol.pool().payload(data.len()).await;
    let mut chunks = p.take_chunks();
    for (i, c) in chunks.iter_mut().enumerate() {
        let from = i * crate::buffer::MAX_CHUNK;
        let n = p.chunk_len(i);
        c[..n].copy_from_slice(&data[from..from + n]);
    }
    p.put_chunks(chunks);
    vol.metrics().payload_copies.increment(data.len() as u64);
    p
}
