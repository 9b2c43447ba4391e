//! The worker's memory allocator: mimalloc for ordinary blocks, and a pool of mapped regions
//! for blocks of [`LARGE`] bytes and more (the activations of the large models).
//!
//! Why our own layer for the large blocks: a 1024x1024 decode allocates and frees activations
//! of 32 MB to 1 GB, of a different size at every resolution. glibc returns each one to the
//! kernel, so the next one page-faults and is zeroed again (the SD 1.5 VAE decode takes twice
//! as long). mimalloc does the same after its purge delay (the SDXL VAE decode 40.5 s instead
//! of 27.9 s, 2-core EPYC), or, never purging, keeps every freed block, and blocks freed at one
//! size do not serve the next sizes (8.8 GB peak RSS where 5.5 GB were live at most).
//!
//! Here a freed large block's region stays mapped in the pool and serves the next large
//! request of any size: the smallest region that holds it, used whole, else the longest,
//! grown by `mremap` (only the difference is faulted in). Faulting is what costs (the kernel
//! zeroes the pages, and on a virtual machine the host may have to back them first), so
//! regions are not shrunk while the pool's mapped bytes stay within [`SLACK`] times the most
//! bytes ever live at once; beyond that, a reused region gives its excess back and the
//! smallest kept regions are unmapped. The mappings ask for 2 MiB transparent huge pages.
//! Each region starts with a one-page header holding its length, so that a block can be
//! freed with only its layout.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Blocks of this size and more are mapped regions of their own.
pub const LARGE: usize = 16 << 20;
/// Regions are whole multiples of the x86-64 (and aarch64) transparent huge page.
const HUGE_PAGE: usize = 2 << 20;
/// The header before a block: its region's length. Blocks are aligned to it.
const HEADER: usize = 4096;
/// At most this many freed regions are kept.
const SLOTS: usize = 16;
/// The pool maps at most this many times the most bytes ever live at once, as a fraction
/// `SLACK.0 / SLACK.1` (the SDXL VAE decode's sizes replay without faults from 1.25 on).
const SLACK: (usize, usize) = (5, 4);

/// A mapped region: its address and length (a multiple of [`HUGE_PAGE`]).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Region {
    addr: usize,
    len: usize,
}

const NONE: Region = Region { addr: 0, len: 0 };

/// The kept regions and the accounts the policy needs.
struct Pool {
    kept: [Region; SLOTS],
    count: usize,
    /// Bytes mapped: live regions and kept ones.
    mapped: usize,
    /// Bytes the live blocks need (their region-rounded sizes).
    live: usize,
    /// The most `live` has been.
    high_water: usize,
}

impl Pool {
    const fn new() -> Self {
        Self {
            kept: [NONE; SLOTS],
            count: 0,
            mapped: 0,
            live: 0,
            high_water: 0,
        }
    }

    fn bound(&self) -> usize {
        self.high_water / SLACK.1 * SLACK.0
    }

    fn remove(&mut self, i: usize) -> Region {
        let region = self.kept[i];
        self.count -= 1;
        self.kept[i] = self.kept[self.count];
        region
    }

    fn shortest(&self) -> Option<usize> {
        (0..self.count).min_by_key(|&i| self.kept[i].len)
    }

    /// A kept region of at least `len` bytes (the shortest), else the longest one.
    fn take(&mut self, len: usize) -> Option<Region> {
        let kept = &self.kept[..self.count];
        let fits = (0..self.count)
            .filter(|&i| kept[i].len >= len)
            .min_by_key(|&i| kept[i].len);
        let i = fits.or_else(|| (0..self.count).max_by_key(|&i| kept[i].len))?;
        Some(self.remove(i))
    }

    /// Unmaps the shortest kept regions until the pool is within its bound.
    fn trim(&mut self) {
        while self.mapped > self.bound() {
            let Some(i) = self.shortest() else { return };
            let region = self.remove(i);
            // SAFETY: kept regions are the pool's and not in use.
            unsafe { unmap(region) };
            self.mapped -= region.len;
        }
    }

    /// A region for a block needing `len` bytes (header included) and whether its block is
    /// all zeros; `None` if the kernel refuses.
    fn region(&mut self, len: usize) -> Option<(Region, bool)> {
        self.resize_live(0, len);
        let got = match self.take(len) {
            // Used whole: it fits, and the pool is within its bound or the fit is exact.
            Some(r) if r.len >= len && (r.len == len || self.mapped <= self.bound()) => {
                Some((r, false))
            }
            // SAFETY: `r` is the pool's and no longer in use; on failure it stays mapped.
            Some(r) => match unsafe { remap(r, len) } {
                Some(addr) => {
                    self.mapped = self.mapped - r.len + len;
                    Some((Region { addr, len }, false))
                }
                None if r.len >= len => Some((r, false)),
                None => {
                    self.keep(r);
                    self.fresh(len)
                }
            },
            None => self.fresh(len),
        };
        if got.is_none() {
            self.live -= len;
        }
        self.trim();
        got
    }

    /// A new mapping of `len` bytes, all zeros.
    fn fresh(&mut self, len: usize) -> Option<(Region, bool)> {
        let addr = map(len)?;
        self.mapped += len;
        Some((Region { addr, len }, true))
    }

    /// A live block's need changes from `old` to `new` bytes.
    fn resize_live(&mut self, old: usize, new: usize) {
        self.live = self.live - old + new;
        self.high_water = self.high_water.max(self.live);
    }

    /// Takes back the region of a block that needed `len` bytes.
    fn free(&mut self, region: Region, len: usize) {
        self.live -= len;
        self.keep(region);
        self.trim();
    }

    fn keep(&mut self, region: Region) {
        if self.count == SLOTS {
            if let Some(i) = self.shortest() {
                let short = self.remove(i);
                // SAFETY: kept regions are the pool's and not in use.
                unsafe { unmap(short) };
                self.mapped -= short.len;
            }
        }
        self.kept[self.count] = region;
        self.count += 1;
    }
}

/// The large-block layer.
pub struct LargeBlocks {
    pool: Mutex<Pool>,
    /// Freed regions are unmapped at once instead of kept.
    return_freed: AtomicBool,
}

impl LargeBlocks {
    pub const fn new() -> Self {
        Self {
            pool: Mutex::new(Pool::new()),
            return_freed: AtomicBool::new(false),
        }
    }

    /// From now on, freed regions go back to the kernel at once (RSS follows live memory).
    pub fn return_freed(&self) {
        self.return_freed.store(true, Ordering::Relaxed);
    }

    /// Whether a block of `layout` lives in a region of its own.
    pub fn serves(layout: Layout) -> bool {
        layout.size() >= LARGE && layout.align() <= HEADER
    }

    /// The region length a block of `size` bytes needs.
    fn needed(size: usize) -> usize {
        (size + HEADER).next_multiple_of(HUGE_PAGE)
    }

    /// The block in `region`, its region length written in the header.
    ///
    /// # Safety
    /// `region` is mapped, writable and at least two pages long.
    unsafe fn block(region: Region) -> *mut u8 {
        let base = region.addr as *mut usize;
        unsafe {
            base.write(region.len);
            base.cast::<u8>().add(HEADER)
        }
    }

    /// # Safety
    /// `ptr` is a block of this layer's.
    unsafe fn region_of(ptr: *mut u8) -> Region {
        let base = unsafe { ptr.sub(HEADER) };
        Region {
            addr: base as usize,
            len: unsafe { base.cast::<usize>().read() },
        }
    }

    /// A block for `layout` (which [`Self::serves`]) and whether it is all zeros; null if the
    /// kernel refuses.
    fn alloc_block(&self, layout: Layout) -> (*mut u8, bool) {
        let got = self.lock().region(Self::needed(layout.size()));
        match got {
            // SAFETY: the region is mapped, ours and at least `needed` long.
            Some((region, zeroed)) => (unsafe { Self::block(region) }, zeroed),
            None => (std::ptr::null_mut(), false),
        }
    }

    /// # Safety
    /// As [`GlobalAlloc::alloc`], for a layout that [`Self::serves`].
    pub unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.alloc_block(layout).0
    }

    /// # Safety
    /// As [`GlobalAlloc::alloc_zeroed`], for a layout that [`Self::serves`].
    pub unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let (ptr, zeroed) = self.alloc_block(layout);
        if !ptr.is_null() && !zeroed {
            // SAFETY: the block is at least `layout.size()` bytes long and ours.
            unsafe { ptr.write_bytes(0, layout.size()) };
        }
        ptr
    }

    /// # Safety
    /// As [`GlobalAlloc::dealloc`]: `ptr` came from this layer with `layout`.
    pub unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let region = unsafe { Self::region_of(ptr) };
        let mut pool = self.lock();
        if self.return_freed.load(Ordering::Relaxed) {
            pool.live -= Self::needed(layout.size());
            pool.mapped -= region.len;
            // SAFETY: the caller hands the block, and so its region, back.
            unsafe { unmap(region) };
        } else {
            pool.free(region, Self::needed(layout.size()));
        }
    }

    /// # Safety
    /// As [`GlobalAlloc::realloc`], for an old and a new layout that both [`Self::serves`].
    pub unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let region = unsafe { Self::region_of(ptr) };
        let (old, new) = (Self::needed(layout.size()), Self::needed(new_size));
        let mut pool = self.lock();
        if new <= region.len {
            pool.resize_live(old, new);
            return ptr;
        }
        // SAFETY: the caller hands the block over; on failure it stays valid and theirs.
        match unsafe { remap(region, new) } {
            Some(addr) => {
                pool.mapped += new - region.len;
                pool.resize_live(old, new);
                pool.trim();
                // SAFETY: the grown region is mapped and ours.
                unsafe { Self::block(Region { addr, len: new }) }
            }
            None => std::ptr::null_mut(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pool> {
        // Nothing panics while the lock is held; a poisoned lock still holds consistent data.
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The worker's global allocator: [`LargeBlocks`] for large blocks, mimalloc for the rest.
pub struct WorkerAlloc {
    large: LargeBlocks,
}

impl WorkerAlloc {
    pub const fn new() -> Self {
        Self {
            large: LargeBlocks::new(),
        }
    }

    /// Freed large blocks go back to the kernel at once ([`LargeBlocks::return_freed`]).
    pub fn return_freed(&self) {
        self.large.return_freed();
    }
}

// SAFETY: every block goes to the layer chosen by its layout, and `dealloc` / `realloc` get
// the layout it was allocated with, so they choose the same layer; blocks that cross the
// threshold on `realloc` are copied between the layers.
unsafe impl GlobalAlloc for WorkerAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if LargeBlocks::serves(layout) {
            unsafe { self.large.alloc(layout) }
        } else {
            unsafe { mimalloc::MiMalloc.alloc(layout) }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if LargeBlocks::serves(layout) {
            unsafe { self.large.alloc_zeroed(layout) }
        } else {
            unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if LargeBlocks::serves(layout) {
            unsafe { self.large.dealloc(ptr, layout) }
        } else {
            unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `GlobalAlloc::realloc` requires `new_size` to make a valid layout.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (LargeBlocks::serves(layout), LargeBlocks::serves(new_layout)) {
            (true, true) => unsafe { self.large.realloc(ptr, layout, new_size) },
            (false, false) => unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) },
            _ => unsafe {
                let new = self.alloc(new_layout);
                if !new.is_null() {
                    std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                    self.dealloc(ptr, layout);
                }
                new
            },
        }
    }
}

/// A fresh anonymous mapping of `len` bytes (zeros) that asks for huge pages.
fn map(len: usize) -> Option<usize> {
    // SAFETY: an anonymous private mapping at an address of the kernel's choosing.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return None;
    }
    advise_huge(addr, len);
    Some(addr as usize)
}

/// Asks for transparent huge pages (a hint: without them the region works the same).
fn advise_huge(addr: *mut libc::c_void, len: usize) {
    // SAFETY: `addr..addr + len` is a mapping of ours; the advice changes no contents.
    unsafe { libc::madvise(addr, len, libc::MADV_HUGEPAGE) };
}

/// The address of `region` resized to `len` bytes, moved if it must be, with its contents up
/// to the shorter length; `None` (and `region` unchanged) if the kernel refuses.
///
/// # Safety
/// `region` is a mapping of this layer's that nothing else uses.
unsafe fn remap(region: Region, len: usize) -> Option<usize> {
    let addr = unsafe {
        libc::mremap(
            region.addr as *mut libc::c_void,
            region.len,
            len,
            libc::MREMAP_MAYMOVE,
        )
    };
    if addr == libc::MAP_FAILED {
        return None;
    }
    if len > region.len {
        advise_huge(addr, len);
    }
    Some(addr as usize)
}

/// # Safety
/// `region` is a mapping of this layer's that nothing uses any more.
unsafe fn unmap(region: Region) {
    unsafe { libc::munmap(region.addr as *mut libc::c_void, region.len) };
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: usize = 1 << 20;

    fn layout(size: usize) -> Layout {
        Layout::from_size_align(size, 64).unwrap()
    }

    fn accounts(blocks: &LargeBlocks) -> (usize, usize, usize, usize) {
        let p = blocks.lock();
        (p.count, p.mapped, p.live, p.high_water)
    }

    #[test]
    fn only_large_page_aligned_blocks_are_mapped() {
        assert!(LargeBlocks::serves(layout(LARGE)));
        assert!(!LargeBlocks::serves(layout(LARGE - 1)));
        assert!(!LargeBlocks::serves(
            Layout::from_size_align(LARGE, 1 << 16).unwrap()
        ));
    }

    #[test]
    fn freed_regions_serve_other_sizes_and_zeroed_blocks_are_zero() {
        let blocks = LargeBlocks::new();
        unsafe {
            let a = blocks.alloc(layout(LARGE));
            assert!(!a.is_null() && (a as usize).is_multiple_of(HEADER));
            a.write_bytes(7, LARGE);
            blocks.dealloc(a, layout(LARGE));
            let small = LargeBlocks::needed(LARGE);
            assert_eq!(accounts(&blocks), (1, small, 0, small));
            // A longer block grows the kept region; `alloc_zeroed` clears the old bytes.
            let big = 3 * LARGE + 5;
            let b = blocks.alloc_zeroed(layout(big));
            let long = LargeBlocks::needed(big);
            assert_eq!(accounts(&blocks), (0, long, long, long));
            assert!((0..big).step_by(4093).all(|i| *b.add(i) == 0));
            assert_eq!(*b.add(big - 1), 0);
            b.write_bytes(9, big);
            blocks.dealloc(b, layout(big));
            // A shorter one takes the whole region (within the slack): no fault, no copy.
            let c = blocks.alloc(layout(LARGE));
            assert_eq!((*c, *c.add(LARGE - 1)), (9, 9));
            assert_eq!(accounts(&blocks), (0, long, small, long));
            // A second block while the first is live: a fresh, zeroed mapping.
            let d = blocks.alloc_zeroed(layout(LARGE));
            assert_eq!(*d.add(LARGE / 2), 0);
            assert_eq!(accounts(&blocks), (0, long + small, 2 * small, long));
            // Freeing `c` while `d` is live puts the pool over 1.25 times the high water: the
            // kept region goes.
            blocks.dealloc(c, layout(LARGE));
            assert_eq!(accounts(&blocks), (0, small, small, long));
            blocks.dealloc(d, layout(LARGE));
            assert_eq!(accounts(&blocks), (1, small, 0, long));
        }
    }

    #[test]
    fn the_pool_stays_within_its_slack() {
        let blocks = LargeBlocks::new();
        unsafe {
            // High water: 100 MB live; then one 20 MB block at a time.
            let big: Vec<_> = (0..5).map(|_| blocks.alloc(layout(20 * MB))).collect();
            for p in &big {
                blocks.dealloc(*p, layout(20 * MB));
            }
            let (_, mapped, _, high) = accounts(&blocks);
            assert_eq!(mapped, high);
            // Ten live 40 MB blocks: 400 MB live, served by growing the kept regions.
            let grown: Vec<_> = (0..10).map(|_| blocks.alloc(layout(40 * MB))).collect();
            let (count, mapped, live, high) = accounts(&blocks);
            assert_eq!((count, live, high), (0, mapped, mapped));
            for p in grown {
                blocks.dealloc(p, layout(40 * MB));
            }
            // Thirty 16 MB blocks: the first ten take the 42 MB regions whole (the pool is
            // within 1.25 times the high water), the rest are fresh; nothing is kept meanwhile.
            let many: Vec<_> = (0..30).map(|_| blocks.alloc(layout(LARGE))).collect();
            let (count, mapped, live, high) = accounts(&blocks);
            let needed = LargeBlocks::needed(LARGE);
            assert_eq!((count, live, high), (0, 30 * needed, 30 * needed));
            assert_eq!(mapped, 10 * LargeBlocks::needed(40 * MB) + 20 * needed);
            for p in many {
                blocks.dealloc(p, layout(LARGE));
            }
            // Freed: at most SLOTS kept, within the bound, and all that is mapped is kept.
            let (count, mapped, live, high) = accounts(&blocks);
            assert!(count <= SLOTS && live == 0 && mapped <= high / 4 * 5);
            let pool = blocks.lock();
            assert_eq!(
                pool.kept[..count].iter().map(|r| r.len).sum::<usize>(),
                mapped
            );
        }
    }

    #[test]
    fn returning_freed_regions_keeps_none() {
        let blocks = LargeBlocks::new();
        blocks.return_freed();
        unsafe {
            let a = blocks.alloc(layout(LARGE));
            blocks.dealloc(a, layout(LARGE));
        }
        let needed = LargeBlocks::needed(LARGE);
        assert_eq!(accounts(&blocks), (0, 0, 0, needed));
    }

    #[test]
    fn realloc_keeps_the_contents() {
        let blocks = LargeBlocks::new();
        unsafe {
            let a = blocks.alloc(layout(LARGE));
            for i in 0..LARGE / 4096 {
                *a.add(i * 4096) = i as u8;
            }
            let b = blocks.realloc(a, layout(LARGE), 4 * LARGE);
            assert!(!b.is_null());
            assert!((0..LARGE / 4096).all(|i| *b.add(i * 4096) == i as u8));
            *b.add(4 * LARGE - 1) = 1;
            let c = blocks.realloc(b, layout(4 * LARGE), LARGE + 1);
            assert_eq!(c, b);
            assert!((0..LARGE / 4096).all(|i| *c.add(i * 4096) == i as u8));
            blocks.dealloc(c, layout(LARGE + 1));
            assert_eq!(accounts(&blocks).2, 0);
        }
    }

    #[test]
    fn the_global_allocator_copies_blocks_across_the_threshold() {
        let alloc = WorkerAlloc::new();
        unsafe {
            let small = layout(1000);
            let a = alloc.alloc(small);
            a.write_bytes(3, 1000);
            let b = alloc.realloc(a, small, LARGE);
            assert!((0..1000).all(|i| *b.add(i) == 3));
            let c = alloc.realloc(b, layout(LARGE), 10);
            assert!((0..10).all(|i| *c.add(i) == 3));
            alloc.dealloc(c, layout(10));
            alloc.return_freed();
            let d = alloc.alloc(layout(LARGE));
            alloc.dealloc(d, layout(LARGE));
            assert_eq!(accounts(&alloc.large).0, 0);
        }
    }
}
