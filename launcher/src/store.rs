//! The rendezvous store: a small TCP key-value server (set / get / wait / add, and a barrier built on
//! them) that `ferrotune launch` serves on node 0 (or rank 0 serves itself when workers are started by
//! torchrun or Slurm), and the client every worker and launcher uses. Each connection first presents
//! the job's token (the run id), so two jobs pointed at one port cannot mix, and a restart generation
//! that prefixes every key, so a restarted job never reads the values of the attempt before it.
//! Frames are a u32 length then JSON. This is for small values (addresses, ids, counters); tensors
//! travel on the collectives' own connections, never through here.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

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
    Hello { token: String },
    Set { key: String, value: Vec<u8> },
    Get { key: String },
    Wait { keys: Vec<String>, timeout_ms: u64 },
    Add { key: String, delta: i64 },
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

#[derive(Default)]
struct State {
    map: Mutex<HashMap<String, Vec<u8>>>,
    changed: Condvar,
}

/// A running store; it stops serving when dropped.
pub struct StoreServer {
    pub port: u16,
    stop: Arc<AtomicBool>,
}

impl StoreServer {
    /// Binds `host:port` (port 0 picks a free one) and serves connections presenting `token`.
    pub fn serve(host: &str, port: u16, token: &str) -> Result<Self> {
        let addr = format!("{host}:{port}");
        let listener = TcpListener::bind(&addr).map_err(|e| match e.kind() {
            std::io::ErrorKind::AddrInUse => StoreError::PortInUse { addr: addr.clone(), port },
            _ => StoreError::Io { addr: addr.clone(), msg: format!("cannot listen: {e}") },
        })?;
        let port = listener.local_addr().map_err(|e| StoreError::Io { addr, msg: e.to_string() })?.port();
        let stop = Arc::new(AtomicBool::new(false));
        let state = Arc::new(State::default());
        let (token, stop2) = (token.to_owned(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (state, token) = (state.clone(), token.clone());
                std::thread::spawn(move || serve_connection(conn, &state, &token));
            }
        });
        Ok(StoreServer { port, stop })
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so that it sees the flag.
        let _ = TcpStream::connect_timeout(&([127, 0, 0, 1], self.port).into(), Duration::from_millis(200));
    }
}

fn serve_connection(mut conn: TcpStream, state: &State, token: &str) {
    let _ = conn.set_nodelay(true);
    match recv::<Request>(&mut conn) {
        Ok(Request::Hello { token: t }) if t == token => {
            if send(&mut conn, &Response::Ok).is_err() {
                return;
            }
        }
        Ok(Request::Hello { token: t }) => {
            let msg = format!("it serves run id `{token}`, this worker belongs to run id `{t}`; hint: another job uses this port: pick another --master-port, or the same --run-id to join that job");
            let _ = send(&mut conn, &Response::Refused(msg));
            return;
        }
        _ => return,
    }
    while let Ok(req) = recv::<Request>(&mut conn) {
        let resp = match req {
            Request::Hello { .. } => Response::Refused("hello sent twice".into()),
            Request::Set { key, value } => {
                state.map.lock().unwrap().insert(key, value);
                state.changed.notify_all();
                Response::Ok
            }
            Request::Get { key } => Response::Value(state.map.lock().unwrap().get(&key).cloned()),
            Request::Add { key, delta } => {
                let mut map = state.map.lock().unwrap();
                let old = map.get(&key).and_then(|v| std::str::from_utf8(v).ok()?.parse::<i64>().ok()).unwrap_or(0);
                map.insert(key, (old + delta).to_string().into_bytes());
                state.changed.notify_all();
                Response::Count(old + delta)
            }
            Request::Wait { keys, timeout_ms } => {
                let deadline = Instant::now() + Duration::from_millis(timeout_ms);
                let mut map = state.map.lock().unwrap();
                loop {
                    let missing: Vec<String> = keys.iter().filter(|k| !map.contains_key(*k)).cloned().collect();
                    let now = Instant::now();
                    if missing.is_empty() {
                        break Response::Ok;
                    }
                    if now >= deadline {
                        break Response::Missing(missing);
                    }
                    map = state.changed.wait_timeout(map, deadline - now).unwrap().0;
                }
            }
        };
        if send(&mut conn, &resp).is_err() {
            return;
        }
    }
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

    /// Waits for a key and returns its value.
    pub fn wait_get(&mut self, key: &str, timeout: Duration, what: &str) -> Result<Vec<u8>> {
        self.wait(&[key.to_owned()], timeout, what)?;
        Ok(self.get(key)?.expect("a key that was waited for is present"))
    }

    /// Every member of `members` (e.g. the ranks) calls this with its own name; it returns once all
    /// have arrived, or times out naming who has not (`rank 1, rank 3`).
    pub fn barrier(&mut self, name: &str, me: &str, members: &[String], timeout: Duration) -> Result<()> {
        self.set(&format!("barrier/{name}/{me}"), b"1")?;
        let keys: Vec<String> = members.iter().map(|m| format!("barrier/{name}/{m}")).collect();
        self.wait(&keys, timeout, &format!("barrier `{name}`")).map_err(|e| match e {
            StoreError::Timeout { what, secs, missing } => StoreError::Timeout {
                what,
                secs,
                missing: missing.split(", ").map(|k| k.rsplit('/').next().unwrap_or(k)).collect::<Vec<_>>().join(", "),
            },
            e => e,
        })
    }
}

/// `["rank 0", "rank 1", ...]`: the member names of a barrier over ranks.
pub fn rank_names(world: usize) -> Vec<String> {
    (0..world).map(|r| format!("rank {r}")).collect()
}
