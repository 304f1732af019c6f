//! The client listeners, which a reload may add and remove while serving.
//!
//! A change of `listen` binds the new addresses first and serves them; the
//! old ones stop only once the reload's health check has passed (requests in
//! flight on them finish). A bind failure or a failed check leaves the old
//! listeners exactly as they were.
//!
//! Connections are served by hyper directly rather than `axum::serve`, for
//! two defences axum does not offer: a client must send a request's headers
//! within `header_read_timeout` (a slowloris trickling them holds nothing
//! for long), and one client address may hold at most
//! `max_connections_per_address` connections (more are closed at accept).

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context;
use axum::{Router, extract::ConnectInfo};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
    service::TowerToHyperService,
};
use kabar_core::admission::AddressSlots;
use tokio::{sync::watch, task::JoinHandle};
use tower::ServiceExt as _;

/// How connections are admitted and read.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// A request's headers must arrive within this.
    pub header_read_timeout: Duration,
    /// Open connections per client address (IPv6 by /64); 0 is no limit.
    pub max_per_address: usize,
    /// Addresses `max_per_address` does not limit (a reverse proxy's).
    pub unlimited: Vec<IpAddr>,
}

/// How many connections may wait to be accepted. tokio's default (1024) is
/// too small for a crowd arriving at once: the kernel drops the excess SYNs
/// and clients stall for seconds in TCP retransmission. The kernel caps this
/// at `net.core.somaxconn`.
const LISTEN_BACKLOG: u32 = 65_535;

fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

struct Listener {
    /// As the configuration names it (port 0 stays 0).
    configured: SocketAddr,
    bound: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<std::io::Result<()>>,
}

pub struct Listeners {
    app: Router,
    active: Mutex<Vec<Listener>>,
    limits: ConnectionLimits,
    /// Open connections per client address, shared by every listener.
    open: Arc<AddressSlots>,
}

impl Listeners {
    /// Binds every address (all or none) and serves `app` on them.
    pub fn start(app: Router, addresses: &[SocketAddr], limits: ConnectionLimits) -> anyhow::Result<Self> {
        let listeners = Self {
            app,
            active: Mutex::new(vec![]),
            open: AddressSlots::new(limits.max_per_address, &limits.unlimited),
            limits,
        };
        listeners.add_missing(addresses)?;
        Ok(listeners)
    }

    /// The bound addresses, in configuration order.
    pub fn bound(&self) -> Vec<SocketAddr> {
        self.active.lock().expect("listeners").iter().map(|l| l.bound).collect()
    }

    /// Where the listener configured as `configured` is bound, if it runs.
    pub fn bound_for(&self, configured: SocketAddr) -> Option<SocketAddr> {
        self.active
            .lock()
            .expect("listeners")
            .iter()
            .find(|l| l.configured == configured)
            .map(|l| l.bound)
    }

    /// Binds and serves each address in `addresses` not served yet. If one
    /// cannot be bound, those this call added are stopped again and the
    /// error says which address failed.
    pub fn add_missing(&self, addresses: &[SocketAddr]) -> anyhow::Result<()> {
        let mut active = self.active.lock().expect("listeners");
        let mut added = vec![];
        for &addr in addresses {
            if active.iter().any(|l| l.configured == addr) {
                continue;
            }
            let listener = match bind(addr).with_context(|| format!("binding listen address {addr}")) {
                Ok(l) => l,
                Err(e) => {
                    active.retain(|l| {
                        let keep = !added.contains(&l.configured);
                        if !keep {
                            let _ = l.stop.send(true);
                        }
                        keep
                    });
                    return Err(e);
                }
            };
            let bound = listener.local_addr()?;
            let (stop, stopped) = watch::channel(false);
            let task = tokio::spawn(serve(listener, self.app.clone(), self.open.clone(), self.limits.clone(), stopped));
            // Tests and scripts read this line to learn the port.
            println!("kabar listening on http://{bound}");
            tracing::info!(address = %bound, "listening");
            active.push(Listener {
                configured: addr,
                bound,
                stop,
                task,
            });
            added.push(addr);
        }
        // Keep configuration order, so the first address stays first.
        active.sort_by_key(|l| addresses.iter().position(|a| *a == l.configured).unwrap_or(usize::MAX));
        Ok(())
    }

    /// Connections open from `peer`'s address now.
    #[cfg(test)]
    fn open_from(&self, peer: std::net::IpAddr) -> usize {
        self.open.in_use(peer)
    }

    /// Stops accepting on every listener not in `keep`; requests in flight
    /// there finish.
    pub fn retain(&self, keep: &[SocketAddr]) {
        self.active.lock().expect("listeners").retain(|l| {
            let stays = keep.contains(&l.configured);
            if !stays {
                tracing::info!(address = %l.bound, "no longer listening");
                let _ = l.stop.send(true);
            }
            stays
        });
    }

    /// Stops accepting everywhere and waits up to `deadline` for requests in
    /// flight; false if some were still running.
    pub async fn shutdown(&self, deadline: Duration) -> bool {
        let tasks: Vec<JoinHandle<std::io::Result<()>>> = {
            let mut active = self.active.lock().expect("listeners");
            active
                .drain(..)
                .map(|l| {
                    let _ = l.stop.send(true);
                    l.task
                })
                .collect()
        };
        match tokio::time::timeout(deadline, futures::future::join_all(tasks)).await {
            Ok(results) => {
                for r in results {
                    match r {
                        Ok(Err(e)) => tracing::error!(error = %e, "a listener failed"),
                        Err(e) => tracing::error!(error = %e, "a listener task failed"),
                        Ok(Ok(())) => {}
                    }
                }
                true
            }
            Err(_) => false,
        }
    }
}

/// Accepts and serves connections until `stopped` turns true, then waits for
/// the connections in flight to finish their requests.
async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    open: Arc<AddressSlots>,
    limits: ConnectionLimits,
    mut stopped: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
            () = stop_requested(&mut stopped) => break,
        };
        let Some(place) = open.acquire(peer.ip()) else {
            // Over this address's share: closed at once, before any byte is read.
            tracing::debug!(%peer, "connection refused: too many open from this address");
            continue;
        };
        let _ = stream.set_nodelay(true);
        // One router shared by every connection (a `Router` per connection
        // would cost memory in proportion to the routes); the peer address
        // feeds the per-address admission limits, as `ConnectInfo`.
        let service = app.clone().map_request(move |mut request: axum::extract::Request| {
            request.extensions_mut().insert(ConnectInfo(peer));
            request
        });
        let service =
            TowerToHyperService::new(service.map_request(|r: hyper::Request<hyper::body::Incoming>| r.map(axum::body::Body::new)));
        let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::trace!(error = %e, "connection ended with an error");
            }
            drop(place);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

async fn stop_requested(stopped: &mut watch::Receiver<bool>) {
    // The sender lives as long as the listener; if it is gone, stop too.
    let _ = stopped.wait_for(|s| *s).await;
}

/// What a failed accept costs: nothing for a connection that went away
/// before it was accepted; a pause when the process is out of descriptors,
/// so the loop does not spin while none can be had.
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind as K;
    if matches!(e.kind(), K::ConnectionRefused | K::ConnectionAborted | K::ConnectionReset) {
        return;
    }
    tracing::error!(error = %e, "accept failed");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn limits(max_per_address: usize) -> ConnectionLimits {
        ConnectionLimits {
            header_read_timeout: Duration::from_millis(300),
            max_per_address,
            unlimited: vec![],
        }
    }

    async fn app() -> Router {
        Router::new().route("/", axum::routing::get(|| async { "ok" }))
    }

    /// Reads until the peer closes the connection (or `limit` passes).
    async fn closed_within(stream: &mut tokio::net::TcpStream, limit: Duration) -> bool {
        let mut buf = [0u8; 256];
        matches!(
            tokio::time::timeout(limit, async {
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
            })
            .await,
            Ok(())
        )
    }

    #[tokio::test]
    async fn headers_trickled_slower_than_the_timeout_close_the_connection() {
        let listeners = Listeners::start(app().await, &["127.0.0.1:0".parse().unwrap()], limits(0)).unwrap();
        let addr = listeners.bound()[0];
        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        // A header line now and then, never the end of the headers.
        let trickle = async {
            for _ in 0..20 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if slow.write_all(b"X-Slow: 1\r\n").await.is_err() {
                    break;
                }
            }
        };
        trickle.await;
        assert!(closed_within(&mut slow, Duration::from_secs(3)).await, "the server hung up");
        // A client that sends its request at once is served.
        let mut quick = tokio::net::TcpStream::connect(addr).await.unwrap();
        quick
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        quick.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(listeners.shutdown(Duration::from_secs(5)).await);
    }

    #[tokio::test]
    async fn one_address_holds_at_most_its_share_of_connections() {
        let listeners = Listeners::start(app().await, &["127.0.0.1:0".parse().unwrap()], limits(3)).unwrap();
        let addr = listeners.bound()[0];
        let mut held = vec![];
        for _ in 0..3 {
            held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while listeners.open_from(addr.ip()) < 3 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(listeners.open_from(addr.ip()), 3);
        let mut fourth = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert!(
            closed_within(&mut fourth, Duration::from_secs(3)).await,
            "the fourth is closed at once"
        );
        drop(held.pop());
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while listeners.open_from(addr.ip()) > 2 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut again = tokio::net::TcpStream::connect(addr).await.unwrap();
        again
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        again.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "a closed connection frees its place: {answer}");
        drop(held);
        assert!(listeners.shutdown(Duration::from_secs(5)).await);
    }
}
