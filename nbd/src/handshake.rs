//! The server side of the fixed newstyle handshake, as a sans-I/O state
//! machine.
//!
//! ```text
//! let mut hs = Handshake::new();            // greeting is queued
//! loop {
//!     write_all(hs.output()); hs.consume_output(n);
//!     match hs.status() { Ready => break, Closed => return, InProgress => {} }
//!     let n = hs.receive(&inbuf, &catalog)?;  // may consume less than given
//!     inbuf.drain(..n);
//! }
//! // inbuf now holds the first transmission-phase bytes, if any.
//! ```
//!
//! The machine answers `EXPORT_NAME`, `GO`, `INFO`, `LIST`, `ABORT`,
//! `STRUCTURED_REPLY`, `EXTENDED_HEADERS`, `LIST_META_CONTEXT` and
//! `SET_META_CONTEXT` (`base:allocation` and, where the export offers it,
//! `qemu:dirty-bitmap:since-LSN`, see [`crate::meta`]); anything else gets `NBD_REP_ERR_UNSUP` and the
//! negotiation continues.
//!
//! TLS follows a [`TlsPolicy`]: with [`TlsPolicy::Off`] (the spec's NOTLS
//! mode) `STARTTLS` is unsupported; otherwise it is acknowledged and the
//! status becomes [`Status::StartTls`]: the caller writes the output, runs
//! the TLS handshake on its socket, calls [`Handshake::tls_established`] and
//! goes on feeding the decrypted bytes. Nothing negotiated before it
//! survives (the spec's rule: a man in the middle could have forged it). With
//! [`TlsPolicy::Required`] every option before `STARTTLS` except `ABORT` is
//! answered `NBD_REP_ERR_TLS_REQD`, and `EXPORT_NAME` closes the session.

use std::ops::ControlFlow;

use crate::consts;
use crate::error::ProtocolError;

/// Largest option payload the handshake buffers. Bigger options are skipped
/// byte by byte without being stored and answered `NBD_REP_ERR_TOO_BIG`
/// (an `EXPORT_NAME` that big closes the session, as it cannot be answered).
/// Every legitimate option is far smaller: strings are capped at 4096 bytes.
pub const MAX_OPTION_DATA: u32 = 64 * 1024;

/// Upper bound on bytes [`Handshake`] holds from the client at any time: one
/// option header plus the largest option payload it buffers.
pub const MAX_BUFFERED_INPUT: usize = consts::OPTION_HEADER_LEN + MAX_OPTION_DATA as usize;

/// Once this many reply bytes are waiting in [`Handshake::output`],
/// [`Handshake::receive`] stops taking new options until the caller has
/// written them out. Without this a client that pipelines options and never
/// reads could make the server queue replies without limit.
pub const OUTPUT_HIGH_WATER: usize = 128 * 1024;

/// Metadata context id this server gives `base:allocation`. Any non-zero value
/// works; clients must treat it as opaque.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Metadata context id this server gives the selected
/// `qemu:dirty-bitmap:since-LSN` (at most one per session).
pub const DIRTY_BITMAP_ID: u32 = 2;

/// The dirty-bitmap context a session selected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirtyBitmap {
    /// Its context id in BLOCK_STATUS replies.
    pub id: u32,
    /// Regions changed by records after this LSN are dirty.
    pub since: u64,
}

/// Default block sizes from the spec, used for fields left at zero.
const DEFAULT_PREFERRED_BLOCK: u32 = 4096;

/// Everything the handshake needs to know about one export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// Canonical name, sent in `NBD_INFO_NAME` and `NBD_REP_SERVER`.
    pub name: String,
    /// Human-readable description (`NBD_INFO_DESCRIPTION`, `NBD_OPT_LIST`).
    pub description: String,
    /// Size in bytes.
    pub size: u64,
    /// Writes, trims and write-zeroes are refused with `EPERM`.
    pub read_only: bool,
    /// `NBD_CMD_FLUSH` is supported.
    pub can_flush: bool,
    /// `NBD_CMD_FLAG_FUA` is honoured.
    pub can_fua: bool,
    /// `NBD_CMD_TRIM` is supported.
    pub can_trim: bool,
    /// `NBD_CMD_WRITE_ZEROES` (and `NO_HOLE`) is supported.
    pub can_write_zeroes: bool,
    /// `NBD_CMD_FLAG_FAST_ZERO` is honoured (only advertised together with
    /// write-zeroes, as the spec requires).
    pub can_fast_zero: bool,
    /// `NBD_CMD_CACHE` is supported.
    pub can_cache: bool,
    /// `NBD_CMD_FLAG_DF` is honoured on reads (advertised only once structured
    /// replies are negotiated).
    pub can_df: bool,
    /// Flush and FUA are visible across connections to this export.
    pub can_multi_conn: bool,
    /// The server can answer `NBD_CMD_BLOCK_STATUS` for `base:allocation`.
    pub can_block_status: bool,
    /// The server also offers `qemu:dirty-bitmap:since-LSN` (needs
    /// `can_block_status`).
    pub can_dirty_bitmap: bool,
    /// Minimum block size: offsets and lengths must be multiples of it.
    /// A power of two ≤ 65536; zero means 1.
    pub min_block: u32,
    /// Preferred block size: a power of two ≥ max(min_block, 512); zero
    /// means 4096.
    pub preferred_block: u32,
    /// Largest READ/WRITE length accepted; zero means no limit (0xffffffff).
    pub max_payload: u32,
}

impl ExportInfo {
    /// An export with every optional feature off and the spec's default
    /// block sizes; set the fields you need on the result.
    pub fn new(name: impl Into<String>, size: u64) -> ExportInfo {
        ExportInfo {
            name: name.into(),
            description: String::new(),
            size,
            read_only: false,
            can_flush: false,
            can_fua: false,
            can_trim: false,
            can_write_zeroes: false,
            can_fast_zero: false,
            can_cache: false,
            can_df: false,
            can_multi_conn: false,
            can_block_status: false,
            can_dirty_bitmap: false,
            min_block: 1,
            preferred_block: DEFAULT_PREFERRED_BLOCK,
            max_payload: 32 * 1024 * 1024,
        }
    }

    /// Transmission flags for this export: `HAS_FLAGS` plus exactly the
    /// features the fields enable. `SEND_FAST_ZERO` is left out unless
    /// write-zeroes is also on (spec requirement). `SEND_DF` follows `can_df`;
    /// the handshake strips it when structured replies were not negotiated.
    pub fn transmission_flags(&self) -> u16 {
        let mut f = consts::FLAG_HAS_FLAGS;
        let mut set = |on: bool, flag: u16| {
            if on {
                f |= flag;
            }
        };
        set(self.read_only, consts::FLAG_READ_ONLY);
        set(self.can_flush, consts::FLAG_SEND_FLUSH);
        set(self.can_fua, consts::FLAG_SEND_FUA);
        set(self.can_trim, consts::FLAG_SEND_TRIM);
        set(self.can_write_zeroes, consts::FLAG_SEND_WRITE_ZEROES);
        set(self.can_df, consts::FLAG_SEND_DF);
        set(self.can_multi_conn, consts::FLAG_CAN_MULTI_CONN);
        set(self.can_cache, consts::FLAG_SEND_CACHE);
        set(
            self.can_fast_zero && self.can_write_zeroes,
            consts::FLAG_SEND_FAST_ZERO,
        );
        f
    }

    /// `(minimum, preferred, maximum)` block sizes as advertised and enforced,
    /// with zero fields replaced by the spec's defaults so callers never
    /// divide by zero or advertise an invalid zero maximum.
    pub fn block_sizes(&self) -> (u32, u32, u32) {
        let min = self.min_block.max(1);
        let preferred = if self.preferred_block == 0 {
            DEFAULT_PREFERRED_BLOCK.max(min)
        } else {
            self.preferred_block
        };
        let max = if self.max_payload == 0 {
            u32::MAX
        } else {
            self.max_payload
        };
        (min, preferred, max)
    }
}

/// Where the handshake looks up exports.
pub trait ExportCatalog {
    /// The export called `name`; `""` asks for the default export. `None`
    /// if there is no such export.
    fn lookup(&self, name: &str) -> Option<ExportInfo>;
    /// `(name, description)` of every export, for `NBD_OPT_LIST`.
    fn list(&self) -> Vec<(String, String)>;
    /// Why `name` is not served here, when the catalog knows (a replica of
    /// a replicated volume): the message of the `NBD_REP_ERR_UNKNOWN` reply
    /// instead of "unknown export", so a client can tell "not here, ask the
    /// primary" from "no such volume". None by default.
    fn refusal(&self, name: &str) -> Option<String> {
        let _ = name;
        None
    }
}

/// The message of the `NBD_REP_ERR_UNKNOWN` reply for `name`.
fn unknown_export(catalog: &dyn ExportCatalog, name: &str) -> String {
    catalog
        .refusal(name)
        .unwrap_or_else(|| format!("unknown export {}", quote_name(name)))
}

/// A plain list of exports is a catalog whose first entry is the default.
impl ExportCatalog for [ExportInfo] {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        if name.is_empty() {
            return self.first().cloned();
        }
        self.iter().find(|e| e.name == name).cloned()
    }

    fn list(&self) -> Vec<(String, String)> {
        self.iter()
            .map(|e| (e.name.clone(), e.description.clone()))
            .collect()
    }
}

/// Same as the slice catalog, for convenience.
impl ExportCatalog for Vec<ExportInfo> {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        self.as_slice().lookup(name)
    }

    fn list(&self) -> Vec<(String, String)> {
        self.as_slice().list()
    }
}

/// The outcome of a successful handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// The export chosen by `GO` or `EXPORT_NAME`.
    pub export: ExportInfo,
    /// Transmission flags exactly as sent to the client.
    pub transmission_flags: u16,
    /// `NBD_OPT_STRUCTURED_REPLY` or `NBD_OPT_EXTENDED_HEADERS` was
    /// acknowledged: READ must be answered with chunked replies (structured,
    /// or extended when `extended_headers`).
    pub structured_replies: bool,
    /// `NBD_OPT_EXTENDED_HEADERS` was acknowledged: requests and replies use
    /// 32-byte headers, every reply is an extended chunk, and lengths of
    /// TRIM, WRITE_ZEROES and BLOCK_STATUS are 64-bit. Implies
    /// `structured_replies`.
    pub extended_headers: bool,
    /// Context id of `base:allocation` if the client selected it (with
    /// `SET_META_CONTEXT` naming the same export it then chose); BLOCK_STATUS
    /// is only valid when this is `Some`.
    pub base_allocation: Option<u32>,
    /// The `qemu:dirty-bitmap:since-LSN` context, if the client selected it
    /// (same rules as `base_allocation`).
    pub dirty_bitmap: Option<DirtyBitmap>,
    /// The client set `NBD_FLAG_C_NO_ZEROES`.
    pub no_zeroes: bool,
}

/// Whether and how the server offers TLS (`--tls off|on|require`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsPolicy {
    /// No TLS: `STARTTLS` is unsupported (the spec's NOTLS mode).
    #[default]
    Off,
    /// `STARTTLS` is accepted; clear-text clients are served too.
    Optional,
    /// Nothing but `STARTTLS` and `ABORT` is accepted before TLS (the spec's
    /// FORCEDTLS mode).
    Required,
}

/// Where the handshake stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Still negotiating.
    InProgress,
    /// `STARTTLS` was acknowledged: write [`Handshake::output`] out, then run
    /// the TLS handshake, then call [`Handshake::tls_established`]. No byte
    /// after the `STARTTLS` option has been consumed.
    StartTls,
    /// Transmission phase reached; see [`Handshake::negotiated`].
    Ready,
    /// The session is over (client abort, unusable `EXPORT_NAME`, protocol
    /// violation); see [`Handshake::close_reason`]. Flush the output, then
    /// close the connection.
    Closed,
}

/// Where in the client's byte stream the parser is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the 32-bit client flags.
    ClientFlags,
    /// Waiting for a 16-byte option header.
    OptionHeader,
    /// Header seen, buffering `len` bytes of option data.
    OptionData { option: u32, len: usize },
    /// Header announced more than [`MAX_OPTION_DATA`]; skipping it.
    Drain { option: u32, remaining: u64 },
    /// `STARTTLS` acknowledged; waiting for the caller's TLS handshake.
    StartTls,
    /// Transmission reached.
    Ready,
    /// Session over.
    Closed,
}

/// Server-side handshake state machine. See the module docs for the driving
/// loop.
#[derive(Debug)]
pub struct Handshake {
    phase: Phase,
    /// Partial client message (client flags, option header or option data);
    /// never longer than [`MAX_BUFFERED_INPUT`].
    inbuf: Vec<u8>,
    /// Bytes waiting to be written to the client.
    out: Vec<u8>,
    no_zeroes: bool,
    structured: bool,
    /// `EXTENDED_HEADERS` was acknowledged (then `structured` is set too).
    extended: bool,
    /// Export name given in the last successful `SET_META_CONTEXT` that
    /// selected a context, and what it selected.
    meta_export: Option<String>,
    meta_selected: Selection,
    negotiated: Option<Negotiated>,
    close_reason: Option<String>,
    tls: TlsPolicy,
    /// The TLS session is up: options now travel encrypted.
    tls_active: bool,
}

impl Default for Handshake {
    fn default() -> Handshake {
        Handshake::new()
    }
}

/// Bounded cursor over untrusted option data; every read is checked.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(data: &'a [u8]) -> Reader<'a> {
        Reader { rest: data }
    }

    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.rest.len() {
            return None;
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Some(head)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.bytes(N).and_then(|b| b.try_into().ok())
    }

    fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_be_bytes)
    }

    fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_be_bytes)
    }

    /// A length-prefixed string of at most [`consts::MAX_STRING_LEN`] bytes.
    fn string(&mut self) -> Option<&'a str> {
        let len = usize::try_from(self.u32()?).ok()?;
        if len > consts::MAX_STRING_LEN {
            return None;
        }
        std::str::from_utf8(self.bytes(len)?).ok()
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }
}

/// Data of `LIST_META_CONTEXT` / `SET_META_CONTEXT`, validated.
struct MetaRequest<'a> {
    export: &'a str,
    queries: Vec<&'a str>,
}

fn parse_meta_request(data: &[u8]) -> Option<MetaRequest<'_>> {
    let mut r = Reader::new(data);
    let export = r.string()?;
    let count = r.u32()?;
    // No pre-allocation from `count`: it is untrusted, and every query needs
    // at least four bytes, so the data length already bounds the loop.
    let mut queries = Vec::new();
    for _ in 0..count {
        queries.push(r.string()?);
    }
    r.is_empty().then_some(MetaRequest { export, queries })
}

/// What one `SET_META_CONTEXT` selected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Selection {
    base_allocation: bool,
    /// The LSN of the selected `qemu:dirty-bitmap:since-LSN`.
    dirty_since: Option<u64>,
}

impl Selection {
    /// The selection the contexts a SET replied with make.
    fn of(contexts: &[(u32, String)]) -> Selection {
        let mut sel = Selection::default();
        for (id, name) in contexts {
            match *id {
                BASE_ALLOCATION_ID => sel.base_allocation = true,
                DIRTY_BITMAP_ID => sel.dirty_since = crate::meta::parse_dirty_bitmap(name),
                _ => {}
            }
        }
        sel
    }
}

/// The contexts of `export` a LIST (ids 0, as the spec reserves) or SET
/// (ids [`BASE_ALLOCATION_ID`], [`DIRTY_BITMAP_ID`]) with `queries`
/// names, in reply order. A LIST with no query, or with a namespace or
/// family query, names `qemu:dirty-bitmap:since-0` for the family (every
/// LSN is valid); a SET selects at most one dirty bitmap, the first valid
/// name.
fn matching_contexts(export: &ExportInfo, set: bool, queries: &[&str]) -> Vec<(u32, String)> {
    let mut out: Vec<(u32, String)> = Vec::new();
    if !export.can_block_status {
        return out;
    }
    let base = if set {
        // Only the full name selects; "base:" is ignored for SET.
        queries.contains(&consts::META_BASE_ALLOCATION)
    } else {
        queries.is_empty()
            || queries
                .iter()
                .any(|q| *q == "base:" || *q == consts::META_BASE_ALLOCATION)
    };
    if base {
        let id = if set { BASE_ALLOCATION_ID } else { 0 };
        out.push((id, consts::META_BASE_ALLOCATION.to_string()));
    }
    if !export.can_dirty_bitmap {
        return out;
    }
    let named = queries
        .iter()
        .filter(|q| crate::meta::parse_dirty_bitmap(q).is_some());
    if set {
        if let Some(q) = named.into_iter().next() {
            out.push((DIRTY_BITMAP_ID, q.to_string()));
        }
        return out;
    }
    if queries.is_empty() || queries.iter().any(|q| crate::meta::lists_dirty_bitmaps(q)) {
        out.push((0, crate::meta::dirty_bitmap_name(0)));
    }
    for q in named {
        if !out.iter().any(|(_, n)| n == q) {
            out.push((0, q.to_string()));
        }
    }
    out
}

/// Cuts `s` to at most `max` bytes on a character boundary.
fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while end > 0 && !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or("")
}

/// Export names echoed into log lines are cut short and quoted, since they
/// come from the client.
fn quote_name(name: &str) -> String {
    format!("{:?}", truncate_str(name, 256))
}

fn len_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn option_name(option: u32) -> &'static str {
    match option {
        consts::OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        consts::OPT_ABORT => "NBD_OPT_ABORT",
        consts::OPT_LIST => "NBD_OPT_LIST",
        consts::OPT_PEEK_EXPORT => "NBD_OPT_PEEK_EXPORT",
        consts::OPT_STARTTLS => "NBD_OPT_STARTTLS",
        consts::OPT_INFO => "NBD_OPT_INFO",
        consts::OPT_GO => "NBD_OPT_GO",
        consts::OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        consts::OPT_LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
        consts::OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        consts::OPT_EXTENDED_HEADERS => "NBD_OPT_EXTENDED_HEADERS",
        _ => "unknown option",
    }
}

impl Handshake {
    /// A new handshake without TLS; see [`Self::with_tls`].
    pub fn new() -> Handshake {
        Handshake::with_tls(TlsPolicy::Off)
    }

    /// A new handshake with the server greeting (NBDMAGIC, IHAVEOPT,
    /// `FIXED_NEWSTYLE | NO_ZEROES`) already queued in [`Self::output`],
    /// treating `STARTTLS` as `tls` says.
    pub fn with_tls(tls: TlsPolicy) -> Handshake {
        let mut out = Vec::with_capacity(consts::GREETING_LEN);
        out.extend_from_slice(&consts::NBDMAGIC.to_be_bytes());
        out.extend_from_slice(&consts::IHAVEOPT.to_be_bytes());
        out.extend_from_slice(
            &(consts::FLAG_FIXED_NEWSTYLE | consts::FLAG_NO_ZEROES).to_be_bytes(),
        );
        Handshake {
            phase: Phase::ClientFlags,
            inbuf: Vec::new(),
            out,
            no_zeroes: false,
            structured: false,
            extended: false,
            meta_export: None,
            meta_selected: Selection::default(),
            negotiated: None,
            close_reason: None,
            tls,
            tls_active: false,
        }
    }

    /// The caller's TLS handshake succeeded after [`Status::StartTls`]:
    /// negotiation resumes over the encrypted stream, forgetting everything
    /// agreed in clear text (structured replies, the metadata context
    /// selection), as the spec requires.
    pub fn tls_established(&mut self) {
        assert_eq!(
            self.phase,
            Phase::StartTls,
            "tls_established without STARTTLS"
        );
        self.tls_active = true;
        self.structured = false;
        self.extended = false;
        self.meta_export = None;
        self.meta_selected = Selection::default();
        self.phase = Phase::OptionHeader;
    }

    /// Options now travel inside TLS.
    pub fn tls_active(&self) -> bool {
        self.tls_active
    }

    /// Feeds bytes received from the client and returns how many were used.
    ///
    /// Fewer than `input.len()` bytes are consumed when:
    /// * the status became [`Status::Ready`]: the rest belongs to the
    ///   transmission phase and must be handed to the request decoder;
    /// * the status became [`Status::Closed`];
    /// * more than [`OUTPUT_HIGH_WATER`] reply bytes are waiting: write
    ///   [`Self::output`] out, then offer the remaining bytes again.
    ///
    /// A partial message is copied into an internal buffer (at most
    /// [`MAX_BUFFERED_INPUT`] bytes) and counted as consumed.
    ///
    /// Errors are protocol violations (bad client flags, bad option magic);
    /// the status is then `Closed` and the connection should be dropped.
    pub fn receive(
        &mut self,
        input: &[u8],
        catalog: &dyn ExportCatalog,
    ) -> Result<usize, ProtocolError> {
        let mut pos = 0usize;
        loop {
            let step = match self.phase {
                Phase::Ready | Phase::Closed | Phase::StartTls => return Ok(pos),
                Phase::ClientFlags => self.receive_client_flags(input, &mut pos)?,
                Phase::OptionHeader => self.receive_option_header(input, &mut pos)?,
                Phase::OptionData { option, len } => {
                    self.receive_option_data(option, len, input, &mut pos, catalog)
                }
                Phase::Drain { option, remaining } => {
                    self.drain_option(option, remaining, input, &mut pos, catalog)
                }
            };
            if step.is_break() {
                return Ok(pos);
            }
        }
    }

    /// The client's flags, the first thing it sends. `Break` means wait for
    /// more input.
    fn receive_client_flags(
        &mut self,
        input: &[u8],
        pos: &mut usize,
    ) -> Result<ControlFlow<()>, ProtocolError> {
        let Some(bytes) = self.fill::<4>(input, pos) else {
            return Ok(ControlFlow::Break(()));
        };
        let flags = u32::from_be_bytes(bytes);
        if flags & !consts::KNOWN_CLIENT_FLAGS != 0 {
            return Err(self.violation(ProtocolError::BadClientFlags(flags)));
        }
        // FIXED_NEWSTYLE is honoured even if the client did not set it (the
        // spec allows this), so options always get replies.
        self.no_zeroes = flags & consts::FLAG_C_NO_ZEROES != 0;
        self.phase = Phase::OptionHeader;
        Ok(ControlFlow::Continue(()))
    }

    /// An option's header: decides whether its data is read or drained.
    /// `Break` means stop consuming input for now (or for good, if closed).
    fn receive_option_header(
        &mut self,
        input: &[u8],
        pos: &mut usize,
    ) -> Result<ControlFlow<()>, ProtocolError> {
        if self.inbuf.is_empty() && self.out.len() >= OUTPUT_HIGH_WATER {
            return Ok(ControlFlow::Break(()));
        }
        let Some(header) = self.fill::<{ consts::OPTION_HEADER_LEN }>(input, pos) else {
            return Ok(ControlFlow::Break(()));
        };
        let mut r = Reader::new(&header);
        let (magic, option, len) = match (r.array::<8>(), r.u32(), r.u32()) {
            (Some(m), Some(o), Some(l)) => (u64::from_be_bytes(m), o, l),
            // Unreachable: the header is exactly 16 bytes.
            _ => return Ok(ControlFlow::Break(())),
        };
        if magic != consts::IHAVEOPT {
            return Err(self.violation(ProtocolError::BadOptionMagic(magic)));
        }
        if len <= MAX_OPTION_DATA {
            self.phase = Phase::OptionData {
                option,
                len: usize::try_from(len).unwrap_or(usize::MAX),
            };
            return Ok(ControlFlow::Continue(()));
        }
        if option == consts::OPT_EXPORT_NAME {
            // No error reply exists for EXPORT_NAME, and no export name can
            // be this long.
            self.close(format!(
                "client sent NBD_OPT_EXPORT_NAME with a {len}-byte name"
            ));
            return Ok(ControlFlow::Break(()));
        }
        self.phase = Phase::Drain {
            option,
            remaining: u64::from(len),
        };
        Ok(ControlFlow::Continue(()))
    }

    /// An option's data, once all `len` bytes are in: handles the option.
    fn receive_option_data(
        &mut self,
        option: u32,
        len: usize,
        input: &[u8],
        pos: &mut usize,
        catalog: &dyn ExportCatalog,
    ) -> ControlFlow<()> {
        if !self.fill_to(input, pos, len) {
            return ControlFlow::Break(());
        }
        let data = std::mem::take(&mut self.inbuf);
        self.phase = Phase::OptionHeader;
        self.handle_option(option, &data, catalog);
        // Keep the allocation for the next option.
        self.inbuf = data;
        self.inbuf.clear();
        ControlFlow::Continue(())
    }

    /// Skips the data of an option too long to buffer, then refuses it (or,
    /// for ABORT, handles it without its data).
    fn drain_option(
        &mut self,
        option: u32,
        remaining: u64,
        input: &[u8],
        pos: &mut usize,
        catalog: &dyn ExportCatalog,
    ) -> ControlFlow<()> {
        let available = input.len().saturating_sub(*pos);
        let n = usize::try_from(remaining)
            .unwrap_or(usize::MAX)
            .min(available);
        *pos = pos.saturating_add(n);
        let remaining = remaining.saturating_sub(n as u64);
        if remaining > 0 {
            self.phase = Phase::Drain { option, remaining };
            return ControlFlow::Break(());
        }
        self.phase = Phase::OptionHeader;
        if option == consts::OPT_ABORT {
            // The spec asks servers to ignore ABORT's data.
            self.handle_option(option, &[], catalog);
        } else {
            self.error_reply(
                option,
                consts::REP_ERR_TOO_BIG,
                &format!("option data exceeds {MAX_OPTION_DATA} bytes"),
            );
        }
        ControlFlow::Continue(())
    }

    /// Bytes queued for the client.
    pub fn output(&self) -> &[u8] {
        &self.out
    }

    /// Drops the first `n` queued bytes after they were written (clamped to
    /// what is queued).
    pub fn consume_output(&mut self, n: usize) {
        let n = n.min(self.out.len());
        self.out.drain(..n);
    }

    /// Current state.
    pub fn status(&self) -> Status {
        match self.phase {
            Phase::Ready => Status::Ready,
            Phase::Closed => Status::Closed,
            Phase::StartTls => Status::StartTls,
            _ => Status::InProgress,
        }
    }

    /// The negotiation result, once [`Status::Ready`].
    pub fn negotiated(&self) -> Option<&Negotiated> {
        self.negotiated.as_ref()
    }

    /// Takes the negotiation result, once [`Status::Ready`].
    pub fn into_negotiated(self) -> Option<Negotiated> {
        self.negotiated
    }

    /// Why the session is [`Status::Closed`], for a log line.
    pub fn close_reason(&self) -> Option<&str> {
        self.close_reason.as_deref()
    }

    /// Bytes of a partial client message currently held (never more than
    /// [`MAX_BUFFERED_INPUT`]); exposed so tests can check the bound.
    pub fn buffered_input(&self) -> usize {
        self.inbuf.len()
    }

    /// Copies input into `inbuf` until it holds `want` bytes. Returns whether
    /// it does.
    fn fill_to(&mut self, input: &[u8], pos: &mut usize, want: usize) -> bool {
        let need = want.saturating_sub(self.inbuf.len());
        let start = (*pos).min(input.len());
        let avail = input.get(start..).unwrap_or(&[]);
        let take = need.min(avail.len());
        self.inbuf
            .extend_from_slice(avail.get(..take).unwrap_or(&[]));
        *pos = start.saturating_add(take);
        self.inbuf.len() >= want
    }

    /// Like [`Self::fill_to`] for a fixed-size field; on success returns it
    /// and empties `inbuf`.
    fn fill<const N: usize>(&mut self, input: &[u8], pos: &mut usize) -> Option<[u8; N]> {
        if !self.fill_to(input, pos, N) {
            return None;
        }
        let bytes: Option<[u8; N]> = self.inbuf.get(..N).and_then(|b| b.try_into().ok());
        self.inbuf.clear();
        bytes
    }

    fn close(&mut self, reason: String) {
        self.phase = Phase::Closed;
        self.close_reason = Some(reason);
    }

    fn violation(&mut self, err: ProtocolError) -> ProtocolError {
        self.close(err.to_string());
        self.inbuf = Vec::new();
        err
    }

    fn reply(&mut self, option: u32, reply_type: u32, data: &[u8]) {
        self.out
            .extend_from_slice(&consts::REPLY_MAGIC.to_be_bytes());
        self.out.extend_from_slice(&option.to_be_bytes());
        self.out.extend_from_slice(&reply_type.to_be_bytes());
        self.out
            .extend_from_slice(&len_u32(data.len()).to_be_bytes());
        self.out.extend_from_slice(data);
    }

    fn ack(&mut self, option: u32) {
        self.reply(option, consts::REP_ACK, &[]);
    }

    fn error_reply(&mut self, option: u32, reply_type: u32, message: &str) {
        self.reply(
            option,
            reply_type,
            truncate_str(message, consts::MAX_STRING_LEN).as_bytes(),
        );
    }

    /// Transmission flags as advertised in this session: `SEND_DF` only
    /// exists once structured replies are on.
    fn advertised_flags(&self, export: &ExportInfo) -> u16 {
        let flags = export.transmission_flags();
        if self.structured {
            flags
        } else {
            flags & !consts::FLAG_SEND_DF
        }
    }

    fn handle_option(&mut self, option: u32, data: &[u8], catalog: &dyn ExportCatalog) {
        if self.tls == TlsPolicy::Required && !self.tls_active {
            match option {
                consts::OPT_STARTTLS | consts::OPT_ABORT => {}
                consts::OPT_EXPORT_NAME => {
                    // EXPORT_NAME has no error reply: the spec says close.
                    self.close(
                        "client sent NBD_OPT_EXPORT_NAME before STARTTLS (TLS is required)"
                            .to_string(),
                    );
                    return;
                }
                _ => {
                    self.error_reply(
                        option,
                        consts::REP_ERR_TLS_REQD,
                        "this server requires TLS: send NBD_OPT_STARTTLS first",
                    );
                    return;
                }
            }
        }
        match option {
            consts::OPT_STARTTLS => self.start_tls(data),
            consts::OPT_EXPORT_NAME => self.export_name(data, catalog),
            consts::OPT_ABORT => {
                self.ack(option);
                self.close("client sent NBD_OPT_ABORT".to_string());
            }
            consts::OPT_LIST => self.list(data, catalog),
            consts::OPT_INFO | consts::OPT_GO => self.info_go(option, data, catalog),
            consts::OPT_EXTENDED_HEADERS => self.extended_headers(data),
            consts::OPT_STRUCTURED_REPLY => {
                if self.extended {
                    self.error_reply(
                        option,
                        consts::REP_ERR_EXT_HEADER_REQD,
                        "extended headers are already on; they take precedence over structured replies",
                    );
                } else if data.is_empty() {
                    // A repeat is harmless, so it is acknowledged again
                    // rather than failed.
                    self.structured = true;
                    self.ack(option);
                } else {
                    self.error_reply(
                        option,
                        consts::REP_ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    );
                }
            }
            consts::OPT_LIST_META_CONTEXT | consts::OPT_SET_META_CONTEXT => {
                self.meta_context(option, data, catalog)
            }
            _ => self.error_reply(
                option,
                consts::REP_ERR_UNSUP,
                &format!("{} ({option}) is not supported", option_name(option)),
            ),
        }
    }

    fn start_tls(&mut self, data: &[u8]) {
        let option = consts::OPT_STARTTLS;
        if self.tls == TlsPolicy::Off {
            self.error_reply(
                option,
                consts::REP_ERR_UNSUP,
                "TLS is not enabled on this server",
            );
        } else if self.tls_active {
            self.error_reply(option, consts::REP_ERR_INVALID, "TLS is already active");
        } else if !data.is_empty() {
            self.error_reply(
                option,
                consts::REP_ERR_INVALID,
                "NBD_OPT_STARTTLS takes no data",
            );
        } else {
            self.ack(option);
            self.phase = Phase::StartTls;
        }
    }

    /// `NBD_OPT_EXTENDED_HEADERS`: on success every later request and reply
    /// uses 32-byte headers, and chunked replies are on (extended headers
    /// take the place of structured replies, so they imply them here).
    fn extended_headers(&mut self, data: &[u8]) {
        let option = consts::OPT_EXTENDED_HEADERS;
        if !data.is_empty() {
            self.error_reply(
                option,
                consts::REP_ERR_INVALID,
                "NBD_OPT_EXTENDED_HEADERS takes no data",
            );
            return;
        }
        // A repeat is harmless, so it is acknowledged again.
        self.extended = true;
        self.structured = true;
        self.ack(option);
    }

    fn export_name(&mut self, data: &[u8], catalog: &dyn ExportCatalog) {
        if self.extended {
            // The spec forbids it; EXPORT_NAME has no error reply and no way
            // to agree on the header style, so the session ends.
            self.close(
                "client sent NBD_OPT_EXPORT_NAME after negotiating extended headers".to_string(),
            );
            return;
        }
        let name = match std::str::from_utf8(data) {
            Ok(name) => name,
            Err(_) => {
                self.close("client sent NBD_OPT_EXPORT_NAME with a non-UTF-8 name".to_string());
                return;
            }
        };
        let Some(export) = catalog.lookup(name) else {
            self.close(format!(
                "client asked for unknown export {} via NBD_OPT_EXPORT_NAME",
                quote_name(name)
            ));
            return;
        };
        let flags = self.advertised_flags(&export);
        self.out.extend_from_slice(&export.size.to_be_bytes());
        self.out.extend_from_slice(&flags.to_be_bytes());
        if !self.no_zeroes {
            self.out
                .extend_from_slice(&[0u8; consts::EXPORT_NAME_ZEROES]);
        }
        self.enter_transmission(export, name, flags);
    }

    fn list(&mut self, data: &[u8], catalog: &dyn ExportCatalog) {
        let option = consts::OPT_LIST;
        if !data.is_empty() {
            self.error_reply(
                option,
                consts::REP_ERR_INVALID,
                "NBD_OPT_LIST takes no data",
            );
            return;
        }
        for (name, description) in catalog.list() {
            // A name longer than the spec allows could not be used anyway.
            if name.len() > consts::MAX_STRING_LEN {
                continue;
            }
            let description = truncate_str(&description, consts::MAX_STRING_LEN);
            let mut payload = Vec::with_capacity(4 + name.len() + description.len());
            payload.extend_from_slice(&len_u32(name.len()).to_be_bytes());
            payload.extend_from_slice(name.as_bytes());
            payload.extend_from_slice(description.as_bytes());
            self.reply(option, consts::REP_SERVER, &payload);
        }
        self.ack(option);
    }

    fn info_go(&mut self, option: u32, data: &[u8], catalog: &dyn ExportCatalog) {
        // Layout: u32 name length, name, u16 count, count × u16 info types.
        let parsed = (|| {
            let mut r = Reader::new(data);
            let name = r.string()?;
            let count = r.u16()?;
            for _ in 0..count {
                r.u16()?;
            }
            r.is_empty().then_some(name)
        })();
        let Some(name) = parsed else {
            self.error_reply(
                option,
                consts::REP_ERR_INVALID,
                "malformed NBD_OPT_INFO/NBD_OPT_GO request",
            );
            return;
        };
        let Some(export) = catalog.lookup(name) else {
            self.error_reply(
                option,
                consts::REP_ERR_UNKNOWN,
                &unknown_export(catalog, name),
            );
            return;
        };
        // Requested info types are not needed: everything this server knows
        // is always sent (the spec lets servers send unrequested info), which
        // also makes INFO and GO answers identical.
        let flags = self.advertised_flags(&export);
        let (min, preferred, max) = export.block_sizes();

        let mut p = Vec::with_capacity(12);
        p.extend_from_slice(&consts::INFO_EXPORT.to_be_bytes());
        p.extend_from_slice(&export.size.to_be_bytes());
        p.extend_from_slice(&flags.to_be_bytes());
        self.reply(option, consts::REP_INFO, &p);

        let canonical = truncate_str(&export.name, consts::MAX_STRING_LEN);
        let mut p = Vec::with_capacity(2 + canonical.len());
        p.extend_from_slice(&consts::INFO_NAME.to_be_bytes());
        p.extend_from_slice(canonical.as_bytes());
        self.reply(option, consts::REP_INFO, &p);

        let description = truncate_str(&export.description, consts::MAX_STRING_LEN);
        let mut p = Vec::with_capacity(2 + description.len());
        p.extend_from_slice(&consts::INFO_DESCRIPTION.to_be_bytes());
        p.extend_from_slice(description.as_bytes());
        self.reply(option, consts::REP_INFO, &p);

        let mut p = Vec::with_capacity(14);
        p.extend_from_slice(&consts::INFO_BLOCK_SIZE.to_be_bytes());
        p.extend_from_slice(&min.to_be_bytes());
        p.extend_from_slice(&preferred.to_be_bytes());
        p.extend_from_slice(&max.to_be_bytes());
        self.reply(option, consts::REP_INFO, &p);

        self.ack(option);
        if option == consts::OPT_GO {
            let name = name.to_string();
            self.enter_transmission(export, &name, flags);
        }
    }

    fn meta_context(&mut self, option: u32, data: &[u8], catalog: &dyn ExportCatalog) {
        let set = option == consts::OPT_SET_META_CONTEXT;
        if set {
            // SET replaces the previous selection even when it fails.
            self.meta_export = None;
            if !self.structured {
                self.error_reply(
                    option,
                    consts::REP_ERR_INVALID,
                    "NBD_OPT_SET_META_CONTEXT needs NBD_OPT_STRUCTURED_REPLY first",
                );
                return;
            }
        }
        let Some(req) = parse_meta_request(data) else {
            self.error_reply(
                option,
                consts::REP_ERR_INVALID,
                "malformed metadata context request",
            );
            return;
        };
        // Every query must at least name a namespace.
        if req.queries.iter().any(|q| !q.contains(':')) {
            self.error_reply(
                option,
                consts::REP_ERR_INVALID,
                "metadata context query without a namespace",
            );
            return;
        }
        let Some(export) = catalog.lookup(req.export) else {
            self.error_reply(
                option,
                consts::REP_ERR_UNKNOWN,
                &unknown_export(catalog, req.export),
            );
            return;
        };
        let contexts = matching_contexts(&export, set, &req.queries);
        for (id, name) in &contexts {
            let mut p = Vec::with_capacity(4 + name.len());
            p.extend_from_slice(&id.to_be_bytes());
            p.extend_from_slice(name.as_bytes());
            self.reply(option, consts::REP_META_CONTEXT, &p);
        }
        if set && !contexts.is_empty() {
            self.meta_export = Some(req.export.to_string());
            self.meta_selected = Selection::of(&contexts);
        }
        self.ack(option);
    }

    fn enter_transmission(&mut self, export: ExportInfo, requested_name: &str, flags: u16) {
        // The selection only counts for the export it named (spec rule).
        let selected = match &self.meta_export {
            Some(n) if n == requested_name && self.structured => self.meta_selected,
            _ => Selection::default(),
        };
        let base_allocation =
            (selected.base_allocation && export.can_block_status).then_some(BASE_ALLOCATION_ID);
        let dirty_bitmap = selected
            .dirty_since
            .filter(|_| export.can_block_status && export.can_dirty_bitmap)
            .map(|since| DirtyBitmap {
                id: DIRTY_BITMAP_ID,
                since,
            });
        self.negotiated = Some(Negotiated {
            export,
            transmission_flags: flags,
            structured_replies: self.structured,
            extended_headers: self.extended,
            base_allocation,
            dirty_bitmap,
            no_zeroes: self.no_zeroes,
        });
        self.phase = Phase::Ready;
        // Nothing else will be buffered; give the memory back.
        self.inbuf = Vec::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog() -> Vec<ExportInfo> {
        let mut a = ExportInfo::new("disk", 1 << 20);
        a.description = "the disk".into();
        a.can_flush = true;
        a.can_df = true;
        a.can_block_status = true;
        a.min_block = 512;
        a.max_payload = 1 << 20;
        let b = ExportInfo::new("other", 4096);
        vec![a, b]
    }

    fn opt(option: u32, data: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&consts::IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&option.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    fn go_data(name: &str) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&(name.len() as u32).to_be_bytes());
        v.extend_from_slice(name.as_bytes());
        v.extend_from_slice(&0u16.to_be_bytes());
        v
    }

    fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&(name.len() as u32).to_be_bytes());
        v.extend_from_slice(name.as_bytes());
        v.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            v.extend_from_slice(&(q.len() as u32).to_be_bytes());
            v.extend_from_slice(q.as_bytes());
        }
        v
    }

    /// Parses queued option replies into (option, type, data).
    fn replies(out: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut v = Vec::new();
        let mut rest = out;
        while rest.len() >= 20 {
            assert_eq!(
                u64::from_be_bytes(rest[0..8].try_into().unwrap()),
                consts::REPLY_MAGIC
            );
            let option = u32::from_be_bytes(rest[8..12].try_into().unwrap());
            let ty = u32::from_be_bytes(rest[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(rest[16..20].try_into().unwrap()) as usize;
            v.push((option, ty, rest[20..20 + len].to_vec()));
            rest = &rest[20 + len..];
        }
        assert!(rest.is_empty());
        v
    }

    /// A handshake past the greeting and client flags.
    fn started(flags: u32) -> Handshake {
        let mut hs = Handshake::new();
        assert_eq!(hs.output().len(), 18);
        hs.consume_output(18);
        let n = hs.receive(&flags.to_be_bytes(), &catalog()).unwrap();
        assert_eq!(n, 4);
        hs
    }

    #[test]
    fn greeting() {
        let hs = Handshake::new();
        let out = hs.output();
        assert_eq!(&out[0..8], b"NBDMAGIC");
        assert_eq!(&out[8..16], b"IHAVEOPT");
        assert_eq!(&out[16..18], &[0, 3]);
        assert_eq!(hs.status(), Status::InProgress);
    }

    #[test]
    fn bad_client_flags_close() {
        let mut hs = Handshake::new();
        let err = hs.receive(&4u32.to_be_bytes(), &catalog()).unwrap_err();
        assert_eq!(err, ProtocolError::BadClientFlags(4));
        assert_eq!(hs.status(), Status::Closed);
        assert!(hs.close_reason().is_some());
        // Nothing more is consumed after closing.
        assert_eq!(hs.receive(&[1, 2, 3], &catalog()), Ok(0));
    }

    #[test]
    fn bad_option_magic_closes() {
        let mut hs = started(3);
        let mut bytes = opt(consts::OPT_LIST, &[]);
        bytes[0] = 0;
        assert!(matches!(
            hs.receive(&bytes, &catalog()),
            Err(ProtocolError::BadOptionMagic(_))
        ));
        assert_eq!(hs.status(), Status::Closed);
    }

    #[test]
    fn go_enters_transmission_and_stops_consuming() {
        let mut hs = started(3);
        let mut input = opt(consts::OPT_GO, &go_data("disk"));
        let go_len = input.len();
        input.extend_from_slice(b"transmission bytes");
        let n = hs.receive(&input, &catalog()).unwrap();
        assert_eq!(n, go_len);
        assert_eq!(hs.status(), Status::Ready);
        let r = replies(hs.output());
        assert_eq!(r.len(), 5);
        assert!(r[..4]
            .iter()
            .all(|(o, t, _)| *o == consts::OPT_GO && *t == consts::REP_INFO));
        assert_eq!(r[4].1, consts::REP_ACK);
        // INFO_EXPORT: no DF without structured replies.
        let export = &r[0].2;
        assert_eq!(&export[0..2], &[0, 0]);
        let flags = u16::from_be_bytes(export[10..12].try_into().unwrap());
        assert_eq!(flags & consts::FLAG_SEND_DF, 0);
        assert_ne!(flags & consts::FLAG_SEND_FLUSH, 0);
        // INFO_BLOCK_SIZE.
        assert_eq!(r[3].2.len(), 14);
        assert_eq!(&r[3].2[2..6], &512u32.to_be_bytes());
        let neg = hs.negotiated().unwrap();
        assert_eq!(neg.export.name, "disk");
        assert_eq!(neg.transmission_flags, flags);
        assert!(!neg.structured_replies);
        assert_eq!(neg.base_allocation, None);
        assert!(neg.no_zeroes);
        assert_eq!(hs.receive(b"more", &catalog()), Ok(0));
    }

    #[test]
    fn go_unknown_export_keeps_session() {
        let mut hs = started(1);
        hs.receive(&opt(consts::OPT_GO, &go_data("nope")), &catalog())
            .unwrap();
        let r = replies(hs.output());
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].1, consts::REP_ERR_UNKNOWN);
        assert_eq!(hs.status(), Status::InProgress);
    }

    /// A catalog that knows why it does not serve "replica0".
    struct Refusing;

    impl ExportCatalog for Refusing {
        fn lookup(&self, _: &str) -> Option<ExportInfo> {
            None
        }
        fn list(&self) -> Vec<(String, String)> {
            Vec::new()
        }
        fn refusal(&self, name: &str) -> Option<String> {
            (name == "replica0").then(|| "a replica here".to_string())
        }
    }

    #[test]
    fn go_refused_export_says_why() {
        let mut hs = started(1);
        let mut input = opt(consts::OPT_GO, &go_data("replica0"));
        input.extend(opt(consts::OPT_GO, &go_data("nope")));
        hs.receive(&input, &Refusing).unwrap();
        let r = replies(hs.output());
        assert_eq!(r.len(), 2);
        assert_eq!(
            (r[0].1, &r[0].2[..]),
            (consts::REP_ERR_UNKNOWN, &b"a replica here"[..])
        );
        assert_eq!(r[1].1, consts::REP_ERR_UNKNOWN);
        assert!(String::from_utf8_lossy(&r[1].2).starts_with("unknown export"));
    }

    #[test]
    fn malformed_go_is_invalid() {
        let mut hs = started(1);
        let mut data = go_data("disk");
        data.push(0); // trailing garbage
        hs.receive(&opt(consts::OPT_GO, &data), &catalog()).unwrap();
        assert_eq!(replies(hs.output())[0].1, consts::REP_ERR_INVALID);
        hs.consume_output(usize::MAX);
        // Name length beyond the data.
        let data = [0, 0, 0, 9, b'a', 0, 0];
        hs.receive(&opt(consts::OPT_INFO, &data), &catalog())
            .unwrap();
        assert_eq!(replies(hs.output())[0].1, consts::REP_ERR_INVALID);
        assert_eq!(hs.status(), Status::InProgress);
    }

    #[test]
    fn export_name_with_and_without_zeroes() {
        for (flags, extra) in [(1u32, 124usize), (3, 0)] {
            let mut hs = started(flags);
            hs.receive(&opt(consts::OPT_EXPORT_NAME, b""), &catalog())
                .unwrap();
            assert_eq!(hs.status(), Status::Ready);
            assert_eq!(hs.output().len(), 10 + extra);
            assert_eq!(&hs.output()[0..8], &(1u64 << 20).to_be_bytes());
            assert_eq!(hs.negotiated().unwrap().export.name, "disk");
        }
    }

    #[test]
    fn export_name_unknown_closes() {
        let mut hs = started(3);
        hs.receive(&opt(consts::OPT_EXPORT_NAME, b"zzz"), &catalog())
            .unwrap();
        assert_eq!(hs.status(), Status::Closed);
        assert!(hs.close_reason().unwrap().contains("zzz"));
        assert!(hs.output().is_empty());
    }

    #[test]
    fn unknown_option_unsupported() {
        let mut hs = started(3);
        hs.receive(&opt(999, b"abc"), &catalog()).unwrap();
        hs.receive(&opt(consts::OPT_STARTTLS, b""), &catalog())
            .unwrap();
        let r = replies(hs.output());
        assert_eq!(r[0].0, 999);
        assert_eq!(r[0].1, consts::REP_ERR_UNSUP);
        assert_eq!(r[1].1, consts::REP_ERR_UNSUP);
        assert_eq!(hs.status(), Status::InProgress);
    }

    #[test]
    fn extended_headers_negotiate_and_take_precedence() {
        let mut hs = started(3);
        hs.receive(&opt(consts::OPT_EXTENDED_HEADERS, &[]), &catalog())
            .unwrap();
        hs.receive(&opt(consts::OPT_STRUCTURED_REPLY, &[]), &catalog())
            .unwrap();
        let mut input = opt(
            consts::OPT_SET_META_CONTEXT,
            &meta_data("disk", &[consts::META_BASE_ALLOCATION]),
        );
        input.extend_from_slice(&opt(consts::OPT_GO, &go_data("disk")));
        hs.receive(&input, &catalog()).unwrap();
        let r = replies(hs.output());
        assert_eq!(r[0].0, consts::OPT_EXTENDED_HEADERS);
        assert_eq!(r[0].1, consts::REP_ACK);
        assert_eq!(r[1].1, consts::REP_ERR_EXT_HEADER_REQD);
        assert_eq!(r[2].1, consts::REP_META_CONTEXT);
        assert_eq!(hs.status(), Status::Ready);
        let neg = hs.negotiated().unwrap();
        assert!(neg.extended_headers && neg.structured_replies);
        assert_eq!(neg.base_allocation, Some(BASE_ALLOCATION_ID));
        assert_ne!(neg.transmission_flags & consts::FLAG_SEND_DF, 0);

        // Data is invalid; EXPORT_NAME after extended headers closes.
        let mut hs = started(3);
        hs.receive(&opt(consts::OPT_EXTENDED_HEADERS, b"x"), &catalog())
            .unwrap();
        assert_eq!(replies(hs.output())[0].1, consts::REP_ERR_INVALID);
        hs.receive(&opt(consts::OPT_EXTENDED_HEADERS, &[]), &catalog())
            .unwrap();
        hs.receive(&opt(consts::OPT_EXPORT_NAME, b"disk"), &catalog())
            .unwrap();
        assert_eq!(hs.status(), Status::Closed);

        // Without the option, compact headers.
        let mut hs = started(3);
        hs.receive(&opt(consts::OPT_GO, &go_data("disk")), &catalog())
            .unwrap();
        assert!(!hs.negotiated().unwrap().extended_headers);
    }

    #[test]
    fn oversized_option_is_drained() {
        let mut hs = started(3);
        let len = MAX_OPTION_DATA + 10;
        let mut header = Vec::new();
        header.extend_from_slice(&consts::IHAVEOPT.to_be_bytes());
        header.extend_from_slice(&consts::OPT_LIST.to_be_bytes());
        header.extend_from_slice(&len.to_be_bytes());
        assert_eq!(hs.receive(&header, &catalog()), Ok(16));
        let chunk = vec![0xAAu8; 4096];
        let mut left = len as usize;
        while left > 0 {
            let n = left.min(chunk.len());
            assert_eq!(hs.receive(&chunk[..n], &catalog()), Ok(n));
            assert_eq!(hs.buffered_input(), 0);
            left -= n;
        }
        let r = replies(hs.output());
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].1, consts::REP_ERR_TOO_BIG);
        // The session goes on.
        hs.consume_output(usize::MAX);
        hs.receive(&opt(consts::OPT_LIST, &[]), &catalog()).unwrap();
        let r = replies(hs.output());
        assert_eq!(r.len(), 3);
    }

    #[test]
    fn oversized_export_name_closes() {
        let mut hs = started(3);
        let mut header = Vec::new();
        header.extend_from_slice(&consts::IHAVEOPT.to_be_bytes());
        header.extend_from_slice(&consts::OPT_EXPORT_NAME.to_be_bytes());
        header.extend_from_slice(&u32::MAX.to_be_bytes());
        hs.receive(&header, &catalog()).unwrap();
        assert_eq!(hs.status(), Status::Closed);
    }

    #[test]
    fn list_exports() {
        let mut hs = started(3);
        hs.receive(&opt(consts::OPT_LIST, &[]), &catalog()).unwrap();
        let r = replies(hs.output());
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].1, consts::REP_SERVER);
        assert_eq!(&r[0].2[..4], &4u32.to_be_bytes());
        assert_eq!(&r[0].2[4..], b"diskthe disk");
        assert_eq!(r[2].1, consts::REP_ACK);
        hs.consume_output(usize::MAX);
        hs.receive(&opt(consts::OPT_LIST, b"x"), &catalog())
            .unwrap();
        assert_eq!(replies(hs.output())[0].1, consts::REP_ERR_INVALID);
    }

    #[test]
    fn abort_acks_and_closes() {
        let mut hs = started(3);
        let mut input = opt(consts::OPT_ABORT, &[]);
        input.extend_from_slice(b"junk");
        assert_eq!(hs.receive(&input, &catalog()), Ok(16));
        assert_eq!(hs.status(), Status::Closed);
        assert_eq!(replies(hs.output())[0].1, consts::REP_ACK);
        assert_eq!(hs.close_reason(), Some("client sent NBD_OPT_ABORT"));
    }

    #[test]
    fn meta_context_needs_structured_replies() {
        let mut hs = started(3);
        let data = meta_data("disk", &["base:allocation"]);
        hs.receive(&opt(consts::OPT_SET_META_CONTEXT, &data), &catalog())
            .unwrap();
        assert_eq!(replies(hs.output())[0].1, consts::REP_ERR_INVALID);
    }

    #[test]
    fn meta_context_selection_follows_export_name() {
        for (go_name, expect) in [("disk", Some(BASE_ALLOCATION_ID)), ("", None)] {
            let mut hs = started(3);
            let mut input = opt(consts::OPT_STRUCTURED_REPLY, &[]);
            input.extend(opt(
                consts::OPT_SET_META_CONTEXT,
                &meta_data("disk", &["base:allocation", "x-other:thing"]),
            ));
            input.extend(opt(consts::OPT_GO, &go_data(go_name)));
            hs.receive(&input, &catalog()).unwrap();
            assert_eq!(hs.status(), Status::Ready);
            let r = replies(hs.output());
            assert_eq!(r[0].1, consts::REP_ACK);
            assert_eq!(r[1].1, consts::REP_META_CONTEXT);
            assert_eq!(&r[1].2[..4], &BASE_ALLOCATION_ID.to_be_bytes());
            assert_eq!(&r[1].2[4..], b"base:allocation");
            assert_eq!(r[2].1, consts::REP_ACK);
            let neg = hs.negotiated().unwrap();
            assert_eq!(neg.base_allocation, expect);
            assert!(neg.structured_replies);
            assert_ne!(neg.transmission_flags & consts::FLAG_SEND_DF, 0);
        }
    }

    /// The names (and ids) of the contexts a LIST or SET on "bitmaps"
    /// (an export offering dirty bitmaps) with `queries` replies with.
    fn bitmap_contexts(option: u32, queries: &[&str]) -> (Vec<(u32, String)>, Handshake) {
        let mut disk = ExportInfo::new("bitmaps", 1 << 20);
        disk.can_block_status = true;
        disk.can_dirty_bitmap = true;
        let catalog = vec![disk];
        let mut hs = started(3);
        let mut input = opt(consts::OPT_STRUCTURED_REPLY, &[]);
        input.extend(opt(option, &meta_data("bitmaps", queries)));
        input.extend(opt(consts::OPT_GO, &go_data("bitmaps")));
        hs.receive(&input, &catalog).unwrap();
        let named = replies(hs.output())
            .into_iter()
            .filter(|r| r.1 == consts::REP_META_CONTEXT)
            .map(|r| {
                let id = u32::from_be_bytes(r.2[..4].try_into().unwrap());
                (id, String::from_utf8(r.2[4..].to_vec()).unwrap())
            })
            .collect();
        (named, hs)
    }

    #[test]
    fn dirty_bitmaps_are_listed_and_selected_by_lsn() {
        let base = || (0, "base:allocation".to_string());
        let since = |n: u64| (0, crate::meta::dirty_bitmap_name(n));
        type Case<'a> = (Vec<&'a str>, Vec<(u32, String)>);
        let cases: Vec<Case> = vec![
            (vec![], vec![base(), since(0)]),
            (vec!["qemu:dirty-bitmap:"], vec![since(0)]),
            (vec!["qemu:"], vec![since(0)]),
            (vec!["qemu:dirty-bitmap:since-77"], vec![since(77)]),
            (vec!["qemu:dirty-bitmap:since-077"], vec![]),
            (vec!["qemu:dirty-bitmap:bitmap0"], vec![]),
            (
                vec!["base:", "qemu:dirty-bitmap:since-5"],
                vec![base(), since(5)],
            ),
        ];
        for (queries, want) in cases {
            let (got, _) = bitmap_contexts(consts::OPT_LIST_META_CONTEXT, &queries);
            assert_eq!(got, want, "LIST {queries:?}");
        }
        let (got, hs) = bitmap_contexts(
            consts::OPT_SET_META_CONTEXT,
            &[
                "qemu:dirty-bitmap:since-1234",
                "base:allocation",
                "qemu:dirty-bitmap:since-9",
            ],
        );
        assert_eq!(
            got,
            vec![
                (BASE_ALLOCATION_ID, "base:allocation".to_string()),
                (DIRTY_BITMAP_ID, "qemu:dirty-bitmap:since-1234".to_string())
            ]
        );
        let neg = hs.negotiated().unwrap();
        assert_eq!(neg.base_allocation, Some(BASE_ALLOCATION_ID));
        assert_eq!(
            neg.dirty_bitmap,
            Some(DirtyBitmap {
                id: DIRTY_BITMAP_ID,
                since: 1234
            })
        );
        // The bitmap alone is a selection too; an export without bitmaps
        // (catalog()'s "disk") never offers one.
        let (_, hs) = bitmap_contexts(consts::OPT_SET_META_CONTEXT, &["qemu:dirty-bitmap:since-0"]);
        let neg = hs.negotiated().unwrap();
        assert_eq!(
            (neg.base_allocation, neg.dirty_bitmap.map(|d| d.since)),
            (None, Some(0))
        );
        let mut hs = started(3);
        let mut input = opt(consts::OPT_STRUCTURED_REPLY, &[]);
        input.extend(opt(
            consts::OPT_SET_META_CONTEXT,
            &meta_data("disk", &["qemu:dirty-bitmap:since-0"]),
        ));
        input.extend(opt(consts::OPT_GO, &go_data("disk")));
        hs.receive(&input, &catalog()).unwrap();
        assert_eq!(hs.negotiated().unwrap().dirty_bitmap, None);
    }

    #[test]
    fn list_meta_context_queries() {
        let cases: [(&[&str], bool); 5] = [
            (&[], true),
            (&["base:"], true),
            (&["base:allocation"], true),
            (&["base:other"], false),
            (&["qemu:dirty-bitmap:x"], false),
        ];
        for (queries, listed) in cases {
            let mut hs = started(3);
            let data = meta_data("disk", queries);
            hs.receive(&opt(consts::OPT_LIST_META_CONTEXT, &data), &catalog())
                .unwrap();
            let r = replies(hs.output());
            if listed {
                assert_eq!(r.len(), 2, "{queries:?}");
                assert_eq!(r[0].1, consts::REP_META_CONTEXT);
                assert_eq!(&r[0].2[..4], &[0, 0, 0, 0]);
            } else {
                assert_eq!(r.len(), 1, "{queries:?}");
            }
            assert_eq!(r.last().unwrap().1, consts::REP_ACK);
        }
        // Export without block status lists nothing; unknown export errors;
        // a query without a namespace is invalid.
        for (name, q, ty) in [
            ("other", "base:", consts::REP_ACK),
            ("nope", "base:", consts::REP_ERR_UNKNOWN),
            ("disk", "allocation", consts::REP_ERR_INVALID),
        ] {
            let mut hs = started(3);
            let data = meta_data(name, &[q]);
            hs.receive(&opt(consts::OPT_LIST_META_CONTEXT, &data), &catalog())
                .unwrap();
            let r = replies(hs.output());
            assert_eq!(r.len(), 1);
            assert_eq!(r[0].1, ty);
        }
    }

    #[test]
    fn failed_set_meta_context_clears_selection() {
        let mut hs = started(3);
        let mut input = opt(consts::OPT_STRUCTURED_REPLY, &[]);
        input.extend(opt(
            consts::OPT_SET_META_CONTEXT,
            &meta_data("disk", &["base:allocation"]),
        ));
        input.extend(opt(consts::OPT_SET_META_CONTEXT, &meta_data("nope", &[])));
        input.extend(opt(consts::OPT_GO, &go_data("disk")));
        hs.receive(&input, &catalog()).unwrap();
        assert_eq!(hs.negotiated().unwrap().base_allocation, None);
    }

    #[test]
    fn byte_at_a_time() {
        let mut input = 3u32.to_be_bytes().to_vec();
        input.extend(opt(consts::OPT_LIST, &[]));
        input.extend(opt(consts::OPT_GO, &go_data("other")));
        let mut hs = Handshake::new();
        for b in &input {
            assert_eq!(hs.receive(std::slice::from_ref(b), &catalog()), Ok(1));
        }
        assert_eq!(hs.status(), Status::Ready);
        assert_eq!(hs.negotiated().unwrap().export.name, "other");
    }

    #[test]
    fn output_backpressure() {
        let mut hs = started(3);
        let one = opt(consts::OPT_LIST, &[]);
        let input: Vec<u8> = one
            .iter()
            .copied()
            .cycle()
            .take(one.len() * 10_000)
            .collect();
        let n = hs.receive(&input, &catalog()).unwrap();
        assert!(n < input.len());
        assert!(hs.output().len() < OUTPUT_HIGH_WATER + 1024);
        hs.consume_output(usize::MAX);
        let m = hs.receive(&input[n..], &catalog()).unwrap();
        assert!(m > 0);
    }

    #[test]
    fn transmission_flags_follow_fields() {
        let mut e = ExportInfo::new("x", 0);
        assert_eq!(e.transmission_flags(), consts::FLAG_HAS_FLAGS);
        e.can_fast_zero = true;
        assert_eq!(e.transmission_flags(), consts::FLAG_HAS_FLAGS);
        e.can_write_zeroes = true;
        e.read_only = true;
        e.can_cache = true;
        e.can_multi_conn = true;
        assert_eq!(
            e.transmission_flags(),
            consts::FLAG_HAS_FLAGS
                | consts::FLAG_READ_ONLY
                | consts::FLAG_SEND_WRITE_ZEROES
                | consts::FLAG_SEND_FAST_ZERO
                | consts::FLAG_SEND_CACHE
                | consts::FLAG_CAN_MULTI_CONN
        );
    }

    #[test]
    fn truncation_respects_char_boundaries() {
        assert_eq!(truncate_str("héllo", 2), "h");
        assert_eq!(truncate_str("abc", 10), "abc");
    }

    fn started_tls(policy: TlsPolicy) -> Handshake {
        let mut hs = Handshake::with_tls(policy);
        hs.consume_output(18);
        hs.receive(&consts::FLAG_C_FIXED_NEWSTYLE.to_be_bytes(), &catalog())
            .unwrap();
        hs
    }

    #[test]
    fn starttls_off_is_unsupported() {
        let mut hs = started_tls(TlsPolicy::Off);
        hs.receive(&opt(consts::OPT_STARTTLS, &[]), &catalog())
            .unwrap();
        let r = replies(hs.output());
        assert_eq!(r[0].1, consts::REP_ERR_UNSUP);
        assert_eq!(hs.status(), Status::InProgress);
    }

    #[test]
    fn required_refuses_every_option_before_starttls() {
        let mut hs = started_tls(TlsPolicy::Required);
        let mut input = opt(consts::OPT_STRUCTURED_REPLY, &[]);
        input.extend(opt(consts::OPT_LIST, &[]));
        input.extend(opt(consts::OPT_INFO, &go_data("disk")));
        input.extend(opt(consts::OPT_GO, &go_data("disk")));
        hs.receive(&input, &catalog()).unwrap();
        let r = replies(hs.output());
        assert_eq!(r.len(), 4);
        assert!(r.iter().all(|x| x.1 == consts::REP_ERR_TLS_REQD), "{r:?}");
        assert_eq!(hs.status(), Status::InProgress);
        assert!(hs.negotiated().is_none());
    }

    #[test]
    fn required_export_name_closes() {
        let mut hs = started_tls(TlsPolicy::Required);
        hs.receive(&opt(consts::OPT_EXPORT_NAME, b"disk"), &catalog())
            .unwrap();
        assert_eq!(hs.status(), Status::Closed);
        assert!(hs.output().is_empty());
    }

    #[test]
    fn starttls_stops_at_the_option_and_forgets_clear_text() {
        let mut hs = started_tls(TlsPolicy::Optional);
        let mut input = opt(consts::OPT_EXTENDED_HEADERS, &[]);
        input.extend(opt(consts::OPT_STARTTLS, &[]));
        let before_tail = input.len();
        // A client must not pipeline past STARTTLS; the machine leaves such
        // bytes to the caller.
        input.extend(opt(consts::OPT_GO, &go_data("disk")));
        let used = hs.receive(&input, &catalog()).unwrap();
        assert_eq!(used, before_tail);
        assert_eq!(hs.status(), Status::StartTls);
        let r = replies(hs.output());
        assert_eq!((r[1].0, r[1].1), (consts::OPT_STARTTLS, consts::REP_ACK));
        hs.consume_output(hs.output().len());
        hs.tls_established();
        assert!(hs.tls_active());
        // Extended headers were negotiated in clear text: forgotten.
        hs.receive(&opt(consts::OPT_STARTTLS, &[]), &catalog())
            .unwrap();
        assert_eq!(replies(hs.output())[0].1, consts::REP_ERR_INVALID);
        hs.consume_output(hs.output().len());
        hs.receive(&opt(consts::OPT_GO, &go_data("disk")), &catalog())
            .unwrap();
        let neg = hs.negotiated().unwrap();
        assert!(!neg.structured_replies && !neg.extended_headers);
    }

    #[test]
    fn required_serves_after_tls() {
        let mut hs = started_tls(TlsPolicy::Required);
        hs.receive(&opt(consts::OPT_STARTTLS, &[]), &catalog())
            .unwrap();
        assert_eq!(hs.status(), Status::StartTls);
        hs.consume_output(hs.output().len());
        hs.tls_established();
        let mut input = opt(consts::OPT_STRUCTURED_REPLY, &[]);
        input.extend(opt(consts::OPT_GO, &go_data("disk")));
        hs.receive(&input, &catalog()).unwrap();
        assert_eq!(hs.status(), Status::Ready);
        assert!(hs.negotiated().unwrap().structured_replies);
    }
}
