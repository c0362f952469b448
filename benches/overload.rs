//! Overload (issue 11): Authorize through gRPC on loopback (release build), first closed-loop to
//! find the sustainable rate, then open-loop at a quarter of it (the unloaded p99) and at three
//! times it. At 3× the bound (`--max-inflight`) must shed at once with RESOURCE_EXHAUSTED, the
//! p99 of accepted requests is compared with the unloaded p99 (the goal: within 2×), and no
//! request from an unlisted address may ever be allowed. Prints the figures; asserts only the
//! never-allow property, since latency goals are measured, not assumed.
//! Run: `cargo bench --bench overload`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use common::{Server, authorize_request, create_key};
use keyfence::grpc::pb::{self, authorizer_client::AuthorizerClient};
use tonic::transport::Channel;

const CHANNELS: usize = 4;
const CLOSED_LOOP_CLIENTS: usize = 32;
const PHASE: Duration = Duration::from_secs(5);
const MAX_INFLIGHT: &str = "32";

/// Every fourth request comes from an address the key does not list.
fn address(i: u64) -> (String, bool) {
    if i % 4 == 3 {
        (format!("192.0.2.{}", i % 250), false)
    } else {
        (format!("203.0.113.{}", i % 250), true)
    }
}

#[derive(Default)]
struct Outcomes {
    accepted_latencies: Mutex<Vec<Duration>>,
    shed: AtomicU64,
    other_errors: AtomicU64,
    wrongly_allowed: AtomicU64,
}

async fn one(authz: &mut AuthorizerClient<Channel>, secret: &str, i: u64, out: &Outcomes) {
    let (ip, listed) = address(i);
    let started = Instant::now();
    match authz.authorize(authorize_request(secret, &ip)).await {
        Ok(response) => {
            let elapsed = started.elapsed();
            if !listed && response.into_inner().decision() == pb::Decision::Allow {
                out.wrongly_allowed.fetch_add(1, Ordering::Relaxed);
            }
            out.accepted_latencies.lock().unwrap().push(elapsed);
        }
        Err(status) if status.code() == tonic::Code::ResourceExhausted => {
            out.shed.fetch_add(1, Ordering::Relaxed);
        }
        Err(_) => {
            out.other_errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Requests per second with `CLOSED_LOOP_CLIENTS` callers each waiting for its answer.
async fn sustainable_rate(channels: &[Channel], secret: &str) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let out = Arc::new(Outcomes::default());
    let mut tasks = Vec::new();
    for client in 0..CLOSED_LOOP_CLIENTS {
        let mut authz = AuthorizerClient::new(channels[client % CHANNELS].clone());
        let (done, stop, out, secret) =
            (done.clone(), stop.clone(), out.clone(), secret.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut i = client as u64;
            while !stop.load(Ordering::Relaxed) {
                one(&mut authz, &secret, i, &out).await;
                done.fetch_add(1, Ordering::Relaxed);
                i += CLOSED_LOOP_CLIENTS as u64;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = done.load(Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(PHASE).await;
    let rate = (done.load(Ordering::Relaxed) - before) as f64 / started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }
    rate
}

/// Offers `rate` requests per second for `PHASE`, whether or not earlier ones were answered.
async fn open_loop(channels: &[Channel], secret: &str, rate: f64) -> Arc<Outcomes> {
    let out = Arc::new(Outcomes::default());
    let tick = Duration::from_millis(1);
    let per_tick = rate / 1000.0;
    let mut owed = 0.0;
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut i = 0u64;
    let mut tasks = Vec::new();
    while started.elapsed() < PHASE {
        ticker.tick().await;
        owed += per_tick;
        while owed >= 1.0 {
            owed -= 1.0;
            let mut authz = AuthorizerClient::new(channels[(i as usize) % CHANNELS].clone());
            let (out, secret) = (out.clone(), secret.to_owned());
            tasks.push(tokio::spawn(async move {
                one(&mut authz, &secret, i, &out).await;
            }));
            i += 1;
        }
    }
    for task in tasks {
        task.await.unwrap();
    }
    out
}

fn p99(out: &Outcomes) -> Duration {
    let mut latencies = out.accepted_latencies.lock().unwrap().clone();
    latencies.sort();
    latencies
        .get(latencies.len().saturating_sub(1) * 99 / 100)
        .copied()
        .unwrap_or_default()
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let server = Server::start(&["--max-inflight", MAX_INFLIGHT, "--access-log", "false"]);
        let mut admin = server.admin().await;
        let key = create_key(&mut admin, "acme", "production", &["203.0.113.0/24"]).await;
        let mut channels = Vec::new();
        for _ in 0..CHANNELS {
            channels.push(Server::channel(server.data_addr).await);
        }
        let sustainable = sustainable_rate(&channels, &key.secret).await;
        let unloaded = open_loop(&channels, &key.secret, sustainable / 4.0).await;
        let overloaded = open_loop(&channels, &key.secret, sustainable * 3.0).await;
        let (base, loaded) = (p99(&unloaded), p99(&overloaded));
        let count = |o: &Outcomes| o.accepted_latencies.lock().unwrap().len();
        println!(
            "sustainable (closed loop, {CLOSED_LOOP_CLIENTS} callers): {sustainable:.0} req/s; max_inflight {MAX_INFLIGHT}"
        );
        println!(
            "unloaded (open loop at {:.0} req/s): {} accepted, p99 {base:?}",
            sustainable / 4.0,
            count(&unloaded)
        );
        println!(
            "3x (open loop at {:.0} req/s): {} accepted, {} shed (RESOURCE_EXHAUSTED), {} other errors, p99 of accepted {loaded:?}",
            sustainable * 3.0,
            count(&overloaded),
            overloaded.shed.load(Ordering::Relaxed),
            overloaded.other_errors.load(Ordering::Relaxed)
        );
        println!(
            "p99 under 3x / unloaded p99 = {:.2} (goal: at most 2.00)",
            loaded.as_secs_f64() / base.as_secs_f64().max(f64::MIN_POSITIVE)
        );
        let wrong = unloaded.wrongly_allowed.load(Ordering::Relaxed)
            + overloaded.wrongly_allowed.load(Ordering::Relaxed);
        println!("requests from unlisted addresses allowed: {wrong}");
        assert_eq!(wrong, 0, "overload must never allow a request that should be denied");
    });
}
