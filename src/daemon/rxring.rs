//! A packet socket's receive ring (`PACKET_RX_RING`, `TPACKET_V2`).
//!
//! With a ring the kernel copies each frame the socket's filter passes
//! into a slot of memory shared with tunsec, in the context that received
//! it (on a veth, the sender's system call), instead of cloning the
//! `sk_buff` onto the socket's queue for `recvmmsg` to copy out, unlink and
//! free: no per-packet queueing, accounting or system call on the
//! receiving side. `TPACKET_V2` rather than V3: a V3 block is handed over
//! when it fills or its timer (a millisecond at least) fires, which a ping
//! or a lone TCP ACK would wait for; a V2 frame is handed over at once.
//!
//! Frames hold packets up to the links' MTU. A larger one (a jumbo frame
//! on a link added later, an IPv4 datagram the fanout reassembled, a
//! packet on `lo`) gets a truncated copy in the ring marked
//! `TP_STATUS_COPY` and is queued whole on the socket as well
//! (`PACKET_COPY_THRESH`): it is read from there in its place, so order
//! is kept.
//!
//! Off unless `TUNSEC_RXRING=1`: on a veth pair, where the peer's receive
//! path runs in the sender's system call, the ring moved cost from the
//! receiver to the sender (the copy into the ring replaces a clone) and
//! the sender sets the pace: ESP aes-gcm-16 over TCP went 2.33–2.41
//! Gbit/s with it, 2.58–2.63 without, in alternating runs (README, "Receive
//! rings"). Where the receiver's own CPU takes the frame (a NIC), the
//! trade may differ; that is not measured here.

use std::cell::Cell;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use super::net;

/// Bytes of ring per socket: 2,048 frames of 2 KiB. A ring of 256 KiB
/// (128 frames) overflowed under one TCP stream (20,988 packets dropped in
/// 5 s, the sender retransmitting); 4 MiB and 16 MiB dropped none.
const RING_BYTES: usize = 4 << 20;
/// Bytes of a block (frames never straddle one; the kernel allocates
/// blocks whole, falling back to vmalloc for large ones).
const BLOCK: usize = 1 << 16;
/// Where the packet starts in a frame: the `tpacket2_hdr`, then the
/// `sockaddr_ll` (aligned to 16), then 16 bytes where a link header would
/// go (`tpacket_rcv` for `SOCK_DGRAM`).
const NET_OFFSET: usize = 80;
/// Offset of `sll_pkttype` in a frame: after the header (32 bytes
/// aligned), `sockaddr_ll`'s family, protocol, ifindex and hatype.
const PKTTYPE_OFFSET: usize = 32 + 10;

/// The frame size for packets up to `mtu` bytes (plus a VLAN tag's room):
/// a power of two from 2 KiB to the block size.
pub fn frame_size(mtu: usize) -> usize {
    (NET_OFFSET + mtu + 4)
        .next_power_of_two()
        .clamp(2048, BLOCK)
}

/// Whether to receive through a ring (`TUNSEC_RXRING=1`; else `recvmmsg`).
pub fn wanted() -> bool {
    std::env::var("TUNSEC_RXRING").is_ok_and(|v| v == "1")
}

/// The largest MTU of the links under `sys` (/sys/class/net) but `lo` and
/// the TUN device `tun`; 1500 if none is readable.
pub fn links_mtu(sys: &std::path::Path, tun: &str) -> usize {
    std::fs::read_dir(sys)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name() != "lo" && e.file_name() != tun)
                .filter_map(|e| std::fs::read_to_string(e.path().join("mtu")).ok())
                .filter_map(|s| s.trim().parse::<usize>().ok())
                .max()
                .unwrap_or(1500)
        })
        .unwrap_or(1500)
}

/// The mapped ring of one socket.
struct Ring {
    map: NonNull<u8>,
    frame: usize,
    frames: usize,
    /// The next frame to look at.
    head: Cell<usize>,
}

// SAFETY: the mapping belongs to the ring alone; a worker owns its socket.
unsafe impl Send for Ring {}

impl Ring {
    /// Give `fd` (not yet bound) a ring of frames of `frame` bytes.
    fn attach(fd: RawFd, frame: usize) -> io::Result<Ring> {
        let v2 = libc::tpacket_versions::TPACKET_V2 as libc::c_int;
        net::setsockopt(fd, libc::SOL_PACKET, libc::PACKET_VERSION, &v2)?;
        let one: libc::c_int = 1;
        net::setsockopt(fd, libc::SOL_PACKET, libc::PACKET_COPY_THRESH, &one)?;
        let frames = RING_BYTES / frame;
        let req = libc::tpacket_req {
            tp_block_size: BLOCK as u32,
            tp_block_nr: (RING_BYTES / BLOCK) as u32,
            tp_frame_size: frame as u32,
            tp_frame_nr: frames as u32,
        };
        net::setsockopt(fd, libc::SOL_PACKET, libc::PACKET_RX_RING, &req)?;
        // SAFETY: mapping the ring the kernel just made for this socket.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                RING_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Ring {
            map: NonNull::new(p as *mut u8).expect("mmap returned null"),
            frame,
            frames,
            head: Cell::new(0),
        })
    }

    fn frame_ptr(&self, i: usize) -> *mut u8 {
        // SAFETY: i < frames, so the frame lies inside the mapping.
        unsafe { self.map.as_ptr().add(i * self.frame) }
    }

    fn status(&self, i: usize) -> &AtomicU32 {
        // SAFETY: tp_status is the frame's first, aligned u32, shared with
        // the kernel, which writes it last (after a barrier).
        unsafe { AtomicU32::from_ptr(self.frame_ptr(i) as *mut u32) }
    }

    /// Hand the head frame back to the kernel and move on.
    fn release(&self) {
        let i = self.head.get();
        self.status(i)
            .store(libc::TP_STATUS_KERNEL, Ordering::Release);
        self.head.set((i + 1) % self.frames);
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: the mapping made in attach, not used after this.
        unsafe { libc::munmap(self.map.as_ptr() as *mut libc::c_void, RING_BYTES) };
    }
}

/// A worker's receiving packet socket, with its ring where it has one.
pub struct RxSocket {
    ring: Option<Ring>,
    fd: OwnedFd,
}

impl RxSocket {
    /// A packet socket of fanout group `group` for `ethertype`
    /// ([`net::packet_socket`]), with a ring of frames of `frame` bytes if
    /// given and the kernel grants it (else a warning, and `recvmmsg`).
    pub fn open(group: u16, ethertype: u16, frame: Option<usize>) -> io::Result<RxSocket> {
        let mut ring = None;
        let fd = net::packet_socket(group, ethertype, |fd| {
            if let Some(frame) = frame {
                match Ring::attach(fd, frame) {
                    Ok(r) => ring = Some(r),
                    Err(e) => tracing::warn!("packet socket without a receive ring: {e}"),
                }
            }
        })?;
        Ok(RxSocket { ring, fd })
    }

    pub fn has_ring(&self) -> bool {
        self.ring.is_some()
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Packets the kernel dropped for this socket since the last call
    /// (its ring or queue was full): `PACKET_STATISTICS`, which resets.
    pub fn take_drops(&self) -> u64 {
        let mut st = libc::tpacket_stats {
            tp_packets: 0,
            tp_drops: 0,
        };
        let mut len = std::mem::size_of::<libc::tpacket_stats>() as libc::socklen_t;
        // SAFETY: st and len are valid for the kernel to fill.
        let r = unsafe {
            libc::getsockopt(
                self.fd(),
                libc::SOL_PACKET,
                libc::PACKET_STATISTICS,
                &mut st as *mut _ as *mut libc::c_void,
                &mut len,
            )
        };
        if r < 0 { 0 } else { st.tp_drops as u64 }
    }

    /// As [`net::recv_batch`]: up to `bufs.len()` packets, each copied at
    /// `offset` in its buffer, their lengths in `lens` (0: skip it, not
    /// for this host or truncated). Ok(0) when there is nothing.
    pub fn recv_batch<B: AsMut<[u8]>>(
        &self,
        bufs: &mut [B],
        offset: usize,
        lens: &mut [usize],
    ) -> io::Result<usize> {
        let Some(ring) = &self.ring else {
            return net::recv_batch(self.fd(), bufs, offset, lens);
        };
        let k = bufs.len().min(lens.len());
        let mut n = 0;
        while n < k {
            let i = ring.head.get();
            let status = ring.status(i).load(Ordering::Acquire);
            if status & libc::TP_STATUS_USER == 0 {
                break;
            }
            if status & libc::TP_STATUS_COPY != 0 {
                // The whole packet waits on the socket's queue: take it
                // there, in its place, with those of the run of such
                // frames that follows it (UDP GSO super-packets that
                // crossed a veth whole come in runs) in one recvmmsg.
                if n > 0 {
                    break;
                }
                let mut run = 0;
                while run < k
                    && ring.status(ring.head.get()).load(Ordering::Acquire)
                        & (libc::TP_STATUS_USER | libc::TP_STATUS_COPY)
                        == libc::TP_STATUS_USER | libc::TP_STATUS_COPY
                {
                    ring.release();
                    run += 1;
                }
                return match net::recv_batch(self.fd(), &mut bufs[..run], offset, &mut lens[..run])
                {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
                    r => r,
                };
            }
            let f = ring.frame_ptr(i);
            // SAFETY: the frame is ours until released: its header, and
            // tp_snaplen bytes at tp_net, which the kernel keeps inside
            // the frame.
            let (hdr, pkttype) = unsafe {
                (
                    std::ptr::read(f as *const libc::tpacket2_hdr),
                    *f.add(PKTTYPE_OFFSET),
                )
            };
            let (net, snap) = (hdr.tp_net as usize, hdr.tp_snaplen as usize);
            let area = &mut bufs[n].as_mut()[offset..];
            lens[n] = if pkttype != libc::PACKET_HOST
                || snap < hdr.tp_len as usize
                || net + snap > ring.frame
                || snap > area.len()
            {
                0
            } else {
                // SAFETY: checked above to lie inside the frame.
                let pkt = unsafe { std::slice::from_raw_parts(f.add(net), snap) };
                area[..snap].copy_from_slice(pkt);
                snap
            };
            ring.release();
            n += 1;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_hold_the_mtu_after_the_header_in_powers_of_two() {
        assert_eq!(frame_size(1500), 2048);
        assert_eq!(frame_size(1280), 2048);
        // 1964 + 80 + 4 = 2048 exactly; one more byte needs 4 KiB.
        assert_eq!(frame_size(1964), 2048);
        assert_eq!(frame_size(1965), 4096);
        assert_eq!(frame_size(9000), 16384);
        // Never past a block: bigger packets take the copy path.
        assert_eq!(frame_size(65536), BLOCK);
        for mtu in [576, 1500, 4000, 9000, 60000] {
            let f = frame_size(mtu);
            assert!(f.is_power_of_two() && BLOCK.is_multiple_of(f) && RING_BYTES.is_multiple_of(f));
            assert!(f >= (NET_OFFSET + mtu + 4).min(BLOCK));
        }
    }

    #[test]
    fn links_mtu_is_the_largest_but_lo_and_the_tun() {
        let d = tempfile::tempdir().unwrap();
        for (l, mtu) in [
            ("lo", "65536"),
            ("tsec0", "9000"),
            ("eth0", "1500"),
            ("eth1", "4000\n"),
        ] {
            std::fs::create_dir(d.path().join(l)).unwrap();
            std::fs::write(d.path().join(l).join("mtu"), mtu).unwrap();
        }
        std::fs::create_dir(d.path().join("broken")).unwrap();
        assert_eq!(links_mtu(d.path(), "tsec0"), 4000);
        assert_eq!(links_mtu(&d.path().join("none"), "tsec0"), 1500);
    }
}
