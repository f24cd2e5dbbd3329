//! The CPU collective backend: bandwidth-optimal ring collectives over TCP, with every rank connected
//! to the next and accepting from the previous. Reduce-scatter and all-gather take any split of the
//! buffer into W parts (uneven or empty ones too; each rank sends and receives (W-1)/W of it); an
//! all-reduce is the two, over even parts. Addresses are exchanged through the rendezvous store. Sends
//! run on a scoped thread while the receiving side adds into place, so the two directions overlap.
//! Every operation runs on one communication thread that owns the sockets, in the order issued, so a
//! reduction started during backward (`start_all_reduce_sum`) proceeds while the trainer computes.
//! Not here: GPU tensors (the NCCL backend), or choosing a backend (`dist::init`).

use super::Collective;
use crate::error::{Error, Result};
use ferrotune_launcher::store::StoreClient;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;
use tch::{Device, Kind, Tensor};

/// Elements the ring can sum: plain little-endian numbers.
trait Elem: Copy + Default + Send + Sync + std::ops::AddAssign + 'static {}
impl Elem for f32 {}
impl Elem for f64 {}

fn bytes_of<T: Elem>(s: &[T]) -> &[u8] {
    // SAFETY: f32/f64 have no padding and any byte pattern is a valid value.
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast(), std::mem::size_of_val(s)) }
}

fn bytes_of_mut<T: Elem>(s: &mut [T]) -> &mut [u8] {
    // SAFETY: as above.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast(), std::mem::size_of_val(s)) }
}

/// The sockets to both neighbours, owned by the communication thread.
struct Link {
    rank: usize,
    world: usize,
    next: Option<TcpStream>,
    prev: Option<TcpStream>,
    scratch: Vec<u8>,
}

/// What is done to a tensor. `bounds` split it into the W parts of `Collective::reduce_scatter_sum`.
#[derive(Debug, Clone)]
enum Op {
    AllReduce,
    ReduceScatter(Vec<usize>),
    AllGather(Vec<usize>),
}

impl Op {
    fn name(&self) -> &'static str {
        match self {
            Op::AllReduce => "all-reduce",
            Op::ReduceScatter(_) => "reduce-scatter",
            Op::AllGather(_) => "all-gather",
        }
    }
}

/// Work for the communication thread: a CPU tensor (fp32 or fp64) reduced or gathered in place, or
/// host numbers summed.
enum Job {
    Tensor(Tensor, Op),
    Host(Vec<f64>),
}

type Reply = Result<Option<Vec<f64>>>;

pub struct Ring {
    rank: usize,
    world: usize,
    jobs: Option<std::sync::mpsc::Sender<Job>>,
    replies: Option<std::sync::mpsc::Receiver<Reply>>,
    /// Started reductions whose replies have not been read.
    pending: usize,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Elements received per read-and-add pass (4 MB of f32).
const PIECE: usize = 1 << 20;

impl Ring {
    /// Connects rank `rank` of `world` to its neighbours; `timeout` bounds the set-up and every later
    /// wait for a neighbour (a dead neighbour is noticed at once: its socket closes).
    pub fn connect(store: &mut StoreClient, rank: usize, world: usize, timeout: Duration) -> Result<Ring> {
        if world == 1 {
            return Ok(Ring { rank, world, jobs: None, replies: None, pending: 0, thread: None });
        }
        let err = |msg: String| Error::Dist { rank, msg };
        let host = std::env::var("FERROTUNE_RING_HOST")
            .ok()
            .or_else(|| store.local_ip().map(|ip| ip.to_string()))
            .unwrap_or_else(|| "127.0.0.1".into());
        let listener = TcpListener::bind((host.as_str(), 0))
            .map_err(|e| err(format!("cannot listen on {host} for the ring: {e}")))?;
        let port = listener.local_addr().map_err(|e| err(e.to_string()))?.port();
        store.set(&format!("ring/{rank}"), format!("{host}:{port}").as_bytes())?;
        let next_rank = (rank + 1) % world;
        let addr =
            store.wait_get(&format!("ring/{next_rank}"), timeout, &format!("the address of rank {next_rank}"))?;
        let addr = String::from_utf8_lossy(&addr).into_owned();
        let mut next =
            TcpStream::connect(&addr).map_err(|e| err(format!("cannot connect to rank {next_rank} at {addr}: {e}")))?;
        next.write_all(&(rank as u64).to_le_bytes()).map_err(|e| err(e.to_string()))?;
        // The previous rank connects to us; anything else on the port is turned away.
        let prev_rank = (rank + world - 1) % world;
        listener.set_nonblocking(true).map_err(|e| err(e.to_string()))?;
        let deadline = std::time::Instant::now() + timeout;
        let mut prev = loop {
            match listener.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).map_err(|e| err(e.to_string()))?;
                    s.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| err(e.to_string()))?;
                    let mut who = [0u8; 8];
                    if s.read_exact(&mut who).is_ok() && u64::from_le_bytes(who) == prev_rank as u64 {
                        break s;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if std::time::Instant::now() >= deadline {
                        return Err(err(format!("rank {prev_rank} never connected within {}s", timeout.as_secs())));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(err(e.to_string())),
            }
        };
        for s in [&mut next, &mut prev] {
            s.set_nodelay(true).map_err(|e| err(e.to_string()))?;
            s.set_read_timeout(Some(timeout)).map_err(|e| err(e.to_string()))?;
            s.set_write_timeout(Some(timeout)).map_err(|e| err(e.to_string()))?;
        }
        let mut link = Link { rank, world, next: Some(next), prev: Some(prev), scratch: vec![] };
        let (jobs, inbox) = std::sync::mpsc::channel::<Job>();
        let (outbox, replies) = std::sync::mpsc::channel::<Reply>();
        let thread = std::thread::Builder::new()
            .name(format!("ring-{rank}"))
            .spawn(move || {
                for job in inbox {
                    let reply = match job {
                        Job::Tensor(t, op) => link.tensor_op(&t, &op).map(|_| None),
                        Job::Host(mut v) => link.all_reduce_slice(&mut v).map(|_| Some(v)),
                    };
                    if outbox.send(reply).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| err(format!("cannot start the ring's thread: {e}")))?;
        Ok(Ring { rank, world, jobs: Some(jobs), replies: Some(replies), pending: 0, thread: Some(thread) })
    }

    fn gone(&self) -> Error {
        Error::Dist { rank: self.rank, msg: "the ring's communication thread has stopped".into() }
    }

    /// Hands `job` to the communication thread.
    fn send(&mut self, job: Job) -> Result<()> {
        let jobs = self.jobs.as_ref().ok_or_else(|| self.gone())?;
        jobs.send(job).map_err(|_| self.gone())
    }

    /// The next reply, in issue order.
    fn reply(&mut self) -> Reply {
        let replies = self.replies.as_ref().ok_or_else(|| self.gone())?;
        replies.recv().map_err(|_| self.gone())?
    }

    /// The job for tensor `t`, checked here, on the caller's thread: the communication thread relies
    /// on it (a panic there would only surface as a stopped thread).
    fn tensor_job(&self, t: &Tensor, op: Op) -> Result<Job> {
        assert!(t.device() == Device::Cpu && t.is_contiguous(), "the ring reduces contiguous CPU tensors");
        assert!(
            matches!(t.kind(), Kind::Float | Kind::Double),
            "the ring reduces fp32 or fp64 tensors, not {:?}",
            t.kind()
        );
        if let Op::ReduceScatter(b) | Op::AllGather(b) = &op {
            super::check_bounds(self.rank, self.world, t, b)?;
        }
        Ok(Job::Tensor(t.shallow_clone(), op))
    }

    /// Runs `job` after everything started before it, and returns its reply; the first failure of
    /// a started reduction wins.
    fn run(&mut self, job: Job) -> Reply {
        self.send(job)?;
        let started = self.wait_started();
        let own = self.reply();
        started.and(own)
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        self.jobs = None; // ends the thread's loop
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Link {
    /// Sends `data[send]` to the next rank while receiving the previous rank's matching chunk into
    /// `data[recv]`, added (`add`) or copied.
    fn exchange<T: Elem>(
        &mut self,
        data: &mut [T],
        send: (usize, usize),
        recv: (usize, usize),
        add: bool,
    ) -> std::io::Result<()> {
        let (next, prev) = (self.next.as_mut().expect("ring"), self.prev.as_mut().expect("ring"));
        let base = data.as_mut_ptr() as usize;
        let size = std::mem::size_of::<T>();
        self.scratch.resize(PIECE * size, 0);
        let scratch = &mut self.scratch;
        std::thread::scope(|scope| {
            // SAFETY: `send` and `recv` are disjoint chunks of `data` (the ring has >= 2 ranks), so the
            // sender's shared view and the receiver's mutable view never overlap.
            let out: &[T] = unsafe { std::slice::from_raw_parts((base as *const T).add(send.0), send.1 - send.0) };
            let sender = scope.spawn(move || next.write_all(bytes_of(out)));
            let into: &mut [T] =
                unsafe { std::slice::from_raw_parts_mut((base as *mut T).add(recv.0), recv.1 - recv.0) };
            let mut result = Ok(());
            for piece in into.chunks_mut(PIECE) {
                let buf = &mut scratch[..std::mem::size_of_val(piece)];
                if let Err(e) = prev.read_exact(buf) {
                    result = Err(e);
                    break;
                }
                if add {
                    // SAFETY: `buf` holds piece.len() elements' bytes; read unaligned as a copy.
                    for (i, x) in piece.iter_mut().enumerate() {
                        *x += unsafe { std::ptr::read_unaligned(buf.as_ptr().cast::<T>().add(i)) };
                    }
                } else {
                    bytes_of_mut(piece).copy_from_slice(buf);
                }
            }
            let sent = sender.join().expect("ring sender thread");
            result.and(sent)
        })
    }

    fn fail(&self, op: &str) -> impl Fn(std::io::Error) -> Error {
        let (r, w) = (self.rank, self.world);
        let op = op.to_owned();
        move |e| Error::Dist {
            rank: r,
            msg: format!(
                "ring {op} with ranks {} and {} failed: {e}; hint: another rank has probably failed, see its log",
                (r + w - 1) % w,
                (r + 1) % w
            ),
        }
    }

    /// Each rank r ends with part r (`part(r)` = start and end) summed over all ranks: at step s it
    /// sends part r-s-1 (its own contribution, or what it has summed so far) to the next rank and adds
    /// the previous rank's part r-s-2 into place; after W-1 steps part r has every contribution.
    fn reduce_scatter_slice<T: Elem>(&mut self, data: &mut [T], part: &dyn Fn(usize) -> (usize, usize)) -> Result<()> {
        let (r, w) = (self.rank, self.world);
        let fail = self.fail("reduce-scatter");
        for s in 0..w - 1 {
            self.exchange(data, part((r + 2 * w - s - 1) % w), part((r + 2 * w - s - 2) % w), true).map_err(&fail)?;
        }
        Ok(())
    }

    /// Each rank starts with its own part r and ends with all of them: at step s it passes on part r-s
    /// and receives part r-s-1.
    fn all_gather_slice<T: Elem>(&mut self, data: &mut [T], part: &dyn Fn(usize) -> (usize, usize)) -> Result<()> {
        let (r, w) = (self.rank, self.world);
        let fail = self.fail("all-gather");
        for s in 0..w - 1 {
            self.exchange(data, part((r + w - s) % w), part((r + 2 * w - s - 1) % w), false).map_err(&fail)?;
        }
        Ok(())
    }

    fn all_reduce_slice<T: Elem>(&mut self, data: &mut [T]) -> Result<()> {
        let (w, n) = (self.world, data.len());
        if w == 1 {
            return Ok(());
        }
        let even = |c: usize| (c * n / w, (c + 1) * n / w);
        self.reduce_scatter_slice(data, &even)?;
        self.all_gather_slice(data, &even)
    }

    fn slice_op<T: Elem>(&mut self, data: &mut [T], op: &Op) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        match op {
            Op::AllReduce => self.all_reduce_slice(data),
            Op::ReduceScatter(b) => self.reduce_scatter_slice(data, &|c| (b[c], b[c + 1])),
            Op::AllGather(b) => self.all_gather_slice(data, &|c| (b[c], b[c + 1])),
        }
    }

    fn tensor_op(&mut self, t: &Tensor, op: &Op) -> Result<()> {
        let n = t.numel();
        // SAFETY: a contiguous CPU tensor of `n` elements of the matched kind (`Ring::tensor_job`); the
        // caller keeps another handle to it and does not touch it until this job's reply has been read.
        match t.kind() {
            Kind::Float => self.slice_op(unsafe { std::slice::from_raw_parts_mut(t.data_ptr().cast::<f32>(), n) }, op),
            Kind::Double => self.slice_op(unsafe { std::slice::from_raw_parts_mut(t.data_ptr().cast::<f64>(), n) }, op),
            k => unreachable!("Ring::tensor_job admits fp32 and fp64 only, not {k:?} ({})", op.name()),
        }
    }
}

impl Collective for Ring {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn device(&self) -> Device {
        Device::Cpu
    }

    fn all_reduce_sum(&mut self, t: &Tensor) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        let job = self.tensor_job(t, Op::AllReduce)?;
        self.run(job).map(|_| ())
    }

    fn reduce_scatter_sum(&mut self, t: &Tensor, bounds: &[usize]) -> Result<()> {
        if self.world == 1 {
            return super::check_bounds(0, 1, t, bounds);
        }
        let job = self.tensor_job(t, Op::ReduceScatter(bounds.to_vec()))?;
        self.run(job).map(|_| ())
    }

    fn start_reduce_scatter_sum(&mut self, t: &Tensor, bounds: &[usize]) -> Result<()> {
        if self.world == 1 {
            return super::check_bounds(0, 1, t, bounds);
        }
        let job = self.tensor_job(t, Op::ReduceScatter(bounds.to_vec()))?;
        self.send(job)?;
        self.pending += 1;
        Ok(())
    }

    fn all_gather(&mut self, t: &Tensor, bounds: &[usize]) -> Result<()> {
        if self.world == 1 {
            return super::check_bounds(0, 1, t, bounds);
        }
        let job = self.tensor_job(t, Op::AllGather(bounds.to_vec()))?;
        self.run(job).map(|_| ())
    }

    fn all_reduce_f64(&mut self, v: &mut [f64]) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        let summed = self.run(Job::Host(v.to_vec()))?.expect("host reply");
        v.copy_from_slice(&summed);
        Ok(())
    }

    fn start_all_reduce_sum(&mut self, t: &Tensor) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        let job = self.tensor_job(t, Op::AllReduce)?;
        self.send(job)?;
        self.pending += 1;
        Ok(())
    }

    fn wait_started(&mut self) -> Result<()> {
        let mut first = Ok(());
        while self.pending > 0 {
            self.pending -= 1;
            if let Err(e) = self.reply() {
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    }
}
