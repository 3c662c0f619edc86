//! The log channel's I/O edge: the reader thread, the handshake, frame encoding.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use ftvm_repl::wire::{Decoder, Frame, Hello, Message, Role as WireRole};

use super::{Node, CHANNEL_READ_BYTES};
use crate::vmdef::FtDef;

/// How long a handshake may take.
pub const HANDSHAKE_TIMEOUT_MS: u64 = 5_000;

pub enum FromPeer {
    /// Every frame one read of the socket completed, in order: one wake-up of the driver per
    /// read, not per frame, so a burst is handled (and acked) as one.
    Frames(Vec<Frame>),
    /// The channel ended: EOF or a read error. Everything it carried was delivered before.
    Closed(String),
    /// A frame failed its checksum. Its bytes had reached this host (and were acknowledged by
    /// its TCP), so the peer may have acted on them.
    Corrupt(String),
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

/// The handshake side of the channel: reads frames synchronously (bounded by
/// [`HANDSHAKE_TIMEOUT_MS`]); the decoder, with whatever arrived after the handshake's last
/// frame, then goes to the reader thread.
pub struct Handshaker {
    stream: TcpStream,
    decoder: Decoder,
    buf: Vec<u8>,
}

impl Handshaker {
    pub fn new(stream: TcpStream) -> std::io::Result<Handshaker> {
        stream.set_read_timeout(Some(Duration::from_millis(HANDSHAKE_TIMEOUT_MS)))?;
        Ok(Handshaker {
            stream,
            decoder: Decoder::new(),
            buf: vec![0u8; CHANNEL_READ_BYTES],
        })
    }

    pub fn next_frame(&mut self) -> Result<Frame, String> {
        loop {
            match self.decoder.next_frame() {
                Ok(Some(frame)) => return Ok(frame),
                Ok(None) => {}
                Err(e) => return Err(format!("corrupt frame: {e}")),
            }
            match (&self.stream).read(&mut self.buf) {
                Ok(0) => return Err("the peer closed the connection".into()),
                Ok(n) => self.decoder.push(&self.buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(format!(
                        "no handshake from the peer within {HANDSHAKE_TIMEOUT_MS} ms"
                    ))
                }
                Err(e) => return Err(format!("read error: {e}")),
            }
        }
    }

    /// Starts the reader thread. `deliver` runs on it for every batch (all frames one read
    /// completed, in order) and for the channel's end; it returns false to stop reading. The
    /// reader does not read again until `deliver` returns, so a slow consumer pushes back on the
    /// peer through TCP.
    pub fn spawn_reader<F>(self, mut deliver: F) -> std::io::Result<std::thread::JoinHandle<()>>
    where
        F: FnMut(FromPeer) -> bool + Send + 'static,
    {
        let Handshaker {
            stream,
            mut decoder,
            mut buf,
        } = self;
        stream.set_read_timeout(None)?;
        std::thread::Builder::new()
            .name("ftvm-log-reader".into())
            .spawn(move || loop {
                let mut frames = Vec::new();
                let mut corrupt = None;
                loop {
                    match decoder.next_frame() {
                        Ok(Some(frame)) => frames.push(frame),
                        Ok(None) => break,
                        Err(e) => {
                            corrupt = Some(e);
                            break;
                        }
                    }
                }
                // The good frames before a corrupt one still count; nothing after it does.
                if !frames.is_empty() && !deliver(FromPeer::Frames(frames)) {
                    return;
                }
                if let Some(e) = corrupt {
                    eprintln!("ftvm: corrupt log-channel frame detected, not applied: {e}");
                    let _ = stream.shutdown(std::net::Shutdown::Both);
                    deliver(FromPeer::Corrupt(e.to_string()));
                    return;
                }
                match (&stream).read(&mut buf) {
                    Ok(0) => {
                        deliver(FromPeer::Closed("the peer closed the connection".into()));
                        return;
                    }
                    Ok(n) => decoder.push(&buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        deliver(FromPeer::Closed(format!("read error: {e}")));
                        return;
                    }
                }
            })
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
