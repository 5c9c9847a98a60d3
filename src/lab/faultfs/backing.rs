//! The passthrough: FUSE operations done on the backing directory.
//!
//! Inodes are tracked by path relative to the backing root, and numbered by
//! the backing file's (device, inode), so that every name of one file, and
//! every lookup of it, reaches the same kernel inode: file locks, which the
//! kernel keeps for a FUSE mount itself (faultfs does not negotiate
//! FUSE_POSIX_LOCKS or FUSE_FLOCK_LOCKS), then conflict between all callers.
//!
//! A file opened with O_DIRECT through the mount is opened with O_DIRECT on
//! the backing side too, and its I/O goes through 4 KiB-aligned buffers:
//! what havirt writes reaches the backing disk before the reply, and an
//! unaligned O_DIRECT access fails with EINVAL as on a real filesystem.
//! The mount itself never caches file data (FOPEN_DIRECT_IO on every open).
//!
//! Every operation returns the errno the caller sees.

use fuser::{Errno, FileAttr, FileType, INodeNo, TimeOrNow};
use nix::sys::stat::{Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, Metadata, OpenOptions, Permissions};
use std::io;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Open flags passed on to the backing file, beside the access mode.
const PASSED_OPEN_FLAGS: i32 = libc::O_APPEND | libc::O_DIRECT | libc::O_DSYNC | libc::O_SYNC | libc::O_TRUNC;
const ROOT_INO: u64 = INodeNo::ROOT.0;

type Key = (u64, u64);

struct Node {
    /// Relative to the backing root; empty for the root.
    rel: PathBuf,
    key: Key,
    /// Lookups the kernel holds (FUSE forget protocol).
    lookups: u64,
}

struct OpenFile {
    file: File,
    /// The network namespace (inode) of the process that opened it.
    opener: Option<u64>,
}

/// One entry of a directory listing, as taken at opendir.
#[derive(Clone, Debug)]
pub struct DirEntry {
    pub ino: u64,
    pub kind: FileType,
    pub name: OsString,
}

#[derive(Default)]
struct Tables {
    nodes: BTreeMap<u64, Node>,
    by_key: BTreeMap<Key, u64>,
    next_ino: u64,
    files: BTreeMap<u64, Arc<OpenFile>>,
    dirs: BTreeMap<u64, Arc<[DirEntry]>>,
    next_fh: u64,
}

pub struct Backing {
    root: PathBuf,
    tables: Mutex<Tables>,
}

/// Who made a request: new files are given to them, as a local filesystem
/// would (faultfs itself runs as root).
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

/// What setattr changes; `None` leaves a field alone.
#[derive(Clone, Copy, Debug, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeOrNow>,
    pub mtime: Option<TimeOrNow>,
}

pub struct Statfs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

/// A buffer whose start is aligned for O_DIRECT (the store's own).
pub use crate::store::direct::AlignedBuf;

fn errno(e: io::Error) -> Errno {
    Errno::from(e)
}

fn nix_errno(e: nix::errno::Errno) -> Errno {
    Errno::from_i32(e as i32)
}

fn saturate_u32(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

fn time(secs: i64, nsecs: i64) -> SystemTime {
    let nanos = u32::try_from(nsecs).unwrap_or(0);
    match u64::try_from(secs) {
        Ok(s) => UNIX_EPOCH + Duration::new(s, nanos),
        Err(_) => UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + Duration::from_nanos(u64::from(nanos)),
    }
}

fn kind_of(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        libc::S_IFSOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

pub fn attr(ino: u64, m: &Metadata) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: m.size(),
        blocks: m.blocks(),
        atime: time(m.atime(), m.atime_nsec()),
        mtime: time(m.mtime(), m.mtime_nsec()),
        ctime: time(m.ctime(), m.ctime_nsec()),
        crtime: UNIX_EPOCH,
        kind: kind_of(m.mode()),
        perm: u16::try_from(m.mode() & 0o7777).unwrap_or(0),
        nlink: saturate_u32(m.nlink()),
        uid: m.uid(),
        gid: m.gid(),
        rdev: saturate_u32(m.rdev()),
        blksize: saturate_u32(m.blksize()),
        flags: 0,
    }
}

fn key_of(m: &Metadata) -> Key {
    (m.dev(), m.ino())
}

/// `rel` moved from `from` to `to` (itself or something under it).
fn moved(rel: &Path, from: &Path, to: &Path) -> Option<PathBuf> {
    rel.strip_prefix(from).ok().map(|rest| if rest.as_os_str().is_empty() { to.to_path_buf() } else { to.join(rest) })
}

fn timespec(t: Option<TimeOrNow>) -> TimeSpec {
    match t {
        None => TimeSpec::UTIME_OMIT,
        Some(TimeOrNow::Now) => TimeSpec::UTIME_NOW,
        Some(TimeOrNow::SpecificTime(t)) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => TimeSpec::from_duration(d),
            Err(_) => TimeSpec::new(0, 0),
        },
    }
}

/// Gives a file faultfs just made to its caller; best effort (a non-root
/// faultfs cannot, and then the file is its own, as with any FUSE server).
fn give_to(file: &File, caller: Caller) {
    let _ = std::os::unix::fs::fchown(file, Some(caller.uid), Some(caller.gid));
}

impl Backing {
    pub fn new(root: PathBuf) -> io::Result<Backing> {
        let m = fs::metadata(&root)?;
        let mut t = Tables { next_ino: ROOT_INO + 1, next_fh: 1, ..Tables::default() };
        t.nodes.insert(ROOT_INO, Node { rel: PathBuf::new(), key: key_of(&m), lookups: 1 });
        t.by_key.insert(key_of(&m), ROOT_INO);
        Ok(Backing { root, tables: Mutex::new(t) })
    }

    fn tables(&self) -> MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn rel(&self, ino: u64) -> Result<PathBuf, Errno> {
        self.tables().nodes.get(&ino).map(|n| n.rel.clone()).ok_or(Errno::ENOENT)
    }

    fn abs(&self, ino: u64) -> Result<PathBuf, Errno> {
        Ok(self.root.join(self.rel(ino)?))
    }

    fn child(&self, parent: u64, name: &OsStr) -> Result<PathBuf, Errno> {
        if name.as_encoded_bytes().contains(&b'/') {
            return Err(Errno::EINVAL);
        }
        Ok(self.rel(parent)?.join(name))
    }

    /// Counts one kernel lookup of `rel` and returns its inode number.
    fn remember(&self, rel: PathBuf, m: &Metadata) -> u64 {
        let key = key_of(m);
        let mut t = self.tables();
        if let Some(&ino) = t.by_key.get(&key)
            && let Some(node) = t.nodes.get_mut(&ino)
        {
            node.lookups = node.lookups.saturating_add(1);
            if ino != ROOT_INO {
                node.rel = rel;
            }
            return ino;
        }
        let ino = t.next_ino;
        t.next_ino += 1;
        t.nodes.insert(ino, Node { rel, key, lookups: 1 });
        t.by_key.insert(key, ino);
        ino
    }

    /// A name was removed: a file made later with the same backing inode
    /// number must get a new FUSE inode. Only for the last name of a file.
    fn unlinked(&self, m: &Metadata) {
        if m.nlink() <= 1 || m.is_dir() {
            self.tables().by_key.remove(&key_of(m));
        }
    }

    fn entry(&self, rel: PathBuf) -> Result<FileAttr, Errno> {
        let m = fs::symlink_metadata(self.root.join(&rel)).map_err(errno)?;
        let ino = self.remember(rel, &m);
        Ok(attr(ino, &m))
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<FileAttr, Errno> {
        self.entry(self.child(parent, name)?)
    }

    pub fn forget(&self, ino: u64, n: u64) {
        if ino == ROOT_INO {
            return;
        }
        let mut t = self.tables();
        let Some(node) = t.nodes.get_mut(&ino) else { return };
        node.lookups = node.lookups.saturating_sub(n);
        if node.lookups == 0 {
            let key = node.key;
            t.nodes.remove(&ino);
            if t.by_key.get(&key) == Some(&ino) {
                t.by_key.remove(&key);
            }
        }
    }

    fn open_file(&self, fh: u64) -> Option<Arc<OpenFile>> {
        self.tables().files.get(&fh).cloned()
    }

    fn file(&self, fh: u64) -> Result<Arc<OpenFile>, Errno> {
        self.open_file(fh).ok_or(Errno::EBADF)
    }

    pub fn getattr(&self, ino: u64, fh: Option<u64>) -> Result<FileAttr, Errno> {
        let m = match fh.and_then(|fh| self.open_file(fh)) {
            Some(f) => f.file.metadata(),
            None => fs::symlink_metadata(self.abs(ino)?),
        };
        Ok(attr(ino, &m.map_err(errno)?))
    }

    pub fn setattr(&self, ino: u64, fh: Option<u64>, s: SetAttr) -> Result<FileAttr, Errno> {
        let path = self.abs(ino)?;
        if let Some(size) = s.size {
            match fh.and_then(|fh| self.open_file(fh)) {
                Some(f) => f.file.set_len(size),
                None => OpenOptions::new().write(true).custom_flags(libc::O_NOFOLLOW).open(&path)?.set_len(size),
            }
            .map_err(errno)?;
        }
        if let Some(mode) = s.mode {
            fs::set_permissions(&path, Permissions::from_mode(mode & 0o7777)).map_err(errno)?;
        }
        if s.uid.is_some() || s.gid.is_some() {
            std::os::unix::fs::lchown(&path, s.uid, s.gid).map_err(errno)?;
        }
        if s.atime.is_some() || s.mtime.is_some() {
            let (a, m) = (timespec(s.atime), timespec(s.mtime));
            nix::sys::stat::utimensat(nix::fcntl::AT_FDCWD, &path, &a, &m, UtimensatFlags::NoFollowSymlink)
                .map_err(nix_errno)?;
        }
        self.getattr(ino, fh)
    }

    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>, Errno> {
        Ok(fs::read_link(self.abs(ino)?).map_err(errno)?.into_os_string().into_vec())
    }

    pub fn mknod(&self, parent: u64, name: &OsStr, mode: u32, rdev: u32, c: Caller) -> Result<FileAttr, Errno> {
        let rel = self.child(parent, name)?;
        let path = self.root.join(&rel);
        let kind = SFlag::from_bits_truncate(mode & libc::S_IFMT);
        let perm = Mode::from_bits_truncate(mode & 0o7777);
        nix::sys::stat::mknod(&path, kind, perm, u64::from(rdev)).map_err(nix_errno)?;
        self.made(&path, mode, c)?;
        self.entry(rel)
    }

    pub fn mkdir(&self, parent: u64, name: &OsStr, mode: u32, c: Caller) -> Result<FileAttr, Errno> {
        let rel = self.child(parent, name)?;
        let path = self.root.join(&rel);
        fs::DirBuilder::new().mode(mode & 0o7777).create(&path).map_err(errno)?;
        self.made(&path, mode, c)?;
        self.entry(rel)
    }

    /// Exact permissions (the kernel applied the caller's umask already,
    /// faultfs's own must not apply again) and the caller's ownership.
    fn made(&self, path: &Path, mode: u32, c: Caller) -> Result<(), Errno> {
        fs::set_permissions(path, Permissions::from_mode(mode & 0o7777)).map_err(errno)?;
        let _ = std::os::unix::fs::lchown(path, Some(c.uid), Some(c.gid));
        Ok(())
    }

    pub fn symlink(&self, parent: u64, name: &OsStr, target: &Path, c: Caller) -> Result<FileAttr, Errno> {
        let rel = self.child(parent, name)?;
        let path = self.root.join(&rel);
        std::os::unix::fs::symlink(target, &path).map_err(errno)?;
        let _ = std::os::unix::fs::lchown(&path, Some(c.uid), Some(c.gid));
        self.entry(rel)
    }

    pub fn link(&self, ino: u64, newparent: u64, newname: &OsStr) -> Result<FileAttr, Errno> {
        let rel = self.child(newparent, newname)?;
        fs::hard_link(self.abs(ino)?, self.root.join(&rel)).map_err(errno)?;
        self.entry(rel)
    }

    pub fn unlink(&self, parent: u64, name: &OsStr) -> Result<(), Errno> {
        let path = self.root.join(self.child(parent, name)?);
        let m = fs::symlink_metadata(&path).map_err(errno)?;
        fs::remove_file(&path).map_err(errno)?;
        self.unlinked(&m);
        Ok(())
    }

    pub fn rmdir(&self, parent: u64, name: &OsStr) -> Result<(), Errno> {
        let path = self.root.join(self.child(parent, name)?);
        let m = fs::symlink_metadata(&path).map_err(errno)?;
        fs::remove_dir(&path).map_err(errno)?;
        self.unlinked(&m);
        Ok(())
    }

    /// `flags`: renameat2 flags (RENAME_NOREPLACE, RENAME_EXCHANGE).
    pub fn rename(&self, parent: u64, name: &OsStr, to_parent: u64, to_name: &OsStr, flags: u32) -> Result<(), Errno> {
        let (from, to) = (self.child(parent, name)?, self.child(to_parent, to_name)?);
        let (from_abs, to_abs) = (self.root.join(&from), self.root.join(&to));
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        let replaced = if exchange { None } else { fs::symlink_metadata(&to_abs).ok() };
        if flags == 0 {
            fs::rename(&from_abs, &to_abs).map_err(errno)?;
        } else {
            let f = nix::fcntl::RenameFlags::from_bits_truncate(flags);
            let cwd = nix::fcntl::AT_FDCWD;
            nix::fcntl::renameat2(cwd, &from_abs, cwd, &to_abs, f).map_err(nix_errno)?;
        }
        if let Some(m) = replaced {
            self.unlinked(&m);
        }
        let mut t = self.tables();
        for node in t.nodes.values_mut().filter(|n| !n.rel.as_os_str().is_empty()) {
            let swapped = if exchange { moved(&node.rel, &to, &from) } else { None };
            if let Some(rel) = moved(&node.rel, &from, &to).or(swapped) {
                node.rel = rel;
            }
        }
        Ok(())
    }

    fn add_file(&self, file: File, opener: Option<u64>) -> u64 {
        let mut t = self.tables();
        let fh = t.next_fh;
        t.next_fh += 1;
        t.files.insert(fh, Arc::new(OpenFile { file, opener }));
        fh
    }

    /// The network namespace (inode) of whoever opened `fh`, if known.
    pub fn opener(&self, fh: u64) -> Option<u64> {
        self.tables().files.get(&fh).and_then(|f| f.opener)
    }

    fn options(flags: i32) -> OpenOptions {
        let mut o = OpenOptions::new();
        match flags & libc::O_ACCMODE {
            libc::O_RDONLY => o.read(true),
            libc::O_WRONLY => o.write(true),
            _ => o.read(true).write(true),
        };
        o.custom_flags((flags & PASSED_OPEN_FLAGS) | libc::O_NOFOLLOW | libc::O_CLOEXEC);
        o
    }

    /// `opener`: the caller's network namespace (inode), which later
    /// requests on the handle meet the faults of (`Gate::submit`).
    pub fn open(&self, ino: u64, flags: i32, opener: Option<u64>) -> Result<u64, Errno> {
        let file = Backing::options(flags).open(self.abs(ino)?).map_err(errno)?;
        Ok(self.add_file(file, opener))
    }

    /// Opens `name`, creating it (mode `mode`, owned by the caller) unless it
    /// exists and `flags` lacks O_EXCL; `opener` as for `open`.
    pub fn create(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        flags: i32,
        c: Caller,
        opener: Option<u64>,
    ) -> Result<(FileAttr, u64), Errno> {
        let rel = self.child(parent, name)?;
        let path = self.root.join(&rel);
        let mut o = Backing::options(flags);
        let file = match o.create_new(true).mode(mode & 0o7777).open(&path) {
            Ok(f) => {
                f.set_permissions(Permissions::from_mode(mode & 0o7777)).map_err(errno)?;
                give_to(&f, c);
                f
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && flags & libc::O_EXCL == 0 => {
                Backing::options(flags).open(&path).map_err(errno)?
            }
            Err(e) => return Err(errno(e)),
        };
        let m = file.metadata().map_err(errno)?;
        let ino = self.remember(rel, &m);
        Ok((attr(ino, &m), self.add_file(file, opener)))
    }

    /// At most `size` bytes at `offset`, in one read (a second, unaligned
    /// one would fail under O_DIRECT): fewer only at end of file.
    pub fn read(&self, fh: u64, offset: u64, size: u32) -> Result<(AlignedBuf, usize), Errno> {
        let f = self.file(fh)?;
        let mut buf = AlignedBuf::zeroed(usize::try_from(size).map_err(|_| Errno::EINVAL)?);
        loop {
            match f.file.read_at(buf.as_mut_slice(), offset) {
                Ok(n) => return Ok((buf, n)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(errno(e)),
            }
        }
    }

    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<u32, Errno> {
        let f = self.file(fh)?;
        let mut buf = AlignedBuf::zeroed(data.len());
        buf.as_mut_slice().copy_from_slice(data);
        loop {
            match f.file.write_at(buf.as_slice(), offset) {
                Ok(n) => return u32::try_from(n).map_err(|_| Errno::EIO),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(errno(e)),
            }
        }
    }

    pub fn fsync(&self, fh: u64, datasync: bool) -> Result<(), Errno> {
        let f = self.file(fh)?;
        if datasync { f.file.sync_data() } else { f.file.sync_all() }.map_err(errno)
    }

    pub fn fallocate(&self, fh: u64, offset: u64, length: u64, mode: i32) -> Result<(), Errno> {
        let f = self.file(fh)?;
        let flags = nix::fcntl::FallocateFlags::from_bits_truncate(mode);
        let offset = i64::try_from(offset).map_err(|_| Errno::EINVAL)?;
        let length = i64::try_from(length).map_err(|_| Errno::EINVAL)?;
        nix::fcntl::fallocate(&f.file, flags, offset, length).map_err(nix_errno)
    }

    pub fn release(&self, fh: u64) {
        self.tables().files.remove(&fh);
    }

    /// Lists the directory once; readdir pages through this listing.
    pub fn opendir(&self, ino: u64) -> Result<u64, Errno> {
        let path = self.abs(ino)?;
        let mut entries = vec![
            DirEntry { ino, kind: FileType::Directory, name: ".".into() },
            DirEntry { ino, kind: FileType::Directory, name: "..".into() },
        ];
        for e in fs::read_dir(&path).map_err(errno)? {
            let e = e.map_err(errno)?;
            let kind = e.file_type().map_err(errno)?;
            let kind = FileType::from_std(kind).unwrap_or(FileType::RegularFile);
            entries.push(DirEntry { ino: std::os::unix::fs::DirEntryExt::ino(&e), kind, name: e.file_name() });
        }
        let mut t = self.tables();
        let fh = t.next_fh;
        t.next_fh += 1;
        t.dirs.insert(fh, entries.into());
        Ok(fh)
    }

    /// Entries from `offset` on (the offset of entry i is i + 1).
    pub fn readdir(&self, fh: u64, offset: u64) -> Result<(Arc<[DirEntry]>, usize), Errno> {
        let entries = self.tables().dirs.get(&fh).cloned().ok_or(Errno::EBADF)?;
        let from = usize::try_from(offset).unwrap_or(usize::MAX).min(entries.len());
        Ok((entries, from))
    }

    pub fn releasedir(&self, fh: u64) {
        self.tables().dirs.remove(&fh);
    }

    pub fn fsyncdir(&self, ino: u64, datasync: bool) -> Result<(), Errno> {
        let dir = File::open(self.abs(ino)?).map_err(errno)?;
        if datasync { dir.sync_data() } else { dir.sync_all() }.map_err(errno)
    }

    pub fn statfs(&self) -> Result<Statfs, Errno> {
        let s = nix::sys::statvfs::statvfs(&self.root).map_err(nix_errno)?;
        Ok(Statfs {
            blocks: s.blocks(),
            bfree: s.blocks_free(),
            bavail: s.blocks_available(),
            files: s.files(),
            ffree: s.files_free(),
            bsize: saturate_u32(s.block_size()),
            namelen: saturate_u32(s.name_max()),
            frsize: saturate_u32(s.fragment_size()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renames_move_descendants_and_nothing_else() {
        let p = |s: &str| PathBuf::from(s);
        assert_eq!(moved(&p("a/b"), &p("a/b"), &p("c")), Some(p("c")));
        assert_eq!(moved(&p("a/b/x/y"), &p("a/b"), &p("c")), Some(p("c/x/y")));
        assert_eq!(moved(&p("a/bc"), &p("a/b"), &p("c")), None);
        assert_eq!(moved(&p("a"), &p("a/b"), &p("c")), None);
    }

    #[test]
    fn buffers_are_aligned_for_o_direct() {
        for len in [0, 1, 4096, 131072] {
            let mut b = AlignedBuf::zeroed(len);
            assert_eq!(b.as_slice().as_ptr().addr() % 4096, 0, "O_DIRECT alignment");
            assert_eq!(b.as_mut_slice().len(), len);
        }
    }

    #[test]
    fn times_before_and_after_the_epoch() {
        assert_eq!(time(1, 5), UNIX_EPOCH + Duration::new(1, 5));
        assert_eq!(time(-2, 0), UNIX_EPOCH - Duration::from_secs(2));
    }
}
