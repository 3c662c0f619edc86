//! Log sinks and sources backed by files: `ftvm run --record` and `ftvm replay`.

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::Path;

use ftvm_log::{write_header, Entry, LogHeader, LogReader};

use crate::gate::{LogSink, LogSource};
use crate::VmError;

/// Flush the file at least every this many buffered bytes, so a reader following the file (or a
/// post-mortem after a crash) sees recent entries.
pub const FILE_BUFFER_BYTES: usize = 64 << 10;

pub struct FileSink {
    out: BufWriter<File>,
    scratch: Vec<u8>,
    path: String,
}

impl FileSink {
    pub fn create(path: &Path, header: &LogHeader) -> Result<FileSink, VmError> {
        let file = File::create(path)
            .map_err(|e| VmError::LogWrite(format!("cannot create {}: {e}", path.display())))?;
        let mut out = BufWriter::with_capacity(FILE_BUFFER_BYTES, file);
        let name = path.display().to_string();
        write_header(&mut out, header).map_err(|e| VmError::LogWrite(format!("{name}: {e}")))?;
        out.flush()
            .map_err(|e| VmError::LogWrite(format!("{name}: {e}")))?;
        Ok(FileSink {
            out,
            scratch: Vec::new(),
            path: name,
        })
    }
}

impl LogSink for FileSink {
    fn append(&mut self, seq: u64, entry: &Entry) -> Result<(), VmError> {
        self.scratch.clear();
        entry.encode_framed(seq, &mut self.scratch);
        self.out
            .write_all(&self.scratch)
            .map_err(|e| VmError::LogWrite(format!("{}: {e}", self.path)))
    }
    fn flush(&mut self) -> Result<(), VmError> {
        self.out
            .flush()
            .map_err(|e| VmError::LogWrite(format!("{}: {e}", self.path)))
    }
}

impl Drop for FileSink {
    fn drop(&mut self) {
        let _ = self.out.flush();
    }
}

pub struct FileSource {
    reader: LogReader<BufReader<File>>,
}

impl FileSource {
    pub fn open(path: &Path) -> Result<FileSource, VmError> {
        let file = File::open(path)
            .map_err(|e| VmError::LogCorrupt(format!("cannot open {}: {e}", path.display())))?;
        let reader = LogReader::open(BufReader::new(file))
            .map_err(|e| VmError::LogCorrupt(format!("{}: {e}", path.display())))?;
        Ok(FileSource { reader })
    }
    pub fn header(&self) -> &LogHeader {
        self.reader.header()
    }
}

impl LogSource for FileSource {
    fn next_entry(&mut self) -> Result<Option<(u64, Entry)>, VmError> {
        self.reader
            .next_entry()
            .map_err(|e| VmError::LogCorrupt(e.to_string()))
    }
}
