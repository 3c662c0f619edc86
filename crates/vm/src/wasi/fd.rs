//! The VM's file-descriptor table: plain, serializable data.
//!
//! Host file handles are a cache (`#[serde(skip)]`): after a restore on another host they are
//! reopened from the path, which is all the state there is.

use std::collections::BTreeMap;
use std::fs::File;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::errno::{self, Errno};

/// Most descriptors a guest may hold open.
pub const FDS_MAX: u32 = 1024;

pub const FDFLAG_APPEND: u16 = 1;
pub const FDFLAG_NONBLOCK: u16 = 4;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum FdKind {
    Stdin,
    Stdout,
    Stderr,
    /// A directory of preopen `root`; `preopen` is the guest path for preopened ones.
    Dir {
        root: u32,
        rel: String,
        preopen: Option<String>,
    },
    File {
        root: u32,
        rel: String,
        pos: u64,
        read: bool,
        write: bool,
        #[serde(skip)]
        handle: Option<Arc<File>>,
    },
    /// A preopened TCP listener of the VM's netstack.
    Listener {
        id: u32,
        port: u16,
    },
    /// A TCP connection of the VM's netstack.
    Socket {
        id: u32,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FdEntry {
    pub kind: FdKind,
    pub flags: u16,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FdTable {
    fds: BTreeMap<u32, FdEntry>,
}

impl FdTable {
    pub fn get(&self, fd: u32) -> Result<&FdEntry, Errno> {
        self.fds.get(&fd).ok_or(errno::BADF)
    }
    pub fn get_mut(&mut self, fd: u32) -> Result<&mut FdEntry, Errno> {
        self.fds.get_mut(&fd).ok_or(errno::BADF)
    }
    /// Inserts at the lowest free descriptor, as POSIX does.
    pub fn insert(&mut self, kind: FdKind, flags: u16) -> Result<u32, Errno> {
        let mut fd = 0;
        for &used in self.fds.keys() {
            if used != fd {
                break;
            }
            fd += 1;
        }
        if fd >= FDS_MAX {
            return Err(errno::MFILE);
        }
        self.fds.insert(fd, FdEntry { kind, flags });
        Ok(fd)
    }
    pub fn insert_at(&mut self, fd: u32, entry: FdEntry) {
        self.fds.insert(fd, entry);
    }
    pub fn remove(&mut self, fd: u32) -> Result<FdEntry, Errno> {
        self.fds.remove(&fd).ok_or(errno::BADF)
    }
    pub fn iter(&self) -> impl Iterator<Item = (&u32, &FdEntry)> {
        self.fds.iter()
    }
}
