//! The QMP client of `bench compare migrate`, for qemu-storage-daemon and for our
//! backend's control socket: commands one at a time, events kept until asked for, every
//! read bounded by a deadline (a block job may run long; a dead daemon must not hang the
//! run), and the block job events a migration waits for.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::compare::CompareError;

/// An event: its name and data.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Event {
    pub(super) name: String,
    pub(super) data: Value,
}

/// One message from a QMP server.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum QmpMsg {
    /// The greeting sent on connecting.
    Greeting,
    /// A command's success and its value.
    Return(Value),
    /// A command's failure: "class: description".
    Error(String),
    /// An asynchronous event.
    Event(Event),
}

/// Parses one line from a QMP server.
pub(super) fn parse_qmp(line: &[u8]) -> Result<QmpMsg, String> {
    let v: Value = serde_json::from_slice(line)
        .map_err(|e| format!("bad QMP line {:?}: {e}", String::from_utf8_lossy(line)))?;
    if v.get("QMP").is_some() {
        Ok(QmpMsg::Greeting)
    } else if let Some(r) = v.get("return") {
        Ok(QmpMsg::Return(r.clone()))
    } else if let Some(e) = v.get("error") {
        Ok(QmpMsg::Error(format!(
            "{}: {}",
            e["class"].as_str().unwrap_or("?"),
            e["desc"].as_str().unwrap_or("?")
        )))
    } else if let Some(name) = v.get("event").and_then(Value::as_str) {
        Ok(QmpMsg::Event(Event {
            name: name.to_string(),
            data: v.get("data").cloned().unwrap_or(Value::Null),
        }))
    } else {
        Err(format!("unexpected QMP message {v}"))
    }
}

/// What a block job event means for job `job`.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum JobEvent {
    /// BLOCK_JOB_READY: a mirror is in sync.
    Ready,
    /// BLOCK_JOB_COMPLETED without an error: bytes the job had to copy and copied.
    Completed { len: u64, offset: u64 },
    /// The job failed or was cancelled.
    Failed(String),
    /// Another job's event, or one that changes nothing.
    Other,
}

/// Classifies an event for job `job`.
pub(super) fn job_event(ev: &Event, job: &str) -> JobEvent {
    if ev.data.get("device").and_then(Value::as_str) != Some(job) {
        return JobEvent::Other;
    }
    let num = |k: &str| ev.data.get(k).and_then(Value::as_u64).unwrap_or(0);
    match ev.name.as_str() {
        "BLOCK_JOB_READY" => JobEvent::Ready,
        "BLOCK_JOB_COMPLETED" => match ev.data.get("error").and_then(Value::as_str) {
            Some(e) => JobEvent::Failed(e.to_string()),
            None => JobEvent::Completed {
                len: num("len"),
                offset: num("offset"),
            },
        },
        "BLOCK_JOB_CANCELLED" => JobEvent::Failed("cancelled".into()),
        "BLOCK_JOB_ERROR" => JobEvent::Failed(format!(
            "I/O error on {} ({})",
            ev.data["operation"].as_str().unwrap_or("?"),
            ev.data["action"].as_str().unwrap_or("?")
        )),
        _ => JobEvent::Other,
    }
}

/// The dirty byte count and granularity of bitmap `name` on node `node`, from
/// `query-named-block-nodes`.
pub(super) fn bitmap_info(nodes: &Value, node: &str, name: &str) -> Option<(u64, u64)> {
    let b = nodes
        .as_array()?
        .iter()
        .find(|n| n["node-name"].as_str() == Some(node))?["dirty-bitmaps"]
        .as_array()?
        .iter()
        .find(|b| b["name"].as_str() == Some(name))?;
    Some((b["count"].as_u64()?, b["granularity"].as_u64()?))
}

/// A QMP connection: commands one at a time, events kept until asked for.
pub(super) struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Bytes of a line not yet complete (a read can time out mid-line).
    pending: Vec<u8>,
    events: VecDeque<Event>,
    /// Which daemon, for messages.
    name: String,
}

/// How long a command may take to answer (block jobs run in the background; commands
/// return at once).
pub(super) const QMP_TIMEOUT: Duration = Duration::from_secs(60);

impl Qmp {
    pub(super) fn new(stream: UnixStream, name: &str) -> Result<Self, CompareError> {
        // Short reads so that deadlines are checked.
        stream.set_read_timeout(Some(Duration::from_millis(200)))?;
        Ok(Qmp {
            writer: stream.try_clone()?,
            reader: BufReader::new(stream),
            pending: Vec::new(),
            events: VecDeque::new(),
            name: name.to_string(),
        })
    }

    /// Reads the greeting and leaves capabilities negotiation, as every QMP client must.
    pub(super) fn handshake(&mut self) -> Result<(), CompareError> {
        match self.read_msg(Instant::now() + QMP_TIMEOUT)? {
            QmpMsg::Greeting => {}
            m => {
                return Err(CompareError::Run(format!(
                    "{}: expected the QMP greeting, got {m:?}",
                    self.name
                )))
            }
        }
        self.execute("qmp_capabilities", json!({})).map(drop)
    }

    pub(super) fn read_msg(&mut self, deadline: Instant) -> Result<QmpMsg, CompareError> {
        loop {
            match self.reader.read_until(b'\n', &mut self.pending) {
                Ok(0) => {
                    return Err(CompareError::Run(format!(
                        "{}: QMP connection closed",
                        self.name
                    )))
                }
                Ok(_) if self.pending.ends_with(b"\n") => {
                    let line = std::mem::take(&mut self.pending);
                    return parse_qmp(&line)
                        .map_err(|e| CompareError::Run(format!("{}: {e}", self.name)));
                }
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(e.into()),
            }
            if Instant::now() > deadline {
                return Err(CompareError::Run(format!(
                    "{}: no answer over QMP in time",
                    self.name
                )));
            }
        }
    }

    /// Runs a command and returns its value; events that arrive meanwhile are kept.
    pub(super) fn execute(&mut self, cmd: &str, args: Value) -> Result<Value, CompareError> {
        self.try_execute(cmd, args)?
            .map_err(|e| CompareError::Run(format!("{}: {cmd}: {e}", self.name)))
    }

    /// Runs a command: Ok(Err(why)) when the server refuses it ("class: description"),
    /// for callers to whom a refusal is an answer (a mode not available yet).
    pub(super) fn try_execute(
        &mut self,
        cmd: &str,
        args: Value,
    ) -> Result<Result<Value, String>, CompareError> {
        let mut line = json!({"execute": cmd, "arguments": args}).to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes())?;
        let deadline = Instant::now() + QMP_TIMEOUT;
        loop {
            match self.read_msg(deadline)? {
                QmpMsg::Return(v) => return Ok(Ok(v)),
                QmpMsg::Error(e) => return Ok(Err(e)),
                QmpMsg::Event(ev) => self.events.push_back(ev),
                QmpMsg::Greeting => {}
            }
        }
    }

    /// The next event (kept ones first), waiting until `deadline`.
    pub(super) fn next_event(&mut self, deadline: Instant) -> Result<Event, CompareError> {
        loop {
            if let Some(ev) = self.events.pop_front() {
                return Ok(ev);
            }
            if let QmpMsg::Event(ev) = self.read_msg(deadline)? {
                return Ok(ev);
            }
        }
    }

    /// Waits for job `job` to become ready (`until_ready`) or to complete; fails when it
    /// fails, is cancelled or takes longer than `timeout`.
    pub(super) fn wait_job(
        &mut self,
        job: &str,
        until_ready: bool,
        timeout: Duration,
    ) -> Result<JobEvent, CompareError> {
        let deadline = Instant::now() + timeout;
        loop {
            let ev = self.next_event(deadline)?;
            match job_event(&ev, job) {
                JobEvent::Other => {}
                JobEvent::Ready if !until_ready => {}
                JobEvent::Completed { .. } if until_ready => {
                    return Err(CompareError::Run(format!(
                        "{}: job {job} completed before it was ready",
                        self.name
                    )))
                }
                JobEvent::Failed(e) => {
                    return Err(CompareError::Run(format!(
                        "{}: job {job} failed: {e}",
                        self.name
                    )))
                }
                done => return Ok(done),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qmp_lines() {
        assert_eq!(
            parse_qmp(br#"{"QMP": {"version": {}, "capabilities": ["oob"]}}"#),
            Ok(QmpMsg::Greeting)
        );
        assert_eq!(
            parse_qmp(b"{\"return\": {}}\r\n"),
            Ok(QmpMsg::Return(json!({})))
        );
        assert_eq!(
            parse_qmp(br#"{"error": {"class": "GenericError", "desc": "Node 'x' not found"}}"#),
            Ok(QmpMsg::Error("GenericError: Node 'x' not found".into()))
        );
        let ev = parse_qmp(
            br#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "BLOCK_JOB_READY", "data": {"device": "full", "len": 4096, "offset": 4096, "speed": 0, "type": "mirror"}}"#,
        );
        let Ok(QmpMsg::Event(ev)) = ev else {
            panic!("{ev:?}")
        };
        assert_eq!(ev.name, "BLOCK_JOB_READY");
        assert_eq!(job_event(&ev, "full"), JobEvent::Ready);
        assert_eq!(job_event(&ev, "other"), JobEvent::Other);
        assert!(parse_qmp(b"{\"what\": 1}").is_err());
        assert!(parse_qmp(b"{\"ret").is_err());
    }

    #[test]
    fn job_events() {
        let ev = |name: &str, data: Value| Event {
            name: name.into(),
            data,
        };
        assert_eq!(
            job_event(
                &ev(
                    "BLOCK_JOB_COMPLETED",
                    json!({"device": "ret", "len": 9, "offset": 9, "type": "backup"})
                ),
                "ret"
            ),
            JobEvent::Completed { len: 9, offset: 9 }
        );
        assert_eq!(
            job_event(
                &ev(
                    "BLOCK_JOB_COMPLETED",
                    json!({"device": "ret", "len": 9, "offset": 3, "error": "Input/output error"})
                ),
                "ret"
            ),
            JobEvent::Failed("Input/output error".into())
        );
        assert!(matches!(
            job_event(&ev("BLOCK_JOB_CANCELLED", json!({"device": "ret"})), "ret"),
            JobEvent::Failed(_)
        ));
        assert!(matches!(
            job_event(
                &ev(
                    "BLOCK_JOB_ERROR",
                    json!({"device": "ret", "operation": "write", "action": "report"})
                ),
                "ret"
            ),
            JobEvent::Failed(_)
        ));
        assert_eq!(
            job_event(
                &ev("JOB_STATUS_CHANGE", json!({"id": "ret", "status": "ready"})),
                "ret"
            ),
            JobEvent::Other
        );
    }

    #[test]
    fn bitmap_from_named_nodes() {
        let nodes = json!([
            {"node-name": "to-dst", "dirty-bitmaps": null},
            {"node-name": "src", "dirty-bitmaps": [
                {"name": "other", "count": 1, "granularity": 512},
                {"name": "ret", "recording": true, "count": 9240576, "granularity": 65536}
            ]}
        ]);
        assert_eq!(bitmap_info(&nodes, "src", "ret"), Some((9_240_576, 65_536)));
        assert_eq!(bitmap_info(&nodes, "src", "nope"), None);
        assert_eq!(bitmap_info(&nodes, "to-dst", "ret"), None);
    }
}
