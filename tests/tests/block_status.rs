//! BLOCK_STATUS as real clients read it (issue 15): `base:allocation`
//! reports never-written and trimmed ranges as holes, written zeroes as
//! zero, written data as data (`nbdinfo --map`, `qemu-img map`), and never
//! claims zero for a byte that reads non-zero; `qemu:dirty-bitmap:since-LSN`
//! marks exactly the regions changed after an LSN (`nbdinfo --map=CONTEXT`,
//! qemu-img's `x-dirty-bitmap`), over structured and extended headers.

use std::time::Duration;

use mirrorblk_tests::tools::{self, qemu_io_ok, Tool, TOOL_TIMEOUT};
use mirrorblk_tests::util::{pattern, poll_until, MIB};
use mirrorblk_tests::{Daemon, TestDir};
use nbd::Client;

const SIZE: u64 = 64 * MIB;
const STATE_HOLE: u64 = 1;
const STATE_ZERO: u64 = 2;

/// One extent of `nbdinfo --map`: (offset, length, type).
type Run = (u64, u64, u64);

/// `nbdinfo --map[=CONTEXT] --json URI`, checked to cover the export.
fn nbdinfo_map(uri: &str, context: Option<&str>) -> Vec<Run> {
    let map_arg = match context {
        Some(c) => format!("--map={c}"),
        None => "--map".to_string(),
    };
    let o = tools::run(
        Tool::NbdInfo,
        [map_arg.as_str(), "--json", uri],
        TOOL_TIMEOUT,
    )
    .expect_success();
    let v: serde_json::Value = serde_json::from_str(&o.stdout)
        .unwrap_or_else(|e| panic!("bad JSON from nbdinfo {map_arg} ({e}): {}", o.stdout));
    let runs: Vec<Run> = v
        .as_array()
        .expect("an array of extents")
        .iter()
        .map(|x| {
            (
                x["offset"].as_u64().expect("offset"),
                x["length"].as_u64().expect("length"),
                x["type"].as_u64().expect("type"),
            )
        })
        .collect();
    assert_eq!(
        runs.iter().map(|r| r.1).sum::<u64>(),
        SIZE,
        "{map_arg} does not cover the export: {runs:?}"
    );
    runs
}

fn type_at(m: &[Run], at: u64) -> u64 {
    m.iter()
        .find(|&&(o, l, _)| o <= at && at < o + l)
        .map(|&(_, _, t)| t)
        .unwrap_or_else(|| panic!("offset {at} is outside the map {m:?}"))
}

/// Reads every range the map reports as zero through the protocol client:
/// the map must never claim zero for bytes that read non-zero.
fn assert_zero_ranges_read_zero(c: &mut Client<std::net::TcpStream>, m: &[Run]) {
    for &(off, len, t) in m.iter().filter(|r| r.2 & STATE_ZERO != 0) {
        let mut pos = off;
        while pos < off + len {
            let n = (off + len - pos).min(4 * MIB);
            let got = c.read(pos, n as u32).expect("read a range reported zero");
            if let Some(i) = got.iter().position(|&b| b != 0) {
                panic!(
                    "the map says {off}+{len} (type {t}) is zero, but byte {} is {:#x}",
                    pos + i as u64,
                    got[i]
                );
            }
            pos += n;
        }
    }
}

/// `qemu-img map --output=json` over NBD: (start, length, data, zero).
fn qemu_img_map(uri: &str) -> Vec<(u64, u64, bool, bool)> {
    let o = tools::run(
        Tool::QemuImg,
        ["map", "--output=json", "-f", "raw", uri],
        TOOL_TIMEOUT,
    )
    .expect_success();
    let v: serde_json::Value = serde_json::from_str(&o.stdout)
        .unwrap_or_else(|e| panic!("bad JSON from qemu-img map ({e}): {}", o.stdout));
    v.as_array()
        .expect("an array")
        .iter()
        .map(|x| {
            (
                x["start"].as_u64().expect("start"),
                x["length"].as_u64().expect("length"),
                x["data"].as_bool().expect("data"),
                x["zero"].as_bool().expect("zero"),
            )
        })
        .collect()
}

/// A fresh volume is one hole; written data is data; a discard (NBD trim)
/// reads as zero at once (pending) and becomes a hole once applied; a
/// write-zeroes reads as zero; every range reported zero reads as zeroes.
#[test]
fn base_allocation_reports_holes_zeroes_and_data_honestly() {
    let dir = TestDir::new();
    let d = Daemon::start(dir.volume_args("vol0", "64M"));
    let uri = d.uri("vol0");
    let mut c = d.connect_structured("vol0");

    let fresh = nbdinfo_map(&uri, None);
    assert_eq!(
        fresh,
        vec![(0, SIZE, STATE_HOLE | STATE_ZERO)],
        "a fresh volume is one hole"
    );
    let q = qemu_img_map(&uri);
    assert!(
        q.iter().all(|&(_, _, data, zero)| !data && zero),
        "qemu-img map of a fresh volume: {q:?}"
    );

    c.write(0, &pattern(1, (8 * MIB) as usize), true).unwrap();
    qemu_io_ok(
        &uri,
        &[
            "discard 1M 1M",
            "write -z 3M 512k",
            "write -z -u 5M 1M",
            "write -P 0x5a 20M 64k",
        ],
    );
    // Immediately (trims perhaps still pending): zero where it must be.
    let m = nbdinfo_map(&uri, None);
    assert_zero_ranges_read_zero(&mut c, &m);
    for at in [MIB, 2 * MIB - 1, 3 * MIB, 5 * MIB, 6 * MIB - 1, 30 * MIB] {
        assert_ne!(
            type_at(&m, at) & STATE_ZERO,
            0,
            "{at} reads zero but the map {m:?}"
        );
    }
    for at in [
        0,
        MIB - 1,
        2 * MIB,
        3 * MIB + 512 * 1024,
        8 * MIB - 1,
        20 * MIB,
    ] {
        assert_eq!(type_at(&m, at), 0, "{at} holds data but the map {m:?}");
    }
    // Once applied, the discarded range is a hole.
    let m = poll_until(
        Duration::from_secs(10),
        "the discarded range to become a hole",
        || {
            let m = nbdinfo_map(&uri, None);
            (type_at(&m, MIB) == STATE_HOLE | STATE_ZERO).then_some(m)
        },
    );
    assert_zero_ranges_read_zero(&mut c, &m);
    assert_eq!(type_at(&m, 40 * MIB), STATE_HOLE | STATE_ZERO, "{m:?}");
    let q = qemu_img_map(&uri);
    let at = |off: u64| {
        *q.iter()
            .find(|r| r.0 <= off && off < r.0 + r.1)
            .unwrap_or_else(|| panic!("{off} not in qemu-img map {q:?}"))
    };
    assert!(at(0).2 && !at(0).3, "written data: {q:?}");
    assert!(at(MIB).3 && !at(MIB).2, "discarded: {q:?}");
    assert!(at(40 * MIB).3, "never written: {q:?}");
}

/// `mirrorblk snapshot create VOLUME NAME` on `d`.
fn snapshot(d: &Daemon, volume: &str, name: &str) {
    let out = std::process::Command::new(mirrorblk_tests::cluster::mirrorblk_cli())
        .arg("--admin-socket")
        .arg(d.admin_socket())
        .args(["snapshot", "create", volume, name])
        .output()
        .expect("run mirrorblk snapshot create");
    assert!(
        out.status.success(),
        "mirrorblk snapshot create failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A snapshot export's `base:allocation` is the snapshot's: its holes stay
/// holes while the volume fills them, its data stays data while the volume
/// trims it (`nbdinfo --map` on `VOLUME@NAME`), and no range it calls zero
/// reads non-zero.
#[test]
fn a_snapshot_export_maps_the_snapshot_not_the_volume() {
    let dir = TestDir::new();
    let d = Daemon::start(dir.volume_args("vol0", "64M"));
    let uri = d.uri("vol0");
    qemu_io_ok(&uri, &["write -P 0x11 0 8M", "write -z 10M 1M"]);
    snapshot(&d, "vol0", "s");
    // After the snapshot: trim data it holds, fill a hole it has.
    qemu_io_ok(&uri, &["discard 2M 2M", "write -P 0x22 30M 1M"]);
    poll_until(Duration::from_secs(10), "the trim to be applied", || {
        let m = nbdinfo_map(&uri, None);
        (type_at(&m, 2 * MIB) == STATE_HOLE | STATE_ZERO).then_some(())
    });
    let snap_uri = d.uri("vol0@s");
    let m = nbdinfo_map(&snap_uri, None);
    for at in [0, 2 * MIB, 4 * MIB - 1, 8 * MIB - 1] {
        assert_eq!(type_at(&m, at), 0, "{at} is data in the snapshot: {m:?}");
    }
    assert_ne!(
        type_at(&m, 10 * MIB) & STATE_ZERO,
        0,
        "written zeroes: {m:?}"
    );
    for at in [9 * MIB, 20 * MIB, 40 * MIB, SIZE - 1] {
        let t = type_at(&m, at);
        assert_eq!(
            t,
            STATE_HOLE | STATE_ZERO,
            "{at} is a hole in the snapshot: {m:?}"
        );
    }
    let mut c = d.connect_structured("vol0@s");
    assert_zero_ranges_read_zero(&mut c, &m);
}

/// `mirrorblk changes VOLUME --since LSN --json`: the regions changed after
/// `since` and the last LSN the answer covers.
fn changes(d: &Daemon, volume: &str, since: u64) -> mirrorblk_admin::Changes {
    let out = std::process::Command::new(mirrorblk_tests::cluster::mirrorblk_cli())
        .arg("--admin-socket")
        .arg(d.admin_socket())
        .args(["changes", volume, "--since", &since.to_string(), "--json"])
        .output()
        .expect("run mirrorblk changes");
    assert!(
        out.status.success(),
        "mirrorblk changes failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("changes JSON")
}

/// The dirty ranges of a map, merged: (offset, length).
fn dirty_ranges(runs: impl IntoIterator<Item = (u64, u64, bool)>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (off, len, _) in runs.into_iter().filter(|r| r.2) {
        match out.last_mut() {
            Some(last) if last.0 + last.1 == off => last.1 += len,
            _ => out.push((off, len)),
        }
    }
    out
}

/// `qemu:dirty-bitmap:since-LSN` marks dirty exactly the regions
/// `mirrorblk changes --since LSN` reports, for nbdinfo (libnbd 1.14:
/// compact structured replies) and for qemu-img's `x-dirty-bitmap`
/// (qemu 10 negotiates extended headers: BLOCK_STATUS_EXT), where a dirty
/// region shows as `"data": false`; since-0 covers every write; LIST with
/// the family query names since-0.
#[test]
fn dirty_bitmap_context_marks_the_regions_changed_after_an_lsn() {
    let dir = TestDir::new();
    let d = Daemon::start(dir.volume_args("vol0", "64M"));
    let uri = d.uri("vol0");
    qemu_io_ok(&uri, &["write -P 1 1M 64k", "write -P 2 7M 4k"]);
    let base = changes(&d, "vol0", 0).lsn;
    qemu_io_ok(
        &uri,
        &[
            "write -P 3 10M 100k",
            "write -z 30M 64k",
            "discard 40M 1M",
            "write -P 4 63M 4k",
        ],
    );
    let want = changes(&d, "vol0", base);
    assert!(want.complete);
    let want: Vec<(u64, u64)> = want.ranges.iter().map(|r| (r.offset, r.length)).collect();
    assert_eq!(want.len(), 4, "{want:?}");

    let context = format!("qemu:dirty-bitmap:since-{base}");
    let m = nbdinfo_map(&uri, Some(&context));
    assert_eq!(
        dirty_ranges(m.iter().map(|r| (r.0, r.1, r.2 & 1 == 1))),
        want,
        "nbdinfo {m:?}"
    );
    let all = nbdinfo_map(&uri, Some("qemu:dirty-bitmap:since-0"));
    let every = dirty_ranges(all.iter().map(|r| (r.0, r.1, r.2 & 1 == 1)));
    assert_eq!(every[0], (MIB, 64 << 10), "since-0 {all:?}");
    assert_eq!(every.len(), 6, "since-0 {all:?}");

    let opts = format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={},export=vol0,x-dirty-bitmap={context}",
        d.port()
    );
    let o = tools::run(
        Tool::QemuImg,
        ["map", "--output=json", "--image-opts", &opts],
        TOOL_TIMEOUT,
    )
    .expect_success();
    let q: serde_json::Value = serde_json::from_str(&o.stdout).expect("qemu-img map JSON");
    let runs = q.as_array().expect("array").iter().map(|x| {
        let (s, l) = (x["start"].as_u64().unwrap(), x["length"].as_u64().unwrap());
        (s, l, !x["data"].as_bool().unwrap())
    });
    assert_eq!(dirty_ranges(runs), want, "qemu-img map {}", o.stdout);

    // LIST_META_CONTEXT with the family query (libnbd's opt mode).
    let script = format!(
        "import nbd\nh = nbd.NBD()\nh.set_opt_mode(True)\nh.connect_uri('{uri}')\n\
         h.add_meta_context('qemu:dirty-bitmap:')\nnames = []\n\
         h.opt_list_meta_context(lambda n: names.append(n) or 0)\nprint(' '.join(names))\nh.opt_abort()\n"
    );
    let o = tools::run(Tool::LibnbdPython, ["-c", &script], TOOL_TIMEOUT).expect_success();
    assert_eq!(o.stdout.trim(), "qemu:dirty-bitmap:since-0");
}

/// On a snapshot export `VOLUME@NAME` the dirty bitmap since an LSN marks
/// at least every region changed between that LSN and the snapshot (a
/// superset is allowed: changes after the snapshot may show too).
#[test]
fn dirty_bitmap_on_a_snapshot_export_covers_the_changes_before_it() {
    let dir = TestDir::new();
    let d = Daemon::start(dir.volume_args("vol0", "64M"));
    let uri = d.uri("vol0");
    qemu_io_ok(&uri, &["write -P 1 0 64k"]);
    let base = changes(&d, "vol0", 0).lsn;
    qemu_io_ok(&uri, &["write -P 2 5M 64k", "write -P 3 9M 4k"]);
    let before = changes(&d, "vol0", base);
    let req = mirrorblk_admin::Request::SnapshotCreate {
        volume: "vol0".into(),
        name: "s1".into(),
        space: None,
    };
    let r = mirrorblk_admin::call(&d.admin_socket(), &req).expect("snapshot_create");
    assert!(r.ok, "{:?}", r.error);
    qemu_io_ok(&uri, &["write -P 4 30M 64k"]);
    let snap_uri = format!("nbd://127.0.0.1:{}/vol0@s1", d.port());
    let m = nbdinfo_map(&snap_uri, Some(&format!("qemu:dirty-bitmap:since-{base}")));
    let dirty = dirty_ranges(m.iter().map(|r| (r.0, r.1, r.2 & 1 == 1)));
    for range in &before.ranges {
        assert!(
            dirty
                .iter()
                .any(|&(o, l)| o <= range.offset && range.offset + range.length <= o + l),
            "{range:?} changed before the snapshot but is clean in {dirty:?}"
        );
    }
    assert!(
        !dirty.iter().any(|&(o, l)| o < 64 << 10 && o + l > 0),
        "the region written before the base is dirty: {dirty:?}"
    );
}
