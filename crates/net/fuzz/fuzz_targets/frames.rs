//! Feeds arbitrary frames, timer calls and guest calls to one `NetStack` and checks that it
//! never panics and keeps every table within its limits.
//!
//! Input format (so the fuzzer can learn structure): a sequence of records
//! `[op: u8][len: u16 little-endian][len bytes]`. `op % 4`: 0 = receive the bytes as a frame,
//! 1 = advance time by `len` milliseconds and poll, 2 = guest: accept everything and send the bytes on every
//! socket, 3 = guest: read from every socket, closing it on end of stream or error.

#![no_main]

use ftvm_net::{NetError, NetStack, NicConfig, SocketId};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let cfg = NicConfig {
        mac: [0x02, 0, 0, 0, 0, 0x01],
        ip: [198, 18, 0, 1],
        prefix_len: 24,
        gateway: Some([198, 18, 0, 254]),
        mtu: 1500,
    };
    let mut s = NetStack::new(cfg, 1);
    let listener = s.listen(80, 8).expect("a fresh stack accepts a listener");
    let mut socks: Vec<SocketId> = Vec::new();
    let mut now: u64 = 0;
    let mut buf = [0u8; 2048];
    let mut rest = data;
    while rest.len() >= 3 {
        let (op, len) = (rest[0], usize::from(u16::from_le_bytes([rest[1], rest[2]])));
        let end = (3 + len).min(rest.len());
        let body = &rest[3..end];
        rest = &rest[end..];
        match op % 4 {
            0 => s.receive_frame(body, now),
            1 => {
                now += len as u64 * 1_000_000;
                s.poll(now);
            }
            2 => {
                while let Ok(id) = s.accept(listener) {
                    socks.push(id);
                }
                for &id in &socks {
                    let _ = s.send(id, body, now);
                }
            }
            _ => {
                socks.retain(|&id| match s.recv(id, &mut buf, op & 0x80 != 0) {
                    Ok(0) | Err(NetError::ConnReset | NetError::TimedOut) => {
                        s.close(id, now);
                        false
                    }
                    _ => true,
                });
            }
        }
        s.drain_frames().for_each(drop);
        s.check_invariants();
    }
    // Whatever state we reached must survive a snapshot round trip.
    let restored = NetStack::restore(&s.save()).expect("a saved state restores");
    assert!(restored == s);
});
