//! A TCP relay between the worker and the broker that the test controls, so a test can break
//! its own worker's connection — cut it, stall it without closing, or slow it down — without
//! disturbing other tests on the same broker. The chaos bench uses it too.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpListener, TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    task::JoinHandle,
};

/// One relayed connection.
struct Link {
    task: JoinHandle<()>,
    stalled: Arc<AtomicBool>,
}

pub struct Relay {
    pub addr: SocketAddr,
    links: Arc<Mutex<Vec<Link>>>,
    /// Added before forwarding each chunk, on every connection (milliseconds).
    delay_ms: Arc<AtomicU64>,
    /// While set, new connections are closed at once: the broker is unreachable.
    refusing: Arc<AtomicBool>,
    accept: JoinHandle<()>,
}

impl Relay {
    /// Listens on 127.0.0.1:0 and forwards every connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Relay {
        Self::start_on("127.0.0.1:0", upstream).await
    }

    /// Listens on `listen` (`[::1]:0`, say) and forwards every connection to `upstream`.
    pub async fn start_on(listen: &str, upstream: SocketAddr) -> Relay {
        let listener = TcpListener::bind(listen).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let links: Arc<Mutex<Vec<Link>>> = Arc::default();
        let registry = links.clone();
        let delay_ms: Arc<AtomicU64> = Arc::default();
        let delay = delay_ms.clone();
        let refusing: Arc<AtomicBool> = Arc::default();
        let refuse = refusing.clone();
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                if refuse.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let stalled = Arc::new(AtomicBool::new(false));
                let faults = Faults {
                    stalled: stalled.clone(),
                    delay_ms: delay.clone(),
                };
                let task = tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (in_read, in_write) = inbound.into_split();
                    let (out_read, out_write) = outbound.into_split();
                    // Either direction ending closes both, as a real connection would.
                    tokio::select! {
                        _ = pump(in_read, out_write, faults.clone()) => {}
                        _ = pump(out_read, in_write, faults) => {}
                    }
                });
                registry.lock().unwrap().push(Link { task, stalled });
            }
        });
        Relay {
            addr,
            links,
            delay_ms,
            refusing,
            accept,
        }
    }

    /// A relay to the broker of `amqp_url`.
    pub async fn to_broker(amqp_url: &str) -> Relay {
        Relay::start(broker_addr(amqp_url).await).await
    }

    /// The broker becomes unreachable: open connections are cut and new ones refused, until
    /// [`Relay::up`].
    pub fn down(&self) -> usize {
        self.refusing.store(true, Ordering::SeqCst);
        self.cut()
    }

    pub fn up(&self) {
        self.refusing.store(false, Ordering::SeqCst);
    }

    /// Drops every open connection at once (both sockets close), as a network cut would.
    pub fn cut(&self) -> usize {
        let links: Vec<_> = self.links.lock().unwrap().drain(..).collect();
        let n = links.iter().filter(|l| !l.task.is_finished()).count();
        for link in links {
            link.task.abort();
        }
        n
    }

    /// Silently stops forwarding on every open connection while keeping its sockets open, as a
    /// dead NAT entry or a hung peer would: only heartbeats can tell. New connections still go
    /// through.
    pub fn stall(&self) -> usize {
        let links = self.links.lock().unwrap();
        let open = links.iter().filter(|l| !l.task.is_finished());
        open.map(|l| l.stalled.store(true, Ordering::SeqCst))
            .count()
    }

    /// Delays every chunk, in both directions and on every connection, by `delay` (zero: none),
    /// as a congested or long-distance link would. Returns the connections open now.
    pub fn slow(&self, delay: Duration) -> usize {
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
        let links = self.links.lock().unwrap();
        links.iter().filter(|l| !l.task.is_finished()).count()
    }
}

/// What the test has done to one connection.
#[derive(Clone)]
struct Faults {
    stalled: Arc<AtomicBool>,
    delay_ms: Arc<AtomicU64>,
}

/// Copies `from` to `to` until either ends; once stalled, swallows everything instead.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, faults: Faults) {
    let mut buf = vec![0; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if faults.stalled.load(Ordering::SeqCst) {
            continue;
        }
        let delay = faults.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// The socket address of `amqp_url`'s host and port.
pub async fn broker_addr(amqp_url: &str) -> SocketAddr {
    let url: url::Url = amqp_url.parse().expect("an AMQP URL");
    let host = url.host_str().expect("a host");
    let addr = format!("{host}:{}", url.port().unwrap_or(5672));
    tokio::net::lookup_host(addr).await.unwrap().next().unwrap()
}
