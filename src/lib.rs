//! tunsec: a userspace IPsec (transport mode) data plane.
//!
//! The core is sans-IO: parsing, SPD/SAD, replay windows and the
//! ESP/AH/IPComp transforms work on byte buffers, with time passed in.
//! Two front ends change the same [`state::State`]: setkey text
//! ([`setkey`], files and the control socket) and XFRM netlink messages
//! ([`xfrm`], what IKE daemons send). The `tunsec` binary's modes (`pcap`,
//! `bench`, the `run` daemon) are thin shells around the engine's
//! [`engine::outbound`] and [`engine::inbound`].

pub mod acquire;
pub mod ah;
pub mod bench;
pub mod buf;
pub mod cli;
pub mod client;
pub mod control;
pub mod cowmap;
pub mod crypto;
pub mod daemon;
pub mod engine;
pub mod esp;
pub mod flowcache;
pub mod gro;
pub mod hugepages;

pub mod ike;
pub mod ipcomp;
pub mod packet;
pub mod pcap;
pub mod prefetch;
pub mod reassembly;
pub mod replay;
pub mod sad;
pub mod secret;
pub mod setkey;
pub mod spd;
pub mod state;
pub mod udp_encap;
pub mod xfrm;
