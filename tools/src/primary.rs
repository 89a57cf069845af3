//! `mirrorblk primary`: where a volume's primary serves, as etcd says.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use mirrorblk_etcd::{records, Client, LeaderRecord, VolumeKeys};

/// How long one etcd call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// How often `--wait` asks again.
const POLL: Duration = Duration::from_millis(100);

/// Prints the primary of `volume` (its NBD address, or the leader record as
/// JSON), waiting up to `wait` for one to exist.
pub fn run(etcd: &[String], volume: &str, json: bool, wait: Duration) -> ExitCode {
    if volume.is_empty() || volume.contains('/') {
        eprintln!("mirrorblk primary: '{volume}' is not a volume name");
        return ExitCode::from(2);
    }
    let client = match Client::new(etcd, CALL_TIMEOUT) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mirrorblk primary: {e}");
            return ExitCode::from(2);
        }
    };
    let deadline = Instant::now() + wait;
    loop {
        match leader(&client, volume) {
            Ok(Some(rec)) => {
                print(&rec, json);
                return ExitCode::SUCCESS;
            }
            Ok(None) if Instant::now() < deadline => std::thread::sleep(POLL),
            Ok(None) => {
                eprintln!("mirrorblk primary: volume '{volume}' has no primary right now: an election is under way, or no replica may take over (see `mirrorblk events` on the nodes); --wait DURATION waits for one");
                return ExitCode::from(1);
            }
            Err(e) => {
                eprintln!("mirrorblk primary: {e}");
                return ExitCode::from(1);
            }
        }
    }
}

fn leader(client: &Client, volume: &str) -> Result<Option<LeaderRecord>, String> {
    let kv = client
        .get(&VolumeKeys::new(volume).leader())
        .map_err(|e| e.to_string())?;
    kv.map(|kv| records::decode(&kv).map_err(|e| e.to_string()))
        .transpose()
}

fn print(rec: &LeaderRecord, json: bool) {
    if json {
        println!("{}", serde_json::to_string(rec).expect("records serialize"));
    } else {
        println!("{}", rec.nbd);
    }
}
