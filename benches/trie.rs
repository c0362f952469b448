//! Longest-prefix-match tries: `ip_network_table_deps_treebitmap::IpLookupTable` (what
//! `policy::allowlist` uses) against `prefix_trie::PrefixMap`.
//!
//! Measured: lookup (one address per iteration, cycling through 1024 fixed pseudo-random
//! addresses, half of them inside some listed network), build (inserting every entry into an
//! empty table) and memory (printed once, outside any timing). Tables of 10 and of 100,000 random
//! networks, IPv4 (prefix lengths 8..=32) and IPv6 (prefix lengths 16..=128). Everything is drawn
//! from a seeded SplitMix64, so every run measures the same tables and addresses.
//!
//! Before each lookup benchmark both structures are asked for every address and must agree on
//! the matched network and its value, so a disagreement fails the run instead of being timed.
//!
//! Run: `cargo bench --bench trie`.

use std::{
    hint::black_box,
    net::{Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use ip_network_table_deps_treebitmap::IpLookupTable;
use ipnet::{Ipv4Net, Ipv6Net};
use prefix_trie::PrefixMap;

const SMALL: usize = 10;
const LARGE: usize = 100_000;
const SIZES: [usize; 2] = [SMALL, LARGE];
const LOOKUPS: usize = 1024;
/// Keys simulated by the "many small tables" memory figure.
const KEYS: usize = 100_000;

/// SplitMix64: tiny, seeded, good enough to spread test networks.
struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }

    fn next_u128(&mut self) -> u128 {
        (u128::from(self.next_u64()) << 64) | u128::from(self.next_u64())
    }

    /// Uniform in `lo..=hi` (the bias of a plain modulo does not matter here).
    fn range(&mut self, lo: u8, hi: u8) -> u8 {
        let span = u64::from(hi - lo) + 1;
        lo + (self.next_u64() % span) as u8
    }

    fn index(&mut self, len: usize) -> usize {
        (self.next_u64() % len as u64) as usize
    }
}

/// The same shape as the allowlist's slot (an optional expiry and a tag): 24 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    expires_at: Option<i64>,
    tag: u32,
}

fn slot(i: usize) -> Slot {
    Slot {
        expires_at: None,
        tag: i as u32,
    }
}

/// What both families of tries need to know about an address family.
trait Family: Sized {
    type Addr: Copy + ip_network_table_deps_treebitmap::address::Address;
    type Net: Copy + Eq + std::fmt::Debug + prefix_trie::Prefix;
    const NAME: &'static str;

    fn random_net(rng: &mut SplitMix64) -> Self::Net;
    /// An address inside `net`, host bits random.
    fn addr_in(net: Self::Net, rng: &mut SplitMix64) -> Self::Addr;
    fn random_addr(rng: &mut SplitMix64) -> Self::Addr;
    fn host_net(addr: Self::Addr) -> Self::Net;
    fn parts(net: Self::Net) -> (Self::Addr, u32);
    fn from_parts(addr: Self::Addr, len: u32) -> Self::Net;
}

struct V4;
struct V6;

impl Family for V4 {
    type Addr = Ipv4Addr;
    type Net = Ipv4Net;
    const NAME: &'static str = "v4";

    fn random_net(rng: &mut SplitMix64) -> Ipv4Net {
        let len = rng.range(8, 32);
        Ipv4Net::new(Ipv4Addr::from(rng.next_u32()), len)
            .expect("prefix length at most 32")
            .trunc()
    }

    fn addr_in(net: Ipv4Net, rng: &mut SplitMix64) -> Ipv4Addr {
        let host = u32::from(net.hostmask()) & rng.next_u32();
        Ipv4Addr::from(u32::from(net.network()) | host)
    }

    fn random_addr(rng: &mut SplitMix64) -> Ipv4Addr {
        Ipv4Addr::from(rng.next_u32())
    }

    fn host_net(addr: Ipv4Addr) -> Ipv4Net {
        Ipv4Net::from(addr)
    }

    fn parts(net: Ipv4Net) -> (Ipv4Addr, u32) {
        (net.network(), u32::from(net.prefix_len()))
    }

    fn from_parts(addr: Ipv4Addr, len: u32) -> Ipv4Net {
        Ipv4Net::new(addr, len as u8).expect("trie prefix lengths are valid")
    }
}

impl Family for V6 {
    type Addr = Ipv6Addr;
    type Net = Ipv6Net;
    const NAME: &'static str = "v6";

    fn random_net(rng: &mut SplitMix64) -> Ipv6Net {
        let len = rng.range(16, 128);
        Ipv6Net::new(Ipv6Addr::from(rng.next_u128()), len)
            .expect("prefix length at most 128")
            .trunc()
    }

    fn addr_in(net: Ipv6Net, rng: &mut SplitMix64) -> Ipv6Addr {
        let host = u128::from(net.hostmask()) & rng.next_u128();
        Ipv6Addr::from(u128::from(net.network()) | host)
    }

    fn random_addr(rng: &mut SplitMix64) -> Ipv6Addr {
        Ipv6Addr::from(rng.next_u128())
    }

    fn host_net(addr: Ipv6Addr) -> Ipv6Net {
        Ipv6Net::from(addr)
    }

    fn parts(net: Ipv6Net) -> (Ipv6Addr, u32) {
        (net.network(), u32::from(net.prefix_len()))
    }

    fn from_parts(addr: Ipv6Addr, len: u32) -> Ipv6Net {
        Ipv6Net::new(addr, len as u8).expect("trie prefix lengths are valid")
    }
}

/// `n` random networks (duplicates possible and harmless: both tries keep the last value).
fn networks<F: Family>(n: usize, seed: u64) -> Vec<(F::Net, Slot)> {
    let mut rng = SplitMix64::new(seed);
    (0..n).map(|i| (F::random_net(&mut rng), slot(i))).collect()
}

/// `LOOKUPS` addresses: even ones inside a random listed network, odd ones anywhere.
fn lookup_addrs<F: Family>(nets: &[(F::Net, Slot)], seed: u64) -> Vec<F::Addr> {
    let mut rng = SplitMix64::new(seed);
    (0..LOOKUPS)
        .map(|i| {
            if i % 2 == 0 {
                let (net, _) = nets[rng.index(nets.len())];
                F::addr_in(net, &mut rng)
            } else {
                F::random_addr(&mut rng)
            }
        })
        .collect()
}

fn build_treebitmap<F: Family>(nets: &[(F::Net, Slot)]) -> IpLookupTable<F::Addr, Slot> {
    let mut table = IpLookupTable::new();
    for &(net, value) in nets {
        let (addr, len) = F::parts(net);
        table.insert(addr, len, value);
    }
    table
}

fn build_prefix_trie<F: Family>(nets: &[(F::Net, Slot)]) -> PrefixMap<F::Net, Slot> {
    let mut map = PrefixMap::new();
    for &(net, value) in nets {
        map.insert(net, value);
    }
    map
}

fn treebitmap_bytes<A, T>(table: &IpLookupTable<A, T>) -> usize
where
    A: ip_network_table_deps_treebitmap::address::Address,
{
    let (nodes, results) = table.mem_usage();
    nodes + results
}

/// Both tries must report the same longest match (network and value) for every address.
/// Returns how many addresses matched something.
fn assert_agree<F: Family>(
    treebitmap: &IpLookupTable<F::Addr, Slot>,
    prefix_trie: &PrefixMap<F::Net, Slot>,
    addrs: &[F::Addr],
) -> usize {
    let mut hits = 0;
    for &addr in addrs {
        let tb = treebitmap
            .longest_match(addr)
            .map(|(net, len, value)| (F::from_parts(net, len), *value));
        let pt = prefix_trie
            .get_lpm(&F::host_net(addr))
            .map(|(net, value)| (net, *value));
        assert_eq!(
            tb,
            pt,
            "treebitmap and prefix-trie disagree on {:?}",
            F::host_net(addr)
        );
        hits += usize::from(tb.is_some());
    }
    hits
}

fn seed_for<F: Family>(n: usize, salt: u64) -> u64 {
    let family = if F::NAME == "v4" { 4 } else { 6 };
    (family << 56) ^ ((n as u64) << 8) ^ salt
}

fn bench_lookup<F: Family>(c: &mut Criterion) {
    let mut group = c.benchmark_group(format!("lpm_{}", F::NAME));
    for n in SIZES {
        let nets = networks::<F>(n, seed_for::<F>(n, 1));
        let addrs = lookup_addrs::<F>(&nets, seed_for::<F>(n, 2));
        let treebitmap = build_treebitmap::<F>(&nets);
        let prefix_trie = build_prefix_trie::<F>(&nets);
        assert_eq!(
            treebitmap.len(),
            prefix_trie.len(),
            "same distinct networks"
        );
        let hits = assert_agree::<F>(&treebitmap, &prefix_trie, &addrs);
        eprintln!(
            "lpm_{}/{n}: {} distinct networks, {hits}/{LOOKUPS} lookup addresses match; both tries agree",
            F::NAME,
            treebitmap.len()
        );
        let host_nets: Vec<F::Net> = addrs.iter().map(|&a| F::host_net(a)).collect();

        group.bench_function(BenchmarkId::new("treebitmap", n), |b| {
            let mut i = 0usize;
            b.iter(|| {
                let addr = addrs[i % LOOKUPS];
                i = i.wrapping_add(1);
                black_box(
                    treebitmap
                        .longest_match(black_box(addr))
                        .map(|(_, len, _)| len),
                )
            });
        });
        group.bench_function(BenchmarkId::new("prefix_trie", n), |b| {
            let mut i = 0usize;
            b.iter(|| {
                let net = &host_nets[i % LOOKUPS];
                i = i.wrapping_add(1);
                black_box(prefix_trie.get_lpm(black_box(net)).map(|(_, v)| v.tag))
            });
        });
    }
    group.finish();
}

fn bench_build<F: Family>(c: &mut Criterion) {
    let mut group = c.benchmark_group(format!("build_{}", F::NAME));
    for n in SIZES {
        let nets = networks::<F>(n, seed_for::<F>(n, 1));
        group.bench_function(BenchmarkId::new("treebitmap", n), |b| {
            b.iter_with_large_drop(|| build_treebitmap::<F>(black_box(&nets)));
        });
        group.bench_function(BenchmarkId::new("prefix_trie", n), |b| {
            b.iter_with_large_drop(|| build_prefix_trie::<F>(black_box(&nets)));
        });
    }
    group.finish();
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn memory_row<F: Family>(label: &str, tables: usize, per_table: usize, seed_salt: u64) {
    let (mut tb_total, mut pt_total) = (0usize, 0usize);
    for t in 0..tables {
        let nets = networks::<F>(per_table, seed_for::<F>(per_table, seed_salt + t as u64));
        tb_total += treebitmap_bytes(&build_treebitmap::<F>(&nets));
        pt_total += build_prefix_trie::<F>(&nets).mem_size();
    }
    // `mem_usage()` leaves out the table struct itself; `mem_size()` counts it. Add it back for a
    // like-for-like total (it matters only when there are many small tables).
    let tb_with_struct = tb_total + tables * std::mem::size_of::<IpLookupTable<F::Addr, Slot>>();
    eprintln!(
        "| {label:<26} | {tb_total:>11} ({:>7.2} MiB) | {tb_with_struct:>11} ({:>7.2} MiB) | {pt_total:>11} ({:>7.2} MiB) | {:>5.2} |",
        mib(tb_total),
        mib(tb_with_struct),
        mib(pt_total),
        pt_total as f64 / tb_with_struct as f64,
    );
}

/// Memory, printed once; nothing here is timed.
fn memory_report(_c: &mut Criterion) {
    eprintln!();
    eprintln!(
        "memory (treebitmap: IpLookupTable::mem_usage() nodes+results; prefix-trie: PrefixMap::mem_size()), value = {} bytes",
        std::mem::size_of::<Slot>()
    );
    eprintln!(
        "| {:<26} | {:>25} | {:>25} | {:>25} | {:>5} |",
        "tables", "treebitmap mem_usage", "treebitmap + struct", "prefix-trie mem_size", "pt/tb"
    );
    memory_row::<V4>("1 x 10 IPv4", 1, SMALL, 1);
    memory_row::<V4>("1 x 100,000 IPv4", 1, LARGE, 1);
    memory_row::<V6>("1 x 10 IPv6", 1, SMALL, 1);
    memory_row::<V6>("1 x 100,000 IPv6", 1, LARGE, 1);
    memory_row::<V4>("100,000 x 10 IPv4 (sum)", KEYS, SMALL, 1_000);
    memory_row::<V4>("100,000 x 0 IPv4 (empty)", KEYS, 0, 1_000);
    memory_row::<V6>("100,000 x 0 IPv6 (empty)", KEYS, 0, 1_000);
    eprintln!(
        "struct sizes: IpLookupTable<Ipv4Addr, _> = {} B, IpLookupTable<Ipv6Addr, _> = {} B, PrefixMap<Ipv4Net, _> = {} B, PrefixMap<Ipv6Net, _> = {} B; pt/tb compares prefix-trie with treebitmap + struct",
        std::mem::size_of::<IpLookupTable<Ipv4Addr, Slot>>(),
        std::mem::size_of::<IpLookupTable<Ipv6Addr, Slot>>(),
        std::mem::size_of::<PrefixMap<Ipv4Net, Slot>>(),
        std::mem::size_of::<PrefixMap<Ipv6Net, Slot>>(),
    );
    eprintln!();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = benches;
    config = config();
    targets = memory_report, bench_lookup::<V4>, bench_lookup::<V6>, bench_build::<V4>, bench_build::<V6>
}
criterion_main!(benches);
