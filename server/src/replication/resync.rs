//! The bookkeeping of one resync or verify pass over a link (sans-I/O).
//!
//! The link's send loop asks [`Job::next_step`] what to put in the stream
//! next, tells the job what it sent, and the ack receiver feeds the
//! replica's answers back ([`Job::on_check`], [`Job::on_durable`]). Bits of
//! the [`OutOfSync`] bitmap are cleared only when the replica reports a
//! region's frame durable and nothing marked the region again meanwhile.
//!
//! - Data resync (bitmap): every set region is sent as RESYNC_DATA.
//! - Checksum resync (new or unknown replica): every set region is first
//!   sent as RESYNC_CHECK; only regions the replica reports different are
//!   sent as data.
//! - Verify: every region is checked; differing ones are reported, and with
//!   `repair` marked out of sync and sent.
//!
//! Bounded: at most [`MAX_CHECKS`] checks unanswered and [`MAX_PENDING`]
//! frames awaiting the replica's durability report.

use std::collections::VecDeque;
use std::time::Instant;

use super::bitmap::{OutOfSync, REGION};

/// Most checks sent and not yet answered.
pub const MAX_CHECKS: usize = 32;
/// Most resync frames sent whose durability is not yet reported.
pub const MAX_PENDING: usize = 256;
/// How often a region's check may be deferred (writes to it were not yet in
/// the stream) before a resync sends its data instead, or a verify reports
/// it as too busy to compare.
pub const MAX_DEFERRALS: u32 = 8;

/// What a pass does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    /// Bring the replica's out-of-sync regions up to date.
    Resync {
        /// Compare checksums first and send only differing regions.
        checksum: bool,
    },
    /// Compare every region; with `repair`, resync the differing ones.
    Verify {
        /// Send differing regions.
        repair: bool,
    },
}

/// The next thing to put in the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Send RESYNC_CHECK for this region.
    Check(usize),
    /// Send RESYNC_DATA for this region.
    Data(usize),
    /// Everything is sent: send RESYNC_DONE (resync, or a repair that sent data).
    Done,
    /// Everything is sent; nothing more to send (a verify that found nothing to repair).
    Finished,
    /// Nothing may be sent now (rate limit, bounds, or answers outstanding).
    Wait,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    seq: u64,
    region: usize,
    /// Found different by the replica: its bit must stay until data arrives.
    mismatch: bool,
    /// Marked out of sync again after it was sent.
    dirty: bool,
}

/// One pass over a link.
#[derive(Debug)]
pub struct Job {
    /// What it does.
    pub kind: JobKind,
    cursor: usize,
    regions: usize,
    volume_size: u64,
    /// Bytes the pass covers.
    pub total_bytes: u64,
    /// Bytes checked equal or sent so far.
    pub done_bytes: u64,
    /// Bytes of region data sent.
    pub sent_bytes: u64,
    next_seq: u64,
    pending: VecDeque<Pending>,
    checks_out: usize,
    wanted: VecDeque<usize>,
    /// Regions whose check must be taken again (their snapshot was
    /// ambiguous), with how often they were deferred; taken after the scan.
    recheck: VecDeque<(usize, u32)>,
    /// Verify: offsets of regions written too continuously to compare.
    pub busy: Vec<u64>,
    /// How often each deferred region was deferred (bounded by the regions
    /// in `recheck`).
    deferrals: std::collections::HashMap<usize, u32>,
    /// Verify: offsets of the regions found different.
    pub differing: Vec<u64>,
    /// RESYNC_DONE (or the verify's end) has been reached.
    pub done_sent: bool,
    /// When it began.
    pub started: Instant,
}

impl Job {
    /// What status shows of this pass as a verify (running, or just ended).
    pub fn verify_status(&self, repair: bool) -> mirrorblk_admin::VerifyStatus {
        let (done_bytes, total_bytes) = self.progress();
        mirrorblk_admin::VerifyStatus {
            running: !self.finished(),
            repair,
            done_bytes,
            total_bytes,
            differing: self.differing.clone(),
            busy: self.busy.clone(),
            region_bytes: REGION,
            aborted: None,
            seconds: self.started.elapsed().as_secs_f64(),
        }
    }

    /// A pass over `bits` (for a resync: its set regions; for a verify:
    /// all) whose first frame has sequence number `first_seq` (numbers run
    /// on per connection, across passes).
    pub fn new(kind: JobKind, bits: &OutOfSync, volume_size: u64, first_seq: u64) -> Job {
        assert!(first_seq >= 1, "resync sequence numbers start at 1");
        let total_bytes = match kind {
            JobKind::Resync { .. } => bits.bytes(),
            JobKind::Verify { .. } => volume_size,
        };
        Job {
            kind,
            cursor: 0,
            regions: bits.regions(),
            volume_size,
            total_bytes,
            done_bytes: 0,
            sent_bytes: 0,
            next_seq: first_seq,
            pending: VecDeque::new(),
            checks_out: 0,
            wanted: VecDeque::new(),
            recheck: VecDeque::new(),
            busy: Vec::new(),
            deferrals: std::collections::HashMap::new(),
            differing: Vec::new(),
            done_sent: false,
            started: Instant::now(),
        }
    }

    fn region_len(&self, i: usize) -> u64 {
        REGION.min(self.volume_size - i as u64 * REGION)
    }

    fn checks_first(&self) -> bool {
        matches!(
            self.kind,
            JobKind::Resync { checksum: true } | JobKind::Verify { .. }
        )
    }

    fn repairs(&self) -> bool {
        matches!(
            self.kind,
            JobKind::Resync { .. } | JobKind::Verify { repair: true }
        )
    }

    /// What to send next; `may_send_data` is the rate limiter's verdict,
    /// `may_check` whether checks can be taken now (the link streams live).
    pub fn next_step(&mut self, bits: &OutOfSync, may_send_data: bool, may_check: bool) -> Step {
        if self.done_sent {
            return Step::Wait;
        }
        let room = self.pending.len() < MAX_PENDING;
        if !self.wanted.is_empty() {
            return if may_send_data && room {
                Step::Data(self.wanted.pop_front().expect("not empty"))
            } else {
                Step::Wait
            };
        }
        if let JobKind::Resync { .. } = self.kind {
            self.cursor = bits.next_set(self.cursor).unwrap_or(self.regions);
        }
        let can_check = self.checks_out < MAX_CHECKS && room && may_send_data && may_check;
        if self.cursor < self.regions {
            let i = self.cursor;
            if self.checks_first() {
                // Checks move no data but cost the replica a read: they
                // share the rate budget.
                if can_check {
                    self.cursor += 1;
                    return Step::Check(i);
                }
            } else if may_send_data && room {
                self.cursor += 1;
                return Step::Data(i);
            }
            return Step::Wait;
        }
        // Deferred checks are retried once the scan is through, so a region
        // under constant writes never holds up the rest.
        if let Some(&(r, _)) = self.recheck.front() {
            return if can_check {
                self.recheck.pop_front();
                Step::Check(r)
            } else {
                Step::Wait
            };
        }
        // The end is only reached once every frame is reported durable and,
        // for a resync, no region is out of sync any more (one marked again
        // meanwhile is sent again).
        if self.checks_out > 0 || !self.pending.is_empty() {
            return Step::Wait;
        }
        if let JobKind::Resync { .. } = self.kind {
            if let Some(i) = bits.next_set(0) {
                self.cursor = i;
                return self.next_step(bits, may_send_data, may_check);
            }
        }
        self.done_sent = true;
        if self.sent_bytes > 0 || matches!(self.kind, JobKind::Resync { .. }) {
            Step::Done
        } else {
            Step::Finished
        }
    }

    /// The check of `region` that [`Job::next_step`] gave could not be taken
    /// now (writes to the region were not yet in the stream): take it later.
    pub fn recheck(&mut self, region: usize) {
        let tries = self.deferrals.get(&region).copied().unwrap_or(0) + 1;
        if tries <= MAX_DEFERRALS {
            self.deferrals.insert(region, tries);
            self.recheck.push_back((region, tries));
            return;
        }
        self.deferrals.remove(&region);
        if self.repairs() {
            // A data snapshot needs no quiet moment: send it.
            if !self.wanted.contains(&region) {
                self.wanted.push_back(region);
            }
        } else {
            self.busy.push(region as u64 * REGION);
            self.done_bytes += self.region_len(region);
        }
    }

    /// Records a frame about `region` just put in the stream; its sequence number.
    pub fn sent(&mut self, region: usize, check: bool) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        if check {
            self.checks_out += 1;
        } else {
            let len = self.region_len(region);
            self.sent_bytes += len;
            self.done_bytes += len;
        }
        self.pending.push_back(Pending {
            seq,
            region,
            mismatch: false,
            dirty: false,
        });
        seq
    }

    /// The replica's answer to check `seq`. Returns the region if its data
    /// must now be marked out of sync (a repair or resync will send it).
    pub fn on_check(&mut self, seq: u64, equal: bool) -> Result<Option<usize>, String> {
        let Some(p) = self.pending.iter_mut().find(|p| p.seq == seq) else {
            return Err(format!("answer to unknown resync check {seq}"));
        };
        if self.checks_out == 0 {
            return Err(format!(
                "answer to resync check {seq} that is not outstanding"
            ));
        }
        self.checks_out -= 1;
        let region = p.region;
        let len = REGION.min(self.volume_size - region as u64 * REGION);
        if equal {
            self.done_bytes += len;
            return Ok(None);
        }
        p.mismatch = true;
        if let JobKind::Verify { .. } = self.kind {
            self.differing.push(region as u64 * REGION);
        }
        if self.repairs() {
            self.wanted.push_back(region);
            Ok(Some(region))
        } else {
            self.done_bytes += len;
            Ok(None)
        }
    }

    /// The replica reports every resync frame up to `seq` durable: clear the
    /// bits of regions that are now known equal and durable.
    pub fn on_durable(&mut self, seq: u64, bits: &mut OutOfSync) {
        while let Some(p) = self.pending.front() {
            if p.seq > seq {
                break;
            }
            if !p.mismatch && !p.dirty {
                bits.clear(p.region);
            }
            self.pending.pop_front();
        }
    }

    /// Region `region` was marked out of sync again (records the replica
    /// lacks left the journal): frames sent before must not clear it.
    pub fn on_mark(&mut self, region: usize) {
        let mut sent = false;
        for p in self.pending.iter_mut().filter(|p| p.region == region) {
            p.dirty = true;
            sent = true;
        }
        // Already passed: send it again (a later snapshot has every record).
        if (sent || region < self.cursor) && !self.wanted.contains(&region) && self.repairs() {
            self.wanted.push_back(region);
        }
    }

    /// The sequence number the next frame on the connection gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Everything sent and reported durable.
    pub fn finished(&self) -> bool {
        self.done_sent && self.pending.is_empty()
    }

    /// Progress as (bytes done, bytes total).
    pub fn progress(&self) -> (u64, u64) {
        (self.done_bytes.min(self.total_bytes), self.total_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits(regions: u64) -> OutOfSync {
        OutOfSync::new(
            std::env::temp_dir().join("mirrorblk-job-unused"),
            regions * REGION,
            1,
        )
    }

    #[test]
    fn data_resync_sends_set_regions_and_clears_them_when_durable() {
        let mut b = bits(10);
        b.clear_all();
        b.set(2);
        b.set(7);
        let mut j = Job::new(JobKind::Resync { checksum: false }, &b, 10 * REGION, 1);
        assert_eq!(j.total_bytes, 2 * REGION);
        assert_eq!(j.next_step(&b, false, true), Step::Wait, "rate limited");
        assert_eq!(j.next_step(&b, true, true), Step::Data(2));
        let s2 = j.sent(2, false);
        assert_eq!(j.next_step(&b, true, true), Step::Data(7));
        let s7 = j.sent(7, false);
        j.on_mark(7); // written again while the replica was away
        assert_eq!(j.next_step(&b, true, true), Step::Data(7), "sent again");
        let s7b = j.sent(7, false);
        assert_eq!(
            j.next_step(&b, true, true),
            Step::Wait,
            "durability outstanding"
        );
        j.on_durable(s2, &mut b);
        assert!(!b.get(2) && b.get(7));
        j.on_durable(s7, &mut b);
        assert!(b.get(7), "a region marked after it was sent stays set");
        j.on_durable(s7b, &mut b);
        assert!(!b.get(7));
        assert_eq!(j.next_step(&b, true, true), Step::Done);
        assert!(j.finished());
    }

    #[test]
    fn checksum_resync_sends_only_differing_regions() {
        let mut b = bits(3);
        b.set_all();
        let mut j = Job::new(JobKind::Resync { checksum: true }, &b, 3 * REGION, 1);
        let mut seqs = Vec::new();
        for i in 0..3 {
            assert_eq!(j.next_step(&b, true, true), Step::Check(i));
            seqs.push(j.sent(i, true));
        }
        assert_eq!(
            j.next_step(&b, true, true),
            Step::Wait,
            "answers outstanding"
        );
        assert_eq!(j.on_check(seqs[0], true), Ok(None));
        assert_eq!(j.on_check(seqs[1], false), Ok(Some(1)));
        assert_eq!(j.on_check(seqs[2], true), Ok(None));
        assert!(j.on_check(99, true).is_err());
        assert_eq!(j.next_step(&b, true, true), Step::Data(1));
        let d = j.sent(1, false);
        j.on_durable(seqs[2], &mut b);
        assert!(
            !b.get(0) && b.get(1) && !b.get(2),
            "a mismatch keeps its bit"
        );
        assert_eq!(j.next_step(&b, true, true), Step::Wait);
        j.on_durable(d, &mut b);
        assert_eq!(b.count(), 0);
        assert_eq!(j.next_step(&b, true, true), Step::Done);
        assert!(j.finished());
        assert_eq!(j.sent_bytes, REGION);
    }

    #[test]
    fn verify_reports_and_only_repairs_when_asked() {
        let mut b = bits(4);
        let mut j = Job::new(JobKind::Verify { repair: false }, &b, 4 * REGION - 8192, 1);
        let mut last = 0;
        for i in 0..4 {
            assert_eq!(j.next_step(&b, true, true), Step::Check(i));
            last = j.sent(i, true);
            assert_eq!(j.on_check(last, i != 3), Ok(None));
        }
        assert_eq!(j.next_step(&b, true, true), Step::Wait);
        j.on_durable(last, &mut b);
        assert_eq!(j.next_step(&b, true, true), Step::Finished);
        assert_eq!(j.differing, vec![3 * REGION]);
        assert_eq!(j.progress(), (4 * REGION - 8192, 4 * REGION - 8192));

        let mut j = Job::new(JobKind::Verify { repair: true }, &b, 4 * REGION, 1);
        let s = (0..4)
            .map(|i| {
                j.next_step(&b, true, true);
                j.sent(i, true)
            })
            .collect::<Vec<_>>();
        assert_eq!(j.on_check(s[1], false), Ok(Some(1)));
        for &x in &[s[0], s[2], s[3]] {
            j.on_check(x, true).unwrap();
        }
        assert_eq!(j.next_step(&b, true, true), Step::Data(1));
        let d = j.sent(1, false);
        j.on_durable(d, &mut b);
        assert_eq!(j.next_step(&b, true, true), Step::Done);
    }

    #[test]
    fn a_deferred_check_is_taken_before_the_pass_ends() {
        let mut b = bits(2);
        let mut j = Job::new(JobKind::Verify { repair: false }, &b, 2 * REGION, 1);
        assert_eq!(j.next_step(&b, true, true), Step::Check(0));
        j.recheck(0);
        assert_eq!(
            j.next_step(&b, true, true),
            Step::Check(1),
            "the scan first"
        );
        let s1 = j.sent(1, true);
        assert_eq!(
            j.next_step(&b, true, true),
            Step::Check(0),
            "then the deferred one"
        );
        let s0 = j.sent(0, true);
        j.on_check(s1, true).unwrap();
        j.on_check(s0, true).unwrap();
        j.on_durable(s0, &mut b);
        assert_eq!(j.next_step(&b, true, true), Step::Finished);
    }

    #[test]
    fn a_region_deferred_too_often_is_sent_or_reported_busy() {
        let mut b = bits(2);
        b.set_all();
        let mut j = Job::new(JobKind::Resync { checksum: true }, &b, 2 * REGION, 1);
        assert_eq!(
            j.next_step(&b, true, false),
            Step::Wait,
            "no checks while not live"
        );
        assert_eq!(j.next_step(&b, true, true), Step::Check(0));
        j.recheck(0);
        assert_eq!(
            j.next_step(&b, true, true),
            Step::Check(1),
            "the scan goes on first"
        );
        j.sent(1, true);
        for _ in 0..MAX_DEFERRALS {
            assert_eq!(j.next_step(&b, true, true), Step::Check(0));
            j.recheck(0);
        }
        assert_eq!(
            j.next_step(&b, true, true),
            Step::Data(0),
            "sent as data at last"
        );

        let b = bits(1);
        let mut v = Job::new(JobKind::Verify { repair: false }, &b, REGION, 1);
        assert_eq!(v.next_step(&b, true, true), Step::Check(0));
        for _ in 0..MAX_DEFERRALS {
            v.recheck(0);
            assert_eq!(v.next_step(&b, true, true), Step::Check(0));
        }
        v.recheck(0);
        assert_eq!(v.busy, vec![0]);
        assert_eq!(v.next_step(&b, true, true), Step::Finished);
    }

    /// The link takes a region's buffers before it asks for a step and says
    /// `may_send_data` only with them in hand: no region step (data or
    /// check) is ever given without, while a pass with nothing left to
    /// send still ends.
    #[test]
    fn no_region_step_without_leave_to_send_but_a_pass_still_ends() {
        // (kind, may send data, may check, step)
        let table = [
            (JobKind::Resync { checksum: false }, false, true, Step::Wait),
            (
                JobKind::Resync { checksum: false },
                true,
                true,
                Step::Data(0),
            ),
            (JobKind::Resync { checksum: true }, false, true, Step::Wait),
            (
                JobKind::Resync { checksum: true },
                true,
                true,
                Step::Check(0),
            ),
            (JobKind::Resync { checksum: true }, true, false, Step::Wait),
            (JobKind::Verify { repair: false }, false, true, Step::Wait),
            (JobKind::Verify { repair: true }, true, true, Step::Check(0)),
        ];
        for (kind, may_send, may_check, want) in table {
            let mut b = bits(2);
            b.set_all();
            let mut j = Job::new(kind, &b, 2 * REGION, 1);
            assert_eq!(
                j.next_step(&b, may_send, may_check),
                want,
                "{kind:?} may send {may_send} may check {may_check}"
            );
        }
        // Everything sent and durable: the end needs no buffers.
        let mut b = bits(1);
        b.set_all();
        let mut j = Job::new(JobKind::Resync { checksum: false }, &b, REGION, 1);
        assert_eq!(j.next_step(&b, true, true), Step::Data(0));
        let s = j.sent(0, false);
        j.on_durable(s, &mut b);
        assert_eq!(j.next_step(&b, false, false), Step::Done);
    }

    #[test]
    fn frames_awaiting_durability_are_bounded() {
        let mut b = bits(MAX_PENDING as u64 + 5);
        b.set_all();
        let mut j = Job::new(
            JobKind::Resync { checksum: false },
            &b,
            (MAX_PENDING as u64 + 5) * REGION,
            1,
        );
        for i in 0..MAX_PENDING {
            assert_eq!(j.next_step(&b, true, true), Step::Data(i));
            j.sent(i, false);
        }
        assert_eq!(j.next_step(&b, true, true), Step::Wait);
        j.on_durable(1, &mut b);
        assert_eq!(j.next_step(&b, true, true), Step::Data(MAX_PENDING));
    }
}
