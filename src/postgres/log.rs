//! Postgres's server log, re-emitted on pgwarden's stdout as one JSON object per record.
//!
//! The logging collector writes `jsonlog` records into a named pipe that pgwarden created in
//! its run directory (and anything not in the log protocol, such as an archive command's
//! stderr, into a second pipe). One JSON record is one line, so multi-line messages stay one
//! record. Messages from before the collector starts (configuration errors) arrive on the
//! postmaster's own stderr. Each stream is pumped by a dedicated thread with blocking reads:
//! a slow stdout never stalls the async runtime, and the pipes are never left unread (a full
//! pipe would block Postgres's logger).
//!
//! The most recent warnings and errors are kept in a small ring so that a failed start can be
//! reported with Postgres's own message.

use std::collections::VecDeque;
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde_json::{json, Map, Value};

use crate::logging::{now_rfc3339, LogFormat};
use crate::postgres::conf::{log_dir, LOG_FILE_STEM};

/// Longest record passed through whole; longer ones are cut (and marked) to bound memory.
const MAX_RECORD: u64 = 1 << 20;
/// How many recent problem messages are kept for error reports.
const RECENT: usize = 16;

/// Handle to the log pumps; cheap to clone.
#[derive(Clone)]
pub struct ServerLog {
    recent: Arc<Mutex<VecDeque<String>>>,
    format: LogFormat,
}

impl ServerLog {
    /// Creates the pipes under `<run_dir>/log` and starts pumping them.
    pub fn start(run_dir: &Path, format: LogFormat) -> std::io::Result<ServerLog> {
        let dir = log_dir(run_dir);
        std::fs::create_dir_all(&dir)?;
        let log = ServerLog {
            recent: Arc::default(),
            format,
        };
        for (suffix, stream) in [("json", Stream::Json), ("log", Stream::Text)] {
            let path = dir.join(format!("{LOG_FILE_STEM}.{suffix}"));
            ensure_fifo(&path)?;
            // Opened read-write: the pipe then always has a writer, so reads block instead of
            // returning end-of-file between postmaster restarts.
            let pipe = OpenOptions::new().read(true).write(true).open(&path)?;
            log.pump(pipe, stream, format!("pgwarden-log-{suffix}"))?;
        }
        Ok(log)
    }

    /// Pumps a postmaster's own stdout or stderr until it closes.
    pub fn attach(&self, pipe: impl Read + Send + 'static, name: &str) {
        if let Err(e) = self.pump(pipe, Stream::Text, format!("pgwarden-{name}")) {
            tracing::error!(error = %e, "cannot start a log pump thread");
        }
    }

    /// Forgets earlier problems (called before each start).
    pub fn clear_recent(&self) {
        self.lock().clear();
    }

    /// The most recent warnings and errors, oldest first.
    pub fn recent(&self) -> Vec<String> {
        self.lock().iter().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<String>> {
        self.recent.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn remember(&self, message: String) {
        let mut recent = self.lock();
        if recent.len() == RECENT {
            recent.pop_front();
        }
        recent.push_back(message);
    }

    fn pump(
        &self,
        pipe: impl Read + Send + 'static,
        stream: Stream,
        name: String,
    ) -> std::io::Result<()> {
        let this = self.clone();
        std::thread::Builder::new()
            .name(name)
            .stack_size(128 * 1024)
            .spawn(move || {
                let mut reader = BufReader::with_capacity(64 * 1024, pipe);
                let mut line = Vec::with_capacity(4096);
                loop {
                    line.clear();
                    match (&mut reader).take(MAX_RECORD).read_until(b'\n', &mut line) {
                        Ok(0) => return,
                        Ok(_) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(_) => return,
                    }
                    let complete = line.last() == Some(&b'\n');
                    if !complete && line.len() as u64 == MAX_RECORD {
                        skip_rest_of_line(&mut reader);
                    }
                    let text = String::from_utf8_lossy(&line);
                    let text = text.trim_end_matches(['\n', '\r']);
                    if text.is_empty() {
                        continue;
                    }
                    let record = match stream {
                        Stream::Json => Record::from_jsonlog(text, complete),
                        Stream::Text => Record::from_text(text),
                    };
                    if record.is_problem() {
                        this.remember(record.summary());
                    }
                    record.emit(this.format);
                }
            })?;
        Ok(())
    }
}

fn skip_rest_of_line(reader: &mut impl BufRead) {
    loop {
        let (found, used) = match reader.fill_buf() {
            Ok([]) | Err(_) => return,
            Ok(buf) => match buf.iter().position(|b| *b == b'\n') {
                Some(i) => (true, i + 1),
                None => (false, buf.len()),
            },
        };
        reader.consume(used);
        if found {
            return;
        }
    }
}

fn ensure_fifo(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_fifo() => return Ok(()),
        // Something else at our own pipe's name in our run directory (a leftover log file
        // from a configuration without pgwarden): replace it.
        Ok(_) => std::fs::remove_file(path)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600))
        .map_err(std::io::Error::from)
}

#[derive(Clone, Copy)]
enum Stream {
    /// jsonlog records from the logging collector.
    Json,
    /// Plain stderr-format text: before the collector starts, or raw writes of child processes.
    Text,
}

/// One server log record, normalised.
struct Record {
    timestamp: String,
    severity: String,
    message: String,
    fields: Map<String, Value>,
}

impl Record {
    fn from_jsonlog(text: &str, complete: bool) -> Record {
        match serde_json::from_str::<Map<String, Value>>(text) {
            Ok(mut fields) => {
                let take = |f: &mut Map<String, Value>, k: &str| match f.remove(k) {
                    Some(Value::String(s)) => Some(s),
                    Some(other) => Some(other.to_string()),
                    None => None,
                };
                let timestamp = take(&mut fields, "timestamp")
                    .map(|t| pg_timestamp_to_rfc3339(&t))
                    .unwrap_or_else(now_rfc3339);
                let severity = take(&mut fields, "error_severity").unwrap_or_else(|| "LOG".into());
                let message = take(&mut fields, "message").unwrap_or_default();
                // Friendlier names for the fields people filter on.
                for (from, to) in [
                    ("state_code", "sql_state"),
                    ("dbname", "database"),
                    ("user", "user"),
                ] {
                    if let Some(v) = fields.remove(from) {
                        fields.insert(to.into(), v);
                    }
                }
                Record {
                    timestamp,
                    severity,
                    message,
                    fields,
                }
            }
            Err(_) => {
                let mut fields = Map::new();
                fields.insert("stream".into(), json!("jsonlog"));
                fields.insert("truncated".into(), json!(!complete));
                Record {
                    timestamp: now_rfc3339(),
                    severity: "LOG".into(),
                    message: text.to_string(),
                    fields,
                }
            }
        }
    }

    /// Parses `<prefix> SEVERITY:  message` as far as it can; the whole line is the message
    /// when there is no severity.
    fn from_text(text: &str) -> Record {
        const SEVERITIES: &[&str] = &[
            "PANIC",
            "FATAL",
            "ERROR",
            "WARNING",
            "NOTICE",
            "LOG",
            "INFO",
            "DETAIL",
            "HINT",
            "CONTEXT",
            "STATEMENT",
            "DEBUG1",
            "DEBUG2",
            "DEBUG3",
            "DEBUG4",
            "DEBUG5",
        ];
        let found = SEVERITIES.iter().find_map(|sev| {
            let tag = format!("{sev}:  ");
            text.find(&tag).map(|at| (*sev, &text[at + tag.len()..]))
        });
        let (severity, message) = match found {
            Some((sev, msg)) => (sev.to_string(), msg.to_string()),
            None => ("LOG".to_string(), text.to_string()),
        };
        let mut fields = Map::new();
        fields.insert("stream".into(), json!("stderr"));
        Record {
            timestamp: now_rfc3339(),
            severity,
            message,
            fields,
        }
    }

    fn level(&self) -> &'static str {
        match self.severity.as_str() {
            "PANIC" | "FATAL" | "ERROR" => "ERROR",
            "WARNING" => "WARN",
            s if s.starts_with("DEBUG") => "DEBUG",
            _ => "INFO",
        }
    }

    fn is_problem(&self) -> bool {
        let stderr = self.fields.get("stream") == Some(&json!("stderr"));
        // A standby says that its history forked off the primary's at LOG level; it is the
        // problem the HA watchdog must see (see `ha::stream`).
        let diverged = self
            .message
            .contains("forked off current database system timeline");
        stderr || diverged || matches!(self.level(), "ERROR" | "WARN")
    }

    fn summary(&self) -> String {
        let mut s = format!("{}: {}", self.severity, self.message);
        if let Some(Value::String(detail)) = self.fields.get("detail") {
            s.push_str(&format!(" ({detail})"));
        }
        s
    }

    fn emit(&self, format: LogFormat) {
        let mut line = match format {
            LogFormat::Json => {
                let mut postgres = self.fields.clone();
                postgres.insert("severity".into(), json!(self.severity));
                // Written by hand to keep the key order of pgwarden's own lines.
                format!(
                    "{{\"timestamp\":{},\"level\":\"{}\",\"message\":{},\"target\":\"postgres\",\"postgres\":{}}}",
                    Value::from(self.timestamp.as_str()),
                    self.level(),
                    Value::from(self.message.as_str()),
                    Value::Object(postgres),
                )
            }
            LogFormat::Human => format!(
                "{} {:>5} postgres: {}",
                self.timestamp,
                self.level(),
                self.summary()
            ),
        };
        line.push('\n');
        // One write per record under stdout's lock: never interleaved with pgwarden's own lines.
        let _ = std::io::stdout().lock().write_all(line.as_bytes());
    }
}

/// `2026-11-25 10:00:00.123 UTC` -> `2026-11-25T10:00:00.123Z`; other zones kept as written.
fn pg_timestamp_to_rfc3339(ts: &str) -> String {
    match ts.strip_suffix(" UTC") {
        Some(t) => format!("{}Z", t.replacen(' ', "T", 1)),
        None => ts.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonlog_records_keep_their_fields() {
        let r = Record::from_jsonlog(
            r#"{"timestamp":"2026-11-25 10:00:00.123 UTC","user":"app","dbname":"shop","pid":42,"error_severity":"ERROR","state_code":"42P01","message":"relation \"x\" does not exist","statement":"select *\nfrom x"}"#,
            true,
        );
        assert_eq!(r.timestamp, "2026-11-25T10:00:00.123Z");
        assert_eq!(r.level(), "ERROR");
        assert_eq!(r.fields["sql_state"], json!("42P01"));
        assert_eq!(r.fields["database"], json!("shop"));
        assert_eq!(r.fields["statement"], json!("select *\nfrom x"));
        assert!(r.is_problem());
    }

    #[test]
    fn stderr_lines_are_parsed() {
        let r = Record::from_text(
            "2026-11-25 10:00:00.000 UTC [7] FATAL:  configuration file \"x\" contains errors",
        );
        assert_eq!(r.severity, "FATAL");
        assert_eq!(r.message, "configuration file \"x\" contains errors");
        let r = Record::from_text("some raw output");
        assert_eq!(r.severity, "LOG");
        assert_eq!(r.message, "some raw output");
    }

    #[test]
    fn broken_json_is_passed_through() {
        let r = Record::from_jsonlog("{not json", false);
        assert_eq!(r.message, "{not json");
        assert_eq!(r.fields["truncated"], json!(true));
    }
}
