//! The client listeners, which a reload may add and remove while serving.
//!
//! A change of `listen` binds the new addresses first and serves them; the
//! old ones stop only once the reload's health check has passed (requests in
//! flight on them finish). A bind failure or a failed check leaves the old
//! listeners exactly as they were.

use std::{net::SocketAddr, sync::Mutex, time::Duration};

use anyhow::Context;
use axum::Router;
use tokio::{sync::watch, task::JoinHandle};

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
}

impl Listeners {
    /// Binds every address (all or none) and serves `app` on them.
    pub fn start(app: Router, addresses: &[SocketAddr]) -> anyhow::Result<Self> {
        let listeners = Self {
            app,
            active: Mutex::new(vec![]),
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
            let (stop, mut stopped) = watch::channel(false);
            // A make-service shares the one router among connections: a plain
            // `Router` is re-specialised with its state for every connection,
            // which costs memory in proportion to the number of routes (about
            // 400 KiB a connection here). The peer address it records feeds
            // the per-address admission limits.
            let service = self.app.clone().into_make_service_with_connect_info::<SocketAddr>();
            let task = tokio::spawn(async move {
                axum::serve(listener, service)
                    .with_graceful_shutdown(async move {
                        let _ = stopped.wait_for(|s| *s).await;
                    })
                    .await
            });
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
