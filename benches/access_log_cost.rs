//! What access logging costs: Authorize throughput through gRPC on loopback (release build) with
//! the access log on and off, alternating rounds in one run so that machine noise hits both.
//! Run: `cargo bench --bench access_log_cost`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use common::{Server, authorize_request, create_key};

const CLIENTS: usize = 32;
const CHANNELS: usize = 4;
const ROUND: Duration = Duration::from_secs(8);
const ROUNDS: usize = 3;

/// Requests per second over one round against a fresh server started with `args`.
async fn round(args: &[&str]) -> f64 {
    let server = Server::start(args);
    let mut admin = server.admin().await;
    let key = create_key(
        &mut admin,
        "acme",
        "production",
        &["203.0.113.0/24", "198.51.100.0/24", "2001:db8::/32"],
    )
    .await;
    let mut channels = Vec::new();
    for _ in 0..CHANNELS {
        channels.push(Server::channel(server.data_addr).await);
    }
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for client in 0..CLIENTS {
        let mut authz = keyfence::grpc::pb::authorizer_client::AuthorizerClient::new(
            channels[client % CHANNELS].clone(),
        );
        let (done, stop, secret) = (done.clone(), stop.clone(), key.secret.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                // Three allowed for every denied, as a mixed workload.
                let ip = if i % 4 == 3 {
                    format!("192.0.2.{}", i % 250)
                } else {
                    format!("203.0.113.{}", i % 250)
                };
                authz
                    .authorize(authorize_request(&secret, &ip))
                    .await
                    .expect("authorize");
                done.fetch_add(1, Ordering::Relaxed);
                i = i.wrapping_add(1);
            }
        }));
    }
    // Warm up, then measure.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = done.load(Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(ROUND).await;
    let counted = done.load(Ordering::Relaxed) - before;
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }
    counted as f64 / elapsed.as_secs_f64()
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
        let (mut on, mut off) = (Vec::new(), Vec::new());
        for r in 0..ROUNDS {
            let a = round(&["--access-log", "true"]).await;
            let b = round(&["--access-log", "false"]).await;
            println!("round {r}: access log on {a:.0} req/s, off {b:.0} req/s");
            on.push(a);
            off.push(b);
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let (on, off) = (mean(&on), mean(&off));
        println!(
            "Authorize throughput, {CLIENTS} clients over {CHANNELS} HTTP/2 connections, {ROUNDS} x {ROUND:?} rounds each: access log on {on:.0} req/s, off {off:.0} req/s; on/off = {:.3} (cost {:.1}%)",
            on / off,
            (1.0 - on / off) * 100.0
        );
    });
}
