//! The TUN device: one queue per worker (IFF_MULTI_QUEUE), so the kernel
//! spreads flows over workers by flow hash and never reorders a flow.
//!
//! tun-rs rather than tun-tap: tun-tap cannot open multi-queue devices,
//! has no IFF_VNET_HDR offloads and no batch I/O; see the README.

use anyhow::{Context, Result, bail};
use tun_rs::{DeviceBuilder, SyncDevice};

pub struct Tun {
    pub name: String,
    pub queues: Vec<SyncDevice>,
}

impl Tun {
    /// Create `name` with `queues` queues and the given MTU, down; the
    /// caller configures and raises it. With `offload`, reads may return
    /// GSO super-packets and writes may coalesce (IFF_VNET_HDR).
    pub fn create(name: &str, queues: usize, mtu: u16, offload: bool) -> Result<Tun> {
        if std::path::Path::new("/sys/class/net").join(name).exists() {
            bail!(
                "interface {name} exists already (another tunsec instance, or pick another name with --tun)"
            );
        }
        let first = DeviceBuilder::new()
            .name(name)
            .mtu(mtu)
            .multi_queue(true)
            .offload(offload)
            .enable(false)
            .build_sync()
            .with_context(|| {
                format!("cannot create TUN device {name} (is /dev/net/tun there, and are we root?)")
            })?;
        let mut qs = vec![first];
        for _ in 1..queues.max(1) {
            let q = qs[0]
                .try_clone()
                .with_context(|| format!("cannot open another queue of {name}"))?;
            qs.push(q);
        }
        for q in &qs {
            q.set_nonblocking(true)?;
        }
        Ok(Tun {
            name: name.to_string(),
            queues: qs,
        })
    }
}
