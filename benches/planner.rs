//! Restart-storm planning cost: 128 hosts, 10,000 domains (target ≤ 50 ms).

use criterion::{Criterion, criterion_group, criterion_main};
use havirt::engine::planner::{PlanRequest, bench_case, plan};
use std::hint::black_box;

const HOSTS: usize = 128;
const DOMAINS: usize = 10_000;

fn planner(c: &mut Criterion) {
    let (hosts, domains) = bench_case(HOSTS, DOMAINS);
    let requests: Vec<PlanRequest<'_>> = domains.iter().map(|d| PlanRequest { domain: d, avoid: Vec::new() }).collect();
    let mut group = c.benchmark_group("planner");
    group.sample_size(20);
    group.bench_function("128x10000", |b| b.iter(|| plan(black_box(&hosts), black_box(&requests))));
    group.finish();
}

criterion_group!(benches, planner);
criterion_main!(benches);
