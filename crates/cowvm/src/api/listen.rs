//! The API's accept loop. It cannot be starved by clients that connect and say nothing:
//!
//! - at most [`MAX_CONNECTIONS`] connections are open; a new one beyond that evicts the oldest
//!   connection that is not serving a request (an idle or half-sent one), so a client that
//!   sends a request is served even with thousands of idle connections waiting;
//! - each request's header must arrive within [`HEADER_TIMEOUT`] of the server starting to read
//!   it, which also closes a keep-alive connection idle that long (and a slowloris);
//! - accept errors (out of file descriptors) back off up to a second and are logged at most
//!   once per [`ERROR_LOG_INTERVAL`], with the number of errors not logged.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::{service_fn, Service};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{oneshot, watch, Notify};
use tokio::task::JoinSet;
use tracing::{debug, warn};

/// Most connections open at once.
pub const MAX_CONNECTIONS: usize = 128;
/// How long a request's header may take to arrive, counted from when the server waits for it
/// (a new connection, or a keep-alive one after its last answer).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest pause after an accept error.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// The shortest interval between two log lines about accept errors.
const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// An open connection, as the accept loop sees it.
struct Slot {
    id: u64,
    /// A request is being served.
    busy: Arc<AtomicBool>,
    /// Woken to close the connection at once.
    evict: Arc<Notify>,
}

/// The open connections, oldest first.
#[derive(Default)]
struct Slots {
    next_id: u64,
    open: VecDeque<Slot>,
}

type SharedSlots = Arc<Mutex<Slots>>;

impl Slots {
    /// Makes room for a new connection, evicting the oldest one not serving a request if all
    /// slots are taken; `None` if every slot is serving a request.
    fn admit(slots: &SharedSlots) -> Option<(u64, Arc<AtomicBool>, Arc<Notify>)> {
        let mut s = slots.lock().unwrap_or_else(PoisonError::into_inner);
        if s.open.len() >= MAX_CONNECTIONS {
            let idle = s
                .open
                .iter()
                .position(|c| !c.busy.load(Ordering::Acquire))?;
            if let Some(old) = s.open.remove(idle) {
                debug!("API connection limit reached: closing an idle connection");
                old.evict.notify_one();
            }
        }
        let id = s.next_id;
        s.next_id += 1;
        let busy = Arc::new(AtomicBool::new(false));
        let evict = Arc::new(Notify::new());
        s.open.push_back(Slot {
            id,
            busy: busy.clone(),
            evict: evict.clone(),
        });
        Some((id, busy, evict))
    }

    fn remove(slots: &SharedSlots, id: u64) {
        let mut s = slots.lock().unwrap_or_else(PoisonError::into_inner);
        s.open.retain(|c| c.id != id);
    }
}

/// Logs accept errors, at most one line per [`ERROR_LOG_INTERVAL`].
#[derive(Default)]
struct ErrorLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl ErrorLog {
    fn error(&mut self, e: &std::io::Error) {
        if self.last.is_some_and(|t| t.elapsed() < ERROR_LOG_INTERVAL) {
            self.suppressed += 1;
            return;
        }
        if self.suppressed > 0 {
            warn!(
                "API accept error: {e} ({} more since the last report)",
                self.suppressed
            );
        } else {
            warn!("API accept error: {e}");
        }
        self.last = Some(Instant::now());
        self.suppressed = 0;
    }
}

/// Serves `router` on `listener` until `stop` fires (or its sender is dropped); then stops
/// accepting, lets each connection finish its request in flight, and returns.
pub async fn serve(listener: UnixListener, router: Router, mut stop: oneshot::Receiver<()>) {
    let slots = SharedSlots::default();
    let (stopping, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut errors = ErrorLog::default();
    let mut backoff = Duration::ZERO;
    loop {
        let accepted = tokio::select! {
            _ = &mut stop => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                backoff = Duration::ZERO;
                match Slots::admit(&slots) {
                    Some((id, busy, evict)) => {
                        let conn = Connection {
                            router: router.clone(),
                            busy,
                            evict,
                            stop: stop_rx.clone(),
                        };
                        let slots = slots.clone();
                        connections.spawn(async move {
                            conn.run(stream).await;
                            Slots::remove(&slots, id);
                        });
                    }
                    None => debug!("API connection limit reached, every connection busy"),
                }
            }
            Err(e) => {
                errors.error(&e);
                backoff = (backoff * 2).clamp(Duration::from_millis(10), ACCEPT_BACKOFF_MAX);
                tokio::select! {
                    _ = &mut stop => break,
                    () = tokio::time::sleep(backoff) => {}
                }
            }
        }
    }
    // No connection waits on this; a send error means none is left.
    let _ = stopping.send(true);
    while connections.join_next().await.is_some() {}
}

/// One connection's service.
struct Connection {
    router: Router,
    busy: Arc<AtomicBool>,
    evict: Arc<Notify>,
    stop: watch::Receiver<bool>,
}

impl Connection {
    async fn run(mut self, stream: UnixStream) {
        let tower = TowerToHyperService::new(self.router);
        let busy = self.busy;
        let service = service_fn(move |req: hyper::Request<Incoming>| {
            busy.store(true, Ordering::Release);
            let answer = tower.call(req);
            let busy = busy.clone();
            async move {
                let answer = answer.await;
                busy.store(false, Ordering::Release);
                answer
            }
        });
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .serve_connection(TokioIo::new(stream), service);
        tokio::pin!(conn);
        let ended = tokio::select! {
            ended = conn.as_mut() => ended,
            () = self.evict.notified() => return,
            () = async { drop(self.stop.wait_for(|stop| *stop).await) } => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = ended {
            debug!("API connection ended: {e}");
        }
    }
}
