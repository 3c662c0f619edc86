//! The ftvm log: what the primary records and the backup (or a debugging replay) consumes.
//!
//! A log is a header followed by entries. The same framed entries are written to a log file and
//! streamed over the log channel, so a file can be read while it is still being written, and a
//! truncated tail (a crash mid-write) is reported with its byte offset instead of being guessed at.
//!
//! File layout (integers little-endian):
//!
//! ```text
//! +----------------+-------------+----------------+---------------------+-----------+
//! | magic 8 bytes  | version u32 | header_len u32 | header (JSON)       | crc32 u32 |
//! | "FTVMLOG\0"    |             |                | LogHeader           | of header |
//! +----------------+-------------+----------------+---------------------+-----------+
//! | entry 1 | entry 2 | ...      (see `entry` for one entry's framing)
//! ```
//!
//! Versioning: `FORMAT_VERSION` is bumped for any change a reader of the previous version would
//! misread or refuse. A reader takes the versions from `OLDEST_READABLE_VERSION` to its own, where
//! every older log means what it meant when it was written, and refuses others with a clear error;
//! there is no silent upgrade.

pub mod entry;
pub mod spec;

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

pub use entry::{Checkpoint, ControlOp, Entry, EntryKind, ENTRY_BYTES_MAX, ENTRY_FRAMING_BYTES};
pub use spec::{Limits, NicSpec, VmSpec};

pub const MAGIC: [u8; 8] = *b"FTVMLOG\0";
/// 2: `HostError` and `HostShort` entries (what the host's disk did not do is a gate input),
/// which a version-1 log lacks even where its guest met a disk error.
/// 3: a path's check for host symlinks is a disk operation of its own, so the operation numbers
/// of a version-2 log's `HostError` and `HostShort` entries do not line up.
/// 4: an `Input` entry carries up to 256 frames (`entry::INPUT_FRAMES_MAX`; 64 before), which a
/// version-3 reader refuses mid-log. A version-3 log reads the same under version 4.
pub const FORMAT_VERSION: u32 = 4;
/// The oldest version this build reads: versions 3 and 4 differ only in that limit.
pub const OLDEST_READABLE_VERSION: u32 = 3;
/// Largest JSON header we accept.
pub const HEADER_BYTES_MAX: usize = 1 << 20;

/// Identifies the VM a log belongs to. A replay against anything else is refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogHeader {
    /// blake3 of the module bytes, hex.
    pub module_hash: String,
    /// Hash of the starting disk contents (paths, sizes, bytes), hex.
    pub disk_hash: String,
    pub spec: VmSpec,
    /// The engine version that recorded it; replay needs the same one.
    pub engine: String,
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("the log is corrupt at byte {offset}: {what}")]
    Corrupt { offset: u64, what: String },
    #[error("the log is truncated at byte {offset} ({what}); it was cut short or is still being written")]
    Truncated { offset: u64, what: String },
    #[error("this is not an ftvm log (bad magic); check the file name")]
    BadMagic,
    #[error("the log has format version {found}, this ftvm reads versions {oldest} to {newest}")]
    BadVersion {
        found: u32,
        oldest: u32,
        newest: u32,
    },
    #[error("log entry {found} follows entry {previous} at byte {offset}: entries are missing or out of order")]
    BadSequence {
        offset: u64,
        previous: u64,
        found: u64,
    },
    #[error("I/O error on the log: {0}")]
    Io(#[from] std::io::Error),
}

/// Writes the header. Call once, first.
pub fn write_header<W: Write>(out: &mut W, header: &LogHeader) -> Result<(), LogError> {
    let json = serde_json::to_vec(header).expect("a LogHeader always serializes");
    assert!(
        json.len() <= HEADER_BYTES_MAX,
        "log header exceeds HEADER_BYTES_MAX"
    );
    out.write_all(&MAGIC)?;
    out.write_all(&FORMAT_VERSION.to_le_bytes())?;
    out.write_all(&(json.len() as u32).to_le_bytes())?;
    out.write_all(&json)?;
    out.write_all(&crc32fast::hash(&json).to_le_bytes())?;
    Ok(())
}

/// Reads a log from any byte source, checking framing, checksums and sequence numbers.
pub struct LogReader<R: Read> {
    input: R,
    offset: u64,
    last_seq: u64,
    header: LogHeader,
    version: u32,
}

impl<R: Read> LogReader<R> {
    pub fn open(mut input: R) -> Result<Self, LogError> {
        let mut magic = [0u8; 8];
        read_exact_or_truncated(&mut input, &mut magic, 0, "in the magic number")?;
        if magic != MAGIC {
            return Err(LogError::BadMagic);
        }
        let mut word = [0u8; 4];
        read_exact_or_truncated(&mut input, &mut word, 8, "in the format version")?;
        let version = u32::from_le_bytes(word);
        if !(OLDEST_READABLE_VERSION..=FORMAT_VERSION).contains(&version) {
            return Err(LogError::BadVersion {
                found: version,
                oldest: OLDEST_READABLE_VERSION,
                newest: FORMAT_VERSION,
            });
        }
        read_exact_or_truncated(&mut input, &mut word, 12, "in the header length")?;
        let len = u32::from_le_bytes(word) as usize;
        if len > HEADER_BYTES_MAX {
            return Err(LogError::Corrupt {
                offset: 12,
                what: format!("header length {len} exceeds {HEADER_BYTES_MAX}"),
            });
        }
        let mut json = vec![0u8; len];
        read_exact_or_truncated(&mut input, &mut json, 16, "in the header")?;
        let header_end = 16 + len as u64;
        read_exact_or_truncated(&mut input, &mut word, header_end, "in the header checksum")?;
        if u32::from_le_bytes(word) != crc32fast::hash(&json) {
            return Err(LogError::Corrupt {
                offset: 16,
                what: "header checksum mismatch".into(),
            });
        }
        let header: LogHeader = serde_json::from_slice(&json).map_err(|e| LogError::Corrupt {
            offset: 16,
            what: format!("header is not valid: {e}"),
        })?;
        Ok(LogReader {
            input,
            offset: header_end + 4,
            last_seq: 0,
            header,
            version,
        })
    }

    pub fn header(&self) -> &LogHeader {
        &self.header
    }

    /// The format version the log was written in.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Byte offset of the next entry.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Sequence number of the last entry returned.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// The next entry, `None` at a clean end, an error for a truncated or corrupt one.
    pub fn next_entry(&mut self) -> Result<Option<(u64, Entry)>, LogError> {
        let mut framing = [0u8; ENTRY_FRAMING_BYTES];
        let got = read_up_to(&mut self.input, &mut framing)?;
        if got == 0 {
            return Ok(None);
        }
        if got < ENTRY_FRAMING_BYTES {
            return Err(LogError::Truncated {
                offset: self.offset,
                what: format!(
                    "entry {} has {got} of its {ENTRY_FRAMING_BYTES} framing bytes",
                    self.last_seq + 1
                ),
            });
        }
        let (len, crc) = parse_framing(&framing, self.offset)?;
        let mut body = vec![0u8; len];
        let got = read_up_to(&mut self.input, &mut body)?;
        if got < len {
            return Err(LogError::Truncated {
                offset: self.offset,
                what: format!(
                    "entry {} has {got} of its {len} body bytes",
                    self.last_seq + 1
                ),
            });
        }
        let (seq, entry) = check_and_decode(&body, crc, self.offset)?;
        if seq != self.last_seq + 1 {
            return Err(LogError::BadSequence {
                offset: self.offset,
                previous: self.last_seq,
                found: seq,
            });
        }
        self.offset += (ENTRY_FRAMING_BYTES + len) as u64;
        self.last_seq = seq;
        Ok(Some((seq, entry)))
    }
}

/// Decodes one framed entry as carried by the log channel. `offset` is for messages only.
pub fn decode_framed(bytes: &[u8], offset: u64) -> Result<(u64, Entry), LogError> {
    if bytes.len() < ENTRY_FRAMING_BYTES {
        return Err(LogError::Truncated {
            offset,
            what: "record shorter than its framing".into(),
        });
    }
    let (len, crc) = parse_framing(
        bytes[..ENTRY_FRAMING_BYTES].try_into().expect("8 bytes"),
        offset,
    )?;
    let body = &bytes[ENTRY_FRAMING_BYTES..];
    if body.len() != len {
        return Err(LogError::Corrupt {
            offset,
            what: format!("record says {len} body bytes, carries {}", body.len()),
        });
    }
    check_and_decode(body, crc, offset)
}

fn parse_framing(
    framing: &[u8; ENTRY_FRAMING_BYTES],
    offset: u64,
) -> Result<(usize, u32), LogError> {
    let len = u32::from_le_bytes(framing[0..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(framing[4..8].try_into().expect("4 bytes"));
    if len > ENTRY_BYTES_MAX {
        return Err(LogError::Corrupt {
            offset,
            what: format!("entry length {len} exceeds {ENTRY_BYTES_MAX}"),
        });
    }
    Ok((len, crc))
}

fn check_and_decode(body: &[u8], crc: u32, offset: u64) -> Result<(u64, Entry), LogError> {
    if crc32fast::hash(body) != crc {
        return Err(LogError::Corrupt {
            offset,
            what: "entry checksum mismatch".into(),
        });
    }
    Entry::decode_body(body, offset)
}

fn read_up_to<R: Read>(input: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

fn read_exact_or_truncated<R: Read>(
    input: &mut R,
    buf: &mut [u8],
    offset: u64,
    what: &str,
) -> Result<(), LogError> {
    if read_up_to(input, buf)? < buf.len() {
        return Err(LogError::Truncated {
            offset,
            what: format!("ends {what}"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> LogHeader {
        LogHeader {
            module_hash: "ab".repeat(32),
            disk_hash: "cd".repeat(32),
            spec: VmSpec {
                args: vec!["hello.wasm".into(), "x".into()],
                env: vec![("A".into(), "1".into())],
                preopens: vec!["/data".into()],
                listeners: vec![6379],
                nic: None,
                limits: Limits::default(),
            },
            engine: "test".into(),
        }
    }

    fn sample_entries() -> Vec<Entry> {
        vec![
            Entry::Clock {
                clock_id: 1,
                ns: 123_456_789,
            },
            Entry::Random {
                bytes: vec![1, 2, 3, 4],
            },
            Entry::Input {
                now_ns: 42,
                frames: vec![vec![0xff; 60], vec![1; 1514]],
            },
            Entry::Input {
                now_ns: 43,
                frames: vec![],
            },
            Entry::Checkpoint(Checkpoint {
                events: 4096,
                output_bytes: 17,
                output_digest: [7; 32],
                state_hash: [9; 32],
                fuel: Some(99),
            }),
            Entry::Control(ControlOp::PowerOff),
            Entry::Trap {
                message: "unreachable".into(),
            },
            Entry::HostError {
                call: 7,
                op: 1,
                errno: 51,
            },
            Entry::HostShort {
                call: 9,
                op: 0,
                done: 4096,
            },
            Entry::Exit { code: 3 },
        ]
    }

    fn encode_log(entries: &[Entry]) -> Vec<u8> {
        let mut out = Vec::new();
        write_header(&mut out, &header()).unwrap();
        for (i, e) in entries.iter().enumerate() {
            e.encode_framed(i as u64 + 1, &mut out);
        }
        out
    }

    #[test]
    fn round_trip_every_kind() {
        let entries = sample_entries();
        let bytes = encode_log(&entries);
        let mut reader = LogReader::open(&bytes[..]).unwrap();
        assert_eq!(reader.header(), &header());
        for (i, want) in entries.iter().enumerate() {
            let (seq, got) = reader.next_entry().unwrap().unwrap();
            assert_eq!(seq, i as u64 + 1);
            assert_eq!(&got, want);
        }
        assert!(reader.next_entry().unwrap().is_none());
    }

    #[test]
    fn truncation_at_every_byte_is_reported_not_misread() {
        let entries = sample_entries();
        let bytes = encode_log(&entries);
        for cut in 0..bytes.len() {
            let slice = &bytes[..cut];
            let result = LogReader::open(slice).and_then(|mut r| {
                let mut n = 0;
                while let Some((_, e)) = r.next_entry()? {
                    assert_eq!(e, entries[n], "a truncated log returned a wrong entry");
                    n += 1;
                }
                Ok(n)
            });
            match result {
                // A cut exactly between entries reads as a shorter, valid log.
                Ok(n) => assert!(n < entries.len()),
                Err(LogError::Truncated { .. }) => {}
                Err(other) => panic!("cut at {cut}: expected truncation, got {other}"),
            }
        }
    }

    #[test]
    fn every_bit_flip_in_entries_is_detected() {
        let entries = sample_entries();
        let bytes = encode_log(&entries);
        let first_entry = LogReader::open(&bytes[..]).unwrap().offset() as usize;
        for byte in first_entry..bytes.len() {
            for bit in 0..8 {
                let mut bad = bytes.clone();
                bad[byte] ^= 1 << bit;
                let mut reader = LogReader::open(&bad[..]).unwrap();
                let mut read_all_intact = true;
                let mut n = 0;
                loop {
                    match reader.next_entry() {
                        Ok(Some((_, e))) => {
                            if e != entries[n] {
                                read_all_intact = false;
                            }
                            n += 1;
                        }
                        Ok(None) => break,
                        Err(_) => {
                            read_all_intact = false;
                            break;
                        }
                    }
                }
                assert!(
                    !read_all_intact || n != entries.len(),
                    "flip at byte {byte} bit {bit} went unnoticed"
                );
                // And no flipped entry may ever be returned as if valid.
            }
        }
    }

    #[test]
    fn sequence_gap_is_detected() {
        let mut out = Vec::new();
        write_header(&mut out, &header()).unwrap();
        Entry::Exit { code: 0 }.encode_framed(1, &mut out);
        Entry::Exit { code: 0 }.encode_framed(3, &mut out);
        let mut reader = LogReader::open(&out[..]).unwrap();
        reader.next_entry().unwrap();
        assert!(matches!(
            reader.next_entry(),
            Err(LogError::BadSequence {
                previous: 1,
                found: 3,
                ..
            })
        ));
    }

    #[test]
    fn header_corruption_and_wrong_files_are_refused() {
        let bytes = encode_log(&sample_entries());
        assert!(matches!(
            LogReader::open(&b"not a log at all"[..]),
            Err(LogError::BadMagic)
        ));
        let mut bad = bytes.clone();
        bad[20] ^= 1;
        assert!(matches!(
            LogReader::open(&bad[..]),
            Err(LogError::Corrupt { .. })
        ));
        let mut bad = bytes.clone();
        bad[8] = 9;
        assert!(matches!(
            LogReader::open(&bad[..]),
            Err(LogError::BadVersion { found: 9, .. })
        ));
        let mut bad = bytes.clone();
        bad[8] = 2;
        assert!(matches!(
            LogReader::open(&bad[..]),
            Err(LogError::BadVersion { found: 2, .. })
        ));
    }

    #[test]
    fn a_version_3_log_reads_as_it_was_written() {
        let entries = sample_entries();
        let mut bytes = encode_log(&entries);
        bytes[8..12].copy_from_slice(&3u32.to_le_bytes());
        let mut reader = LogReader::open(&bytes[..]).unwrap();
        assert_eq!(reader.version(), 3);
        for want in &entries {
            assert_eq!(&reader.next_entry().unwrap().unwrap().1, want);
        }
        assert!(reader.next_entry().unwrap().is_none());
    }

    #[test]
    fn an_input_entry_holds_up_to_its_frame_limit_and_no_more() {
        // The largest Input entry a wake-up can make fits one entry, and reads back whole.
        let full = Entry::Input {
            now_ns: 1,
            frames: vec![vec![0x5a; entry::FRAME_BYTES_MAX]; entry::INPUT_FRAMES_MAX],
        };
        let mut buf = Vec::new();
        full.encode_framed(1, &mut buf);
        assert!(buf.len() - ENTRY_FRAMING_BYTES <= ENTRY_BYTES_MAX);
        assert_eq!(decode_framed(&buf, 0).unwrap(), (1, full));
        // One frame more is a corrupt entry, whatever its checksum says.
        let over = Entry::Input {
            now_ns: 1,
            frames: vec![vec![1; 60]; entry::INPUT_FRAMES_MAX + 1],
        };
        let mut buf = Vec::new();
        over.encode_framed(1, &mut buf);
        let err = decode_framed(&buf, 0).unwrap_err();
        assert!(
            matches!(&err, LogError::Corrupt { what, .. } if what.contains("frames (max")),
            "{err}"
        );
    }

    #[test]
    fn framed_records_decode_alone() {
        let mut buf = Vec::new();
        Entry::Clock { clock_id: 0, ns: 5 }.encode_framed(7, &mut buf);
        assert_eq!(
            decode_framed(&buf, 0).unwrap(),
            (7, Entry::Clock { clock_id: 0, ns: 5 })
        );
        buf[10] ^= 0x10;
        assert!(decode_framed(&buf, 0).is_err());
    }
}
