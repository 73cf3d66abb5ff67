//! `keygate-ratelimit`: fleet-wide per-key limits for keygate.
//!
//! An Envoy Rate Limit Service (gRPC `envoy.service.ratelimit.v3`) on
//! Kuadrant's limitador with its Redis storage. It reads the same plugin
//! configuration and key list as keygate (through keygate-core), so a key's
//! limits are typed in one place, and counts them in Redis for every Envoy
//! that asks. Envoy's `envoy.filters.http.ratelimit`, placed after keygate,
//! sends it keygate's identity header (README: "Fleet-wide limits").

mod service;
mod source;
mod table;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use clap::{Parser, Subcommand};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer;
use hyper::Uri;
use limitador::storage::redis::AsyncRedisStorage;
use limitador::AsyncRateLimiter;

use crate::service::{limitador_limits, Service};
use crate::source::Source;
use crate::table::FleetTable;

#[derive(Parser)]
#[command(name = "keygate-ratelimit", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve Envoy's RLS gRPC API, counting keygate's per-key limits in Redis.
    Serve {
        /// keygate's plugin configuration (JSON): its keys and its default
        /// limits. Re-read when it changes.
        #[arg(long, value_name = "FILE", required_unless_present = "control_plane")]
        config: Option<PathBuf>,
        /// A control plane's key list (`http://host:port/v1/keys`), polled
        /// with If-None-Match.
        #[arg(long, value_name = "URL")]
        control_plane: Option<Uri>,
        /// Seconds between two reads of the configuration and the control plane.
        #[arg(long, value_name = "SECONDS", default_value_t = 1.0)]
        poll: f64,
        /// Redis holding the counters.
        #[arg(long, value_name = "URL", default_value = "redis://127.0.0.1:6379")]
        redis: String,
        /// Address the gRPC service listens on.
        #[arg(long, value_name = "ADDR")]
        listen: SocketAddr,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("keygate-ratelimit: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Serve {
            config,
            control_plane,
            poll,
            redis,
            listen,
        } => runtime.block_on(serve(config, control_plane, poll, redis, listen)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keygate-ratelimit: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Connects to Redis, retrying every second until it answers.
///
/// The connection manager gets timeouts and a reconnect backoff of half a
/// second: with redis-rs's defaults a command waits without end on a Redis
/// that stopped answering, and a reconnect after a Redis restart waits up
/// to a minute. Envoy's own `timeout` still bounds every check.
async fn connect(redis: &str) -> Result<AsyncRedisStorage, String> {
    let client = redis::Client::open(redis).map_err(|e| format!("--redis {redis}: {e}"))?;
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Duration::from_millis(500))
        .set_response_timeout(Duration::from_secs(1))
        .set_factor(1)
        .set_max_delay(500)
        .set_number_of_retries(2);
    let mut told = false;
    loop {
        let storage =
            match redis::aio::ConnectionManager::new_with_config(client.clone(), config.clone())
                .await
            {
                Ok(manager) => AsyncRedisStorage::new_with_conn_manager(manager).await,
                Err(e) => Err(e),
            };
        match storage {
            Ok(storage) => return Ok(storage),
            Err(e) if !told => {
                eprintln!("keygate-ratelimit: redis {redis}: {e} (retrying every second)");
                told = true;
            }
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Installs the limits of `next`: the new limits first, then the table
/// that points at them, then limitador drops the limits (and their Redis
/// counters) no key uses any more.
async fn apply(
    next: FleetTable,
    limiter: &AsyncRateLimiter,
    table: &RwLock<Arc<FleetTable>>,
) -> Result<(), String> {
    let limits = limitador_limits(&next)?;
    for limit in &limits {
        limiter.add_limit(limit.clone());
    }
    eprintln!(
        "keygate-ratelimit: {} keys, {} limit sets, {} limits",
        next.keys(),
        next.sets().len(),
        limits.len()
    );
    match table.write() {
        Ok(mut t) => *t = Arc::new(next),
        Err(poisoned) => *poisoned.into_inner() = Arc::new(next),
    }
    limiter
        .configure_with(limits)
        .await
        .map_err(|e| format!("removing unused limits: {e}"))
}

async fn serve(
    config: Option<PathBuf>,
    control_plane: Option<Uri>,
    poll: f64,
    redis: String,
    listen: SocketAddr,
) -> Result<(), String> {
    if !(poll.is_finite() && (0.05..=3600.0).contains(&poll)) {
        return Err("--poll must be from 0.05 to 3600 seconds".into());
    }
    let mut source = Source::new(config, control_plane)?;
    let first = source.refresh().await?;
    let limiter = Arc::new(AsyncRateLimiter::new_with_storage(Box::new(
        connect(&redis).await?,
    )));
    let table = Arc::new(RwLock::new(Arc::new(FleetTable::default())));
    if let Some(next) = first {
        apply(next, &limiter, &table).await?;
    }
    let (poll_limiter, poll_table) = (limiter.clone(), table.clone());
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs_f64(poll));
        tick.tick().await;
        loop {
            tick.tick().await;
            let outcome = match source.refresh().await {
                Ok(Some(next)) => apply(next, &poll_limiter, &poll_table).await,
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            };
            if let Err(e) = outcome {
                eprintln!("keygate-ratelimit: {e}");
            }
        }
    });
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("--listen {listen}: {e}"))?;
    eprintln!("keygate-ratelimit: listening on {listen} (redis {redis})");
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    tonic::transport::Server::builder()
        .add_service(RateLimitServiceServer::new(Service { table, limiter }))
        .serve_with_incoming_shutdown(incoming, shutdown())
        .await
        .map_err(|e| format!("serving: {e}"))
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    eprintln!("keygate-ratelimit: stopping");
}
