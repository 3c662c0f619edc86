//! The log channel's I/O edge: the reader thread, the handshake, frame encoding.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::collections::VecDeque;
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver};
use ftvm_repl::wire::{Decoder, Frame, Hello, Message, Role as WireRole};

use super::{Node, CHANNEL_READ_BYTES};
use crate::vmdef::FtDef;

/// Most decoded messages queued from the reader to the driver.
pub const READER_QUEUE_MESSAGES_MAX: usize = 4096;
/// How long a handshake may take.
pub const HANDSHAKE_TIMEOUT_MS: u64 = 5_000;

pub enum FromPeer {
    /// Every frame one read of the socket completed, in order: one wake-up of the driver per
    /// read, not per frame, so a burst is handled (and acked) as one.
    Frames(Vec<Frame>),
    /// The channel ended: EOF, a read error, a corrupt frame or a stale epoch.
    Closed(String),
}

pub fn approx_size(msg: &Message) -> u64 {
    match msg {
        Message::Records { records, .. } => {
            records.iter().map(|r| r.len() as u64 + 4).sum::<u64>() + 36
        }
        _ => 48,
    }
}

pub fn config(ft: &FtDef) -> ftvm_repl::LinkConfig {
    ftvm_repl::LinkConfig {
        heartbeat_interval_ms: ft.heartbeat_ms,
        failure_timeout_ms: ft.failure_timeout_ms,
        lag_target_ms: ft.lag_target_ms,
        ..ftvm_repl::LinkConfig::default()
    }
}

/// Reads frames off the channel (epochs are checked by the link state machines). A corrupt frame
/// ends the channel: it is never applied, and nothing after it can be trusted.
pub fn spawn_reader(mut stream: TcpStream) -> Receiver<FromPeer> {
    let (tx, rx) = bounded(READER_QUEUE_MESSAGES_MAX);
    std::thread::Builder::new()
        .name("ftvm-log-reader".into())
        .spawn(move || {
            let mut decoder = Decoder::new();
            let mut buf = vec![0u8; CHANNEL_READ_BYTES];
            loop {
                let n = match stream.read(&mut buf) {
                    Ok(0) => {
                        let _ = tx.send(FromPeer::Closed("the peer closed the connection".into()));
                        return;
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        let _ = tx.send(FromPeer::Closed(format!("read error: {e}")));
                        return;
                    }
                };
                decoder.push(&buf[..n]);
                let mut frames = Vec::new();
                loop {
                    match decoder.next_frame() {
                        Ok(Some(frame)) => frames.push(frame),
                        Ok(None) => break,
                        Err(e) => {
                            // The good frames before it still count; nothing after it does.
                            if !frames.is_empty() {
                                let _ = tx.send(FromPeer::Frames(std::mem::take(&mut frames)));
                            }
                            eprintln!("ftvm: corrupt log-channel frame detected, not applied: {e}");
                            let _ = tx.send(FromPeer::Closed(format!("corrupt frame: {e}")));
                            let _ = stream.shutdown(std::net::Shutdown::Both);
                            return;
                        }
                    }
                }
                if !frames.is_empty() && tx.send(FromPeer::Frames(frames)).is_err() {
                    return;
                }
            }
        })
        .expect("spawn reader");
    rx
}

/// The reader's output, frame by frame for the handshake: frames that arrived in the same read
/// as the handshake's last one stay in `pending` for the driver.
pub struct Inbox {
    pub rx: Receiver<FromPeer>,
    pub pending: VecDeque<Frame>,
}

impl Inbox {
    pub fn new(rx: Receiver<FromPeer>) -> Inbox {
        Inbox {
            rx,
            pending: VecDeque::new(),
        }
    }

    /// Waits (bounded) for the next frame during a handshake.
    pub fn next_frame(&mut self) -> Result<Frame, String> {
        if let Some(f) = self.pending.pop_front() {
            return Ok(f);
        }
        match self.rx.recv_timeout(Duration::from_millis(HANDSHAKE_TIMEOUT_MS)) {
            Ok(FromPeer::Frames(frames)) => {
                self.pending.extend(frames);
                self.pending
                    .pop_front()
                    .ok_or_else(|| "the reader sent an empty batch".to_string())
            }
            Ok(FromPeer::Closed(why)) => Err(why),
            Err(_) => Err(format!(
                "no handshake from the peer within {HANDSHAKE_TIMEOUT_MS} ms"
            )),
        }
    }
}

pub fn write_frame(stream: &TcpStream, frame: &Frame) -> std::io::Result<()> {
    let bytes = frame
        .encode()
        .expect("frames built by ftvm are within the wire limits");
    let mut s = stream;
    s.write_all(&bytes)
}

/// Writes `frames` with one write.
pub fn write_frames(stream: &TcpStream, frames: &[Frame]) -> std::io::Result<()> {
    let mut bytes = Vec::new();
    for frame in frames {
        bytes.extend_from_slice(
            &frame
                .encode()
                .expect("frames built by ftvm are within the wire limits"),
        );
    }
    let mut s = stream;
    s.write_all(&bytes)
}

/// Of several acks queued to go out together only the last is kept: acks are cumulative.
pub fn coalesce_acks(frames: &mut Vec<Frame>) {
    let is_ack = |f: &Frame| matches!(f.message, Message::Ack { .. });
    if let Some(last) = frames.iter().rposition(is_ack) {
        let mut i = 0;
        frames.retain(|f| {
            i += 1;
            i - 1 == last || !is_ack(f)
        });
    }
}

pub fn hello(node: &Node, config: [u8; 32], disk: [u8; 32]) -> Hello {
    Hello {
        vm_id: node.vm_id.clone(),
        role: WireRole::Primary,
        config_hash: config,
        disk_hash: disk,
        start_seq: 1,
    }
}

pub fn expect(node: &Node, config: [u8; 32], disk: [u8; 32]) -> ftvm_repl::BackupExpect {
    ftvm_repl::BackupExpect {
        vm_id: node.vm_id.clone(),
        config_hash: config,
        disk_hash: disk,
        next_seq: 1,
    }
}
