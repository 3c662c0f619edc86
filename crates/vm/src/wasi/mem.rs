//! Bounds-checked access to guest linear memory. A bad pointer is the guest's `EFAULT`, never a
//! host panic.

use super::errno::{self, Errno};

pub struct GuestMem<'a>(pub &'a mut [u8]);

impl GuestMem<'_> {
    fn range(&self, ptr: u32, len: u32) -> Result<std::ops::Range<usize>, Errno> {
        let start = ptr as usize;
        let end = start.checked_add(len as usize).ok_or(errno::FAULT)?;
        if end > self.0.len() {
            return Err(errno::FAULT);
        }
        Ok(start..end)
    }
    pub fn slice(&self, ptr: u32, len: u32) -> Result<&[u8], Errno> {
        let r = self.range(ptr, len)?;
        Ok(&self.0[r])
    }
    pub fn slice_mut(&mut self, ptr: u32, len: u32) -> Result<&mut [u8], Errno> {
        let r = self.range(ptr, len)?;
        Ok(&mut self.0[r])
    }
    pub fn read_u32(&self, ptr: u32) -> Result<u32, Errno> {
        Ok(u32::from_le_bytes(
            self.slice(ptr, 4)?.try_into().expect("4 bytes"),
        ))
    }
    pub fn read_u64(&self, ptr: u32) -> Result<u64, Errno> {
        Ok(u64::from_le_bytes(
            self.slice(ptr, 8)?.try_into().expect("8 bytes"),
        ))
    }
    pub fn read_u16(&self, ptr: u32) -> Result<u16, Errno> {
        Ok(u16::from_le_bytes(
            self.slice(ptr, 2)?.try_into().expect("2 bytes"),
        ))
    }
    pub fn read_u8(&self, ptr: u32) -> Result<u8, Errno> {
        Ok(self.slice(ptr, 1)?[0])
    }
    pub fn write_u8(&mut self, ptr: u32, v: u8) -> Result<(), Errno> {
        self.slice_mut(ptr, 1)?[0] = v;
        Ok(())
    }
    pub fn write_u16(&mut self, ptr: u32, v: u16) -> Result<(), Errno> {
        self.slice_mut(ptr, 2)?.copy_from_slice(&v.to_le_bytes());
        Ok(())
    }
    pub fn write_u32(&mut self, ptr: u32, v: u32) -> Result<(), Errno> {
        self.slice_mut(ptr, 4)?.copy_from_slice(&v.to_le_bytes());
        Ok(())
    }
    pub fn write_u64(&mut self, ptr: u32, v: u64) -> Result<(), Errno> {
        self.slice_mut(ptr, 8)?.copy_from_slice(&v.to_le_bytes());
        Ok(())
    }
    pub fn write_bytes(&mut self, ptr: u32, bytes: &[u8]) -> Result<(), Errno> {
        self.slice_mut(ptr, bytes.len() as u32)?
            .copy_from_slice(bytes);
        Ok(())
    }
    /// Reads an iovec array: (pointer, length) pairs.
    pub fn iovecs(&self, iovs: u32, count: u32) -> Result<Vec<(u32, u32)>, Errno> {
        if count > super::IOVECS_MAX {
            return Err(errno::INVAL);
        }
        (0..count)
            .map(|i| {
                Ok((
                    self.read_u32(iovs + i * 8)?,
                    self.read_u32(iovs + i * 8 + 4)?,
                ))
            })
            .collect()
    }
    /// Concatenates the bytes of an iovec array (for writes), bounded by `max` bytes.
    pub fn gather(&self, iovs: u32, count: u32, max: usize) -> Result<Vec<u8>, Errno> {
        let mut out = Vec::new();
        for (ptr, len) in self.iovecs(iovs, count)? {
            let take = (len as usize).min(max - out.len());
            out.extend_from_slice(self.slice(ptr, take as u32)?);
            if out.len() == max {
                break;
            }
        }
        Ok(out)
    }
    /// Spreads `data` over an iovec array (for reads); returns the bytes placed.
    pub fn scatter(&mut self, iovs: &[(u32, u32)], data: &[u8]) -> Result<usize, Errno> {
        let mut done = 0;
        for &(ptr, len) in iovs {
            if done == data.len() {
                break;
            }
            let take = (len as usize).min(data.len() - done);
            self.write_bytes(ptr, &data[done..done + take])?;
            done += take;
        }
        Ok(done)
    }
    pub fn string(&self, ptr: u32, len: u32) -> Result<String, Errno> {
        if len as usize > crate::vdisk::PATH_BYTES_MAX {
            return Err(errno::NAMETOOLONG);
        }
        String::from_utf8(self.slice(ptr, len)?.to_vec()).map_err(|_| errno::INVAL)
    }
}
