//! A task's stdout and stderr: read from its pipes line by line, numbered in arrival
//! order across both streams, kept in memory (bounded) and appended to a file under the
//! state directory, and pushed to followers.

use std::collections::VecDeque;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::sync::broadcast;

use super::state::now_unix_ms;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub seq: u64,
    pub stream: Stream,
    pub at_unix_ms: i64,
    pub line: Vec<u8>,
}

/// Lines kept in memory per task; the file keeps everything.
const KEPT_LINES: usize = 10_000;
/// Longest line kept whole; longer ones are cut (a task printing without newlines must
/// not grow celld without bound).
pub const MAX_LINE: usize = 16 * 1024;

struct Inner {
    lines: VecDeque<LogLine>,
    next_seq: u64,
    path: Option<PathBuf>,
    /// Open only while a pipe is being read, so finished tasks hold no descriptor.
    file: Option<std::fs::File>,
    pumps: usize,
}

/// Room for followers that fall behind; a lagging follower skips ahead rather than
/// holding memory for it.
const FOLLOW_BUFFER: usize = 256;

/// The log of one task, shared by its pipe readers and its readers over gRPC.
#[derive(Clone)]
pub struct TaskLog {
    inner: Arc<Mutex<Inner>>,
    tx: broadcast::Sender<LogLine>,
}

impl TaskLog {
    /// `file`: where lines are appended (None keeps them in memory only).
    pub fn new(path: Option<PathBuf>) -> Self {
        let (tx, _) = broadcast::channel(FOLLOW_BUFFER);
        Self {
            inner: Arc::new(Mutex::new(Inner {
                lines: VecDeque::new(),
                next_seq: 1,
                path,
                file: None,
                pumps: 0,
            })),
            tx,
        }
    }

    /// The file lines are appended to, if any.
    pub fn path(&self) -> Option<PathBuf> {
        self.inner.lock().ok().and_then(|i| i.path.clone())
    }

    fn pump_started(&self) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.pumps += 1;
            if inner.file.is_none() {
                inner.file = inner.path.as_ref().and_then(|p| {
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(p)
                        .ok()
                });
            }
        }
    }

    fn pump_ended(&self) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.pumps = inner.pumps.saturating_sub(1);
            if inner.pumps == 0 {
                inner.file = None;
            }
        }
    }

    pub fn push(&self, stream: Stream, line: Vec<u8>) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        let entry = LogLine {
            seq: inner.next_seq,
            stream,
            at_unix_ms: now_unix_ms(),
            line,
        };
        inner.next_seq += 1;
        if let Some(f) = inner.file.as_mut() {
            let tag = match stream {
                Stream::Stdout => "out",
                Stream::Stderr => "err",
            };
            let _ = write!(f, "{} {} ", entry.at_unix_ms, tag);
            let _ = f.write_all(&entry.line);
            let _ = f.write_all(b"\n");
        }
        if inner.lines.len() >= KEPT_LINES {
            inner.lines.pop_front();
        }
        inner.lines.push_back(entry.clone());
        // Sent under the lock so a follower that subscribed under it sees no gap.
        let _ = self.tx.send(entry);
    }

    /// The kept lines (the last `tail` when non-zero) and, atomically with them, a
    /// receiver for every later line.
    pub fn snapshot(&self, tail: usize) -> (Vec<LogLine>, broadcast::Receiver<LogLine>) {
        let Ok(inner) = self.inner.lock() else {
            return (Vec::new(), self.tx.subscribe());
        };
        let skip = if tail == 0 {
            0
        } else {
            inner.lines.len().saturating_sub(tail)
        };
        (
            inner.lines.iter().skip(skip).cloned().collect(),
            self.tx.subscribe(),
        )
    }

    /// Reads a pipe until EOF, one entry per line.
    pub async fn pump<R: tokio::io::AsyncRead + Unpin>(self, stream: Stream, reader: R) {
        self.pump_started();
        self.pump_lines(stream, reader).await;
        self.pump_ended();
    }

    async fn pump_lines<R: tokio::io::AsyncRead + Unpin>(&self, stream: Stream, reader: R) {
        let mut reader = BufReader::new(reader);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            // Bounded read: take at most MAX_LINE bytes before a newline.
            let n = match (&mut reader)
                .take(MAX_LINE as u64)
                .read_until(b'\n', &mut buf)
                .await
            {
                Ok(n) => n,
                Err(_) => break,
            };
            if n == 0 {
                break;
            }
            if buf.last() == Some(&b'\n') {
                buf.pop();
            }
            self.push(stream, std::mem::take(&mut buf));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_keep_their_order_and_followers_see_new_ones() {
        let log = TaskLog::new(None);
        log.push(Stream::Stdout, b"one".to_vec());
        log.push(Stream::Stderr, b"two".to_vec());
        let (lines, mut rx) = log.snapshot(0);
        assert_eq!(lines.iter().map(|l| l.seq).collect::<Vec<_>>(), [1, 2]);
        log.push(Stream::Stdout, b"three".to_vec());
        let next = rx.recv().await.unwrap();
        assert_eq!((next.seq, next.line.as_slice()), (3, &b"three"[..]));
        let (tail, _) = log.snapshot(1);
        assert_eq!(tail.len(), 1);
        assert_eq!(tail[0].seq, 3);
    }

    #[tokio::test]
    async fn pump_splits_lines_and_cuts_long_ones() {
        let log = TaskLog::new(None);
        let mut data = b"a\nb\n".to_vec();
        data.extend(std::iter::repeat_n(b'x', MAX_LINE + 10));
        log.clone().pump(Stream::Stdout, &data[..]).await;
        let (lines, _) = log.snapshot(0);
        assert_eq!(lines[0].line, b"a");
        assert_eq!(lines[1].line, b"b");
        assert_eq!(lines[2].line.len(), MAX_LINE);
        assert_eq!(lines[3].line.len(), 10);
    }
}
