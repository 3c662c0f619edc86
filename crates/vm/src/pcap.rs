//! A capture of the VM's NIC in the classic pcap format, stamped with *virtual* time, for
//! debugging: `ftvm replay --pcap FILE` shows every frame the VM took in and sent out, exactly
//! as the recorded run saw them, for tcpdump or tshark to read. A capture is a side channel of
//! the host: nothing the guest can observe depends on it, and a write error only ends it.

use std::io::Write;

/// pcap's magic for microsecond timestamps, written in our (little-endian) byte order.
const PCAP_MAGIC_USEC: u32 = 0xa1b2_c3d4;
/// LINKTYPE_ETHERNET.
const LINKTYPE_ETHERNET: u32 = 1;
/// Frames longer than this are cut in the capture (their original length is kept).
pub const PCAP_SNAPLEN: u32 = 65_535;

pub struct Capture {
    out: Option<Box<dyn Write + Send>>,
}

impl Capture {
    /// Starts a capture: writes the pcap file header.
    pub fn new(mut out: Box<dyn Write + Send>) -> std::io::Result<Capture> {
        let mut h = Vec::with_capacity(24);
        h.extend_from_slice(&PCAP_MAGIC_USEC.to_le_bytes());
        h.extend_from_slice(&2u16.to_le_bytes());
        h.extend_from_slice(&4u16.to_le_bytes());
        h.extend_from_slice(&0i32.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&PCAP_SNAPLEN.to_le_bytes());
        h.extend_from_slice(&LINKTYPE_ETHERNET.to_le_bytes());
        out.write_all(&h)?;
        Ok(Capture { out: Some(out) })
    }

    /// Adds one frame seen at virtual time `now_ns`.
    pub fn frame(&mut self, now_ns: u64, frame: &[u8]) {
        let Some(out) = self.out.as_mut() else { return };
        let kept = frame.len().min(PCAP_SNAPLEN as usize);
        let mut r = Vec::with_capacity(16 + kept);
        r.extend_from_slice(&((now_ns / 1_000_000_000) as u32).to_le_bytes());
        r.extend_from_slice(&((now_ns % 1_000_000_000 / 1_000) as u32).to_le_bytes());
        r.extend_from_slice(&(kept as u32).to_le_bytes());
        r.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        r.extend_from_slice(&frame[..kept]);
        if let Err(e) = out.write_all(&r) {
            eprintln!("ftvm: the packet capture stopped: {e}");
            self.out = None;
        }
    }

    pub fn flush(&mut self) {
        if let Some(out) = self.out.as_mut() {
            let _ = out.flush();
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn records_carry_virtual_time_and_lengths() {
        let buf = Shared::default();
        let mut c = Capture::new(Box::new(buf.clone())).unwrap();
        c.frame(3_000_123_456, &[1, 2, 3]);
        let b = buf.0.lock().unwrap().clone();
        assert_eq!(b.len(), 24 + 16 + 3);
        assert_eq!(&b[0..4], &PCAP_MAGIC_USEC.to_le_bytes());
        assert_eq!(u32::from_le_bytes(b[24..28].try_into().unwrap()), 3);
        assert_eq!(u32::from_le_bytes(b[28..32].try_into().unwrap()), 123);
        assert_eq!(u32::from_le_bytes(b[32..36].try_into().unwrap()), 3);
        assert_eq!(&b[40..], &[1, 2, 3]);
    }
}
