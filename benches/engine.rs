//! Criterion benches: the engine per transform and packet size, outbound
//! and inbound, beside the raw primitives, plus the pieces of the hot path
//! (SPD lookup, replay window). `cargo bench --bench engine`.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use std::time::Duration;
use tunsec::bench::{Placed, config, plaintext, transforms};
use tunsec::buf::PacketBuf;
use tunsec::engine::{self, Verdict, Worker};
use tunsec::replay::ReplayWindow;
use tunsec::spd::{Dir, Flow};
use tunsec::state::State;

fn engine(c: &mut Criterion) {
    for t in transforms() {
        let (state, _, _) = State::default()
            .apply_text(&config(&t), "bench", Duration::ZERO)
            .unwrap();
        let mut g = c.benchmark_group(t.name);
        g.measurement_time(Duration::from_secs(2))
            .warm_up_time(Duration::from_millis(300));
        for size in [64usize, 512, 1400, 9000] {
            let mut w = Worker::new([1; 32]);
            let mut buf = PacketBuf::new();
            // Copy sources away from 4K aliasing with the buffer (see Placed).
            let dst = buf.raw()[tunsec::buf::HEADROOM..].as_ptr();
            let plain = Placed::new(&plaintext(size, t.text), dst);
            g.throughput(Throughput::Bytes(size as u64));
            g.bench_with_input(BenchmarkId::new("out", size), plain.get(), |b, p| {
                b.iter(|| {
                    buf.load(p);
                    assert_eq!(
                        engine::outbound(&state, &mut w, &mut buf, Duration::ZERO),
                        Verdict::Forward
                    );
                })
            });
            buf.load(plain.get());
            engine::outbound(&state, &mut w, &mut buf, Duration::ZERO);
            let sealed = Placed::new(buf.data(), dst);
            g.bench_with_input(BenchmarkId::new("in", size), sealed.get(), |b, p| {
                b.iter(|| {
                    buf.load(p);
                    assert_eq!(
                        engine::inbound(&state, &mut w, &mut buf, Duration::ZERO),
                        Verdict::Forward
                    );
                })
            });
        }
        g.finish();
    }
}

fn hot_path_pieces(c: &mut Criterion) {
    let seed = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/netns/seed-linux-windows.conf"
    ))
    .unwrap_or_else(|_| "spdadd 0.0.0.0/0 0.0.0.0/0 icmp -P out priority 10 none;\n".into());
    let (state, _, _) = State::default()
        .apply_text(&seed, "seed", Duration::ZERO)
        .unwrap();
    let flow = Flow {
        src: "172.17.207.12".parse().unwrap(),
        dst: "172.17.207.66".parse().unwrap(),
        proto: 6,
        ports: Some((40000, 22)),
    };
    c.bench_function("spd lookup (seed policies)", |b| {
        b.iter(|| black_box(state.spd.lookup(Dir::Out, black_box(&flow))))
    });
    let mut w = ReplayWindow::new(4096);
    let mut s = 1u64;
    c.bench_function("replay window 4096 in-order accept", |b| {
        b.iter(|| {
            s += 1;
            w.accept(black_box(s)).unwrap();
        })
    });
}

criterion_group!(benches, engine, hot_path_pieces);
criterion_main!(benches);
