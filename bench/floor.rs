//! The floor keygate is measured against, and the clients `bench/load.py` needs beside h2load.
//! Built with the same tonic, prost and envoy-types as keygate.
//!
//! ```text
//! floor authorize ADDRESS          keygate.v1.Authorize/Check that allows every call at once
//! floor ext-authz ADDRESS          envoy.service.auth.v3.Authorization/Check that allows every call
//! floor mint COUNT FILE SITE       COUNT new keys as `keygate import` lines (3 scopes, one site)
//! floor warm ADDRESS FILE          Checks every key of FILE once, 64 at a time
//! floor flood ADDRESS SECONDS      Checks well-formed keys nobody minted, 16 at a time
//! ```
//!
//! The servers run on tonic's own server with its defaults (TCP_NODELAY on, as keygate's) and
//! answer the smallest valid allow: what a handler costs when its decision costs nothing. They
//! print `listening on ADDRESS` once bound and serve until killed. The clients print one line
//! of counts.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use envoy_types::ext_authz::v3::pb::{
    Authorization, AuthorizationServer, CheckRequest as EnvoyCheckRequest, CheckResponse as EnvoyCheckResponse,
};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use keygate::domain::key::{ApiKeySecret, Environment};
use keygate::domain::key_format::KeyShapes;
use keygate::proto::authorize_client::AuthorizeClient;
use keygate::proto::authorize_server::{Authorize, AuthorizeServer};
use keygate::proto::{CheckRequest, CheckResponse};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// The scope every benchmark key holds and Checks ask for (one of three it holds).
const SCOPE: &str = "events:read";

struct AllowAll;

#[tonic::async_trait]
impl Authorize for AllowAll {
    async fn check(&self, _: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        Ok(Response::new(CheckResponse { allowed: true, http_status: 200, ..Default::default() }))
    }
}

#[tonic::async_trait]
impl Authorization for AllowAll {
    async fn check(&self, _: Request<EnvoyCheckRequest>) -> Result<Response<EnvoyCheckResponse>, Status> {
        Ok(Response::new(EnvoyCheckResponse {
            status: Some(RpcStatus { code: 0, ..Default::default() }),
            ..Default::default()
        }))
    }
}

const USAGE: &str = "usage: floor authorize|ext-authz ADDRESS | mint COUNT FILE SITE | warm ADDRESS FILE | \
                     flood ADDRESS SECONDS";

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["authorize" | "ext-authz", address] => serve(args[0], address.parse()?).await,
        ["mint", count, file, site] => mint(count.parse()?, file, site),
        ["warm", address, file] => warm(address, file).await,
        ["flood", address, seconds] => flood(address, Duration::from_secs_f64(seconds.parse()?)).await,
        _ => Err(USAGE.into()),
    }
}

async fn serve(kind: &str, address: SocketAddr) -> Result<(), Error> {
    let incoming = tonic::transport::server::TcpIncoming::bind(address)?.with_nodelay(Some(true));
    println!("listening on {}", incoming.local_addr()?);
    let mut server = tonic::transport::Server::builder();
    match kind {
        "authorize" => server.add_service(AuthorizeServer::new(AllowAll)).serve_with_incoming(incoming).await?,
        _ => server.add_service(AuthorizationServer::new(AllowAll)).serve_with_incoming(incoming).await?,
    }
    Ok(())
}

/// Writes `count` new keys of keygate's default shape as import lines.
fn mint(count: usize, file: &str, site: &str) -> Result<(), Error> {
    use std::io::Write;
    let shape = KeyShapes::default().minting;
    let mut out = std::io::BufWriter::new(std::fs::File::create(file)?);
    for index in 0..count {
        let secret = ApiKeySecret::generate(&shape, Environment::Live)?.expose();
        writeln!(
            out,
            r#"{{"secret": "{secret}", "name": "bench {index}", "scopes": ["{SCOPE}", "events:write", "stats:read"], "site_ids": ["{site}"]}}"#
        )?;
    }
    out.flush()?;
    Ok(())
}

async fn channel(address: &str) -> Result<Channel, Error> {
    Ok(Channel::from_shared(format!("http://{address}"))?.tcp_nodelay(true).connect().await?)
}

/// Runs `calls` Checks (`key(index)` for the index-th) on `streams` streams at once; returns
/// (allowed, denied, failed).
async fn run_checks(
    address: &str,
    streams: usize,
    calls: impl Fn(u64) -> Option<(String, String)> + Send + Sync + 'static,
) -> Result<(u64, u64, u64), Error> {
    let channel = channel(address).await?;
    let next = Arc::new(AtomicU64::new(0));
    let calls = Arc::new(calls);
    let counts = Arc::new([AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)]);
    let mut tasks = Vec::new();
    for _ in 0..streams {
        let (mut client, next, calls, counts) =
            (AuthorizeClient::new(channel.clone()), next.clone(), calls.clone(), counts.clone());
        tasks.push(tokio::spawn(async move {
            while let Some((key, site_id)) = calls(next.fetch_add(1, Ordering::Relaxed)) {
                let request = CheckRequest { key, scope: SCOPE.into(), site_id, tenant_id: String::new() };
                let slot = match client.check(request).await {
                    Ok(response) if response.get_ref().allowed => 0,
                    Ok(_) => 1,
                    Err(_) => 2,
                };
                counts[slot].fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    Ok((counts[0].load(Ordering::Relaxed), counts[1].load(Ordering::Relaxed), counts[2].load(Ordering::Relaxed)))
}

/// Checks each key of an import file once.
async fn warm(address: &str, file: &str) -> Result<(), Error> {
    #[derive(serde::Deserialize)]
    struct Line {
        secret: String,
        site_ids: Vec<String>,
    }
    let lines: Vec<(String, String)> = std::fs::read_to_string(file)?
        .lines()
        .map(|line| serde_json::from_str::<Line>(line).map(|line| (line.secret, line.site_ids[0].clone())))
        .collect::<Result<_, _>>()?;
    let lines = Arc::new(lines);
    let started = Instant::now();
    let (allowed, denied, failed) = run_checks(address, 64, move |index| lines.get(index as usize).cloned()).await?;
    println!("warm: {allowed} allowed, {denied} denied, {failed} failed in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Checks fresh well-formed keys (each one unknown) for `seconds`.
async fn flood(address: &str, seconds: Duration) -> Result<(), Error> {
    let shape = KeyShapes::default().minting;
    let until = Instant::now() + seconds;
    let started = Instant::now();
    let (allowed, denied, failed) = run_checks(address, 16, move |_| {
        let key = ApiKeySecret::generate(&shape, Environment::Live).ok()?.expose();
        (Instant::now() < until).then(|| (key, String::new()))
    })
    .await?;
    let calls = allowed + denied + failed;
    println!(
        "flood: {calls} Checks of unknown keys ({:.0}/s): {denied} denied, {failed} failed, {allowed} allowed",
        calls as f64 / started.elapsed().as_secs_f64()
    );
    Ok(())
}
