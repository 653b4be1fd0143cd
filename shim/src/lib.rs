//! `libtunsec_xfrm.so`: loaded with `LD_PRELOAD` (by `tunsec ike`), it
//! gives the process's `NETLINK_XFRM` sockets to tunsec and leaves every
//! other socket alone: route, link and address netlink still reach the
//! kernel.
//!
//! `socket(AF_NETLINK, *, NETLINK_XFRM)` returns instead a Unix
//! `SOCK_SEQPACKET` socket connected to `$TUNSEC_XFRM` (tunsec's `--xfrm`
//! socket). One datagram carries what a netlink datagram would, so
//! `read`, `write`, `recv`, `poll`, `select`, `epoll` and `FIONREAD` work
//! on it unchanged. What differs is wrapped here:
//! - `bind`, `connect`, `getsockname`: the netlink address (port id and
//!   multicast groups); tunsec learns them from a small message of its
//!   own (type `0x7453`, port id and groups as two `u32`s).
//! - `setsockopt`/`getsockopt` at `SOL_NETLINK`: group membership is
//!   passed on, other options are accepted; `SO_TYPE`, `SO_DOMAIN` and
//!   `SO_PROTOCOL` answer as a netlink socket would.
//! - `sendto`/`sendmsg`: the netlink destination is dropped (tunsec is
//!   "the kernel"); `recvfrom`/`recvmsg`: the source address is filled in
//!   as the kernel's (`nl_pid` 0), which charon and iproute2 check.
//! - `close`: the socket's entry is forgotten.
//!
//! Not covered: statically linked programs and raw `syscall()`s (nothing
//! to interpose), `dup`/`dup2` of such a socket (the copy is a plain Unix
//! socket), a port id chosen by `write()` before any `bind`/`send*` (the
//! replies then carry port id 0), and `NETLINK_PKTINFO` control messages.

use libc::{c_int, c_void, msghdr, size_t, sockaddr, socklen_t, ssize_t};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, Ordering::Relaxed};

const NETLINK_XFRM: c_int = 6;
const SOL_NETLINK: c_int = 270;
const NETLINK_ADD_MEMBERSHIP: c_int = 1;
const NETLINK_DROP_MEMBERSHIP: c_int = 2;
/// tunsec's message: this connection's port id and groups.
const SHIM_BIND: u16 = 0x7453;

/// Per-descriptor state of the sockets taken over.
struct Slot {
    xfrm: AtomicBool,
    pid: AtomicU32,
    groups: AtomicU32,
    /// The type asked for (SOCK_RAW or SOCK_DGRAM), for SO_TYPE.
    ty: AtomicU32,
}

const SLOTS: usize = 4096;
#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    xfrm: AtomicBool::new(false),
    pid: AtomicU32::new(0),
    groups: AtomicU32::new(0),
    ty: AtomicU32::new(0),
};
static TABLE: [Slot; SLOTS] = [EMPTY; SLOTS];
/// Port ids handed out when a socket binds to 0 (the kernel's are the
/// pid for the first socket, then negative numbers; these never collide
/// with a pid).
static NEXT_PORT: AtomicU32 = AtomicU32::new(0);

fn slot(fd: c_int) -> Option<&'static Slot> {
    let s = TABLE.get(usize::try_from(fd).ok()?)?;
    s.xfrm.load(Relaxed).then_some(s)
}

macro_rules! real {
    ($name:ident : $ty:ty) => {{
        static P: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
        let mut p = P.load(Relaxed);
        if p.is_null() {
            // SAFETY: dlsym with a NUL-terminated name.
            p = unsafe {
                libc::dlsym(
                    libc::RTLD_NEXT,
                    concat!(stringify!($name), "\0").as_ptr() as *const libc::c_char,
                )
            };
            P.store(p, Relaxed);
        }
        // SAFETY: the symbol of that name has this C signature.
        unsafe { std::mem::transmute::<*mut c_void, $ty>(p) }
    }};
}

fn set_errno(e: c_int) {
    // SAFETY: errno is thread-local.
    unsafe { *libc::__errno_location() = e };
}

/// The port id, assigned on first need.
fn port(s: &Slot) -> u32 {
    let p = s.pid.load(Relaxed);
    if p != 0 {
        return p;
    }
    let n = NEXT_PORT.fetch_add(1, Relaxed);
    // SAFETY: getpid cannot fail.
    let p = if n == 0 {
        unsafe { libc::getpid() as u32 }
    } else {
        (-4096i32 - n as i32) as u32
    };
    match s.pid.compare_exchange(0, p, Relaxed, Relaxed) {
        Ok(_) => p,
        Err(other) => other,
    }
}

/// Tell tunsec this socket's port id and groups.
fn announce(fd: c_int, s: &Slot) {
    let pid = port(s);
    let mut m = [0u8; 24];
    m[0..4].copy_from_slice(&24u32.to_ne_bytes());
    m[4..6].copy_from_slice(&SHIM_BIND.to_ne_bytes());
    m[6..8].copy_from_slice(&1u16.to_ne_bytes());
    m[12..16].copy_from_slice(&pid.to_ne_bytes());
    m[16..20].copy_from_slice(&pid.to_ne_bytes());
    m[20..24].copy_from_slice(&s.groups.load(Relaxed).to_ne_bytes());
    let send = real!(send: unsafe extern "C" fn(c_int, *const c_void, size_t, c_int) -> ssize_t);
    // SAFETY: m is valid for the call.
    unsafe { send(fd, m.as_ptr() as *const c_void, m.len(), libc::MSG_NOSIGNAL) };
}

fn ensure_bound(fd: c_int, s: &Slot) {
    if s.pid.load(Relaxed) == 0 {
        announce(fd, s);
    }
}

/// Write the kernel's netlink address (`nl_pid` 0) to `addr`.
///
/// # Safety
/// `addr`/`len` as given to recvfrom/getsockname.
unsafe fn fill_addr(addr: *mut sockaddr, len: *mut socklen_t, pid: u32, groups: u32) {
    if addr.is_null() || len.is_null() {
        return;
    }
    let mut nl: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    nl.nl_family = libc::AF_NETLINK as u16;
    nl.nl_pid = pid;
    nl.nl_groups = groups;
    let n = std::mem::size_of::<libc::sockaddr_nl>();
    let room = unsafe { *len } as usize;
    unsafe {
        std::ptr::copy_nonoverlapping(&nl as *const _ as *const u8, addr as *mut u8, room.min(n));
        *len = n as socklen_t;
    }
}

/// # Safety
/// Called as libc's `socket`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn socket(domain: c_int, ty: c_int, protocol: c_int) -> c_int {
    let real_socket = real!(socket: unsafe extern "C" fn(c_int, c_int, c_int) -> c_int);
    if domain != libc::AF_NETLINK || protocol != NETLINK_XFRM {
        return unsafe { real_socket(domain, ty, protocol) };
    }
    let path = unsafe { libc::getenv(c"TUNSEC_XFRM".as_ptr()) };
    if path.is_null() {
        return unsafe { real_socket(domain, ty, protocol) };
    }
    let fd = unsafe {
        real_socket(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | (ty & libc::SOCK_CLOEXEC),
            0,
        )
    };
    if fd < 0 {
        return fd;
    }
    let mut sun: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    sun.sun_family = libc::AF_UNIX as u16;
    let p = unsafe { std::ffi::CStr::from_ptr(path) }.to_bytes();
    let close = real!(close: unsafe extern "C" fn(c_int) -> c_int);
    if p.len() >= sun.sun_path.len() || usize::try_from(fd).map_or(true, |i| i >= SLOTS) {
        unsafe { close(fd) };
        set_errno(libc::EPROTONOSUPPORT);
        return -1;
    }
    for (d, s) in sun.sun_path.iter_mut().zip(p) {
        *d = *s as libc::c_char;
    }
    let connect = real!(connect: unsafe extern "C" fn(c_int, *const sockaddr, socklen_t) -> c_int);
    let r = unsafe {
        connect(
            fd,
            &sun as *const _ as *const sockaddr,
            std::mem::size_of::<libc::sockaddr_un>() as socklen_t,
        )
    };
    if r < 0 {
        // No tunsec there: as a kernel without XFRM would answer.
        unsafe { close(fd) };
        set_errno(libc::EPROTONOSUPPORT);
        return -1;
    }
    if ty & libc::SOCK_NONBLOCK != 0 {
        unsafe {
            let fl = libc::fcntl(fd, libc::F_GETFL);
            libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
    }
    let s = &TABLE[fd as usize];
    s.pid.store(0, Relaxed);
    s.groups.store(0, Relaxed);
    s.ty.store((ty & 0xf) as u32, Relaxed);
    s.xfrm.store(true, Relaxed);
    fd
}

/// # Safety
/// Called as libc's `bind`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bind(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    let Some(s) = slot(fd) else {
        let f = real!(bind: unsafe extern "C" fn(c_int, *const sockaddr, socklen_t) -> c_int);
        return unsafe { f(fd, addr, len) };
    };
    if addr.is_null() || (len as usize) < std::mem::size_of::<libc::sockaddr_nl>() {
        set_errno(libc::EINVAL);
        return -1;
    }
    let nl = unsafe { &*(addr as *const libc::sockaddr_nl) };
    if nl.nl_pid != 0 {
        s.pid.store(nl.nl_pid, Relaxed);
    }
    s.groups.store(nl.nl_groups, Relaxed);
    announce(fd, s);
    0
}

/// # Safety
/// Called as libc's `connect`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn connect(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    if let Some(s) = slot(fd) {
        // Connecting a netlink socket to the kernel: nothing to do.
        ensure_bound(fd, s);
        return 0;
    }
    let f = real!(connect: unsafe extern "C" fn(c_int, *const sockaddr, socklen_t) -> c_int);
    unsafe { f(fd, addr, len) }
}

/// # Safety
/// Called as libc's `getsockname`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn getsockname(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    let Some(s) = slot(fd) else {
        let f =
            real!(getsockname: unsafe extern "C" fn(c_int, *mut sockaddr, *mut socklen_t) -> c_int);
        return unsafe { f(fd, addr, len) };
    };
    ensure_bound(fd, s);
    unsafe { fill_addr(addr, len, port(s), s.groups.load(Relaxed)) };
    0
}

/// # Safety
/// Called as libc's `getpeername`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn getpeername(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    if slot(fd).is_some() {
        unsafe { fill_addr(addr, len, 0, 0) };
        return 0;
    }
    let f = real!(getpeername: unsafe extern "C" fn(c_int, *mut sockaddr, *mut socklen_t) -> c_int);
    unsafe { f(fd, addr, len) }
}

/// # Safety
/// Called as libc's `setsockopt`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn setsockopt(
    fd: c_int,
    level: c_int,
    name: c_int,
    val: *const c_void,
    len: socklen_t,
) -> c_int {
    let f = real!(setsockopt: unsafe extern "C" fn(c_int, c_int, c_int, *const c_void, socklen_t) -> c_int);
    let Some(s) = slot(fd) else {
        return unsafe { f(fd, level, name, val, len) };
    };
    if level != SOL_NETLINK {
        return unsafe { f(fd, level, name, val, len) };
    }
    if name == NETLINK_ADD_MEMBERSHIP || name == NETLINK_DROP_MEMBERSHIP {
        if val.is_null() || (len as usize) < 4 {
            set_errno(libc::EINVAL);
            return -1;
        }
        let g = unsafe { *(val as *const u32) };
        if g == 0 || g > 32 {
            set_errno(libc::EINVAL);
            return -1;
        }
        let bit = 1u32 << (g - 1);
        if name == NETLINK_ADD_MEMBERSHIP {
            s.groups.fetch_or(bit, Relaxed);
        } else {
            s.groups.fetch_and(!bit, Relaxed);
        }
        announce(fd, s);
    }
    // Extended acks, strict checking, no-ENOBUFS...: accepted.
    0
}

/// # Safety
/// Called as libc's `getsockopt`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn getsockopt(
    fd: c_int,
    level: c_int,
    name: c_int,
    val: *mut c_void,
    len: *mut socklen_t,
) -> c_int {
    let f = real!(getsockopt: unsafe extern "C" fn(c_int, c_int, c_int, *mut c_void, *mut socklen_t) -> c_int);
    let Some(s) = slot(fd) else {
        return unsafe { f(fd, level, name, val, len) };
    };
    let answer = match (level, name) {
        (SOL_NETLINK, _) => Some(0),
        (libc::SOL_SOCKET, libc::SO_TYPE) => Some(s.ty.load(Relaxed) as c_int),
        (libc::SOL_SOCKET, libc::SO_DOMAIN) => Some(libc::AF_NETLINK),
        (libc::SOL_SOCKET, libc::SO_PROTOCOL) => Some(NETLINK_XFRM),
        _ => None,
    };
    match answer {
        None => unsafe { f(fd, level, name, val, len) },
        Some(v) => {
            if val.is_null() || len.is_null() || (unsafe { *len } as usize) < 4 {
                set_errno(libc::EINVAL);
                return -1;
            }
            unsafe {
                *(val as *mut c_int) = v;
                *len = 4;
            }
            0
        }
    }
}

/// # Safety
/// Called as libc's `send`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn send(fd: c_int, buf: *const c_void, n: size_t, flags: c_int) -> ssize_t {
    if let Some(s) = slot(fd) {
        ensure_bound(fd, s);
    }
    let f = real!(send: unsafe extern "C" fn(c_int, *const c_void, size_t, c_int) -> ssize_t);
    unsafe { f(fd, buf, n, flags) }
}

/// # Safety
/// Called as libc's `sendto`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sendto(
    fd: c_int,
    buf: *const c_void,
    n: size_t,
    flags: c_int,
    addr: *const sockaddr,
    len: socklen_t,
) -> ssize_t {
    if let Some(s) = slot(fd) {
        ensure_bound(fd, s);
        let f = real!(send: unsafe extern "C" fn(c_int, *const c_void, size_t, c_int) -> ssize_t);
        return unsafe { f(fd, buf, n, flags | libc::MSG_NOSIGNAL) };
    }
    let f = real!(sendto: unsafe extern "C" fn(c_int, *const c_void, size_t, c_int, *const sockaddr, socklen_t) -> ssize_t);
    unsafe { f(fd, buf, n, flags, addr, len) }
}

/// # Safety
/// Called as libc's `sendmsg`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sendmsg(fd: c_int, msg: *const msghdr, flags: c_int) -> ssize_t {
    let f = real!(sendmsg: unsafe extern "C" fn(c_int, *const msghdr, c_int) -> ssize_t);
    let Some(s) = slot(fd) else {
        return unsafe { f(fd, msg, flags) };
    };
    ensure_bound(fd, s);
    if msg.is_null() {
        set_errno(libc::EFAULT);
        return -1;
    }
    let mut m = unsafe { *msg };
    m.msg_name = std::ptr::null_mut();
    m.msg_namelen = 0;
    m.msg_control = std::ptr::null_mut();
    m.msg_controllen = 0;
    unsafe { f(fd, &m, flags | libc::MSG_NOSIGNAL) }
}

/// # Safety
/// Called as libc's `recvfrom`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn recvfrom(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    flags: c_int,
    addr: *mut sockaddr,
    len: *mut socklen_t,
) -> ssize_t {
    let f = real!(recvfrom: unsafe extern "C" fn(c_int, *mut c_void, size_t, c_int, *mut sockaddr, *mut socklen_t) -> ssize_t);
    if slot(fd).is_none() {
        return unsafe { f(fd, buf, n, flags, addr, len) };
    }
    let r = unsafe {
        f(
            fd,
            buf,
            n,
            flags,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
    };
    if r >= 0 {
        unsafe { fill_addr(addr, len, 0, 0) };
    }
    r
}

/// # Safety
/// Called as libc's `recvmsg`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn recvmsg(fd: c_int, msg: *mut msghdr, flags: c_int) -> ssize_t {
    let f = real!(recvmsg: unsafe extern "C" fn(c_int, *mut msghdr, c_int) -> ssize_t);
    if slot(fd).is_none() || msg.is_null() {
        return unsafe { f(fd, msg, flags) };
    }
    let m = unsafe { &mut *msg };
    let (name, namelen) = (m.msg_name, m.msg_namelen);
    m.msg_name = std::ptr::null_mut();
    m.msg_namelen = 0;
    let r = unsafe { f(fd, m, flags) };
    m.msg_name = name;
    m.msg_namelen = namelen;
    if r >= 0 {
        m.msg_controllen = 0;
        let mut l = namelen;
        unsafe { fill_addr(name as *mut sockaddr, &mut l, 0, 0) };
        m.msg_namelen = if name.is_null() { 0 } else { l };
    }
    r
}

/// # Safety
/// Called as libc's `close`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn close(fd: c_int) -> c_int {
    if let Some(s) = slot(fd) {
        s.xfrm.store(false, Relaxed);
        s.pid.store(0, Relaxed);
        s.groups.store(0, Relaxed);
    }
    let f = real!(close: unsafe extern "C" fn(c_int) -> c_int);
    unsafe { f(fd) }
}
