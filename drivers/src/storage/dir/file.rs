//! Volume files: what a dir pool's volume is made of. Raw files are handled
//! here directly (sparse creation, preallocation, sparse-aware copies,
//! zeroing); qcow2 images are read here (the header says their virtual size
//! and backing file) and written by `qemu-img` (see [`super::qemu_img`]).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use vireo_crds::VolFormat;

use crate::storage::Progress;

/// Copies move data in pieces of this size.
const CHUNK: usize = 1 << 20;

/// The prefix of files that are not volumes (yet): hidden names are ours.
pub const HIDDEN: char = '.';

/// The name a volume's content is built under until it is complete.
pub fn partial_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!(".{name}.vireo-partial"))
}

/// Whether a directory entry's name is one of our partial files (or an
/// upload marker, which `pool-delete` removes with them).
pub fn is_partial(name: &str) -> bool {
    name.starts_with(HIDDEN) && (name.ends_with(".vireo-partial") || name.ends_with(UPLOAD_MARKER))
}

const UPLOAD_MARKER: &str = ".vireo-awaiting-upload";

/// The marker beside a volume made for an upload (`source.upload`) that
/// has not had its content yet: present from before the volume's file
/// appears until an upload completes, so a crash in between never leaves
/// an empty volume that looks filled.
pub fn upload_marker_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!(".{name}{UPLOAD_MARKER}"))
}

/// What the first bytes of a volume file say about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub format: VolFormat,
    /// The size the guest sees.
    pub capacity: u64,
    /// Bytes the file occupies on disk.
    pub allocation: u64,
    /// A qcow2 image's backing file, as written in its header.
    pub backing: Option<String>,
}

/// The magic of a qcow2 image: "QFI\xfb".
const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// Reads a volume file's format, virtual size and backing file.
pub fn probe(path: &Path) -> io::Result<Probe> {
    let mut file = File::open(path)?;
    let meta = file.metadata()?;
    let allocation = meta.blocks().saturating_mul(512);
    let mut header = [0u8; 32];
    let mut got = 0;
    while got < header.len() {
        match file.read(&mut header[got..])? {
            0 => break,
            n => got += n,
        }
    }
    if got == header.len() && header[..4] == QCOW2_MAGIC {
        // qcow2 header (big-endian): version @4, backing_file_offset @8 (u64),
        // backing_file_size @16 (u32), cluster_bits @20, size @24 (u64).
        let be64 = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&header[at..at + 8]);
            u64::from_be_bytes(b)
        };
        let be32 = |at: usize| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&header[at..at + 4]);
            u32::from_be_bytes(b)
        };
        let capacity = be64(24);
        let backing_offset = be64(8);
        let backing_len = be32(16);
        let backing = if backing_offset != 0 && backing_len > 0 {
            // A backing file name is at most 1023 bytes (the format's limit).
            if backing_len > 1023 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "qcow2 header: backing file name longer than 1023 bytes",
                ));
            }
            let mut name = vec![0u8; backing_len as usize];
            file.seek(SeekFrom::Start(backing_offset))?;
            file.read_exact(&mut name)?;
            Some(String::from_utf8_lossy(&name).into_owned())
        } else {
            None
        };
        return Ok(Probe {
            format: VolFormat::Qcow2,
            capacity,
            allocation,
            backing,
        });
    }
    // ISO 9660: the primary volume descriptor's "CD001" at 32769.
    let mut magic = [0u8; 5];
    let iso = file.seek(SeekFrom::Start(ISO_MAGIC_AT)).is_ok()
        && file.read_exact(&mut magic).is_ok()
        && magic == ISO_MAGIC;
    Ok(Probe {
        format: if iso { VolFormat::Iso } else { VolFormat::Raw },
        capacity: meta.len(),
        allocation,
        backing: None,
    })
}

/// Where an ISO 9660 image says so, and what it says.
const ISO_MAGIC_AT: u64 = 0x8001;
const ISO_MAGIC: [u8; 5] = *b"CD001";

/// A backing file named in a qcow2 header, as a path: a relative name is
/// relative to the directory of the image that names it (as QEMU reads it).
pub fn backing_path(dir: &Path, backing: &str) -> PathBuf {
    let p = Path::new(backing);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        dir.join(p)
    }
}

/// Creates (or truncates) `path` as a new file only we can read and write.
pub fn create_new(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

/// Reserves the first `len` bytes of the file on disk (posix_fallocate-like,
/// without changing the size when it is already bigger).
pub fn allocate(file: &File, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let len = i64::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: fallocate on a file descriptor we own, with a plain range; it
    // touches no memory of ours.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The next data region at or after `from`: `(start, end)`, or None past
/// the last one. Holes are skipped (SEEK_DATA / SEEK_HOLE).
fn next_data(file: &File, from: u64, len: u64) -> io::Result<Option<(u64, u64)>> {
    if from >= len {
        return Ok(None);
    }
    let fd = file.as_raw_fd();
    let at = i64::try_from(from).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: lseek on a descriptor we own; no memory is involved.
    let start = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
    if start < 0 {
        let e = io::Error::last_os_error();
        // ENXIO: no data after `from`.
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        // A filesystem without SEEK_DATA: everything is data.
        if e.raw_os_error() == Some(libc::EINVAL) {
            return Ok(Some((from, len)));
        }
        return Err(e);
    }
    // SAFETY: as above.
    let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
    if end < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Some((start as u64, (end as u64).min(len))))
}

/// Calls `progress` at most every 200 ms, and always at the end.
pub struct Ticker<'a> {
    progress: Progress<'a>,
    total: Option<u64>,
    last: Instant,
}

impl<'a> Ticker<'a> {
    pub fn new(progress: Progress<'a>, total: Option<u64>) -> Self {
        progress(0, total);
        Self {
            progress,
            total,
            last: Instant::now(),
        }
    }
    pub fn tick(&mut self, done: u64) {
        if self.last.elapsed() >= Duration::from_millis(200) {
            (self.progress)(done, self.total);
            self.last = Instant::now();
        }
    }
    pub fn finish(&mut self, done: u64) {
        (self.progress)(done, self.total.or(Some(done)));
    }
}

/// Alignment of buffers, offsets and lengths for writes that bypass the
/// page cache (O_DIRECT); 4 KiB satisfies every block size in use.
const DIRECT_ALIGN: usize = 4096;

/// A buffer of CHUNK bytes aligned for O_DIRECT.
struct AlignedBuf {
    storage: Vec<u8>,
    offset: usize,
}

impl AlignedBuf {
    fn new() -> Self {
        let storage = vec![0u8; CHUNK + DIRECT_ALIGN];
        let offset = storage.as_ptr().align_offset(DIRECT_ALIGN);
        Self { storage, offset }
    }
    fn get(&mut self) -> &mut [u8] {
        &mut self.storage[self.offset..self.offset + CHUNK]
    }
}

/// Writes a new volume's content past the page cache where it can.
///
/// A copy into the page cache makes the kernel find and fill a fresh page
/// for every 4 KiB it writes, which then sit dirty until the final fsync:
/// measured on our build machines, a 1 GiB clone took 2-3 s that way and
/// under 1 s with O_DIRECT (`cargo bench -p vireo-drivers --bench
/// storage`), and it leaves the host's cache to the guests. Pieces that
/// are not block-aligned (the tail of a file), and filesystems that refuse
/// O_DIRECT, go through the page cache as before; the caller's fsync makes
/// both durable.
struct VolumeWriter<'a> {
    file: &'a File,
    /// O_DIRECT may be used on this file (it was accepted once).
    direct_ok: bool,
    /// O_DIRECT is set on the descriptor now.
    direct_on: bool,
}

impl<'a> VolumeWriter<'a> {
    fn new(file: &'a File) -> Self {
        let mut w = Self {
            file,
            direct_ok: true,
            direct_on: false,
        };
        w.direct_ok = w.set_direct(true).is_ok();
        w
    }

    fn set_direct(&mut self, on: bool) -> io::Result<()> {
        if self.direct_on == on {
            return Ok(());
        }
        let fd = self.file.as_raw_fd();
        // SAFETY: F_GETFL/F_SETFL on a descriptor we borrow; only its
        // status flags change, no memory is passed.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        let flags = if on {
            flags | libc::O_DIRECT
        } else {
            flags & !libc::O_DIRECT
        };
        // SAFETY: as above.
        if unsafe { libc::fcntl(fd, libc::F_SETFL, flags) } < 0 {
            return Err(io::Error::last_os_error());
        }
        self.direct_on = on;
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let align = DIRECT_ALIGN as u64;
        let aligned = self.direct_ok
            && offset.is_multiple_of(align)
            && (buf.len() as u64).is_multiple_of(align)
            && buf.as_ptr().align_offset(DIRECT_ALIGN) == 0;
        self.set_direct(aligned)?;
        match self.file.write_all_at(buf, offset) {
            // A filesystem that takes the flag but not the write.
            Err(e) if aligned && e.raw_os_error() == Some(libc::EINVAL) => {
                self.direct_ok = false;
                self.set_direct(false)?;
                self.file.write_all_at(buf, offset)
            }
            r => r,
        }
    }

    /// Leaves the descriptor as it was given (buffered).
    fn finish(mut self) -> io::Result<()> {
        self.set_direct(false)
    }
}

impl Drop for VolumeWriter<'_> {
    /// A copy that ended in an error leaves the caller's descriptor
    /// buffered too (best effort; `finish` reports the error otherwise).
    fn drop(&mut self) {
        let _ = self.set_direct(false);
    }
}

/// Whether a piece of a copy is all zeros (a hole in the copy).
///
/// Compares 16 bytes at a time: the byte-at-a-time loop this replaces does
/// not vectorise (it stops at the first non-zero byte) and took 2.1 s to
/// look at 1 GiB of zeros, against 0.09 s for this (docs/storage.md).
pub fn is_zero(buf: &[u8]) -> bool {
    // SAFETY: every bit pattern is a valid u128, and align_to hands back
    // only the aligned middle as u128s (the ends stay bytes).
    let (head, words, tail) = unsafe { buf.align_to::<u128>() };
    // OR-ing runs of 64 words before each test lets the loop vectorise
    // and still stop early on data (usually in the first run).
    head.iter().all(|b| *b == 0)
        && tail.iter().all(|b| *b == 0)
        && words
            .chunks(64)
            .all(|run| run.iter().fold(0, |acc, w| acc | w) == 0)
}

/// Makes `dst` share `src`'s blocks (FICLONE, a reflink) where the
/// filesystem can (btrfs, XFS with reflink, bcachefs): the copy is
/// instant, holes stay holes, and blocks are copied only when either side
/// is written later. Ok(false) where it cannot (ext4, tmpfs, across
/// filesystems), and the caller copies the bytes.
pub fn reflink(src: &File, dst: &File) -> io::Result<bool> {
    // SAFETY: FICLONE takes the source descriptor as its argument (an
    // integer, no pointer); both descriptors are ours and open.
    let rc = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) };
    if rc == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP | libc::ENOTTY | libc::EXDEV | libc::EINVAL | libc::ENOSYS) => {
            Ok(false)
        }
        _ => Err(e),
    }
}

/// Copies a raw file into `dst` (already created, empty), keeping holes as
/// holes; `dst` ends with the source's length.
pub fn copy_sparse(src: &Path, dst: &File, progress: Progress<'_>) -> io::Result<u64> {
    copy_file(&File::open(src)?, dst, progress)
}

/// Copies an open file into `dst` (already created, empty), keeping holes
/// as holes; `dst` ends with the source's length.
///
/// A reflink where the filesystem has them; otherwise the data regions
/// only (SEEK_DATA/SEEK_HOLE), in 1 MiB pieces read into an aligned
/// buffer and written past the page cache by a writer thread while the
/// next ones are read (see [`write_behind`]), with all-zero pieces left
/// as holes. Measured against the alternatives in
/// docs/storage.md: copy_file_range (in-kernel, but through the page
/// cache: 4 to 20 times slower here), buffered writes (the same), larger
/// buffers (no faster, and fewer holes found).
pub fn copy_file(input: &File, dst: &File, progress: Progress<'_>) -> io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let len = input.metadata()?.len();
    let mut ticker = Ticker::new(progress, Some(len));
    if dst.metadata()?.len() == 0 && reflink(input, dst)? {
        ticker.finish(len);
        return Ok(len);
    }
    write_behind(dst, |pieces| {
        let mut pos = 0;
        while let Some((start, end)) = next_data(input, pos, len)? {
            let mut at = start;
            while at < end {
                let Some(mut buf) = pieces.buffer() else {
                    return Ok(());
                };
                let want = usize::try_from((end - at).min(CHUNK as u64)).unwrap_or(CHUNK);
                let n = match input.read_at(&mut buf.get()[..want], at) {
                    // The file shrank under us. Every buffer taken goes
                    // back, or a later `buffer()` could wait forever.
                    Ok(0) => {
                        pieces.keep(buf);
                        break;
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                        pieces.keep(buf);
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                // Zero pieces inside a data region stay holes in the copy.
                if !pieces.put(buf, at, n) {
                    return Ok(());
                }
                at += n as u64;
                ticker.tick(at);
            }
            pos = end;
        }
        Ok(())
    })?;
    dst.set_len(len)?;
    ticker.finish(len);
    Ok(len)
}

/// Pieces a copy reads ahead of the one its writer is writing.
const AHEAD: usize = 4;

/// A piece read, on its way to the writer: `len` bytes of `buf`, to be
/// written at `at`.
struct Piece {
    buf: AlignedBuf,
    at: u64,
    len: usize,
}

/// The reading side of [`write_behind`]: buffers to read into, and the
/// writer to hand them to.
struct Pieces {
    spare: Option<AlignedBuf>,
    empty: mpsc::Receiver<AlignedBuf>,
    full: mpsc::SyncSender<Piece>,
}

impl Pieces {
    /// A buffer for the next piece; None once the writer has stopped (on
    /// an error, which [`write_behind`] returns).
    fn buffer(&mut self) -> Option<AlignedBuf> {
        self.spare.take().or_else(|| self.empty.recv().ok())
    }
    /// Keeps a buffer that is not to be written (a piece of zeros).
    fn keep(&mut self, buf: AlignedBuf) {
        self.spare = Some(buf);
    }
    /// Hands on a piece of `len` bytes of `buf`, to be written at `at`: one
    /// of all zeros stays a hole (its buffer is kept for the next piece),
    /// any other goes to the writer. False once the writer has stopped.
    fn put(&mut self, mut buf: AlignedBuf, at: u64, len: usize) -> bool {
        if is_zero(&buf.get()[..len]) {
            self.keep(buf);
            return true;
        }
        self.full.send(Piece { buf, at, len }).is_ok()
    }
}

/// Runs `read` on this thread and writes the pieces it hands on from
/// another, past the page cache ([`VolumeWriter`]): the read of the next
/// pieces (and their zero check) overlaps the write of this one, up to
/// [`AHEAD`] pieces ahead, in the order they were read. Measured on the
/// storage bench's image, against reading and writing in turn: a streamed
/// upload 0.37 s instead of 0.39 s (the reader checks a whole GiB for
/// zeros), a download from a cold source 0.66 s instead of 0.68 s
/// (docs/storage.md). A write error stops the reader at its next piece and
/// is returned; a read error is returned once the pieces read before it
/// are written.
fn write_behind(dst: &File, read: impl FnOnce(&mut Pieces) -> io::Result<()>) -> io::Result<()> {
    let (full_tx, full_rx) = mpsc::sync_channel::<Piece>(AHEAD);
    let (empty_tx, empty_rx) = mpsc::channel::<AlignedBuf>();
    for _ in 0..AHEAD {
        // The receiver is alive: it is ours, below.
        let _ = empty_tx.send(AlignedBuf::new());
    }
    std::thread::scope(|scope| {
        let writer = scope.spawn(move || -> io::Result<()> {
            let mut output = VolumeWriter::new(dst);
            for mut piece in full_rx {
                output.write_at(&piece.buf.get()[..piece.len], piece.at)?;
                // The reader may be done; then the buffer is dropped.
                let _ = empty_tx.send(piece.buf);
            }
            output.finish()
        });
        let mut pieces = Pieces {
            spare: Some(AlignedBuf::new()),
            empty: empty_rx,
            full: full_tx,
        };
        let read_result = read(&mut pieces);
        // Ends the writer's loop once it has written what it was handed.
        drop(pieces);
        let write_result = writer
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the copy's writer thread panicked")));
        read_result.and(write_result)
    })
}

/// Reads until `buf` is full or the end of the input.
fn read_full(source: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match source.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Copies a stream into `dst` (already created, empty) and returns the
/// number of bytes; all-zero chunks become holes.
pub fn copy_stream(
    source: &mut dyn Read,
    dst: &File,
    total: Option<u64>,
    progress: Progress<'_>,
) -> io::Result<u64> {
    let mut ticker = Ticker::new(progress, total);
    let mut done = 0u64;
    write_behind(dst, |pieces| {
        loop {
            let Some(mut buf) = pieces.buffer() else {
                return Ok(());
            };
            // Whole chunks, so that zero detection sees whole chunks and
            // every write but the last is aligned.
            let got = read_full(source, buf.get())?;
            if got == 0 {
                return Ok(());
            }
            let at = done;
            done += got as u64;
            if !pieces.put(buf, at, got) {
                return Ok(());
            }
            ticker.tick(done);
            if got < CHUNK {
                return Ok(());
            }
        }
    })?;
    dst.set_len(done)?;
    ticker.finish(done);
    Ok(done)
}

/// Writes the whole file to `sink`. Holes are not read: the sink gets
/// zeros from a buffer that already holds them.
pub fn copy_out(src: &Path, sink: &mut dyn Write, progress: Progress<'_>) -> io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let input = File::open(src)?;
    let len = input.metadata()?.len();
    let mut ticker = Ticker::new(progress, Some(len));
    let mut buf = vec![0u8; CHUNK];
    let zeros = vec![0u8; CHUNK];
    let mut done = 0u64;
    let zeros_to = |sink: &mut dyn Write, from: u64, to: u64| -> io::Result<()> {
        let mut at = from;
        while at < to {
            let n = usize::try_from((to - at).min(CHUNK as u64)).unwrap_or(CHUNK);
            sink.write_all(&zeros[..n])?;
            at += n as u64;
        }
        Ok(())
    };
    while let Some((start, end)) = next_data(&input, done, len)? {
        zeros_to(sink, done, start)?;
        done = start;
        while done < end {
            let want = usize::try_from((end - done).min(CHUNK as u64)).unwrap_or(CHUNK);
            let n = match input.read_at(&mut buf[..want], done) {
                // The file shrank under us: what is left reads as zeros.
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            sink.write_all(&buf[..n])?;
            done += n as u64;
            ticker.tick(done);
        }
        zeros_to(sink, done, end)?;
        done = done.max(end);
    }
    zeros_to(sink, done, len)?;
    done = len;
    sink.flush()?;
    ticker.finish(done);
    Ok(done)
}

/// Overwrites every allocated region of a raw file with zeros, so that it
/// reads as zeros and keeps its allocation.
pub fn zero_data(path: &Path) -> io::Result<()> {
    let file = OpenOptions::new().read(true).write(true).open(path)?;
    let len = file.metadata()?.len();
    let zeros = vec![0u8; CHUNK];
    let mut out = &file;
    let mut pos = 0;
    while let Some((start, end)) = next_data(&file, pos, len)? {
        out.seek(SeekFrom::Start(start))?;
        let mut at = start;
        while at < end {
            let n = usize::try_from((end - at).min(CHUNK as u64)).unwrap_or(CHUNK);
            out.write_all(&zeros[..n])?;
            at += n as u64;
        }
        pos = end;
    }
    file.sync_all()
}

/// Renames `from` to `to` unless `to` exists (renameat2 RENAME_NOREPLACE).
pub fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
    };
    let (f, t) = (c(from)?, c(to)?);
    // SAFETY: both pointers are NUL-terminated strings that live across the
    // call; AT_FDCWD makes them relative to the working directory (they are
    // absolute here).
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes a rename in `dir` durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// A filesystem's sizes (statvfs): capacity, used, available to us.
pub fn fs_sizes(path: &Path) -> io::Result<(u64, u64, u64)> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: statvfs is plain old data; zeroed is a valid value for it.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a valid, writable
    // statvfs that outlives the call.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let frsize = st.f_frsize;
    let capacity = st.f_blocks.saturating_mul(frsize);
    let used = st
        .f_blocks
        .saturating_sub(st.f_bfree)
        .saturating_mul(frsize);
    let available = st.f_bavail.saturating_mul(frsize);
    Ok((capacity, used, available))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::no_progress;

    fn tmp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vireo-file-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("tmp dir");
        dir
    }

    /// A reader that hands out at most 1000 bytes a call, as a socket does.
    struct Trickle<'a>(&'a [u8]);
    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.0.len()).min(1000);
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    /// Aligned chunks go past the page cache, the unaligned tail through
    /// it: the bytes are the same either way, and zero chunks stay holes.
    #[test]
    fn copies_with_an_unaligned_tail_are_exact() {
        let dir = tmp("tail");
        let len = 3 * CHUNK + 1234;
        let mut data: Vec<u8> = (0..len).map(|i| (i % 251) as u8 | 1).collect();
        data[CHUNK..2 * CHUNK].fill(0);
        let src = dir.join("src");
        std::fs::write(&src, &data).expect("test file I/O");

        let streamed = dir.join("streamed");
        let out = create_new(&streamed).expect("create");
        let n = copy_stream(&mut Trickle(&data), &out, None, &no_progress).expect("copy");
        assert_eq!(n, len as u64);
        drop(out);
        assert!(std::fs::read(&streamed).expect("test file I/O") == data);
        let alloc = std::fs::metadata(&streamed)
            .expect("test file I/O")
            .blocks()
            * 512;
        assert!(
            alloc < (len - CHUNK / 2) as u64,
            "the zero MiB is a hole: {alloc}"
        );

        let copied = dir.join("copied");
        let out = create_new(&copied).expect("create");
        copy_sparse(&src, &out, &no_progress).expect("copy");
        // The descriptor is handed back without O_DIRECT: an unaligned
        // write through it still works.
        let mut w = &out;
        w.seek(SeekFrom::Start(7)).expect("seek");
        w.write_all(&data[7..10])
            .expect("buffered write after the copy");
        drop(out);
        assert!(std::fs::read(&copied).expect("test file I/O") == data);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Every piece lands where it belongs: data, zero pieces (holes) and
    /// holes in the source, from a source read from the disk (out of the
    /// page cache) and from a stream.
    #[test]
    fn copies_put_every_piece_in_its_place() {
        let dir = tmp("pieces");
        let pieces = 23;
        let len = pieces * CHUNK + 4096 + 17;
        let mut data = vec![0u8; len];
        for (i, piece) in data.chunks_mut(CHUNK).enumerate() {
            if i % 3 != 1 {
                piece.fill(i as u8 | 0x80);
            }
        }
        let src = dir.join("src");
        {
            use std::os::unix::fs::FileExt;
            let f = create_new(&src).expect("create");
            f.set_len(len as u64).expect("set_len");
            // Pieces 1, 4, 7, ... stay holes in the source too.
            for (i, piece) in data.chunks(CHUNK).enumerate() {
                if i % 3 != 1 {
                    f.write_all_at(piece, (i * CHUNK) as u64).expect("write");
                }
            }
            // Out of the page cache: the copy reads the disk.
            f.sync_all().expect("sync");
            // SAFETY: fadvise on our descriptor; it passes no memory.
            let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            assert_eq!(rc, 0, "fadvise");
        }
        let last = std::sync::atomic::AtomicU64::new(0);
        let seen = |done: u64, total: Option<u64>| {
            assert_eq!(total, Some(len as u64));
            last.store(done, std::sync::atomic::Ordering::Relaxed);
        };
        let copied = dir.join("copied");
        let out = create_new(&copied).expect("create");
        assert_eq!(copy_sparse(&src, &out, &seen).expect("copy"), len as u64);
        drop(out);
        assert_eq!(last.load(std::sync::atomic::Ordering::Relaxed), len as u64);
        assert!(std::fs::read(&copied).expect("read") == data);

        let streamed = dir.join("streamed");
        let out = create_new(&streamed).expect("create");
        let n = copy_stream(&mut Trickle(&data), &out, Some(len as u64), &seen).expect("copy");
        assert_eq!(n, len as u64);
        drop(out);
        assert!(std::fs::read(&streamed).expect("read") == data);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A stream that fails, or a file that cannot be written, ends the copy
    /// with that error.
    #[test]
    fn a_failed_copy_reports_its_error_and_returns() {
        struct Breaks(usize);
        impl Read for Breaks {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if self.0 == 0 {
                    return Err(io::Error::other("the peer went away"));
                }
                let n = buf.len().min(self.0);
                buf[..n].fill(7);
                self.0 -= n;
                Ok(n)
            }
        }
        let dir = tmp("fails");
        let out = create_new(&dir.join("out")).expect("create");
        let e = copy_stream(&mut Breaks(9 * CHUNK + 5), &out, None, &no_progress)
            .expect_err("the stream broke");
        assert_eq!(e.to_string(), "the peer went away");
        // A directory opened for reading takes no writes.
        let not_writable = File::open(&dir).expect("open dir");
        let data = vec![1u8; 6 * CHUNK];
        assert!(copy_stream(&mut Trickle(&data), &not_writable, None, &no_progress).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A single non-zero byte anywhere, in slices of any alignment and
    /// length, is seen.
    #[test]
    fn is_zero_sees_every_byte() {
        let buf = vec![0u8; 4096 + 64];
        for start in [0, 1, 7, 15, 16, 17] {
            for len in [0, 1, 15, 16, 17, 1024, 1025, 4000] {
                let slice = &buf[start..start + len];
                assert!(is_zero(slice));
                for at in 0..len {
                    let mut copy = slice.to_vec();
                    copy[at] = 1;
                    // The copy's alignment is the allocator's; check the
                    // original alignment too by writing into the buffer.
                    assert!(!is_zero(&copy), "start {start} len {len} at {at}");
                    let mut b = buf.clone();
                    b[start + at] = 0x80;
                    assert!(!is_zero(&b[start..start + len]), "{start} {len} {at}");
                }
            }
        }
    }

    #[test]
    fn sparse_copy_keeps_data_and_holes() {
        let dir = tmp("sparse");
        let src = dir.join("src");
        let f = create_new(&src).expect("create");
        f.set_len(8 << 20).expect("len");
        let mut w = &f;
        w.seek(SeekFrom::Start(3 << 20)).expect("seek");
        w.write_all(b"hello in the middle").expect("write");
        drop(f);
        let dst = dir.join("dst");
        let out = create_new(&dst).expect("dst");
        let n = copy_sparse(&src, &out, &no_progress).expect("copy");
        assert_eq!(n, 8 << 20);
        assert_eq!(
            std::fs::read(&src).expect("test file I/O"),
            std::fs::read(&dst).expect("test file I/O")
        );
        let alloc = std::fs::metadata(&dst).expect("test file I/O").blocks() * 512;
        assert!(
            alloc < 2 << 20,
            "the copy is not sparse: {alloc} bytes allocated"
        );
    }

    #[test]
    fn probe_reads_qcow2_headers_and_raw_sizes() {
        let dir = tmp("probe");
        let raw = dir.join("raw");
        create_new(&raw)
            .expect("test file I/O")
            .set_len(12345)
            .expect("test file I/O");
        let p = probe(&raw).expect("test file I/O");
        assert_eq!(
            (p.format, p.capacity, p.backing),
            (VolFormat::Raw, 12345, None)
        );

        // A hand-made qcow2 header: version 3, backing name at 512, size 1 GiB.
        let mut h = vec![0u8; 1024];
        h[..4].copy_from_slice(&QCOW2_MAGIC);
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[8..16].copy_from_slice(&512u64.to_be_bytes());
        h[16..20].copy_from_slice(&(b"base.img".len() as u32).to_be_bytes());
        h[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
        h[512..520].copy_from_slice(b"base.img");
        let q = dir.join("q");
        std::fs::write(&q, &h).expect("test file I/O");
        let p = probe(&q).expect("test file I/O");
        assert_eq!(p.format, VolFormat::Qcow2);
        assert_eq!(p.capacity, 1 << 30);
        assert_eq!(p.backing.as_deref(), Some("base.img"));

        // A truncated header is refused, not read past.
        h[16..20].copy_from_slice(&5000u32.to_be_bytes());
        std::fs::write(&q, &h).expect("test file I/O");
        assert!(probe(&q).is_err());
    }

    #[test]
    fn zero_data_zeroes_and_keeps_the_size() {
        let dir = tmp("zero");
        let p = dir.join("v");
        std::fs::write(&p, vec![0xabu8; 3 << 20]).expect("test file I/O");
        zero_data(&p).expect("test file I/O");
        let data = std::fs::read(&p).expect("test file I/O");
        assert_eq!(data.len(), 3 << 20);
        assert!(data.iter().all(|b| *b == 0));
    }

    #[test]
    fn rename_noreplace_refuses_an_existing_target() {
        let dir = tmp("rename");
        let (a, b) = (dir.join("a"), dir.join("b"));
        std::fs::write(&a, b"a").expect("test file I/O");
        std::fs::write(&b, b"b").expect("test file I/O");
        let e = rename_noreplace(&a, &b).expect_err("must fail");
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&b).expect("test file I/O"), b"b");
        std::fs::remove_file(&b).expect("test file I/O");
        rename_noreplace(&a, &b).expect("test file I/O");
        assert_eq!(std::fs::read(&b).expect("test file I/O"), b"a");
    }
}
