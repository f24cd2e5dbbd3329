//! ferrotune's launcher crate: how a worker learns its place in a job (rank, local rank, world size and
//! the rendezvous address) from the environment that `ferrotune launch`, torchrun or Slurm set; the
//! rendezvous store (`store`); spawning and supervising workers (`supervise`). It knows nothing of
//! models, data or tensors.

pub mod store;
pub mod supervise;

use std::collections::HashMap;

/// A worker's place in the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankEnv {
    pub rank: usize,
    pub local_rank: usize,
    pub world_size: usize,
    pub local_world_size: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// Which convention the values came from: "single", "torchrun" or "slurm".
    pub source: &'static str,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvError {
    #[error("environment variable {name}={value:?} is not a valid {what}")]
    Invalid { name: String, value: String, what: &'static str },
    #[error("{0}")]
    Inconsistent(String),
}

impl RankEnv {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, EnvError> {
        Self::from_vars(&std::env::vars().collect())
    }

    /// torchrun-style variables (RANK, WORLD_SIZE, ...) win over Slurm's; with neither, a single
    /// process job on 127.0.0.1.
    pub fn from_vars(vars: &HashMap<String, String>) -> Result<Self, EnvError> {
        let num = |name: &str| -> Result<Option<usize>, EnvError> {
            vars.get(name)
                .map(|v| {
                    v.trim().parse::<usize>().map_err(|_| EnvError::Invalid {
                        name: name.into(),
                        value: v.clone(),
                        what: "non-negative integer",
                    })
                })
                .transpose()
        };
        let port = match vars.get("MASTER_PORT") {
            Some(p) => p.trim().parse::<u16>().map_err(|_| EnvError::Invalid {
                name: "MASTER_PORT".into(),
                value: p.clone(),
                what: "port number",
            })?,
            None => 29500,
        };
        let env = if let (Some(rank), Some(world)) = (num("RANK")?, num("WORLD_SIZE")?) {
            RankEnv {
                rank,
                local_rank: num("LOCAL_RANK")?.unwrap_or(rank),
                world_size: world,
                local_world_size: num("LOCAL_WORLD_SIZE")?.unwrap_or(world),
                master_addr: vars.get("MASTER_ADDR").cloned().unwrap_or_else(|| "127.0.0.1".into()),
                master_port: port,
                source: "torchrun",
            }
        } else if let (Some(rank), Some(world)) = (num("SLURM_PROCID")?, num("SLURM_NTASKS")?) {
            let nodes = num("SLURM_NNODES")?.unwrap_or(1).max(1);
            let addr = match vars.get("MASTER_ADDR") {
                Some(a) => a.clone(),
                None => {
                    first_host(vars.get("SLURM_JOB_NODELIST").or(vars.get("SLURM_NODELIST")).map_or("127.0.0.1", |s| s))
                }
            };
            RankEnv {
                rank,
                local_rank: num("SLURM_LOCALID")?.unwrap_or(0),
                world_size: world,
                local_world_size: num("SLURM_NTASKS_PER_NODE")?.unwrap_or(world / nodes),
                master_addr: addr,
                master_port: port,
                source: "slurm",
            }
        } else {
            RankEnv {
                rank: 0,
                local_rank: 0,
                world_size: 1,
                local_world_size: 1,
                master_addr: "127.0.0.1".into(),
                master_port: port,
                source: "single",
            }
        };
        if env.world_size == 0 || env.rank >= env.world_size {
            return Err(EnvError::Inconsistent(format!(
                "rank {} is outside a world of size {} (from {} variables)",
                env.rank, env.world_size, env.source
            )));
        }
        Ok(env)
    }
}

/// The first host of a Slurm node list: "gpu[003-005,007],cpu1" -> "gpu003".
pub fn first_host(list: &str) -> String {
    let first = split_top_level(list).into_iter().next().unwrap_or_default();
    match first.split_once('[') {
        Some((prefix, rest)) => {
            let range = rest.trim_end_matches(']');
            let first_item = range.split(',').next().unwrap_or("");
            let start = first_item.split('-').next().unwrap_or("");
            format!("{prefix}{start}")
        }
        None => first.to_owned(),
    }
}

/// Splits on commas that are not inside brackets.
fn split_top_level(s: &str) -> Vec<&str> {
    let mut out = vec![];
    let (mut depth, mut start) = (0, 0);
    for (i, c) in s.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn slurm_node_lists() {
        // Expected values are what `scontrol show hostnames LIST | head -1` prints.
        assert_eq!(first_host("gpu[003-005,007],cpu1"), "gpu003");
        assert_eq!(first_host("node7"), "node7");
        assert_eq!(first_host("a[10,12]"), "a10");
    }

    #[test]
    fn torchrun_wins_over_slurm_and_defaults_are_single() {
        let e = RankEnv::from_vars(&vars(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "2"),
        ]))
        .unwrap();
        assert_eq!((e.rank, e.local_rank, e.world_size, e.source), (3, 1, 4, "torchrun"));
        let e = RankEnv::from_vars(&vars(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_NNODES", "2"),
            ("SLURM_JOB_NODELIST", "n[01-02]"),
        ]))
        .unwrap();
        assert_eq!(
            (e.rank, e.local_rank, e.world_size, e.local_world_size, e.master_addr.as_str()),
            (5, 1, 8, 4, "n01")
        );
        let e = RankEnv::from_vars(&vars(&[])).unwrap();
        assert_eq!((e.rank, e.world_size, e.source), (0, 1, "single"));
        let err = RankEnv::from_vars(&vars(&[("RANK", "4"), ("WORLD_SIZE", "4")])).unwrap_err();
        assert!(err.to_string().contains("rank 4 is outside a world of size 4"));
        let err = RankEnv::from_vars(&vars(&[("RANK", "x"), ("WORLD_SIZE", "4")])).unwrap_err();
        assert_eq!(err.to_string(), "environment variable RANK=\"x\" is not a valid non-negative integer");
    }
}
