//! Weights served from the page cache: a safetensors file mapped into memory (privately, so a
//! write to a weight stays in the process), each tensor a `Vec` over its bytes in the mapping.
//! Loading then copies nothing and touches no fresh memory.
//!
//! Why: a freshly allocated page costs a fault and the kernel's zeroing the first time it is
//! touched, and on a virtual machine that hands freed memory back to its host, far more (measured
//! here: 5.4 s to touch 2 GB right after another process freed its memory, 1.1 s otherwise).
//! Reading an SD 2.1 pipeline's 5 GB into fresh buffers took 7-22 s so; mapping it takes under
//! one, the file's pages being in the page cache already. diffusers maps its files too.
//!
//! A `Vec` must be freed by the allocator it came from. A mapped tensor's `Vec` is freed by
//! [`MappedAware`], the global allocator the sidbooth binaries install: it recognises the
//! mappings' addresses and unmaps a file once its last tensor and its [`MappedFile`] are gone,
//! and passes everything else to the system allocator. In a process without it (a library user,
//! the unit tests) [`map`] answers `None` and weights are read into fresh buffers as before.
//!
//! As with any mapped file, one cut short while mapped makes the process fault (SIGBUS) when it
//! next reads a page that is gone: replace model files by renaming new ones into place, not by
//! rewriting them where they are.

use std::alloc::{GlobalAlloc, Layout, System};
use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

/// The system allocator, plus freeing the `Vec`s of mapped tensors. Install it in a binary
/// with `#[global_allocator] static ALLOC: MappedAware = MappedAware;`.
pub struct MappedAware;

/// Set by the first allocation through [`MappedAware`]: only then may a `Vec` own mapped memory.
static INSTALLED: AtomicBool = AtomicBool::new(false);
/// Lowest start and highest end of the live mappings: a cheap test that rules out nearly every
/// address freed.
static LOW: AtomicUsize = AtomicUsize::new(usize::MAX);
static HIGH: AtomicUsize = AtomicUsize::new(0);
/// The live mappings, in a fixed table: the allocator takes this lock, so nothing done under it
/// may allocate or free (a std `Mutex` itself allocates nothing).
static MAPPINGS: Mutex<[Option<Mapping>; MAX_MAPPINGS]> =
    Mutex::new([const { None }; MAX_MAPPINGS]);
/// Files mapped at once; past it, weights are read into fresh buffers (a pipeline maps three).
const MAX_MAPPINGS: usize = 64;

#[derive(Clone, Copy)]
struct Mapping {
    start: usize,
    len: usize,
    /// Tensors over it plus one for its [`MappedFile`].
    users: usize,
}

// SAFETY: every method hands the request to `System` unchanged, except that memory inside a
// live mapping (which `System` never handed out) is released to the mapping instead, and a
// reallocation of it is a fresh `System` allocation with the old bytes copied in.
unsafe impl GlobalAlloc for MappedAware {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        mark_installed();
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        mark_installed();
        System.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if !release(ptr as usize) {
            System.dealloc(ptr, layout)
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !is_mapped(ptr as usize) {
            return System.realloc(ptr, layout, new_size);
        }
        let new = System.alloc(Layout::from_size_align_unchecked(new_size, layout.align()));
        if !new.is_null() {
            std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
            release(ptr as usize);
        }
        new
    }
}

/// A load before the store: the flag's cache line stays shared once it is set.
fn mark_installed() {
    if !INSTALLED.load(Ordering::Relaxed) {
        INSTALLED.store(true, Ordering::Relaxed);
    }
}

fn in_bounds(addr: usize) -> bool {
    addr >= LOW.load(Ordering::Acquire) && addr < HIGH.load(Ordering::Acquire)
}

type Table = [Option<Mapping>; MAX_MAPPINGS];

fn mappings() -> std::sync::MutexGuard<'static, Table> {
    // Nothing panics while holding the lock, so a poisoned table is still consistent.
    MAPPINGS.lock().unwrap_or_else(|e| e.into_inner())
}

/// The slot of the mapping that holds `addr`.
fn slot_of(table: &Table, addr: usize) -> Option<usize> {
    table.iter().position(|m| {
        m.as_ref()
            .is_some_and(|m| addr >= m.start && addr < m.start + m.len)
    })
}

fn is_mapped(addr: usize) -> bool {
    in_bounds(addr) && slot_of(&mappings(), addr).is_some()
}

/// Recomputes [`LOW`] and [`HIGH`] from the table.
fn update_bounds(table: &Table) {
    let live = table.iter().flatten();
    LOW.store(
        live.clone().map(|m| m.start).min().unwrap_or(usize::MAX),
        Ordering::Release,
    );
    HIGH.store(
        live.map(|m| m.start + m.len).max().unwrap_or(0),
        Ordering::Release,
    );
}

/// Drops one user of the mapping holding `addr`, unmapping it with its last; false when `addr`
/// is in no mapping.
fn release(addr: usize) -> bool {
    if !in_bounds(addr) {
        return false;
    }
    let mut table = mappings();
    let Some(i) = slot_of(&table, addr) else {
        return false;
    };
    let m = table[i].as_mut().expect("slot_of found it");
    m.users -= 1;
    if m.users == 0 {
        let m = table[i].take().expect("slot_of found it");
        // SAFETY: the range is this module's own mapping and nothing refers to it any more.
        unsafe { libc::munmap(m.start as *mut libc::c_void, m.len) };
        update_bounds(&table);
    }
    true
}

/// A file mapped privately into memory, from which tensors' `Vec`s are made.
pub struct MappedFile {
    start: usize,
    len: usize,
}

/// Maps `file` (of `len` bytes, `path` for errors); `None` when [`MappedAware`] is not this
/// process's allocator, or the file is empty.
pub fn map(file: &File, len: u64, path: &Path) -> std::io::Result<Option<MappedFile>> {
    if !available() || len == 0 {
        return Ok(None);
    }
    use std::os::fd::AsRawFd;
    let len = usize::try_from(len)
        .map_err(|_| std::io::Error::other(format!("{}: too large to map", path.display())))?;
    // SAFETY: a new private mapping of a file we hold open; nothing else refers to its range.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE,
            file.as_raw_fd(),
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let start = ptr as usize;
    let mut table = mappings();
    let Some(free) = table.iter_mut().find(|m| m.is_none()) else {
        drop(table);
        // SAFETY: the mapping just made, not handed out.
        unsafe { libc::munmap(ptr, len) };
        return Ok(None);
    };
    *free = Some(Mapping {
        start,
        len,
        users: 1,
    });
    update_bounds(&table);
    Ok(Some(MappedFile { start, len }))
}

/// Whether this process frees mapped tensors correctly (its allocator is [`MappedAware`]).
pub fn available() -> bool {
    INSTALLED.load(Ordering::Relaxed)
}

/// How many files are mapped now (for tests: a file stays mapped while any of its tensors lives).
pub fn live_mappings() -> usize {
    mappings().iter().flatten().count()
}

/// Element types whose every bit pattern is a value (what a weight file's bytes may hold).
pub trait Plain: Copy + 'static {}
impl Plain for f32 {}
impl Plain for f64 {}
impl Plain for half::f16 {}
impl Plain for half::bf16 {}
impl Plain for i64 {}
impl Plain for u32 {}
impl Plain for u8 {}

impl MappedFile {
    /// The `count` values of `T` at byte `offset` as a `Vec` over the mapping; `None` when they
    /// are not aligned for `T` (the caller then copies) or `count` is 0.
    pub fn vec<T: Plain>(&self, offset: usize, count: usize) -> Option<Vec<T>> {
        let bytes = count.checked_mul(std::mem::size_of::<T>())?;
        let end = offset.checked_add(bytes)?;
        assert!(end <= self.len, "tensor bytes outside the mapping");
        let ptr = self.start + offset;
        if count == 0 || ptr % std::mem::align_of::<T>() != 0 {
            return None;
        }
        let mut table = mappings();
        let slot = slot_of(&table, self.start).expect("a MappedFile's mapping outlives it");
        table[slot].as_mut().expect("slot_of found it").users += 1;
        drop(table);
        // SAFETY: the range lies inside a live private mapping that stays mapped until this Vec
        // (counted above) is freed, which `MappedAware` (installed: `map` checked) turns into a
        // release of the mapping; any bit pattern is a valid `T`; capacity equals length, so a
        // growth goes through `realloc`, which copies out of the mapping.
        Some(unsafe { Vec::from_raw_parts(ptr as *mut T, count, count) })
    }
}

impl Drop for MappedFile {
    fn drop(&mut self) {
        release(self.start);
    }
}

#[cfg(test)]
mod tests {
    /// The unit tests' allocator is the system's: nothing may be mapped, and weights are read.
    #[test]
    fn without_the_allocator_nothing_is_mapped() {
        assert!(!super::available());
        let path = std::env::temp_dir().join(format!("sidbooth-mapped-{}", std::process::id()));
        std::fs::write(&path, [1u8; 64]).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        assert!(super::map(&file, 64, &path).unwrap().is_none());
        assert_eq!(super::live_mappings(), 0);
        std::fs::remove_file(&path).unwrap();
    }
}
