//! The rendezvous store: a small TCP key-value server (set / get / wait / add, and a barrier built on
//! them) that `ferrotune launch` serves on node 0 (or rank 0 serves itself when workers are started by
//! torchrun or Slurm), and the client every worker and launcher uses. Each connection first presents
//! the job's token (the run id), so two jobs pointed at one port cannot mix, and a restart generation
//! that prefixes every key, so a restarted job never reads the values of the attempt before it.
//! The server is one thread running an event loop for every connection; the client is blocking.
//! Frames are a u32 length then JSON. This is for small values (addresses, ids, counters); tensors
//! travel on the collectives' own connections, never through here.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot serve the rendezvous store on {addr}: port {port} is in use; hint: pick another --master-port, or stop the job that holds it")]
    PortInUse { addr: String, port: u16 },
    #[error("rendezvous store at {addr}: {msg}")]
    Io { addr: String, msg: String },
    #[error("rendezvous store at {addr} refused this worker: {msg}")]
    Refused { addr: String, msg: String },
    #[error("rendezvous timed out after {secs:.0}s at {what}: still missing {missing}")]
    Timeout { what: String, secs: f64, missing: String },
}

pub type Result<T> = std::result::Result<T, StoreError>;

#[derive(Serialize, Deserialize, Debug)]
enum Request {
    Hello {
        token: String,
    },
    Set {
        key: String,
        value: Vec<u8>,
    },
    Get {
        key: String,
    },
    Wait {
        keys: Vec<String>,
        timeout_ms: u64,
    },
    Add {
        key: String,
        delta: i64,
    },
    /// When this connection ends, append `name` to the value of `key` (a comma-separated list): how
    /// the other nodes learn that a node's launcher died (or its host, through TCP keepalive).
    OnDisconnect {
        key: String,
        name: String,
    },
}

#[derive(Serialize, Deserialize, Debug)]
enum Response {
    Ok,
    Value(Option<Vec<u8>>),
    Count(i64),
    /// `Wait` ran out of time; these keys never appeared.
    Missing(Vec<String>),
    Refused(String),
}

fn send<T: Serialize>(s: &mut TcpStream, v: &T) -> std::io::Result<()> {
    let body = serde_json::to_vec(v).expect("store frames serialize");
    s.write_all(&(body.len() as u32).to_le_bytes())?;
    s.write_all(&body)
}

fn recv<T: for<'de> Deserialize<'de>>(s: &mut TcpStream) -> std::io::Result<T> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len)?;
    let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
    s.read_exact(&mut body)?;
    serde_json::from_slice(&body).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// The store's contents, and who waits for which missing key.
#[derive(Default)]
struct State {
    map: HashMap<String, Vec<u8>>,
    /// Woken (and removed) when their key is set.
    waiters: HashMap<String, Vec<oneshot::Sender<()>>>,
}

impl State {
    fn insert(&mut self, key: String, value: Vec<u8>) {
        if let Some(waiting) = self.waiters.remove(&key) {
            for w in waiting {
                let _ = w.send(());
            }
        }
        self.map.insert(key, value);
    }
}

type Shared = Arc<Mutex<State>>;

/// The longest frame the store reads (values are addresses, ids and counters): a larger length is a
/// client of another protocol or a corrupt stream, and closes that connection instead of allocating.
const MAX_FRAME: usize = 16 << 20;

/// A running store; it stops serving, and closes every connection, when dropped.
pub struct StoreServer {
    pub port: u16,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StoreServer {
    /// Binds `host:port` (port 0 picks a free one) and serves connections presenting `token`.
    ///
    /// One thread runs an event loop (Tokio, single-threaded) that serves every connection: a thread per
    /// connection cost 1,024 threads and 106 MiB for 1,024 ranks, and waking every waiter on every set
    /// made a barrier quadratic (`launcher/tests/store_scale.rs`). Here a waiter waits on one missing key
    /// at a time and only a set of that key wakes it.
    pub fn serve(host: &str, port: u16, token: &str) -> Result<Self> {
        let addr = format!("{host}:{port}");
        let listener = TcpListener::bind(&addr).map_err(|e| match e.kind() {
            std::io::ErrorKind::AddrInUse => StoreError::PortInUse { addr: addr.clone(), port },
            _ => StoreError::Io { addr: addr.clone(), msg: format!("cannot listen: {e}") },
        })?;
        let io = |e: std::io::Error| StoreError::Io { addr: addr.clone(), msg: e.to_string() };
        let port = listener.local_addr().map_err(io)?.port();
        listener.set_nonblocking(true).map_err(io)?;
        raise_open_file_limit();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(io)?;
        let (stop, mut stopped) = oneshot::channel::<()>();
        let token = token.to_owned();
        let thread = std::thread::Builder::new()
            .name("rendezvous-store".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else { return };
                    let state = Shared::default();
                    loop {
                        tokio::select! {
                            _ = &mut stopped => break,
                            conn = listener.accept() => {
                                // Accept errors (e.g. out of descriptors) are transient: the client retries.
                                let Ok((conn, _)) = conn else { continue };
                                tokio::spawn(serve_connection(conn, state.clone(), token.clone()));
                            }
                        }
                    }
                });
                // Dropping the runtime here cancels every connection's task: their sockets close.
            })
            .map_err(io)?;
        Ok(StoreServer { port, stop: Some(stop), thread: Some(thread) })
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Each connection holds a descriptor: a store for thousands of ranks needs more than the common soft
/// limit of 1,024, so it raises its own soft limit to the hard one (what the user may allow anyway).
fn raise_open_file_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

async fn read_frame<T: for<'de> Deserialize<'de>>(s: &mut tokio::net::TcpStream) -> std::io::Result<T> {
    let len = s.read_u32_le().await? as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("frame of {len} bytes")));
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await?;
    serde_json::from_slice(&body).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

async fn write_frame<T: Serialize>(s: &mut tokio::net::TcpStream, v: &T) -> std::io::Result<()> {
    let body = serde_json::to_vec(v).expect("store frames serialize");
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    s.write_all(&frame).await
}

async fn serve_connection(mut conn: tokio::net::TcpStream, state: Shared, token: String) {
    let _ = conn.set_nodelay(true);
    match read_frame::<Request>(&mut conn).await {
        Ok(Request::Hello { token: t }) if t == token => {
            if write_frame(&mut conn, &Response::Ok).await.is_err() {
                return;
            }
        }
        Ok(Request::Hello { token: t }) => {
            let msg = format!("it serves run id `{token}`, this worker belongs to run id `{t}`; hint: another job uses this port: pick another --master-port, or the same --run-id to join that job");
            let _ = write_frame(&mut conn, &Response::Refused(msg)).await;
            return;
        }
        _ => return,
    }
    let mut on_disconnect: Option<(String, String)> = None;
    while let Ok(req) = read_frame::<Request>(&mut conn).await {
        let resp = match req {
            Request::Hello { .. } => Response::Refused("hello sent twice".into()),
            Request::OnDisconnect { key, name } => {
                keep_alive(&conn);
                on_disconnect = Some((key, name));
                Response::Ok
            }
            Request::Set { key, value } => {
                state.lock().unwrap().insert(key, value);
                Response::Ok
            }
            Request::Get { key } => Response::Value(state.lock().unwrap().map.get(&key).cloned()),
            Request::Add { key, delta } => {
                let mut st = state.lock().unwrap();
                let old = st.map.get(&key).and_then(|v| std::str::from_utf8(v).ok()?.parse::<i64>().ok()).unwrap_or(0);
                st.insert(key, (old + delta).to_string().into_bytes());
                Response::Count(old + delta)
            }
            Request::Wait { keys, timeout_ms } => wait(&state, keys, timeout_ms).await,
        };
        if write_frame(&mut conn, &resp).await.is_err() {
            break;
        }
    }
    if let Some((key, name)) = on_disconnect {
        let mut st = state.lock().unwrap();
        let mut list = st.map.get(&key).map(|v| String::from_utf8_lossy(v).into_owned()).unwrap_or_default();
        if !list.is_empty() {
            list.push_str(", ");
        }
        list.push_str(&name);
        st.insert(key, list.into_bytes());
    }
}

/// TCP keepalive on a connection whose end must be noticed even when the other host vanishes without a
/// word (power loss, a cut link); on both ends, so a client does not wait forever on a vanished store:
/// probes after 10 s idle, every 5 s, 3 unanswered end it (about 25 s). TCP_USER_TIMEOUT bounds the
/// other case, data sent and never acknowledged (keepalive waits for idle; retransmission alone
/// gives up only after some 15 minutes), to the same 25 s.
fn keep_alive(conn: &impl std::os::fd::AsRawFd) {
    let fd = conn.as_raw_fd();
    for (level, opt, value) in [
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 10),
        (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 5),
        (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3),
        (libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, 25_000),
    ] {
        // SAFETY: setsockopt on a socket this task owns, with a valid int option value.
        unsafe {
            libc::setsockopt(
                fd,
                level,
                opt,
                &value as *const i32 as *const libc::c_void,
                std::mem::size_of::<i32>() as libc::socklen_t,
            )
        };
    }
}

/// Waits until every key is set, one missing key at a time (keys are never removed, so a key seen
/// once stays), or answers with the keys still missing at the deadline.
async fn wait(state: &Shared, keys: Vec<String>, timeout_ms: u64) -> Response {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout_ms);
    for key in &keys {
        let woken = {
            let mut st = state.lock().unwrap();
            if st.map.contains_key(key) {
                continue;
            }
            let (tx, rx) = oneshot::channel();
            st.waiters.entry(key.clone()).or_default().push(tx);
            rx
        };
        if tokio::time::timeout_at(deadline, woken).await.is_err() {
            let st = state.lock().unwrap();
            return Response::Missing(keys.iter().filter(|k| !st.map.contains_key(*k)).cloned().collect());
        }
    }
    Response::Ok
}

/// A connection to the store, with every key under `gen/<generation>/`.
pub struct StoreClient {
    conn: TcpStream,
    addr: String,
    prefix: String,
}

impl StoreClient {
    /// Connects to `host:port`, retrying until `timeout` (the server may not be up yet), and presents
    /// `token`.
    pub fn connect(host: &str, port: u16, token: &str, generation: u64, timeout: Duration) -> Result<Self> {
        let addr = format!("{host}:{port}");
        let deadline = Instant::now() + timeout;
        // Connection and hello are retried together until the deadline: the server may not be up yet,
        // or may be going away (a restart), which shows as a reset during the hello.
        let hello = |addr: &str| -> std::io::Result<std::result::Result<TcpStream, String>> {
            let a = addr.to_socket_addrs()?.next().ok_or_else(|| std::io::Error::other("no address"))?;
            let mut conn = TcpStream::connect_timeout(&a, Duration::from_secs(2))?;
            conn.set_nodelay(true)?;
            conn.set_read_timeout(Some(Duration::from_secs(10)))?;
            send(&mut conn, &Request::Hello { token: token.into() })?;
            let answer = recv::<Response>(&mut conn)?;
            conn.set_read_timeout(None)?;
            keep_alive(&conn);
            Ok(match answer {
                Response::Ok => Ok(conn),
                Response::Refused(msg) => Err(msg),
                other => Err(format!("unexpected answer {other:?}")),
            })
        };
        let conn = loop {
            match hello(&addr) {
                Ok(Ok(c)) => break c,
                Ok(Err(msg)) => return Err(StoreError::Refused { addr, msg }),
                Err(e) if Instant::now() >= deadline => {
                    return Err(StoreError::Io {
                        addr,
                        msg: format!("cannot connect within {:.0}s ({e}); hint: is node 0 up, and are --master-addr/--master-port right?", timeout.as_secs_f64()),
                    })
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        Ok(StoreClient { conn, addr, prefix: format!("gen/{generation}/") })
    }

    fn call(&mut self, req: &Request) -> Result<Response> {
        let io = |e: std::io::Error| StoreError::Io {
            addr: self.addr.clone(),
            msg: format!("{e}; hint: the store went away, the job's node 0 or launcher has probably stopped"),
        };
        send(&mut self.conn, req).map_err(io)?;
        recv(&mut self.conn).map_err(io)
    }

    /// This end's IP address on the connection to the store: the interface other nodes reach us on.
    pub fn local_ip(&self) -> Option<std::net::IpAddr> {
        self.conn.local_addr().ok().map(|a| a.ip())
    }

    pub fn set(&mut self, key: &str, value: &[u8]) -> Result<()> {
        self.call(&Request::Set { key: format!("{}{key}", self.prefix), value: value.to_vec() }).map(|_| ())
    }

    pub fn get(&mut self, key: &str) -> Result<Option<Vec<u8>>> {
        match self.call(&Request::Get { key: format!("{}{key}", self.prefix) })? {
            Response::Value(v) => Ok(v),
            other => Err(StoreError::Io { addr: self.addr.clone(), msg: format!("unexpected answer {other:?}") }),
        }
    }

    pub fn add(&mut self, key: &str, delta: i64) -> Result<i64> {
        match self.call(&Request::Add { key: format!("{}{key}", self.prefix), delta })? {
            Response::Count(n) => Ok(n),
            other => Err(StoreError::Io { addr: self.addr.clone(), msg: format!("unexpected answer {other:?}") }),
        }
    }

    /// Waits until every key is set; on timeout the error lists the missing ones (`what` says what
    /// was being waited for, e.g. "rank addresses").
    pub fn wait(&mut self, keys: &[String], timeout: Duration, what: &str) -> Result<()> {
        let full: Vec<String> = keys.iter().map(|k| format!("{}{k}", self.prefix)).collect();
        match self.call(&Request::Wait { keys: full, timeout_ms: timeout.as_millis() as u64 })? {
            Response::Ok => Ok(()),
            Response::Missing(m) => Err(StoreError::Timeout {
                what: what.into(),
                secs: timeout.as_secs_f64(),
                missing: m.iter().map(|k| k.strip_prefix(&self.prefix).unwrap_or(k)).collect::<Vec<_>>().join(", "),
            }),
            other => Err(StoreError::Io { addr: self.addr.clone(), msg: format!("unexpected answer {other:?}") }),
        }
    }

    /// When this connection ends (this process dies, or its host stops answering keepalive probes), the
    /// store appends `name` to the comma-separated list under `key`.
    pub fn on_disconnect(&mut self, key: &str, name: &str) -> Result<()> {
        let req = Request::OnDisconnect { key: format!("{}{key}", self.prefix), name: name.into() };
        self.call(&req).map(|_| ())
    }

    /// Waits for a key and returns its value.
    pub fn wait_get(&mut self, key: &str, timeout: Duration, what: &str) -> Result<Vec<u8>> {
        self.wait(&[key.to_owned()], timeout, what)?;
        Ok(self.get(key)?.expect("a key that was waited for is present"))
    }

    /// Every member of `members` (e.g. the ranks) calls this with its own name; it returns once all
    /// have arrived, or times out naming who has not (`rank 1, rank 3`).
    pub fn barrier(&mut self, name: &str, me: &str, members: &[String], timeout: Duration) -> Result<()> {
        // Each member leaves its own key (to name the missing later) and counts itself in; the last
        // one to arrive sets `done`, the one key everyone waits for. A request per member, whatever
        // the job's size; only a timeout sends the whole member list, once, to name who is missing.
        let key = |m: &str| format!("barrier/{name}/member/{m}");
        let done = format!("barrier/{name}/done");
        self.set(&key(me), b"1")?;
        if self.add(&format!("barrier/{name}/count"), 1)? == members.len() as i64 {
            self.set(&done, b"1")?;
        }
        let what = format!("barrier `{name}`");
        match self.wait(std::slice::from_ref(&done), timeout, &what) {
            Err(StoreError::Timeout { secs, .. }) => {
                let keys: Vec<String> = members.iter().map(|m| key(m)).collect();
                let missing = match self.wait(&keys, Duration::ZERO, &what) {
                    Err(StoreError::Timeout { missing, .. }) => missing
                        .split(", ")
                        .map(|k| k.strip_prefix(&format!("barrier/{name}/member/")).unwrap_or(k))
                        .collect::<Vec<_>>()
                        .join(", "),
                    // Everyone arrived just now: the count and `done` are on their way.
                    _ => return self.wait(std::slice::from_ref(&done), timeout, &what),
                };
                Err(StoreError::Timeout { what, secs, missing })
            }
            other => other,
        }
    }
}

/// `["rank 0", "rank 1", ...]`: the member names of a barrier over ranks.
pub fn rank_names(world: usize) -> Vec<String> {
    (0..world).map(|r| format!("rank {r}")).collect()
}
