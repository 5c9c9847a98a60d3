//! Whole-block I/O with O_DIRECT, shared by the `dir` and `block` backends.
//!
//! O_DIRECT bypasses the client page cache, so a read sees what the server or
//! device holds now (on NFS, what another host wrote a moment ago), and a
//! write followed by fdatasync is on stable storage when it returns. Where the
//! filesystem refuses O_DIRECT (EINVAL), we fail and name the path: a cached
//! heartbeat read would show a dead host alive, so there is no fallback.

use super::record::BLOCK_BYTES;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Records are readable by root only (they steer fencing).
pub const FILE_MODE: u32 = 0o600;

/// One block in memory, aligned as O_DIRECT requires.
#[derive(Clone)]
#[repr(C, align(4096))]
pub struct AlignedBlock(pub [u8; BLOCK_BYTES]);

impl AlignedBlock {
    pub fn zeroed() -> Box<AlignedBlock> {
        Box::new(AlignedBlock([0u8; BLOCK_BYTES]))
    }

    pub fn from_bytes(bytes: &[u8; BLOCK_BYTES]) -> Box<AlignedBlock> {
        let mut b = AlignedBlock::zeroed();
        b.0.copy_from_slice(bytes);
        b
    }
}

/// A buffer of any multiple of 512 bytes, aligned to 4096 as O_DIRECT
/// requires of memory (for sector-sized I/O on a block device: a Disk Paxos
/// area, one ballot sector, a run of blocks). No unsafe: a larger Vec and
/// the aligned window inside it.
pub struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    pub fn zeroed(len: usize) -> AlignedBuf {
        let raw = vec![0u8; len + BLOCK_BYTES];
        let start = raw.as_ptr().align_offset(BLOCK_BYTES);
        assert!(start < BLOCK_BYTES, "align_offset of a u8 pointer is below the alignment");
        AlignedBuf { raw, start, len }
    }

    pub fn from_slice(bytes: &[u8]) -> AlignedBuf {
        let mut b = AlignedBuf::zeroed(bytes.len());
        b.as_mut_slice().copy_from_slice(bytes);
        b
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DirectIoError {
    #[error(
        "{path}: the filesystem refuses O_DIRECT (EINVAL); havirt needs uncached I/O on shared storage, use a filesystem or device that supports it"
    )]
    Unsupported { path: PathBuf },
    #[error("{path}: {op} failed: {source}")]
    Io { op: &'static str, path: PathBuf, source: io::Error },
    #[error("{path}: short write at offset {offset}: {written} bytes written")]
    ShortWrite { path: PathBuf, offset: u64, written: usize },
    #[error("{path}: short read at offset {offset}: {read} of {wanted} bytes (past the end of the device?)")]
    ShortRead { path: PathBuf, offset: u64, read: usize, wanted: usize },
}

impl DirectIoError {
    fn from_io(op: &'static str, path: &Path, source: io::Error) -> DirectIoError {
        if source.raw_os_error() == Some(libc::EINVAL) {
            return DirectIoError::Unsupported { path: path.to_path_buf() };
        }
        DirectIoError::Io { op, path: path.to_path_buf(), source }
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, DirectIoError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    /// Read and write, creating the file (mode 0600) if missing.
    CreateReadWrite,
    /// Read and write an existing file or device.
    ReadWrite,
}

pub fn open(path: &Path, access: Access) -> Result<File, DirectIoError> {
    let mut o = OpenOptions::new();
    o.read(true).custom_flags(libc::O_DIRECT | libc::O_CLOEXEC);
    match access {
        Access::Read => {}
        Access::CreateReadWrite => {
            o.write(true).create(true).mode(FILE_MODE);
        }
        Access::ReadWrite => {
            o.write(true);
        }
    }
    o.open(path).map_err(|e| DirectIoError::from_io("open", path, e))
}

/// Reads the block at `offset`; returns it with the number of bytes read,
/// which is less than a block only at end of file. One read call: a second
/// one at an unaligned offset would fail under O_DIRECT, and a short read
/// that is not end of file then decodes as `Truncated` (rejected, retried at
/// the next poll).
pub fn read_block(file: &File, path: &Path, offset: u64) -> Result<(Box<AlignedBlock>, usize), DirectIoError> {
    let mut block = AlignedBlock::zeroed();
    loop {
        match file.read_at(&mut block.0, offset) {
            Ok(n) => return Ok((block, n)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(DirectIoError::from_io("read", path, e)),
        }
    }
}

/// Writes one block at `offset` in place, then fdatasync: on stable storage
/// when this returns.
pub fn write_block(file: &File, path: &Path, offset: u64, block: &AlignedBlock) -> Result<(), DirectIoError> {
    write_block_nosync(file, path, offset, block)?;
    sync(file, path)
}

/// As `write_block` without the fdatasync (for formatting many blocks).
pub fn write_block_nosync(file: &File, path: &Path, offset: u64, block: &AlignedBlock) -> Result<(), DirectIoError> {
    let written = loop {
        match file.write_at(&block.0, offset) {
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(DirectIoError::from_io("write", path, e)),
        }
    };
    if written != BLOCK_BYTES {
        return Err(DirectIoError::ShortWrite { path: path.to_path_buf(), offset, written });
    }
    Ok(())
}

/// Reads exactly `len` bytes at `offset` (both multiples of the device's
/// logical sector size) in one call; a short read is an error (past the end
/// of the device: the layout does not fit it).
pub fn read_exact_at(file: &File, path: &Path, offset: u64, len: usize) -> Result<AlignedBuf, DirectIoError> {
    let mut buf = AlignedBuf::zeroed(len);
    let n = loop {
        match file.read_at(buf.as_mut_slice(), offset) {
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(DirectIoError::from_io("read", path, e)),
        }
    };
    if n != len {
        return Err(DirectIoError::ShortRead { path: path.to_path_buf(), offset, read: n, wanted: len });
    }
    Ok(buf)
}

/// Writes `buf` at `offset` in one call, then fdatasync.
pub fn write_all_at(file: &File, path: &Path, offset: u64, buf: &AlignedBuf) -> Result<(), DirectIoError> {
    let written = loop {
        match file.write_at(buf.as_slice(), offset) {
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(DirectIoError::from_io("write", path, e)),
        }
    };
    if written != buf.as_slice().len() {
        return Err(DirectIoError::ShortWrite { path: path.to_path_buf(), offset, written });
    }
    sync(file, path)
}

pub fn sync(file: &File, path: &Path) -> Result<(), DirectIoError> {
    file.sync_data().map_err(|e| DirectIoError::Io { op: "fdatasync", path: path.to_path_buf(), source: e })
}

/// fsync of a directory, so that a newly created entry survives a crash.
pub fn sync_dir(dir: &Path) -> Result<(), DirectIoError> {
    let f =
        File::open(dir).map_err(|e| DirectIoError::Io { op: "open directory", path: dir.to_path_buf(), source: e })?;
    f.sync_all().map_err(|e| DirectIoError::Io { op: "fsync directory", path: dir.to_path_buf(), source: e })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn einval_names_the_path_and_has_no_fallback() {
        let e =
            DirectIoError::from_io("open", Path::new("/mnt/x/hosts/1.hb"), io::Error::from_raw_os_error(libc::EINVAL));
        assert!(matches!(&e, DirectIoError::Unsupported { path } if path == Path::new("/mnt/x/hosts/1.hb")));
        assert!(e.to_string().starts_with("/mnt/x/hosts/1.hb: the filesystem refuses O_DIRECT"));
        let e = DirectIoError::from_io("read", Path::new("/p"), io::Error::from_raw_os_error(libc::EIO));
        assert!(matches!(e, DirectIoError::Io { op: "read", .. }));
    }

    #[test]
    fn blocks_are_aligned_for_o_direct() {
        let b = AlignedBlock::zeroed();
        assert_eq!(std::ptr::from_ref(&b.0).addr() % BLOCK_BYTES, 0);
        assert_eq!(std::mem::size_of::<AlignedBlock>(), BLOCK_BYTES);
    }
}
