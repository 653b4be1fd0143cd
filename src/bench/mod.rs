//! `tunsec bench`: the engine's throughput on one core, beside the raw cost
//! of the same cipher and MAC over the same bytes (no headers, no lookups,
//! no policy), like `openssl speed`. The ratio is the engine's efficiency.
//!
//! Both loops start each packet by copying it into the working buffer (as a
//! packet read from the kernel would arrive). Engine and primitive run in
//! short alternating slices; the ratio reported is the median of the ratios
//! of adjacent slices, so that a noisy neighbour slows both sides of a pair
//! alike.

pub mod peers;
pub mod threads;

use crate::buf::PacketBuf;
use crate::crypto::Auth;
use crate::engine::{self, Verdict, Worker};
use crate::sad::{Proto, Sa};
use crate::state::State;
use anyhow::{Result, bail};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Measuring time per case (engine and primitive each), in ms.
    #[arg(long, default_value_t = 300)]
    pub millis: u64,
    /// Rounds per case (engine and primitive slices alternate); medians are reported.
    #[arg(long, default_value_t = 15)]
    pub rounds: usize,
    /// IP packet sizes in bytes.
    #[arg(long, value_delimiter = ',', default_values_t = vec![64, 512, 1400, 9000])]
    pub sizes: Vec<usize>,
    /// Only transforms whose name contains one of these.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Instead: the cost of the number of peers (e.g. 1,100,1000,10000):
    /// per packet, per SA and policy change, loading, memory.
    #[arg(long, value_delimiter = ',')]
    pub peers: Vec<usize>,
    /// With --peers: packets per call of the engine's batch functions
    /// (the workers hand it up to 64, what one receive call returns).
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Instead: workers protecting (and opening) packets of one SA at once
    /// against each with its own SA, for each number of threads (e.g.
    /// 1,2): ESP aes-gcm-16, the first of --sizes.
    #[arg(long, value_delimiter = ',')]
    pub threads: Vec<usize>,
}

/// A benchmarked transform: the setkey SAs and the bundle.
pub struct Transform {
    pub name: &'static str,
    /// `add` lines' algorithm part per protocol, in bundle order (innermost first).
    pub sas: &'static [(Proto, &'static str)],
    /// Text-like payload (for IPComp).
    pub text: bool,
}

const K16: &str = "0x00112233445566778899aabbccddeeff";
const K32: &str = "0x00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
const K20: &str = "0x00112233445566778899aabbccddeeff00112233";

pub fn transforms() -> Vec<Transform> {
    vec![
        Transform {
            name: "esp aes-cbc-128 hmac-sha1",
            sas: &[(Proto::Esp, "-E aes-cbc K16 -A hmac-sha1 K20")],
            text: false,
        },
        Transform {
            name: "esp aes-cbc-256 hmac-sha256",
            sas: &[(Proto::Esp, "-E aes-cbc K32 -A hmac-sha256 K32")],
            text: false,
        },
        Transform {
            name: "esp aes-gcm-16-128",
            sas: &[(Proto::Esp, "-E aes-gcm-16 K20")],
            text: false,
        },
        Transform {
            name: "esp aes-gcm-16-256",
            sas: &[(Proto::Esp, "-E aes-gcm-16 K32S")],
            text: false,
        },
        Transform {
            name: "esp chacha20-poly1305",
            sas: &[(Proto::Esp, "-E chacha20-poly1305 K32S")],
            text: false,
        },
        Transform {
            name: "ah hmac-sha256",
            sas: &[(Proto::Ah, "-A hmac-sha256 K32")],
            text: false,
        },
        Transform {
            name: "seed esp aes-cbc-128 hmac-sha1 + ah hmac-sha1",
            sas: &[
                (Proto::Esp, "-E aes-cbc K16 -A hmac-sha1 K20"),
                (Proto::Ah, "-A hmac-sha1 K20"),
            ],
            text: false,
        },
        Transform {
            name: "ipcomp + esp aes-cbc-128 hmac-sha256 + ah hmac-sha256 (text)",
            sas: &[
                (Proto::IpComp, "-C deflate"),
                (Proto::Esp, "-E aes-cbc K16 -A hmac-sha256 K32"),
                (Proto::Ah, "-A hmac-sha256 K32"),
            ],
            text: true,
        },
    ]
}

const SRC: &str = "198.51.100.1";
const DST: &str = "198.51.100.2";

/// The setkey text of one host for a transform: SAs both ways with the
/// same keys (so one host's output is the other's input) and policies.
pub fn config(t: &Transform) -> String {
    let mut s = String::from("flush;\nspdflush;\n");
    let mut rules = Vec::new();
    for (i, (proto, algs)) in t.sas.iter().enumerate() {
        let algs = algs
            .replace("K32S", &format!("{K32}01020304"))
            .replace("K32", K32)
            .replace("K20", K20)
            .replace("K16", K16);
        // -r 0: the inbound loop replays a small pool of packets.
        s.push_str(&format!(
            "add {SRC} {DST} {proto} {:#x} -r 0 {algs};\n",
            0x1000 + i
        ));
        rules.push(format!("{proto}/transport//require"));
    }
    let rules = rules.join(" ");
    s.push_str(&format!("spdadd {SRC} {DST} any -P out ipsec {rules};\n"));
    s.push_str(&format!("spdadd {SRC} {DST} any -P in ipsec {rules};\n"));
    s
}

/// A UDP packet of `size` bytes from SRC to DST.
pub fn plaintext(size: usize, text: bool) -> Vec<u8> {
    let size = size.max(28);
    let mut p = vec![0u8; size];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(size as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&SRC.parse::<std::net::Ipv4Addr>().unwrap().octets());
    p[16..20].copy_from_slice(&DST.parse::<std::net::Ipv4Addr>().unwrap().octets());
    p[20..22].copy_from_slice(&4000u16.to_be_bytes());
    p[22..24].copy_from_slice(&5000u16.to_be_bytes());
    p[24..26].copy_from_slice(&((size - 20) as u16).to_be_bytes());
    let words = [
        "the ", "quick ", "brown ", "fox ", "jumps ", "over ", "lazy ", "dog ", "and ", "IPsec ",
    ];
    let mut x: u32 = 12345;
    let mut i = 28;
    while i < size {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        if text {
            for b in words[(x >> 16) as usize % words.len()].bytes() {
                if i < size {
                    p[i] = b;
                    i += 1;
                }
            }
        } else {
            p[i] = (x >> 16) as u8;
            i += 1;
        }
    }
    crate::packet::fix_lengths(&mut p);
    p
}

/// One row of results.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    pub transform: String,
    pub direction: &'static str,
    pub size: usize,
    pub pps: f64,
    pub gbps: f64,
    pub primitive_gbps: f64,
    pub ratio: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Run `f` repeatedly for about `d`; packets per second.
fn rate(d: Duration, mut f: impl FnMut()) -> f64 {
    // Calibrate a batch that takes ~1 ms so the clock is read rarely.
    let mut batch = 1u64;
    loop {
        let t = Instant::now();
        for _ in 0..batch {
            f();
        }
        if t.elapsed() >= Duration::from_micros(500) || batch >= 1 << 20 {
            break;
        }
        batch *= 2;
    }
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < d {
        for _ in 0..batch {
            f();
        }
        n += batch;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// The primitive work of one packet: what the bundle costs in crypto (and
/// DEFLATE) alone.
struct Primitive {
    steps: Vec<Step>,
    scratch: Vec<u8>,
    /// The input bytes: one buffer outbound (the engine protects the same
    /// plaintext each time); inbound, as many distinct buffers as the
    /// engine's pool of sealed packets, walked in turn, so that both sides
    /// read the same amount of memory.
    srcs: Vec<Placed>,
    k: usize,
    comp: Compress,
    decomp: Decompress,
}

/// Distinct sealed packets the inbound loops cycle through.
const POOL: usize = 16;

/// Bytes kept at an address half a page away (modulo 4096) from the
/// buffer they are copied into. Both loops copy their input into a working
/// buffer per packet; when source and destination happen to lie a few
/// bytes apart modulo 4096, each load waits on the store before it (4K
/// aliasing) and that copy alone took 11% of the loop. Which side it hit
/// depended on where ASLR put the allocations: the same binary measured
/// 83% to 93% from one run to the next, and 83-88% every time with ASLR
/// off. Placing every source relative to its destination removes that
/// lottery.
pub struct Placed {
    mem: Vec<u8>,
    off: usize,
    len: usize,
}

impl Placed {
    /// A copy of `bytes` at an address 2048 bytes from `dst` modulo 4096.
    pub fn new(bytes: &[u8], dst: *const u8) -> Placed {
        let mut mem = vec![0u8; bytes.len() + 4096];
        let base = mem.as_ptr() as usize;
        let off = (dst as usize + 2048).wrapping_sub(base) % 4096;
        mem[off..off + bytes.len()].copy_from_slice(bytes);
        Placed {
            mem,
            off,
            len: bytes.len(),
        }
    }

    pub fn get(&self) -> &[u8] {
        &self.mem[self.off..self.off + self.len]
    }
}

enum Step {
    Deflate(usize),
    Inflate(Vec<u8>),
    /// The SA's cipher (the SA is shared, the cipher keyed once).
    CbcEnc(Arc<Sa>, usize),
    CbcDec(Arc<Sa>, usize),
    Seal(Arc<Sa>, usize),
    /// Ciphertexts and their valid tags (one per pooled input): a wrong
    /// tag would measure a failure path, not the work.
    Open(Arc<Sa>, Vec<(Placed, [u8; 16])>),
    Mac(Auth, usize),
}

impl Primitive {
    fn run(&mut self) {
        let Primitive {
            steps,
            scratch: s,
            srcs,
            k,
            comp,
            decomp,
        } = self;
        let i = *k;
        *k = (*k + 1) % srcs.len();
        let src = srcs[i].get();
        for step in steps.iter() {
            match step {
                Step::Deflate(n) => {
                    comp.reset();
                    s.clear();
                    let _ = comp.compress_vec(&src[..*n], s, FlushCompress::Finish);
                }
                Step::Inflate(data) => {
                    decomp.reset(false);
                    s.clear();
                    let _ = decomp.decompress_vec(data, s, FlushDecompress::Finish);
                }
                Step::CbcEnc(c, n) => {
                    s.clear();
                    s.extend_from_slice(&src[..*n]);
                    c.cipher.cbc_encrypt(&[7; 16], s);
                }
                Step::CbcDec(c, n) => {
                    s.clear();
                    s.extend_from_slice(&src[..*n]);
                    c.cipher.cbc_decrypt(&[7; 16], s);
                }
                Step::Seal(c, n) => {
                    s.clear();
                    s.extend_from_slice(&src[..*n]);
                    black_box(c.cipher.aead_seal(&[1; 8], &[2; 8], s));
                }
                Step::Open(c, sealed) => {
                    let (ct, tag) = &sealed[i % sealed.len()];
                    s.clear();
                    s.extend_from_slice(ct.get());
                    assert!(c.cipher.aead_open(&[1; 8], &[2; 8], s, tag));
                }
                Step::Mac(a, n) => {
                    let mut out = [0u8; 32];
                    a.compute(&[&src[..*n]], &mut out[..a.icv_len()]);
                    black_box(out);
                }
            }
        }
        black_box(&s);
    }
}

/// Build the primitive steps for a packet, from the SAs and the real
/// sizes seen when the engine processed it.
fn primitive(sas: &[Arc<Sa>], plain: &[u8], out_dir: bool) -> Primitive {
    // The working buffer never grows past this capacity, so the sources
    // can be placed relative to it.
    let scratch: Vec<u8> = Vec::with_capacity(65536 + 256);
    let dst = scratch.as_ptr();
    let mut steps = Vec::new();
    let mut payload = plain.len() - 20;
    let mut comp = Compress::new(Compression::default(), false);
    let mut total = plain.len();
    let mut inbound_steps = Vec::new();
    for sa in sas {
        match sa.config.proto {
            Proto::IpComp => {
                let mut out = Vec::with_capacity(payload + 64);
                let _ = comp.compress_vec(&plain[20..], &mut out, FlushCompress::Finish);
                if out.len() + 4 < payload && payload >= crate::ipcomp::THRESHOLD {
                    steps.push(Step::Deflate(payload));
                    inbound_steps.push(Step::Inflate(out.clone()));
                    payload = out.len() + 4;
                    total = 20 + payload;
                }
            }
            Proto::Esp => {
                let ovh = crate::esp::overhead(sa, payload);
                let icv = if sa.cipher.is_aead() {
                    16
                } else {
                    sa.mac.icv_len()
                };
                let ct = payload + ovh - 8 - sa.cipher.iv_len() - icv;
                if sa.cipher.is_aead() {
                    steps.push(Step::Seal(sa.clone(), ct));
                    let sealed = (0..POOL)
                        .map(|j| {
                            let mut b = plain.to_vec();
                            b.resize(ct, j as u8);
                            let tag = sa.cipher.aead_seal(&[1; 8], &[2; 8], &mut b);
                            (Placed::new(&b, dst), tag)
                        })
                        .collect();
                    inbound_steps.push(Step::Open(sa.clone(), sealed));
                } else {
                    if sa.cipher.iv_len() > 0 {
                        steps.push(Step::CbcEnc(sa.clone(), ct));
                        inbound_steps.push(Step::CbcDec(sa.clone(), ct));
                    }
                    steps.push(Step::Mac(sa.mac.clone(), 8 + sa.cipher.iv_len() + ct));
                    inbound_steps.push(Step::Mac(sa.mac.clone(), 8 + sa.cipher.iv_len() + ct));
                }
                payload += ovh;
                total = 20 + payload;
            }
            Proto::Ah => {
                let ah = crate::ah::header_len(sa, false);
                total += ah;
                payload += ah;
                steps.push(Step::Mac(sa.mac.clone(), total));
                inbound_steps.push(Step::Mac(sa.mac.clone(), total));
            }
        }
    }
    if !out_dir {
        inbound_steps.reverse();
        steps = inbound_steps;
    }
    let copies = if out_dir { 1 } else { POOL };
    let srcs = (0..copies)
        .map(|j| {
            let mut src = plain.to_vec();
            src.resize(total.max(plain.len()) + 64, j as u8);
            Placed::new(&src, dst)
        })
        .collect();
    Primitive {
        steps,
        scratch,
        srcs,
        k: 0,
        comp: Compress::new(Compression::default(), false),
        decomp: Decompress::new(false),
    }
}

/// Measure one transform at one size, both directions.
pub fn measure(t: &Transform, size: usize, d: Duration, rounds: usize) -> Result<[Row; 2]> {
    let (state, _, _) = State::default().apply_text(&config(t), "bench", Duration::ZERO)?;
    let plain = plaintext(size, t.text);
    let mut w = Worker::new([9; 32]);
    let mut buf = PacketBuf::new();
    // A pool of sealed packets for the inbound loop.
    let mut pool = Vec::new();
    for _ in 0..POOL {
        buf.load(&plain);
        if engine::outbound(&state, &mut w, &mut buf, Duration::ZERO) != Verdict::Forward {
            bail!("{}: the engine dropped the benchmark packet", t.name);
        }
        pool.push(buf.data().to_vec());
    }
    // Inputs placed relative to where load() writes (see Placed).
    let dst = buf.raw()[crate::buf::HEADROOM..].as_ptr();
    let pool: Vec<Placed> = pool.iter().map(|p| Placed::new(p, dst)).collect();
    let plain_src = Placed::new(&plain, dst);
    buf.load(pool[0].get());
    if engine::inbound(&state, &mut w, &mut buf, Duration::ZERO) != Verdict::Forward
        || buf.data() != plain
    {
        bail!(
            "{}: the engine did not restore the benchmark packet",
            t.name
        );
    }
    let sas: Vec<Arc<Sa>> = t
        .sas
        .iter()
        .enumerate()
        .map(|(i, (p, _))| {
            state
                .sad
                .get(
                    SRC.parse().unwrap(),
                    DST.parse().unwrap(),
                    *p,
                    0x1000 + i as u32,
                )
                .cloned()
                .expect("benchmark SA")
        })
        .collect();
    let mut rows = Vec::new();
    for out_dir in [true, false] {
        let mut prim = primitive(&sas, &plain, out_dir);
        let mut eng = Vec::new();
        let mut raw = Vec::new();
        let mut k = 0usize;
        let slice = d / rounds.max(1) as u32;
        let mut ratios = Vec::new();
        for round in 0..rounds.max(1) {
            let mut run_engine = || {
                if out_dir {
                    rate(slice, || {
                        buf.load(plain_src.get());
                        black_box(engine::outbound(&state, &mut w, &mut buf, Duration::ZERO));
                    })
                } else {
                    rate(slice, || {
                        k = (k + 1) % pool.len();
                        buf.load(pool[k].get());
                        black_box(engine::inbound(&state, &mut w, &mut buf, Duration::ZERO));
                    })
                }
            };
            // Alternate which goes first, so that drift in the machine's
            // speed does not favour one side.
            let (e, r) = if round % 2 == 0 {
                let e = run_engine();
                (e, rate(slice, || prim.run()))
            } else {
                let r = rate(slice, || prim.run());
                (run_engine(), r)
            };
            eng.push(e);
            raw.push(r);
            ratios.push(e / r);
        }
        let pps = median(eng);
        let raw_pps = median(raw);
        let gbps = pps * size as f64 * 8.0 / 1e9;
        let primitive_gbps = raw_pps * size as f64 * 8.0 / 1e9;
        // The ratio is the median of ratios of adjacent slices: noise from
        // other tenants hits both sides of a pair alike.
        let ratio = median(ratios);
        rows.push(Row {
            transform: t.name.to_string(),
            direction: if out_dir { "out" } else { "in" },
            size,
            pps,
            gbps,
            primitive_gbps,
            ratio,
        });
    }
    if w.counters.total_drops() > 0 {
        bail!(
            "{}: the engine dropped packets during the benchmark",
            t.name
        );
    }
    Ok([rows[0].clone(), rows[1].clone()])
}

/// The CPU features the crypto crates pick up at run time.
pub fn cpu_features() -> Vec<(&'static str, bool)> {
    #[cfg(target_arch = "x86_64")]
    {
        vec![
            ("aes", std::arch::is_x86_feature_detected!("aes")),
            (
                "pclmulqdq",
                std::arch::is_x86_feature_detected!("pclmulqdq"),
            ),
            ("sha", std::arch::is_x86_feature_detected!("sha")),
            ("avx2", std::arch::is_x86_feature_detected!("avx2")),
            ("vaes", std::arch::is_x86_feature_detected!("vaes")),
        ]
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        vec![]
    }
}

pub fn run(args: &Args) -> Result<()> {
    if !args.peers.is_empty() {
        return peers::run(
            &args.peers,
            args.json,
            args.rounds.min(7),
            args.batch.max(1),
        );
    }
    let d = Duration::from_millis(args.millis);
    if !args.threads.is_empty() {
        let size = args.sizes.first().copied().unwrap_or(1400);
        return threads::run(&args.threads, size, d, args.rounds.min(7), args.json);
    }
    let mut results = Vec::new();
    let cpu = cpu_features();
    if !args.json {
        let f: Vec<String> = cpu
            .iter()
            .map(|(n, on)| format!("{}{n}", if *on { "+" } else { "-" }))
            .collect();
        println!(
            "cpu: {} (detected at run time; no target-cpu flags needed)",
            f.join(" ")
        );
        println!(
            "{:<58} {:>3} {:>6} {:>11} {:>9} {:>11} {:>6}",
            "transform", "dir", "size", "packets/s", "Gbit/s", "raw Gbit/s", "ratio"
        );
    }
    for t in transforms() {
        if !args.only.is_empty() && !args.only.iter().any(|o| t.name.contains(o.as_str())) {
            continue;
        }
        for &size in &args.sizes {
            for r in measure(&t, size, d, args.rounds)? {
                if !args.json {
                    println!(
                        "{:<58} {:>3} {:>6} {:>11.0} {:>9.2} {:>11.2} {:>5.0}%",
                        r.transform,
                        r.direction,
                        r.size,
                        r.pps,
                        r.gbps,
                        r.primitive_gbps,
                        r.ratio * 100.0
                    );
                }
                results.push(r);
            }
        }
    }
    if args.json {
        println!(
            "{}",
            serde_json::json!({ "results": results, "millis": args.millis, "rounds": args.rounds })
        );
    }
    Ok(())
}
