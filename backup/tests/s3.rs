//! The repository round trip on S3: a real S3-compatible server (moto's,
//! from PyPI, installed into a venv under the target directory) on
//! loopback, stopped by PID. Prints SKIP with the reason when moto cannot
//! be installed or started.

// Changed ranges are lists of ranges; a list of one is meant.
#![allow(clippy::single_range_in_vec_init)]

mod common;

use std::io::{Cursor, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use backup::backend::{S3Backend, S3Config};
use backup::{RepoConfig, Repository};
use common::*;

/// The moto server; killed by its PID when dropped.
struct Moto {
    child: Child,
    port: u16,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Makes sure `moto_server` is installed in a venv under the target
/// directory; returns its path or why not.
fn install_moto() -> Result<PathBuf, String> {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("moto-venv");
    let server = venv.join("bin/moto_server");
    if server.exists() {
        return Ok(server);
    }
    let run = |cmd: &mut Command| -> Result<(), String> {
        let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
        match out.status.success() {
            true => Ok(()),
            false => Err(format!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr))),
        }
    };
    run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    run(Command::new("timeout")
        .arg("600")
        .arg(venv.join("bin/pip"))
        .args(["install", "-q", "moto[server]"]))?;
    Ok(server)
}

/// A port nobody listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Sends one HTTP request to the server and returns the status line.
fn http(port: u16, request_line: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "{request_line} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    Ok(reply.lines().next().unwrap_or_default().to_owned())
}

fn start_moto() -> Result<Moto, String> {
    let server = install_moto()?;
    let port = free_port();
    let log = std::fs::File::create(
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("moto-{port}.log")),
    )
    .map_err(|e| e.to_string())?;
    let child = Command::new(server)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("moto_server: {e}"))?;
    let moto = Moto { child, port };
    let deadline = Instant::now() + Duration::from_secs(30);
    while http(port, "GET /").is_err() {
        if Instant::now() > deadline {
            return Err("moto_server did not answer within 30 s".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(moto)
}

fn s3_repo(moto: &Moto) -> Repository {
    let status = http(moto.port, "PUT /backups").unwrap();
    assert!(status.contains(" 200 "), "creating the bucket: {status}");
    let config = S3Config {
        bucket: "backups".into(),
        prefix: "site-a/repo".into(),
        endpoint: Some(format!("http://127.0.0.1:{}", moto.port)),
        region: Some("us-east-1".into()),
        access_key_id: Some("testing".into()),
        secret_access_key: Some("testing".into()),
        allow_http: true,
    };
    let repo_config = RepoConfig {
        chunk_size: CHUNK,
        ..RepoConfig::default()
    };
    Repository::create(Box::new(S3Backend::new(config).unwrap()), repo_config).unwrap()
}

#[test]
fn s3_round_trip_verify_prune_gc() {
    let moto = match start_moto() {
        Ok(moto) => moto,
        Err(reason) => {
            println!("SKIP s3_round_trip_verify_prune_gc: {reason}");
            return;
        }
    };
    let repo = s3_repo(&moto);
    let c = CHUNK as usize;
    let mut data = volume(16, 300, 71);
    let full = repo
        .backup(
            spec("vol", 1, &data, 1),
            None,
            None,
            &mut Cursor::new(&data),
        )
        .unwrap();
    let id1 = full.id.clone().unwrap();
    let v1 = data.clone();
    scribble(&mut data, 2 * c, 100, 72);
    let changed = [(2 * c) as u64..(2 * c + 100) as u64];
    let inc = repo
        .backup(
            spec("vol", 1, &data, 2),
            Some(&id1),
            Some(&changed),
            &mut Cursor::new(&data),
        )
        .unwrap();
    let id2 = inc.id.clone().unwrap();
    assert_eq!(
        (inc.chunks_reused, inc.chunks_new, inc.bytes_read),
        (16, 1, CHUNK as u64)
    );
    assert_eq!(repo.backups().unwrap(), vec![id1.clone(), id2.clone()]);
    for (id, want) in [(&id1, &v1), (&id2, &data)] {
        let (restored, result) = restore(&repo, id, want.len());
        result.unwrap();
        assert!(restored == *want, "{id} restores exactly from S3");
    }
    assert_eq!(repo.verify(None).unwrap().damaged, vec![]);

    // Prune the full backup; GC (after S3's one-second timestamps settle)
    // removes only the chunk the incremental replaced.
    assert_eq!(repo.prune(None, 1).unwrap(), vec![id1]);
    std::thread::sleep(S3Backend::CLOCK_SLACK + Duration::from_millis(500));
    let gc = repo.gc(&gc_now()).unwrap();
    assert_eq!(gc.chunks_removed, 1);
    let (restored, result) = restore(&repo, &id2, data.len());
    result.unwrap();
    assert!(restored == data);

    // A deleted chunk is named by verify and by restore.
    let victim = repo.load_index(&id2).unwrap().chunks[5].unwrap();
    repo.backend().delete(&victim.key()).unwrap();
    let report = repo.verify(None).unwrap();
    assert_eq!(report.damaged.len(), 1);
    assert_eq!(
        report.damaged[0].ranges[0].range,
        (5 * c) as u64..(6 * c) as u64
    );
    assert!(matches!(
        restore(&repo, &id2, data.len()).1,
        Err(backup::RepoError::Damaged { .. })
    ));
}
