//! A small QMP (QEMU Machine Protocol) client: JSON objects, one per line,
//! over a Unix socket (`--chardev socket,path=...,server=on,wait=off
//! --monitor chardev=...` on the QEMU side).
//!
//! The exchange: QEMU greets with `{"QMP": {...}}`, the client sends
//! `qmp_capabilities` to leave negotiation mode, then each `execute` gets
//! exactly one reply, `{"return": ...}` or `{"error": {"class", "desc"}}`,
//! carrying the `id` it was sent with. Asynchronous events
//! (`{"event": NAME, "data": ..., "timestamp": ...}`) may arrive at any time,
//! also between a command and its reply; they are collected (a bounded
//! number) for [`Qmp::wait_event`].
//!
//! Parsing ([`parse`], [`take_line`], [`command_line`]) is pure and tested
//! apart from the socket.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Events kept for [`Qmp::wait_event`]; older ones are dropped (a long run
/// emits few, but nothing here may grow without bound).
const MAX_EVENTS: usize = 256;
/// Longest line accepted from QEMU (a `query-*` answer is a few KiB).
const MAX_LINE: usize = 1 << 20;
/// Pause between connection attempts while the socket does not exist yet.
const CONNECT_RETRY: Duration = Duration::from_millis(20);

/// Why a QMP exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// A socket call failed while doing `what`.
    #[error("QMP {what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// No answer before the caller's deadline.
    #[error("QMP {what}: no answer in time")]
    Timeout {
        /// What was awaited, with its bound.
        what: String,
    },
    /// QEMU closed the connection.
    #[error("QMP {what}: connection closed by QEMU")]
    Closed {
        /// What was awaited.
        what: String,
    },
    /// A line that is not a QMP message.
    #[error("QMP protocol: {why}: {line}")]
    Protocol {
        /// The offending line (cut to 200 bytes).
        line: String,
        /// What is wrong with it.
        why: String,
    },
    /// QEMU refused a command.
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QMP error class (`GenericError`, `DeviceNotFound`, ...).
        class: String,
        /// QEMU's description.
        desc: String,
    },
}

impl From<QmpError> for crate::error::Error {
    fn from(e: QmpError) -> Self {
        crate::error::Error::Tool(e.to_string())
    }
}

/// One message from QEMU.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// The greeting (`{"QMP": {"version": ..., "capabilities": ...}}`).
    Greeting(Value),
    /// A command's success: its `return` value.
    Return {
        /// The id the command was sent with, if any.
        id: Option<Value>,
        /// The `return` member.
        value: Value,
    },
    /// A command's failure.
    Error {
        /// The id the command was sent with, if any.
        id: Option<Value>,
        /// QMP error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// An asynchronous event.
    Event(Event),
}

/// An asynchronous QMP event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Its name (`BLOCK_JOB_READY`, `JOB_STATUS_CHANGE`, ...).
    pub name: String,
    /// Its `data` member (`null` when absent).
    pub data: Value,
}

fn protocol(line: &str, why: &str) -> QmpError {
    let mut cut = line.len().min(200);
    while !line.is_char_boundary(cut) {
        cut -= 1;
    }
    QmpError::Protocol {
        line: line[..cut].to_string(),
        why: why.to_string(),
    }
}

/// Parses one line from QEMU.
pub fn parse(line: &str) -> Result<Message, QmpError> {
    let v: Value = serde_json::from_str(line).map_err(|e| protocol(line, &e.to_string()))?;
    let Value::Object(o) = v else {
        return Err(protocol(line, "not a JSON object"));
    };
    let id = o.get("id").cloned();
    if let Some(g) = o.get("QMP") {
        return Ok(Message::Greeting(g.clone()));
    }
    if let Some(r) = o.get("return") {
        return Ok(Message::Return {
            id,
            value: r.clone(),
        });
    }
    if let Some(e) = o.get("error") {
        let text = |k: &str| e.get(k).and_then(Value::as_str).map(str::to_string);
        return Ok(Message::Error {
            id,
            class: text("class").unwrap_or_else(|| "?".into()),
            desc: text("desc").unwrap_or_else(|| e.to_string()),
        });
    }
    if let Some(name) = o.get("event") {
        let name = name
            .as_str()
            .ok_or_else(|| protocol(line, "event name is not a string"))?;
        return Ok(Message::Event(Event {
            name: name.to_string(),
            data: o.get("data").cloned().unwrap_or(Value::Null),
        }));
    }
    Err(protocol(line, "neither greeting, return, error nor event"))
}

/// Takes the first complete line (without its `\n`) out of `buf`, if there
/// is one; a partial line stays for the next read.
pub fn take_line(buf: &mut Vec<u8>) -> Option<String> {
    let end = buf.iter().position(|&b| b == b'\n')?;
    let line: Vec<u8> = buf.drain(..=end).take(end).collect();
    Some(
        String::from_utf8_lossy(&line)
            .trim_end_matches('\r')
            .to_string(),
    )
}

/// The line that executes `command` with `args` (`Value::Null`: none) and
/// `id`.
pub fn command_line(command: &str, args: &Value, id: u64) -> String {
    let mut m = json!({ "execute": command, "id": id });
    if !args.is_null() {
        m["arguments"] = args.clone();
    }
    format!("{m}\n")
}

/// A negotiated QMP connection.
pub struct Qmp {
    stream: UnixStream,
    path: PathBuf,
    buf: Vec<u8>,
    next_id: u64,
    events: VecDeque<Event>,
}

impl Qmp {
    /// Connects to `path` (retrying while QEMU has not created it yet),
    /// reads the greeting and leaves negotiation mode; all within `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(QmpError::Io {
                        what: format!("connect to {} (for {timeout:?})", path.display()),
                        source: e,
                    })
                }
                Err(_) => std::thread::sleep(CONNECT_RETRY),
            }
        };
        let mut q = Qmp {
            stream,
            path: path.to_path_buf(),
            buf: Vec::new(),
            next_id: 1,
            events: VecDeque::new(),
        };
        match q.read_message("greeting", deadline)? {
            Message::Greeting(_) => {}
            other => {
                return Err(protocol(
                    &format!("{other:?}"),
                    "expected the greeting first",
                ))
            }
        }
        q.execute("qmp_capabilities", &Value::Null, remaining(deadline))?;
        Ok(q)
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `command` with `args` and returns its `return` value, or its
    /// error as [`QmpError::Command`]; waits at most `timeout`. Events
    /// arriving meanwhile are kept; a late reply to an earlier command that
    /// timed out (another id) is skipped.
    pub fn execute(
        &mut self,
        command: &str,
        args: &Value,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let deadline = Instant::now() + timeout;
        let id = self.next_id;
        self.next_id += 1;
        let line = command_line(command, args, id);
        self.stream
            .set_write_timeout(Some(timeout.max(Duration::from_millis(1))))
            .and_then(|_| self.stream.write_all(line.as_bytes()))
            .map_err(|e| QmpError::Io {
                what: format!("send {command}"),
                source: e,
            })?;
        let what = format!("{command} (waiting up to {timeout:?})");
        let ours = |got: &Option<Value>| got.as_ref().and_then(Value::as_u64) == Some(id);
        loop {
            match self.read_message(&what, deadline)? {
                Message::Return { id: got, value } if ours(&got) => return Ok(value),
                Message::Error {
                    id: got,
                    class,
                    desc,
                } if ours(&got) => {
                    return Err(QmpError::Command {
                        command: command.to_string(),
                        class,
                        desc,
                    })
                }
                Message::Event(e) => self.keep(e),
                // A stale reply or a second greeting: not ours.
                _ => {}
            }
        }
    }

    /// Waits at most `timeout` for an event named in `names` (collected
    /// ones first, oldest first) and removes it from the collection.
    pub fn wait_event(&mut self, names: &[&str], timeout: Duration) -> Result<Event, QmpError> {
        if let Some(i) = self
            .events
            .iter()
            .position(|e| names.contains(&e.name.as_str()))
        {
            if let Some(e) = self.events.remove(i) {
                return Ok(e);
            }
        }
        let deadline = Instant::now() + timeout;
        let what = format!("event {} (waiting up to {timeout:?})", names.join(" or "));
        loop {
            if let Message::Event(e) = self.read_message(&what, deadline)? {
                if names.contains(&e.name.as_str()) {
                    return Ok(e);
                }
                self.keep(e);
            }
        }
    }

    /// The events collected so far (oldest first), emptied.
    pub fn drain_events(&mut self) -> Vec<Event> {
        self.events.drain(..).collect()
    }

    fn keep(&mut self, e: Event) {
        if self.events.len() == MAX_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(e);
    }

    /// The next message, reading until `deadline`.
    fn read_message(&mut self, what: &str, deadline: Instant) -> Result<Message, QmpError> {
        loop {
            if let Some(line) = take_line(&mut self.buf) {
                if line.trim().is_empty() {
                    continue;
                }
                return parse(&line);
            }
            if self.buf.len() > MAX_LINE {
                return Err(protocol(
                    &String::from_utf8_lossy(&self.buf[..200]),
                    "line longer than 1 MiB",
                ));
            }
            let left = remaining(deadline);
            if left.is_zero() {
                return Err(QmpError::Timeout {
                    what: what.to_string(),
                });
            }
            self.read_some(what, left)?;
        }
    }

    /// One read of at most 64 KiB into the buffer, waiting at most `left`.
    fn read_some(&mut self, what: &str, left: Duration) -> Result<(), QmpError> {
        let io = |e| QmpError::Io {
            what: what.to_string(),
            source: e,
        };
        self.stream.set_read_timeout(Some(left)).map_err(io)?;
        let mut chunk = [0u8; 65536];
        match self.stream.read(&mut chunk) {
            Ok(0) => Err(QmpError::Closed {
                what: what.to_string(),
            }),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
            // The next turn of the loop sees the deadline passed.
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Ok(()),
            Err(e) if e.kind() == ErrorKind::Interrupted => Ok(()),
            Err(e) => Err(io(e)),
        }
    }
}

/// Time left until `deadline` (zero once passed).
fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_greeting_return_error_and_event() {
        let g = r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}}, "capabilities": ["oob"]}}"#;
        assert!(matches!(parse(g), Ok(Message::Greeting(_))));
        assert_eq!(
            parse(r#"{"return": {}, "id": 3}"#).ok(),
            Some(Message::Return {
                id: Some(json!(3)),
                value: json!({})
            })
        );
        assert_eq!(
            parse(
                r#"{"id": 4, "error": {"class": "GenericError", "desc": "Need a root block node"}}"#
            )
            .ok(),
            Some(Message::Error {
                id: Some(json!(4)),
                class: "GenericError".into(),
                desc: "Need a root block node".into()
            })
        );
        let ev = r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "BLOCK_JOB_READY", "data": {"device": "mirror0", "len": 65536}}"#;
        assert_eq!(
            parse(ev).ok(),
            Some(Message::Event(Event {
                name: "BLOCK_JOB_READY".into(),
                data: json!({"device": "mirror0", "len": 65536})
            }))
        );
    }

    #[test]
    fn refuses_what_is_not_qmp() {
        for bad in [
            "not json",
            "[1, 2]",
            r#"{"something": 1}"#,
            r#"{"event": 7}"#,
        ] {
            assert!(
                matches!(parse(bad), Err(QmpError::Protocol { .. })),
                "{bad}"
            );
        }
        // An error without the usual members still says what it was.
        let Ok(Message::Error { class, desc, .. }) = parse(r#"{"error": {"x": 1}}"#) else {
            panic!("an error reply");
        };
        assert_eq!((class.as_str(), desc.as_str()), ("?", r#"{"x":1}"#));
    }

    #[test]
    fn splits_lines_and_keeps_a_partial_one() {
        let mut buf = b"{\"return\": {}}\r\n{\"event\": \"A\"}\n{\"ret".to_vec();
        assert_eq!(take_line(&mut buf).as_deref(), Some("{\"return\": {}}"));
        assert_eq!(take_line(&mut buf).as_deref(), Some("{\"event\": \"A\"}"));
        assert_eq!(take_line(&mut buf), None);
        assert_eq!(buf, b"{\"ret");
    }

    #[test]
    fn command_lines_carry_id_and_arguments_only_when_given() {
        let l = command_line("quit", &Value::Null, 7);
        assert!(l.ends_with('\n'));
        let v: Value = serde_json::from_str(l.trim()).expect("json");
        assert_eq!(v, json!({"execute": "quit", "id": 7}));
        let l = command_line("block-job-cancel", &json!({"device": "m"}), 8);
        let v: Value = serde_json::from_str(l.trim()).expect("json");
        assert_eq!(v["arguments"], json!({"device": "m"}));
        assert_eq!(v["id"], 8);
    }

    /// A fake QEMU on a socket pair: greeting, an event before the reply,
    /// a stale reply, an error reply, and the event collected for later.
    #[test]
    fn execute_skips_events_and_stale_replies_and_reports_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("qmp.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            let mut buf = Vec::new();
            let mut next = |s: &mut UnixStream| -> Value {
                loop {
                    if let Some(l) = take_line(&mut buf) {
                        return serde_json::from_str(&l).expect("command");
                    }
                    let mut c = [0u8; 4096];
                    let n = s.read(&mut c).expect("read");
                    assert!(n > 0, "client closed early");
                    buf.extend_from_slice(&c[..n]);
                }
            };
            s.write_all(b"{\"QMP\": {\"capabilities\": []}}\n")
                .expect("w");
            let c = next(&mut s);
            assert_eq!(c["execute"], "qmp_capabilities");
            s.write_all(format!("{{\"return\": {{}}, \"id\": {}}}\n", c["id"]).as_bytes())
                .expect("w");
            let c = next(&mut s);
            let reply = format!(
                "{{\"event\": \"JOB_STATUS_CHANGE\", \"data\": {{\"status\": \"running\"}}}}\n\
                 {{\"return\": \"stale\", \"id\": 999}}\n\
                 {{\"return\": [1], \"id\": {}}}\n",
                c["id"]
            );
            s.write_all(reply.as_bytes()).expect("w");
            let c = next(&mut s);
            let reply = format!(
                "{{\"error\": {{\"class\": \"DeviceNotFound\", \"desc\": \"no job\"}}, \"id\": {}}}\n",
                c["id"]
            );
            s.write_all(reply.as_bytes()).expect("w");
        });
        let mut q = Qmp::connect(&path, Duration::from_secs(5)).expect("connect");
        let got = q
            .execute("query-block-jobs", &Value::Null, Duration::from_secs(5))
            .expect("reply");
        assert_eq!(got, json!([1]));
        let err = q
            .execute(
                "block-job-cancel",
                &json!({"device": "x"}),
                Duration::from_secs(5),
            )
            .expect_err("refused");
        assert!(
            matches!(&err, QmpError::Command { class, .. } if class == "DeviceNotFound"),
            "{err}"
        );
        let e = q
            .wait_event(&["JOB_STATUS_CHANGE"], Duration::from_secs(1))
            .expect("collected event");
        assert_eq!(e.data["status"], "running");
        server.join().expect("fake QEMU");
        // The fake QEMU is gone: the next wait ends, it does not hang.
        assert!(matches!(
            q.wait_event(&["NEVER"], Duration::from_secs(2)),
            Err(QmpError::Closed { .. })
        ));
    }
}
