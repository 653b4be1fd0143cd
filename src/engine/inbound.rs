//! Inbound: IPsec arriving for this host, opened and checked against the
//! inbound SPD, in chunks like the outbound path.

use super::in_run::InRun;
use super::*;

/// Process a packet arriving for this host: verify and remove AH, ESP and
/// IPComp, then check the result against the inbound policy. A fragment of
/// an IPsec packet is held ([`Verdict::Held`]) until its datagram is
/// complete; the packet that completes it returns the datagram's verdict
/// with the datagram in `buf`. ([`inbound_batch`] of one packet.)
pub fn inbound(state: &State, w: &mut Worker, buf: &mut PacketBuf, now: Duration) -> Verdict {
    let mut v = [Verdict::Forward];
    inbound_batch(state, w, std::slice::from_mut(buf), now, &mut v);
    v[0]
}

/// A transform found on an inbound packet (all `Some` in `found[..n]`).
type Found<'s> = Option<(Proto, &'s Arc<Sa>)>;

/// Where an inbound packet of a chunk stands between the stages.
#[derive(Clone, Copy)]
enum InStep<'s> {
    /// Decided (`verdicts[i]` is set).
    Done,
    /// Parsed (`info`), outer UDP removed (`encap`), its first IPsec
    /// header at (`at`, `nh_pos`) with the SA its SPI names, if found.
    Header {
        encap: Option<udp_encap::Encap>,
        ipsec: Option<(usize, usize)>,
        sa: Option<&'s Arc<Sa>>,
    },
    /// Decapsulated by at most one SA (more are checked at once); its
    /// flow is in the scratch.
    Open(Found<'s>),
    /// And the flow's inbound policy: from the flow cache (with the SA it
    /// last passed with), or looked up.
    Policy(Found<'s>, PolicyOf<'s>),
}

#[derive(Clone, Copy)]
enum PolicyOf<'s> {
    Cached(flowcache::Hit),
    Looked(Option<&'s Arc<Policy>>),
}

/// Process packets arriving for this host: `verdicts[i]` is the verdict
/// for `bufs[i]`, as [`inbound`] would give packet by packet, in order.
/// In chunks of [`CHUNK`], four stages: parse, find the IPsec header and
/// its SA, ask for the SA's lines; verify and decapsulate, hash the inner
/// flow, ask for its flow cache set; find the flow's policy, ask for its
/// lines; check the policy.
pub fn inbound_batch<B: AsMut<PacketBuf>>(
    state: &State,
    w: &mut Worker,
    bufs: &mut [B],
    now: Duration,
    verdicts: &mut [Verdict],
) {
    assert_eq!(bufs.len(), verdicts.len(), "one verdict per packet");
    w.in_flows
        .begin_batch(state.generation, state.spd.len_dir(Dir::In));
    let mut sc = w.scratch.take().unwrap_or_else(Scratch::new);
    let mut run = w.in_run.take().unwrap_or_else(InRun::new);
    for (b, v) in bufs.chunks_mut(CHUNK).zip(verdicts.chunks_mut(CHUNK)) {
        // The stages' arrays are made (zeroed) per chunk: a packet alone
        // does not pay for 32.
        if b.len() == 1 {
            inbound_chunk::<1, B>(state, w, &mut sc, &mut run, b, now, v);
        } else {
            inbound_chunk::<CHUNK, B>(state, w, &mut sc, &mut run, b, now, v);
        }
        w.in_flows.end_batch();
    }
    w.scratch = Some(sc);
    w.in_run = Some(run);
}

#[allow(clippy::needless_range_loop)]
fn inbound_chunk<const N: usize, B: AsMut<PacketBuf>>(
    state: &State,
    w: &mut Worker,
    sc: &mut Scratch,
    run: &mut InRun,
    bufs: &mut [B],
    now: Duration,
    verdicts: &mut [Verdict],
) {
    let n = bufs.len();
    let second = flowcache::second(now);
    let mut steps = [InStep::Done; N];
    let mut spis = [None; N];
    // Stage 1: parse (and reassemble), take off UDP, find the SPI.
    for i in 0..n {
        let buf = bufs[i].as_mut();
        // (Results written in place: a packet's records moved through
        // the stack cost store-forwarding stalls.)
        if let Err(v) = inbound_header(
            state,
            w,
            buf,
            now,
            &mut sc.info[i],
            &mut steps[i],
            &mut spis[i],
        ) {
            verdicts[i] = v;
        }
    }
    // Then look up the SAs (their slots were asked for in stage 1); ask
    // for each SA's lines.
    for i in 0..n {
        if let (Some((dst, proto, spi, _)), InStep::Header { sa, .. }) = (spis[i], &mut steps[i]) {
            *sa = state.sad.lookup_inbound(dst, proto, spi);
            if let Some(sa) = sa {
                sa.prefetch();
            }
        }
    }
    // Stage 2: verify and decapsulate; hash the inner flow. With
    // `account_runs`, consecutive packets of one SA are a run (`in_run`).
    run.begin_chunk();
    let mut run_sa: Option<&Arc<Sa>> = None;
    for i in 0..n {
        let InStep::Header { encap, ipsec, sa } = steps[i] else {
            continue;
        };
        let member = match (sa, spis[i]) {
            (Some(sa), Some(_)) if w.account_runs => Some(sa),
            _ => None,
        };
        if let Some(rs) = run_sa
            && !member.is_some_and(|sa| run.is(sa))
        {
            end_run(run, rs, w, now, &mut steps, verdicts);
            run_sa = None;
        }
        if let Some(sa) = member
            && run_sa.is_none()
            && !run.refused(sa)
        {
            let members = (i..n)
                .map_while(|j| match steps[j] {
                    InStep::Header { sa: Some(s), .. } if Arc::ptr_eq(s, sa) => {
                        Some(spis[j].map(|(_, _, _, lo)| (j, lo, bufs[j].as_mut().len())))
                    }
                    InStep::Done => Some(None),
                    _ => None,
                })
                .flatten();
            if run.start(sa, members, now) {
                run_sa = Some(sa);
            }
        }
        let in_run = if run_sa.is_some() {
            Some((&mut *run, i))
        } else {
            None
        };
        let buf = bufs[i].as_mut();
        let mut found = [None; MAX_BUNDLE];
        let flow = &mut sc.flow[i];
        let nfound = match decap_all(
            state,
            w,
            buf,
            &sc.info[i],
            encap,
            ipsec,
            sa,
            in_run,
            now,
            &mut found,
            flow,
        ) {
            Ok(n) => n,
            Err(r) => {
                verdicts[i] = w.drop(r);
                steps[i] = InStep::Done;
                continue;
            }
        };
        if nfound > 1 {
            // A bundle: checked now, without the flow cache.
            let policy = state.spd.lookup(Dir::In, flow);
            verdicts[i] = accept(w, buf, policy.map(|p| &**p), &found[..nfound], flow, now);
            steps[i] = InStep::Done;
            continue;
        }
        sc.key[i] = FlowKey::of(flow);
        let h = w.in_flows.hash(&sc.key[i]);
        w.in_flows.prefetch(h);
        sc.hash[i] = h;
        steps[i] = InStep::Open(found[0]);
    }
    if let Some(rs) = run_sa {
        end_run(run, rs, w, now, &mut steps, verdicts);
    }
    // Stage 3: the flow's policy.
    for i in 0..n {
        let InStep::Open(found) = steps[i] else {
            continue;
        };
        let p = match w.in_flows.get(&sc.key[i], sc.hash[i]) {
            Some(hit) => {
                // Read only when the bundle is checked or the use time
                // touched (once a second).
                let memo = found.is_some_and(|(_, sa)| hit.sa == Some(Arc::as_ptr(sa)));
                if let Some(p) = hit.policy
                    && (!memo || hit.must_touch(second))
                {
                    crate::prefetch::bytes(p, std::mem::size_of::<Policy>());
                }
                PolicyOf::Cached(hit)
            }
            None => PolicyOf::Looked(state.spd.lookup(Dir::In, &sc.flow[i])),
        };
        steps[i] = InStep::Policy(found, p);
    }
    // Stage 4: check it.
    for i in 0..n {
        let InStep::Policy(found, p) = steps[i] else {
            continue;
        };
        let buf = bufs[i].as_mut();
        let flow = &sc.flow[i];
        let one = [found];
        let found = &one[..found.is_some() as usize];
        verdicts[i] = match p {
            PolicyOf::Cached(hit) => {
                // SAFETY: valid until the chunk ends (flowcache::Hit).
                let policy = hit.policy.map(|p| unsafe { &*p });
                let passed = found
                    .first()
                    .and_then(|f| *f)
                    .is_some_and(|(_, sa)| hit.sa == Some(Arc::as_ptr(sa)));
                if passed {
                    // The same flow passed this policy with this SA.
                    if let Some(p) = policy
                        && hit.must_touch(second)
                    {
                        p.used.touch(now);
                        w.in_flows.touched(hit.slot, &sc.key[i], second);
                    }
                    w.counters.in_packets += 1;
                    w.counters.in_bytes += buf.len() as u64;
                    Verdict::Forward
                } else {
                    let v = accept(w, buf, policy, found, flow, now);
                    if let (Verdict::Forward, [Some((_, sa))]) = (v, found) {
                        w.in_flows.set_sa(&sc.key[i], sc.hash[i], Arc::clone(sa));
                    }
                    v
                }
            }
            PolicyOf::Looked(policy) => {
                let v = accept(w, buf, policy.map(|p| &**p), found, flow, now);
                let sa = match (v, found) {
                    (Verdict::Forward, [Some((_, sa))]) => Some(Arc::clone(sa)),
                    _ => None,
                };
                w.in_flows
                    .insert(sc.key[i], sc.hash[i], policy.cloned(), sa);
                v
            }
        };
    }
}

/// End an inbound run: accept its packets' numbers; drop those refused
/// there (unless already decided).
fn end_run(
    run: &mut InRun,
    sa: &Sa,
    w: &mut Worker,
    now: Duration,
    steps: &mut [InStep<'_>],
    verdicts: &mut [Verdict],
) {
    for &(i, r) in run.end(sa, w, now) {
        let i = i as usize;
        if !matches!(steps[i], InStep::Done) {
            verdicts[i] = w.drop(r);
            steps[i] = InStep::Done;
        }
    }
}

/// Check the transforms found against the flow's inbound policy and count
/// the packet.
fn accept(
    w: &mut Worker,
    buf: &PacketBuf,
    policy: Option<&Policy>,
    found: &[Found<'_>],
    flow: &Flow,
    now: Duration,
) -> Verdict {
    if let Some(policy) = policy {
        if let Err(r) = check_inbound_policy(policy, found, flow) {
            return w.drop(r);
        }
        policy.used.touch(now);
    }
    w.counters.in_packets += 1;
    w.counters.in_bytes += buf.len() as u64;
    Verdict::Forward
}

/// Stage 1 of a packet: parse it (a fragment goes to reassembly), take
/// off an ESP-in-UDP header meant for us, find its first IPsec header and
/// the key of the SA it names (destination, protocol, SPI).
#[inline(always)]
fn inbound_header<'s>(
    state: &'s State,
    w: &mut Worker,
    buf: &mut PacketBuf,
    now: Duration,
    info: &mut IpInfo,
    step: &mut InStep<'s>,
    out_spi: &mut Option<(IpAddr, Proto, u32, u32)>,
) -> Result<(), Verdict> {
    // Parsed into place: a packet's record copied through the stack after
    // narrow stores costs a store-forwarding stall.
    *info = match packet::parse(buf.data()) {
        Ok(i) => i,
        Err(_) => return Err(w.drop(DropReason::Malformed)),
    };
    if info.fragment && reassembly::wanted(buf.data(), info) {
        match w.reassembly.push(buf, info, now, &mut w.counters) {
            Outcome::Held => return Err(Verdict::Held),
            Outcome::Dropped(r) => return Err(Verdict::Drop(r)),
            Outcome::Complete => match packet::parse(buf.data()) {
                Ok(i) => *info = i,
                Err(_) => return Err(w.drop(DropReason::Malformed)),
            },
        }
    }
    // ESP in UDP (RFC 3948): to an SA that expects it on this port, or to
    // the NAT-T port (where an unknown SPI is counted as one).
    let mut encap = None;
    if let Some((spi, e)) = udp_encap::peek(buf.data(), info) {
        let expected = state
            .sad
            .lookup_inbound(info.dst(buf.data()), Proto::Esp, spi)
            .is_some_and(|sa| sa.config.encap.is_some_and(|x| x.dport == e.dport));
        if expected || e.dport == udp_encap::NAT_T_PORT {
            udp_encap::decapsulate(buf, info);
            *info = match packet::parse(buf.data()) {
                Ok(i) => i,
                Err(_) => return Err(w.drop(DropReason::Malformed)),
            };
            encap = Some(e);
        }
    }
    let ipsec = match packet::find_ipsec_header(buf.data(), info) {
        Ok(h) => h.map(|(at, nh_pos, _)| (at, nh_pos)),
        Err(_) => return Err(w.drop(DropReason::Malformed)),
    };
    // The SA the first header names (AH or ESP), looked up next.
    let mut spi = None;
    if let Some((at, nh_pos)) = ipsec {
        let d = buf.data();
        let proto = match d[nh_pos] {
            packet::PROTO_AH => Some(Proto::Ah),
            packet::PROTO_ESP => Some(Proto::Esp),
            _ => None,
        };
        if let Some(proto) = proto {
            let peek = match proto {
                Proto::Ah => ah::peek(d, at),
                _ => esp::peek(d, at),
            };
            spi = peek.map(|(spi, lo)| (info.dst(d), proto, spi, lo));
            if let Some((dst, proto, spi, _)) = spi {
                state.sad.prefetch_inbound(dst, proto, spi);
            }
        }
    }
    *step = InStep::Header {
        encap,
        ipsec,
        sa: None,
    };
    *out_spi = spi;
    Ok(())
}

/// Stage 2 of a packet: remove its IPsec headers, outermost first (`sa`:
/// the first one's, found in stage 1), and check the UDP encapsulation.
/// Fills in the SAs found (outermost first) and the inner flow; returns
/// how many SAs.
#[allow(clippy::too_many_arguments)]
fn decap_all<'s>(
    state: &'s State,
    w: &mut Worker,
    buf: &mut PacketBuf,
    info: &IpInfo,
    encap: Option<udp_encap::Encap>,
    ipsec: Option<(usize, usize)>,
    sa: Option<&'s Arc<Sa>>,
    mut run: Option<(&mut InRun, usize)>,
    now: Duration,
    found: &mut [Found<'s>; MAX_BUNDLE],
    out_flow: &mut Flow,
) -> Result<usize, DropReason> {
    let info = *info;
    let mut n = 0;
    let mut first = sa;
    // The outermost header's number waits to be accepted with its run.
    let mut waits = false;
    if let Some((at, nh_pos)) = ipsec {
        loop {
            let proto = match buf.data()[nh_pos] {
                packet::PROTO_AH => Proto::Ah,
                packet::PROTO_ESP => Proto::Esp,
                packet::PROTO_IPCOMP => Proto::IpComp,
                _ => break,
            };
            if waits && let (Some((r, i)), Some((_, outer))) = (&mut run, found[0]) {
                // A bundle: the outer number is accepted (with those
                // waiting before it) before the inner headers are opened.
                r.flush(outer, w, now);
                if let Some(e) = r.failure(*i) {
                    return Err(e);
                }
            }
            if n == MAX_BUNDLE || found[..n].iter().flatten().any(|(p, _)| *p == proto) {
                // Each protocol once, at most three layers.
                return Err(DropReason::PolicyMismatch);
            }
            let (sa, w8) = decap_one(
                state,
                w,
                buf,
                &info,
                at,
                nh_pos,
                proto,
                first.take(),
                if n == 0 {
                    run.as_mut().map(|(r, i)| (&mut **r, *i))
                } else {
                    None
                },
                now,
            )?;
            waits = w8;
            // The UDP header came off the outermost header, which must be
            // the ESP of an SA with that encapsulation (as `xfrm_input`
            // checks the encapsulation type); no other SA may expect UDP.
            let wanted = if n == 0 && proto == Proto::Esp {
                encap.map(|e| e.dport)
            } else {
                None
            };
            if sa.encap().map(|e| e.dport) != wanted {
                return Err(DropReason::EncapMismatch);
            }
            found[n] = Some((proto, sa));
            n += 1;
        }
    }
    if encap.is_some() {
        if n == 0 {
            return Err(DropReason::EncapMismatch);
        }
        let inner = packet::parse(buf.data()).map_err(|_| DropReason::Malformed)?;
        let header = if inner.is_v6() {
            40
        } else {
            (buf.data()[0] & 0xf) as usize * 4
        };
        if w.defer_tcp_checksum
            && inner.upper_proto == packet::PROTO_TCP
            && inner.upper_off == header
            && !inner.fragment
        {
            buf.csum_stale = true;
        } else {
            udp_encap::fix_inner_checksum(buf.data_mut(), &inner);
        }
    }
    *out_flow = if n == 0 {
        flow_of(&info, buf.data(), info.dst(buf.data()))
    } else if !info.is_v6() {
        // IPv4 after decapsulation: same header, the protocol byte now
        // names the upper layer.
        let info = IpInfo {
            next_hdr: buf.data()[9],
            upper_proto: buf.data()[9],
            ..info
        };
        flow_of(&info, buf.data(), info.dst(buf.data()))
    } else {
        let info = packet::parse(buf.data()).map_err(|_| DropReason::Malformed)?;
        flow_of(&info, buf.data(), info.dst(buf.data()))
    };
    Ok(n)
}

#[allow(clippy::too_many_arguments)]
fn decap_one<'s>(
    state: &'s State,
    w: &mut Worker,
    buf: &mut PacketBuf,
    info: &IpInfo,
    at: usize,
    nh_pos: usize,
    proto: Proto,
    // The SA of this header's SPI if looked up already (stage 1).
    pre: Option<&'s Arc<Sa>>,
    // The run this packet (its index) is of, if any: its number then
    // waits to be accepted with the run's (true returned).
    run: Option<(&mut InRun, usize)>,
    now: Duration,
) -> Result<(&'s Arc<Sa>, bool), DropReason> {
    if proto == Proto::IpComp {
        let cpi = Codec::peek(buf.data(), at).ok_or(DropReason::Malformed)?;
        let sa = state
            .sad
            .lookup_inbound(info.dst(buf.data()), Proto::IpComp, cpi as u32)
            .ok_or(DropReason::UnknownSpi)?;
        w.codec.decompress(buf, at, nh_pos).map_err(|e| {
            sa.counters.format_errors.fetch_add(1, Relaxed);
            match e {
                IpCompError::TooBig => DropReason::TooBig,
                IpCompError::Malformed => DropReason::Malformed,
                IpCompError::Corrupt => DropReason::Decompress,
            }
        })?;
        let e = sa.account(buf.len(), now);
        w.expiry(sa, e)?;
        return Ok((sa, false));
    }
    let (spi, seq_lo) = match proto {
        Proto::Ah => ah::peek(buf.data(), at),
        _ => esp::peek(buf.data(), at),
    }
    .ok_or(DropReason::Malformed)?;
    let sa = match pre {
        Some(sa) => sa,
        None => state
            .sad
            .lookup_inbound(info.dst(buf.data()), proto, spi)
            .ok_or(DropReason::UnknownSpi)?,
    };
    if sa.src() != info.src(buf.data()) {
        return Err(DropReason::UnknownSpi);
    }
    if sa.is_dead() {
        return Err(DropReason::SaExpired);
    }
    // (A run is of the SA found in stage 1.)
    let run = run.filter(|_| pre.is_some());
    let seq = match &run {
        Some((r, i)) => r.check(sa, *i, seq_lo),
        None => sa.replay_check(seq_lo),
    }
    .map_err(|e| replay_drop(sa, e))?;
    let seq_hi = (seq >> 32) as u32;
    let len = buf.len();
    let r = match proto {
        Proto::Ah => {
            ah::open(buf, at, nh_pos, sa, seq_hi, &mut w.scratch_bytes).map_err(|e| match e {
                AhError::Icv => DropReason::IcvFailure,
                _ => DropReason::Malformed,
            })
        }
        _ => esp::open(buf, at, nh_pos, sa, seq_hi).map_err(|e| match e {
            EspError::Icv => DropReason::IcvFailure,
            EspError::Padding => DropReason::BadPadding,
            _ => DropReason::Malformed,
        }),
    };
    if let Err(r) = r {
        match r {
            DropReason::IcvFailure => sa.counters.icv_failures.fetch_add(1, Relaxed),
            _ => sa.counters.format_errors.fetch_add(1, Relaxed),
        };
        return Err(r);
    }
    if let Some((r, i)) = run {
        r.opened(i, seq, len);
        return Ok((sa, true));
    }
    let e = sa
        .accept_inbound(seq, len, now)
        .map_err(|e| replay_drop(sa, e))?;
    w.expiry(sa, e)?;
    Ok((sa, false))
}

/// Do the transforms found (outermost first) satisfy the policy's bundle
/// (innermost first)? IPComp is always optional: RFC 3173 has the sender
/// skip it when compression would not help.
fn check_inbound_policy(
    policy: &Policy,
    found: &[Found<'_>],
    flow: &Flow,
) -> Result<(), DropReason> {
    let rules = match &policy.action {
        Action::Bypass => return Ok(()),
        Action::Discard => return Err(DropReason::PolicyDiscard),
        Action::Ipsec(rules) => rules,
    };
    let mut inner_first = found.iter().rev().flatten().peekable();
    for r in rules {
        let hit = inner_first.peek().is_some_and(|(p, sa)| {
            *p == r.proto
                && sa.config.src == flow.src
                && sa.config.dst == flow.dst
                && match r.level {
                    Level::Unique(Some(id)) => sa.config.reqid == id,
                    _ => true,
                }
        });
        if hit {
            inner_first.next();
        } else if r.level.required() && r.proto != Proto::IpComp {
            return Err(if found.is_empty() {
                DropReason::PlaintextRefused
            } else {
                DropReason::PolicyMismatch
            });
        }
    }
    if inner_first.next().is_some() {
        return Err(DropReason::PolicyMismatch);
    }
    Ok(())
}
