//! The console output port: guest stdout and stderr bytes to this process's own.

use std::io::Write;

use crate::gate::{Output, OutputPort};
use crate::VmError;

/// Writes console output at once; frames go to an optional transmit function.
pub struct ConsolePort {
    pub frames: Option<Box<dyn FnMut(Vec<u8>) + Send>>,
}

impl OutputPort for ConsolePort {
    fn emit(&mut self, output: Output, _seq: u64) -> Result<(), VmError> {
        match output {
            Output::Console { fd: 1, bytes } => {
                let mut out = std::io::stdout().lock();
                // A closed stdout (a pipe whose reader left) loses output the user no longer
                // wants; it is not a reason to stop the VM.
                let _ = out.write_all(&bytes).and_then(|_| out.flush());
            }
            Output::Console { bytes, .. } => {
                let _ = std::io::stderr().lock().write_all(&bytes);
            }
            Output::Frame(frame) => {
                if let Some(tx) = self.frames.as_mut() {
                    tx(frame);
                }
            }
        }
        Ok(())
    }
}
