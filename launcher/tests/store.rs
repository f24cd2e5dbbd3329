//! The rendezvous store over real TCP on loopback: values, counters, waits, barriers naming who is
//! missing, run-id refusal, port in use, and generations that never see each other's keys.

use ferrotune_launcher::store::{rank_names, StoreClient, StoreError, StoreServer};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(5);

#[test]
fn set_get_add_wait_across_clients() {
    let server = StoreServer::serve("127.0.0.1", 0, "job").unwrap();
    let mut a = StoreClient::connect("127.0.0.1", server.port, "job", 0, T).unwrap();
    let mut b = StoreClient::connect("127.0.0.1", server.port, "job", 0, T).unwrap();
    assert_eq!(a.get("x").unwrap(), None);
    let waiter = std::thread::spawn(move || {
        let v = b.wait_get("x", T, "x").unwrap();
        (v, b.add("n", 5).unwrap())
    });
    std::thread::sleep(Duration::from_millis(100));
    // The counter first: once `x` is set the waiter adds its 5 at any moment.
    assert_eq!(a.add("n", 2).unwrap(), 2);
    a.set("x", b"hello").unwrap();
    let (v, _) = waiter.join().unwrap();
    assert_eq!(v, b"hello");
    assert_eq!(a.add("n", 0).unwrap(), 7);
}

#[test]
fn barrier_releases_everyone_or_names_the_missing() {
    let server = StoreServer::serve("127.0.0.1", 0, "job").unwrap();
    let port = server.port;
    let members = rank_names(3);
    let handles: Vec<_> = (0..3)
        .map(|r| {
            let members = members.clone();
            std::thread::spawn(move || {
                let mut c = StoreClient::connect("127.0.0.1", port, "job", 0, T).unwrap();
                c.barrier("start", &format!("rank {r}"), &members, T)
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap().unwrap();
    }
    // Rank 1 and 2 never come: the error names them.
    let mut c = StoreClient::connect("127.0.0.1", port, "job", 0, T).unwrap();
    let t0 = Instant::now();
    let err = c.barrier("late", "rank 0", &members, Duration::from_millis(300)).unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(2));
    assert!(matches!(&err, StoreError::Timeout { missing, .. } if missing == "rank 1, rank 2"), "{err}");
    assert!(err.to_string().contains("barrier `late`"), "{err}");
}

#[test]
fn another_run_id_is_refused_and_a_used_port_is_a_clear_error() {
    let server = StoreServer::serve("127.0.0.1", 0, "job-a").unwrap();
    let err = StoreClient::connect("127.0.0.1", server.port, "job-b", 0, T).err().unwrap();
    let msg = err.to_string();
    assert!(matches!(err, StoreError::Refused { .. }), "{msg}");
    assert!(msg.contains("run id `job-a`") && msg.contains("`job-b`"), "{msg}");
    let err = StoreServer::serve("127.0.0.1", server.port, "job-b").err().unwrap();
    assert!(err.to_string().contains(&format!("port {} is in use", server.port)), "{err}");
}

#[test]
fn generations_are_separate() {
    let server = StoreServer::serve("127.0.0.1", 0, "job").unwrap();
    let mut g0 = StoreClient::connect("127.0.0.1", server.port, "job", 0, T).unwrap();
    let mut g1 = StoreClient::connect("127.0.0.1", server.port, "job", 1, T).unwrap();
    g0.set("addr/0", b"old").unwrap();
    assert_eq!(g1.get("addr/0").unwrap(), None);
    g1.set("addr/0", b"new").unwrap();
    assert_eq!(g0.get("addr/0").unwrap().unwrap(), b"old");
}

#[test]
fn connect_waits_for_a_late_server_then_gives_up_clearly() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let late = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        let s = StoreServer::serve("127.0.0.1", free, "job").unwrap();
        std::thread::sleep(Duration::from_secs(2));
        drop(s);
    });
    StoreClient::connect("127.0.0.1", free, "job", 0, T).unwrap();
    late.join().unwrap();
    let err = StoreClient::connect("127.0.0.1", free, "job", 0, Duration::from_millis(300)).err().unwrap();
    assert!(err.to_string().contains("cannot connect within"), "{err}");
}
