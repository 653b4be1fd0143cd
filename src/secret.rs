//! Memory for key material that is never swapped and never dumped.
//!
//! Keys pass through many allocations: the setkey text that names them
//! (a config file, a control request, an XFRM message), the parser's
//! tokens, the SA's own key bytes and cipher state, and AWS-LC's AEAD
//! contexts (its own `malloc`). Rather than give each of those a special
//! type, the daemon marks the *code* that handles keys: inside
//! [`scope`], every allocation of the calling thread comes from a
//! dedicated arena, and so does every AWS-LC allocation once [`init`] has
//! hooked its allocator. The arena is one anonymous mapping marked
//! `MADV_DONTDUMP` (absent from core dumps, and from `gcore`'s, which
//! honours the flag), locked with `mlock` as it grows (never swapped),
//! and every block is zeroed when it is freed or moved, so a freed parse
//! buffer keeps no key either. Memory that is in the arena stays there
//! when it grows (a `Vec` begun in a scope stays secret).
//!
//! The global allocator is [`Alloc`]: outside a scope it is the system
//! allocator plus one thread-local flag read and, on free, one range
//! check. The packet path allocates nothing in a scope.
//!
//! Not covered: copies on thread stacks (the daemon scrubs the stack
//! below a scope when it ends, see [`scope`]; a worker's per-packet HMAC
//! working state lives on its stack), and kernel buffers.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::ptr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};

/// Size classes: 16 bytes to 64 MiB (see `class_of`).
const CLASSES: usize = 84;
const PAGE: usize = 4096;
/// Blocks of this size and more give their pages back when freed.
const RELEASE: usize = 64 << 10;
/// The arena is locked in steps of this many bytes.
const LOCK_STEP: usize = 256 << 10;

thread_local! {
    static IN_SCOPE: Cell<bool> = const { Cell::new(false) };
}

static BASE: AtomicUsize = AtomicUsize::new(0);
static LEN: AtomicUsize = AtomicUsize::new(0);
/// Bytes of the arena handed out at least once (its high-water mark).
static USED: AtomicUsize = AtomicUsize::new(0);
/// Allocations that wanted the arena and did not get it (full, or an
/// alignment over a page): served by the system allocator instead.
static MISSES: AtomicUsize = AtomicUsize::new(0);
/// mlock failed at least once (RLIMIT_MEMLOCK): the arena is not swap-proof.
static UNLOCKED: AtomicBool = AtomicBool::new(false);

struct Arena {
    /// Offset of the first byte never handed out.
    bump: usize,
    /// Bytes from the start that are locked.
    locked: usize,
    /// Heads of the free lists, one per class (0: empty). A free block
    /// holds the next one's address in its first word.
    free: [usize; CLASSES],
}

static ARENA: Mutex<Arena> = Mutex::new(Arena {
    bump: 0,
    locked: 0,
    free: [0; CLASSES],
});

/// Reserve the arena and hook AWS-LC's allocator into it. Call once,
/// first thing, before any thread starts and before AWS-LC is used
/// (AWS-LC frees through the hook what it allocated before it);
/// returns the reserved bytes.
pub fn init() -> usize {
    let n = reserve();
    if n > 0 {
        hook_aws_lc();
    }
    n
}

/// Reserve the arena: the largest of a few sizes the kernel grants.
pub fn reserve() -> usize {
    if BASE.load(Relaxed) != 0 {
        return LEN.load(Relaxed);
    }
    for len in [16usize << 30, 4 << 30, 1 << 30, 256 << 20, 64 << 20] {
        // SAFETY: a new private anonymous mapping; no existing memory is
        // touched.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            continue;
        }
        // SAFETY: advice on the mapping just made.
        let r = unsafe { libc::madvise(p, len, libc::MADV_DONTDUMP) };
        if r != 0 {
            // SAFETY: unmapping what was just mapped; nothing uses it.
            unsafe { libc::munmap(p, len) };
            return 0;
        }
        LEN.store(len, Relaxed);
        BASE.store(p as usize, Relaxed);
        break;
    }
    LEN.load(Relaxed)
}

/// Run `f` with this thread's allocations in the arena, then zero the
/// stack below this frame that `f` may have used (key bytes and key
/// schedules pass through locals). Scopes nest.
pub fn scope<R>(f: impl FnOnce() -> R) -> R {
    let r = with_flag(true, f);
    scrub_stack();
    r
}

/// [`scope`] as a guard: allocations in the arena until it is dropped,
/// then the stack below the dropping frame is zeroed.
pub struct Scope(bool);

impl Scope {
    pub fn enter() -> Scope {
        Scope(IN_SCOPE.with(|s| s.replace(true)))
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        let _ = IN_SCOPE.try_with(|s| s.set(self.0));
        scrub_stack();
    }
}

/// Run `f` with this thread's allocations in the arena, without the
/// stack scrub (for the small allocations that hold a key: cheap enough
/// to use for each one).
pub fn within<R>(f: impl FnOnce() -> R) -> R {
    with_flag(true, f)
}

/// Run `f` with this thread's allocations outside the arena (a large
/// buffer that is wiped by hand and should not pin locked memory).
pub fn outside<R>(f: impl FnOnce() -> R) -> R {
    with_flag(false, f)
}

fn with_flag<R>(on: bool, f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = IN_SCOPE.try_with(|s| s.set(self.0));
        }
    }
    let prev = IN_SCOPE.with(|s| s.replace(on));
    let _restore = Restore(prev);
    f()
}

/// Zero 128 KiB of stack below the caller's frame.
#[inline(never)]
fn scrub_stack() {
    let mut buf = [0u8; 128 << 10];
    std::hint::black_box(&mut buf);
}

/// What the arena holds, for the log: (bytes reserved, high-water mark,
/// misses, whether locking failed).
pub fn stats() -> (usize, usize, usize, bool) {
    (
        LEN.load(Relaxed),
        USED.load(Relaxed),
        MISSES.load(Relaxed),
        UNLOCKED.load(Relaxed),
    )
}

fn in_scope() -> bool {
    IN_SCOPE.try_with(|s| s.get()).unwrap_or(false)
}

fn in_arena(p: *mut u8) -> bool {
    let base = BASE.load(Relaxed);
    (p as usize).wrapping_sub(base) < LEN.load(Relaxed)
}

/// The class of a layout: 16, 32, 48, 64, then four steps per doubling
/// (80, 96, 112, 128, 160, …), so a block wastes at most a fifth.
/// Alignments over 16 take a power-of-two class, whose blocks are aligned
/// to their size (up to a page).
fn class_of(layout: Layout) -> Option<usize> {
    if layout.align() > PAGE {
        return None;
    }
    let mut s = layout.size().max(16);
    if layout.align() > 16 {
        s = s.max(layout.align()).next_power_of_two();
    }
    let c = if s <= 64 {
        s.div_ceil(16) - 1
    } else {
        let e = usize::BITS - 1 - (s - 1).leading_zeros(); // 2^e < s <= 2^(e+1)
        let step = 1usize << (e - 2);
        let k = (s - (1 << e)).div_ceil(step);
        3 + (e as usize - 6) * 4 + k
    };
    (c < CLASSES).then_some(c)
}

fn class_size(c: usize) -> usize {
    if c < 4 {
        16 * (c + 1)
    } else {
        let j = c - 4;
        let e = 6 + j / 4;
        (1 << e) + (j % 4 + 1) * (1 << (e - 2))
    }
}

/// Where blocks of a size start: power-of-two sizes at a multiple of
/// themselves (up to a page), others of a page or more at a page, the
/// rest at 16 bytes.
fn class_align(size: usize) -> usize {
    if size.is_power_of_two() {
        size.min(PAGE)
    } else if size >= PAGE {
        PAGE
    } else {
        16
    }
}

/// A block of the arena for `layout`, or null.
pub fn arena_alloc(layout: Layout) -> *mut u8 {
    let base = BASE.load(Relaxed);
    let Some(c) = class_of(layout) else {
        return ptr::null_mut();
    };
    if base == 0 {
        return ptr::null_mut();
    }
    let size = class_size(c);
    let mut a = ARENA.lock().unwrap_or_else(|e| e.into_inner());
    let head = a.free[c];
    if head != 0 {
        // SAFETY: a free block of this class holds the next one's address.
        a.free[c] = unsafe { (head as *const usize).read() };
        // SAFETY: the block is ours and was zeroed when freed, but for the link.
        unsafe { (head as *mut usize).write(0) };
        // SAFETY: locking pages of our own mapping.
        if size >= RELEASE && unsafe { libc::mlock(head as *const libc::c_void, size) } != 0 {
            UNLOCKED.store(true, Relaxed);
        }
        return head as *mut u8;
    }
    let align = class_align(size);
    let off = (a.bump + align - 1) & !(align - 1);
    let end = off + size;
    if end > LEN.load(Relaxed) {
        return ptr::null_mut();
    }
    a.bump = end;
    USED.store(end, Relaxed);
    if end > a.locked {
        let to = end.div_ceil(LOCK_STEP) * LOCK_STEP;
        let to = to.min(LEN.load(Relaxed));
        // SAFETY: locking pages of our own mapping.
        let r = unsafe { libc::mlock((base + a.locked) as *const libc::c_void, to - a.locked) };
        if r != 0 {
            UNLOCKED.store(true, Relaxed);
        }
        a.locked = to;
    }
    (base + off) as *mut u8
}

/// Zero a block of the arena and put it on its free list.
///
/// # Safety
/// `p` came from [`arena_alloc`] with `layout` and is not used again.
pub unsafe fn arena_free(p: *mut u8, layout: Layout) {
    let Some(c) = class_of(layout) else { return };
    let size = class_size(c);
    if size >= RELEASE {
        // Large blocks (a state's maps while a configuration loads) give
        // their memory back: unlocked, then dropped, which also zeroes it.
        // SAFETY: pages of our own mapping that nothing uses any more.
        let released = unsafe {
            libc::munlock(p as *const libc::c_void, size) == 0
                && libc::madvise(p as *mut libc::c_void, size, libc::MADV_DONTNEED) == 0
        };
        if !released {
            // SAFETY: as below.
            unsafe { ptr::write_bytes(p, 0, size) };
        }
    } else {
        // SAFETY: the block (a whole class size) is ours until it is listed.
        unsafe { ptr::write_bytes(p, 0, size) };
    }
    std::hint::black_box(p);
    let mut a = ARENA.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY: as above; the first word links the free list.
    unsafe { (p as *mut usize).write(a.free[c]) };
    a.free[c] = p as usize;
}

/// The global allocator: the system's, or the arena inside a [`scope`].
pub struct Alloc;

// SAFETY: blocks come from System or from the arena, and each is returned
// to the one it came from (decided by address); arena blocks are at least
// as large and as aligned as asked.
unsafe impl GlobalAlloc for Alloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if in_scope() {
            let p = arena_alloc(layout);
            if !p.is_null() {
                return p;
            }
            MISSES.fetch_add(1, Relaxed);
        }
        // SAFETY: forwarded as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if in_scope() {
            // Arena blocks are zero when handed out (zeroed when freed,
            // fresh pages are zero).
            let p = arena_alloc(layout);
            if !p.is_null() {
                return p;
            }
            MISSES.fetch_add(1, Relaxed);
        }
        // SAFETY: forwarded as is.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        if in_arena(p) {
            // SAFETY: an arena block, given back once.
            unsafe { arena_free(p, layout) }
        } else {
            // SAFETY: forwarded as is.
            unsafe { System.dealloc(p, layout) }
        }
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !in_arena(p) && !in_scope() {
            // SAFETY: forwarded as is.
            return unsafe { System.realloc(p, layout, new_size) };
        }
        // SAFETY: the caller guarantees a valid size for this alignment.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        if in_arena(p) && class_of(layout) == class_of(new_layout) {
            return p;
        }
        // Secret data stays secret: an arena block moves within the arena.
        let q = match arena_alloc(new_layout) {
            q if !q.is_null() => q,
            _ => {
                MISSES.fetch_add(1, Relaxed);
                // SAFETY: a valid layout, as above.
                unsafe { System.alloc(new_layout) }
            }
        };
        if q.is_null() {
            return q;
        }
        // SAFETY: both blocks are valid for the smaller size; they differ.
        unsafe {
            ptr::copy_nonoverlapping(p, q, layout.size().min(new_size));
            self.dealloc(p, layout);
        }
        q
    }
}

/// AWS-LC's `OPENSSL_malloc` family, served from the arena (with the
/// system allocator behind it if the arena is full), each block prefixed
/// with its size.
const PREFIX: usize = 16;

unsafe extern "C" fn lc_malloc(
    size: usize,
    _: *const libc::c_char,
    _: libc::c_int,
) -> *mut libc::c_void {
    let Some(total) = size.checked_add(PREFIX) else {
        return ptr::null_mut();
    };
    let Ok(layout) = Layout::from_size_align(total, PREFIX) else {
        return ptr::null_mut();
    };
    let mut p = arena_alloc(layout);
    if p.is_null() {
        MISSES.fetch_add(1, Relaxed);
        // SAFETY: a valid, non-zero layout.
        p = unsafe { System.alloc(layout) };
        if p.is_null() {
            return ptr::null_mut();
        }
    }
    // SAFETY: the block has room for the prefix and `size` bytes.
    unsafe {
        (p as *mut usize).write(size);
        p.add(PREFIX) as *mut libc::c_void
    }
}

unsafe extern "C" fn lc_free(p: *mut libc::c_void, _: *const libc::c_char, _: libc::c_int) {
    if p.is_null() {
        return;
    }
    // SAFETY: `p` came from lc_malloc: its size sits PREFIX bytes before.
    unsafe {
        let start = (p as *mut u8).sub(PREFIX);
        let size = (start as *const usize).read();
        let layout = Layout::from_size_align_unchecked(size + PREFIX, PREFIX);
        if in_arena(start) {
            arena_free(start, layout);
        } else {
            ptr::write_bytes(start, 0, size + PREFIX);
            std::hint::black_box(start);
            System.dealloc(start, layout);
        }
    }
}

unsafe extern "C" fn lc_realloc(
    p: *mut libc::c_void,
    size: usize,
    file: *const libc::c_char,
    line: libc::c_int,
) -> *mut libc::c_void {
    // SAFETY: the AWS-LC allocator contract, as in lc_malloc and lc_free.
    unsafe {
        let q = lc_malloc(size, file, line);
        if q.is_null() || p.is_null() {
            return q;
        }
        let old = ((p as *mut u8).sub(PREFIX) as *const usize).read();
        ptr::copy_nonoverlapping(p as *const u8, q as *mut u8, old.min(size));
        lc_free(p, file, line);
        q
    }
}

static HOOKED: AtomicBool = AtomicBool::new(false);

fn hook_aws_lc() {
    if HOOKED.swap(true, Relaxed) {
        return;
    }
    // SAFETY: three functions with AWS-LC's signatures; it accepts them
    // once, before its first allocation (init runs first in the daemon).
    let ok = unsafe {
        aws_lc_sys::CRYPTO_set_mem_functions(Some(lc_malloc), Some(lc_realloc), Some(lc_free))
    };
    if ok != 1 {
        MISSES.fetch_add(1, Relaxed);
    }
}

/// Is AWS-LC's allocator the arena?
pub fn aws_lc_hooked() -> bool {
    HOOKED.load(Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arena_blocks_are_aligned_reused_zeroed_and_never_dumped() {
        assert!(reserve() > 0);
        let l = Layout::from_size_align(100, 8).unwrap();
        let p = arena_alloc(l);
        assert!(!p.is_null() && in_arena(p));
        assert_eq!(p as usize % 8, 0);
        // SAFETY: 100 bytes of our block.
        unsafe { ptr::write_bytes(p, 0xa5, 100) };
        // SAFETY: given back once.
        unsafe { arena_free(p, l) };
        let q = arena_alloc(l);
        assert_eq!(p, q, "the freed block is reused");
        // SAFETY: reading our block.
        let bytes = unsafe { std::slice::from_raw_parts(q, 128) };
        assert!(bytes.iter().all(|b| *b == 0), "freed blocks are zeroed");
        let page = Layout::from_size_align(5000, 4096).unwrap();
        let big = arena_alloc(page);
        assert_eq!(big as usize % 4096, 0);
        assert!(arena_alloc(Layout::from_size_align(16, 8192).unwrap()).is_null());
        // The whole mapping carries the dd (do not dump) flag.
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let base = format!("{:x}-", BASE.load(Relaxed));
        let entry = smaps
            .split('\n')
            .skip_while(|l| !l.starts_with(&base))
            .find(|l| l.starts_with("VmFlags:"))
            .expect("the arena's mapping");
        assert!(entry.split_whitespace().any(|f| f == "dd"), "{entry}");
        // SAFETY: given back once.
        unsafe {
            arena_free(q, l);
            arena_free(big, page);
        }
    }

    #[test]
    fn classes_fit_and_align() {
        for size in 1..300_000usize {
            for align in [1, 8, 16, 32, 64, 4096] {
                let l = Layout::from_size_align(size, align).unwrap();
                let c = class_of(l).unwrap();
                let cs = class_size(c);
                assert!(cs >= size && cs >= 16, "{size}/{align}: class {c} of {cs}");
                assert!(
                    c == 0 || class_size(c - 1) < size.max(16) || align > 16,
                    "{size}: not the smallest"
                );
                assert!(class_align(cs) >= align.min(16).max(if align > 16 { align } else { 1 }));
                assert!(cs <= size.max(16).max(align) * 2, "{size}/{align}: {cs}");
            }
        }
        assert_eq!(class_size(CLASSES - 1), 64 << 20);
        assert!(class_of(Layout::from_size_align((64 << 20) + 1, 8).unwrap()).is_none());
    }

    #[test]
    fn a_scope_allocates_in_the_arena_and_outside_does_not() {
        reserve();
        // The tests do not install Alloc: call it directly.
        let l = Layout::from_size_align(64, 8).unwrap();
        let p = scope(|| unsafe { Alloc.alloc(l) });
        assert!(in_arena(p));
        let r = scope(|| outside(|| unsafe { Alloc.alloc(l) }));
        assert!(!in_arena(r));
        // A secret block stays in the arena when it grows, even outside.
        let grown = unsafe { Alloc.realloc(p, l, 4000) };
        assert!(in_arena(grown));
        unsafe {
            Alloc.dealloc(grown, Layout::from_size_align(4000, 8).unwrap());
            Alloc.dealloc(r, l);
        }
        assert!(!in_scope());
    }
}
