//! A disk with a volatile write cache, served over NBD, that can lose power.
//!
//! The power-cut tests boot a guest whose virtio disk is this server (qemu's
//! NBD client, `cache=writeback`, so the guest sees a volatile cache and
//! sends flushes). The disk keeps, per 4 KiB sector, its durable contents
//! and every version written since the last FLUSH; a FUA write is durable at
//! once. [`VolatileDisk::cut`] is the power cut: the server stops answering
//! at once, and each dirty sector keeps either its durable contents or any
//! one of the versions written to it since the last FLUSH, chosen at random
//! (a cache may have written any of them back, in any order). What was
//! flushed, or written with FUA, before the cut always survives.
//!
//! The server speaks NBD through the workspace's own sans-I/O codec
//! ([`nbd::Handshake`], [`nbd::request`], [`nbd::reply`]): READ, WRITE (with
//! FUA), FLUSH and DISC, 4 KiB aligned (the guest's disk has 4 KiB logical
//! blocks, so no write is ever smaller than the unit that may tear).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use nbd::reply::{self, ReplyStyle, ReplyTo};
use nbd::request::{decode_header, header_len};
use nbd::{Command, CommandFlags, ErrorCode, ExportCatalog, ExportInfo, Handshake, Negotiated};
use nbd::{Request, Status, Verdict};

use crate::util::Rng;

/// The unit that is written atomically: a sector of the disk.
pub const SECTOR: u64 = 4096;
/// The export's name (qemu's `nbd://HOST:PORT/disk`).
pub const EXPORT: &str = "disk";
/// Largest READ or WRITE served (qemu splits larger guest requests).
const MAX_PAYLOAD: u32 = 4 << 20;
/// Versions of one sector kept between two flushes: far more than a test
/// writes; reaching it is a harness failure, not a disk behaviour.
const MAX_VERSIONS: usize = 4096;

/// What the disk has seen, for a test's report.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DiskStats {
    /// WRITE requests served.
    pub writes: u64,
    /// Of them, with FUA.
    pub fua_writes: u64,
    /// FLUSH requests served.
    pub flushes: u64,
    /// Dirty sectors at the cut.
    pub dirty_at_cut: u64,
    /// Of them, sectors that kept their durable contents.
    pub lost_at_cut: u64,
}

/// The medium and its cache.
struct State {
    /// What survives a power cut now.
    durable: Vec<u8>,
    /// What a read returns: the newest data of every sector.
    current: Vec<u8>,
    /// Per dirty sector, every version written since the last FLUSH, oldest
    /// first.
    dirty: HashMap<u64, Vec<Box<[u8]>>>,
    /// The power is off: nothing more is served.
    cut: bool,
    stats: DiskStats,
}

impl State {
    fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<(), String> {
        for (i, piece) in data.chunks(SECTOR as usize).enumerate() {
            let sector = offset / SECTOR + i as u64;
            let at = (sector * SECTOR) as usize;
            self.current[at..at + piece.len()].copy_from_slice(piece);
            if fua {
                self.durable[at..at + piece.len()].copy_from_slice(piece);
                // The medium holds the newest data: no older cached version
                // of this sector can be written back any more.
                self.dirty.remove(&sector);
                continue;
            }
            let versions = self.dirty.entry(sector).or_default();
            if versions.len() >= MAX_VERSIONS {
                return Err(format!(
                    "sector {sector} rewritten {MAX_VERSIONS} times without a FLUSH"
                ));
            }
            versions.push(piece.into());
        }
        Ok(())
    }

    fn flush(&mut self) {
        for sector in self.dirty.keys() {
            let at = (sector * SECTOR) as usize;
            self.durable[at..at + SECTOR as usize]
                .copy_from_slice(&self.current[at..at + SECTOR as usize]);
        }
        self.dirty.clear();
    }

    /// Each dirty sector keeps its durable contents (half the time) or one
    /// of its cached versions.
    fn cut(&mut self, rng: &mut Rng) {
        self.cut = true;
        self.stats.dirty_at_cut = self.dirty.len() as u64;
        for (sector, versions) in self.dirty.drain() {
            let at = (sector * SECTOR) as usize;
            if rng.chance(1, 2) {
                self.stats.lost_at_cut += 1;
                continue;
            }
            let pick = &versions[rng.below(versions.len() as u64) as usize];
            self.durable[at..at + pick.len()].copy_from_slice(pick);
        }
        self.current.clone_from(&self.durable);
    }
}

/// The one export.
struct Catalog {
    size: u64,
}

impl ExportCatalog for Catalog {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        (name == EXPORT || name.is_empty()).then(|| {
            let mut e = ExportInfo::new(EXPORT, self.size);
            e.can_flush = true;
            e.can_fua = true;
            e.min_block = SECTOR as u32;
            e.preferred_block = SECTOR as u32;
            e.max_payload = MAX_PAYLOAD;
            e
        })
    }

    fn list(&self) -> Vec<(String, String)> {
        vec![(EXPORT.into(), "volatile-cache test disk".into())]
    }
}

/// A volatile-cache disk served on 127.0.0.1 until dropped or cut.
pub struct VolatileDisk {
    state: Arc<Mutex<State>>,
    port: u16,
    size: u64,
    acceptor: Option<JoinHandle<()>>,
    /// Why a connection ended badly (protocol errors, harness failures).
    errors: Arc<Mutex<Vec<String>>>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A connection thread that panicked leaves the data as consistent as
    // any request boundary: go on and let the test report it.
    state.lock().unwrap_or_else(|e| e.into_inner())
}

impl VolatileDisk {
    /// Serves `image` (its length a multiple of [`SECTOR`]), all of it
    /// durable, on an ephemeral port.
    pub fn serve(image: Vec<u8>) -> VolatileDisk {
        assert!(
            !image.is_empty() && image.len() as u64 % SECTOR == 0,
            "image of {} bytes is not whole sectors",
            image.len()
        );
        let size = image.len() as u64;
        let state = Arc::new(Mutex::new(State {
            current: image.clone(),
            durable: image,
            dirty: HashMap::new(),
            cut: false,
            stats: DiskStats::default(),
        }));
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the volatile disk");
        let port = listener.local_addr().expect("local address").port();
        let errors = Arc::new(Mutex::new(Vec::new()));
        let acceptor = {
            let (state, errors) = (state.clone(), errors.clone());
            std::thread::spawn(move || accept(listener, state, size, errors))
        };
        VolatileDisk {
            state,
            port,
            size,
            acceptor: Some(acceptor),
            errors,
        }
    }

    /// A blank (all-zero) disk of `size` bytes.
    pub fn blank(size: u64) -> VolatileDisk {
        VolatileDisk::serve(vec![0; size as usize])
    }

    /// The NBD URI qemu connects to.
    pub fn uri(&self) -> String {
        format!("nbd://127.0.0.1:{}/{EXPORT}", self.port)
    }

    /// The disk's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Cuts the power: no request is answered from now on, and the cache's
    /// contents are lost or kept, sector by sector, as `rng` decides.
    pub fn cut(&self, rng: &mut Rng) {
        lock(&self.state).cut(rng);
    }

    /// What the disk has served so far.
    pub fn stats(&self) -> DiskStats {
        lock(&self.state).stats
    }

    /// Problems connections ran into (none is expected).
    pub fn errors(&self) -> Vec<String> {
        self.errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The medium after a cut (what the next boot finds).
    pub fn durable_image(&self) -> Vec<u8> {
        let st = lock(&self.state);
        assert!(st.cut, "durable_image() is for after the power cut");
        st.durable.clone()
    }
}

impl Drop for VolatileDisk {
    fn drop(&mut self) {
        lock(&self.state).cut = true;
        // Wake the acceptor so it sees the cut and returns.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
    }
}

fn accept(
    listener: TcpListener,
    state: Arc<Mutex<State>>,
    size: u64,
    errors: Arc<Mutex<Vec<String>>>,
) {
    for conn in listener.incoming() {
        if lock(&state).cut {
            return;
        }
        let Ok(stream) = conn else { continue };
        let (state, errors) = (state.clone(), errors.clone());
        std::thread::spawn(move || {
            if let Err(e) = serve_connection(stream, &state, size) {
                if !lock(&state).cut {
                    errors.lock().unwrap_or_else(|e| e.into_inner()).push(e);
                }
            }
        });
    }
}

fn handshake(s: &mut TcpStream, size: u64) -> Result<Option<Negotiated>, String> {
    let catalog = Catalog { size };
    let mut hs = Handshake::new();
    let mut inbuf: Vec<u8> = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        s.write_all(hs.output())
            .map_err(|e| format!("handshake write: {e}"))?;
        let n = hs.output().len();
        hs.consume_output(n);
        match hs.status() {
            Status::Ready => return Ok(hs.into_negotiated()),
            Status::Closed | Status::StartTls => return Ok(None),
            Status::InProgress => {}
        }
        let got = s
            .read(&mut buf)
            .map_err(|e| format!("handshake read: {e}"))?;
        if got == 0 {
            return Ok(None);
        }
        inbuf.extend_from_slice(&buf[..got]);
        let used = hs
            .receive(&inbuf, &catalog)
            .map_err(|e| format!("handshake: {e}"))?;
        inbuf.drain(..used);
        if hs.status() == Status::Ready && !inbuf.is_empty() {
            return Err("the client sent requests before the handshake ended".into());
        }
    }
}

fn serve_connection(mut s: TcpStream, state: &Mutex<State>, size: u64) -> Result<(), String> {
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    // A guest that stops mid-request must not keep this thread forever.
    s.set_read_timeout(Some(Duration::from_secs(600)))
        .map_err(|e| e.to_string())?;
    let Some(neg) = handshake(&mut s, size)? else {
        return Ok(());
    };
    let style = ReplyStyle::of(&neg);
    let mut header = vec![0u8; header_len(neg.extended_headers)];
    let mut payload = vec![0u8; MAX_PAYLOAD as usize];
    loop {
        if s.read_exact(&mut header).is_err() {
            return Ok(());
        }
        let req = decode_header(&header, neg.extended_headers).map_err(|e| e.to_string())?;
        let to = ReplyTo {
            cookie: req.cookie,
            offset: req.offset,
        };
        let data_len = req.payload_len(neg.extended_headers) as usize;
        match nbd::request::check_request(&req, &neg) {
            Verdict::Serve => {}
            Verdict::Reject(code) => {
                let n = data_len.min(payload.len());
                read_payload(&mut s, &mut payload[..n])?;
                let msg = "refused by the volatile disk";
                s.write_all(&reply::failure(style, to, req.command, code, msg))
                    .map_err(|e| e.to_string())?;
                continue;
            }
            Verdict::Close(e) => return Err(format!("request {req:?}: {e}")),
        }
        if req.command == Command::Disc {
            return Ok(());
        }
        read_payload(&mut s, &mut payload[..data_len])?;
        let Some(out) = serve_request(state, &req, &payload[..data_len], style)? else {
            return Ok(()); // the power is off: no reply, ever
        };
        s.write_all(&out).map_err(|e| format!("reply: {e}"))?;
    }
}

fn read_payload(s: &mut TcpStream, buf: &mut [u8]) -> Result<(), String> {
    s.read_exact(buf).map_err(|e| format!("payload: {e}"))
}

/// Performs one request on the medium; the whole reply, or None once the
/// power is off.
fn serve_request(
    state: &Mutex<State>,
    req: &Request,
    data: &[u8],
    style: ReplyStyle,
) -> Result<Option<Vec<u8>>, String> {
    let to = ReplyTo {
        cookie: req.cookie,
        offset: req.offset,
    };
    let mut st = lock(state);
    if st.cut {
        return Ok(None);
    }
    let out = match req.command {
        Command::Read => {
            let (a, n) = (req.offset as usize, req.length as usize);
            let mut out = reply::read_header(style, to, n as u32);
            out.extend_from_slice(&st.current[a..a + n]);
            out
        }
        Command::Write => {
            let fua = req.flags.contains(CommandFlags::FUA);
            st.write(req.offset, data, fua)?;
            st.stats.writes += 1;
            st.stats.fua_writes += u64::from(fua);
            reply::success(style, to)
        }
        Command::Flush => {
            st.flush();
            st.stats.flushes += 1;
            reply::success(style, to)
        }
        other => reply::failure(style, to, other, ErrorCode::Inval, "not supported"),
    };
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh(sectors: u64) -> State {
        let n = (sectors * SECTOR) as usize;
        State {
            durable: vec![0; n],
            current: vec![0; n],
            dirty: HashMap::new(),
            cut: false,
            stats: DiskStats::default(),
        }
    }

    fn sector(st: &[u8], s: u64) -> u8 {
        let v = &st[(s * SECTOR) as usize..((s + 1) * SECTOR) as usize];
        assert!(v.iter().all(|&b| b == v[0]), "sector {s} is torn");
        v[0]
    }

    #[test]
    fn flushed_and_fua_data_survive_every_cut_and_the_rest_is_some_version() {
        for seed in 0..64 {
            let mut st = fresh(4);
            st.write(0, &[1; SECTOR as usize], false).unwrap();
            st.flush();
            st.write(SECTOR, &[2; SECTOR as usize], true).unwrap();
            for v in 3..6 {
                st.write(2 * SECTOR, &[v; SECTOR as usize], false).unwrap();
            }
            // A FUA write supersedes what the cache held for its sector.
            st.write(3 * SECTOR, &[7; SECTOR as usize], false).unwrap();
            st.write(3 * SECTOR, &[8; SECTOR as usize], true).unwrap();
            assert_eq!(sector(&st.current, 2), 5, "reads see the newest data");
            st.cut(&mut Rng::new(seed));
            assert_eq!(sector(&st.durable, 0), 1, "seed {seed}: flushed data lost");
            assert_eq!(sector(&st.durable, 1), 2, "seed {seed}: FUA data lost");
            assert_eq!(
                sector(&st.durable, 3),
                8,
                "seed {seed}: a stale version came back"
            );
            assert!([0, 3, 4, 5].contains(&sector(&st.durable, 2)));
            assert_eq!(st.current, st.durable);
        }
    }

    #[test]
    fn cuts_both_keep_and_lose_unflushed_writes() {
        let mut kept = [false; 4];
        for seed in 0..64 {
            let mut st = fresh(1);
            for v in 1..4 {
                st.write(0, &[v; SECTOR as usize], false).unwrap();
            }
            st.cut(&mut Rng::new(seed));
            kept[sector(&st.durable, 0) as usize] = true;
        }
        assert_eq!(kept, [true; 4], "some outcome of a cut never happens");
    }
}
