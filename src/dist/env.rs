//! Where this process sits in the job, from the launcher's environment variables.

use super::DistError;

/// Rank, world size and node-local rank of this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    /// Which variables said so, e.g. `"RANK/WORLD_SIZE"`.
    pub source: &'static str,
}

/// (rank, world size, local rank) variables of each launcher, in the order they are tried.
const LAUNCHERS: [(&str, &str, &str, &str); 3] = [
    ("RANK/WORLD_SIZE", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
    (
        "OMPI_COMM_WORLD_RANK/SIZE",
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_LOCAL_RANK",
    ),
    (
        "SLURM_PROCID/SLURM_NTASKS",
        "SLURM_PROCID",
        "SLURM_NTASKS",
        "SLURM_LOCALID",
    ),
];

/// Variables an MPI launcher (Open MPI's `mpirun`, Hydra, PMIx under `srun`) sets.
const MPI_MARKERS: [&str; 3] = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"];

/// Was this process started by an MPI launcher?
pub fn started_by_mpi(get: &dyn Fn(&str) -> Option<String>) -> bool {
    MPI_MARKERS.iter().any(|k| get(k).is_some())
}

fn parse(get: &dyn Fn(&str) -> Option<String>, key: &str) -> Result<Option<usize>, DistError> {
    match get(key) {
        None => Ok(None),
        Some(v) => v.trim().parse().map(Some).map_err(|_| {
            DistError::Environment(format!("{key}={v:?} is not a non-negative integer"))
        }),
    }
}

/// The placement from the first launcher whose rank or world-size variable is set; `None`
/// when no launcher's is. A half-set pair, a bad number or a rank outside the world is an
/// error naming the variables.
pub fn placement(get: &dyn Fn(&str) -> Option<String>) -> Result<Option<Placement>, DistError> {
    for (source, rank_key, size_key, local_key) in LAUNCHERS {
        let (rank, size) = (parse(get, rank_key)?, parse(get, size_key)?);
        let (rank, world_size) = match (rank, size) {
            (None, None) => continue,
            (Some(r), Some(w)) => (r, w),
            (Some(_), None) => {
                return Err(DistError::Environment(format!(
                    "{rank_key} is set but {size_key} is not"
                )))
            }
            (None, Some(_)) => {
                return Err(DistError::Environment(format!(
                    "{size_key} is set but {rank_key} is not"
                )))
            }
        };
        if world_size == 0 || rank >= world_size {
            return Err(DistError::Environment(format!(
                "{rank_key}={rank} is not a rank of {size_key}={world_size}"
            )));
        }
        let local_rank = parse(get, local_key)?.unwrap_or(0);
        return Ok(Some(Placement {
            rank,
            world_size,
            local_rank,
            source,
        }));
    }
    Ok(None)
}

/// `MASTER_ADDR:MASTER_PORT`, where rank 0 listens for the rendezvous.
pub fn master_addr(
    get: &dyn Fn(&str) -> Option<String>,
    p: &Placement,
) -> Result<String, DistError> {
    let hint = if started_by_mpi(get) && !cfg!(feature = "mpi") {
        "; this packtrain was built without mpi (cargo build --release --features mpi), so ranks \
         started by mpirun meet over TCP: launch/mpirun.sh sets both"
    } else {
        "; launch/local.sh, launch/mpirun.sh and launch/slurm.sbatch set both"
    };
    let missing = |key: &str| {
        DistError::Environment(format!(
            "rank {}/{} (from {}): {key} is not set; a world of more than one rank meets rank 0 \
             at MASTER_ADDR:MASTER_PORT{hint}",
            p.rank, p.world_size, p.source
        ))
    };
    let addr = get("MASTER_ADDR")
        .filter(|a| !a.trim().is_empty())
        .ok_or_else(|| missing("MASTER_ADDR"))?;
    let port = get("MASTER_PORT").ok_or_else(|| missing("MASTER_PORT"))?;
    let port: u16 = port.trim().parse().map_err(|_| {
        DistError::Environment(format!("MASTER_PORT={port:?} is not a port number"))
    })?;
    let addr = addr.trim();
    // An IPv6 literal needs brackets before the port.
    Ok(if addr.contains(':') && !addr.starts_with('[') {
        format!("[{addr}]:{port}")
    } else {
        format!("{addr}:{port}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn with(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn launchers_in_order() {
        let get = with(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("SLURM_PROCID", "3"),
            ("SLURM_NTASKS", "8"),
        ]);
        let p = placement(&get).unwrap().unwrap();
        assert_eq!((p.rank, p.world_size, p.local_rank), (1, 4, 1));
        assert_eq!(p.source, "RANK/WORLD_SIZE");

        let get = with(&[
            ("OMPI_COMM_WORLD_RANK", "2"),
            ("OMPI_COMM_WORLD_SIZE", "3"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "0"),
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "1"),
        ]);
        let p = placement(&get).unwrap().unwrap();
        assert_eq!((p.rank, p.world_size, p.local_rank), (2, 3, 0));
        assert!(started_by_mpi(&get));

        let get = with(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_LOCALID", "1"),
        ]);
        let p = placement(&get).unwrap().unwrap();
        assert_eq!((p.rank, p.world_size, p.local_rank), (5, 8, 1));
        assert!(!started_by_mpi(&get));

        assert_eq!(placement(&with(&[])).unwrap(), None);
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (pairs, needle) in [
            (vec![("RANK", "x"), ("WORLD_SIZE", "2")], "RANK=\"x\""),
            (vec![("RANK", "0")], "WORLD_SIZE"),
            (vec![("WORLD_SIZE", "2")], "RANK"),
            (vec![("RANK", "2"), ("WORLD_SIZE", "2")], "RANK=2"),
            (
                vec![("SLURM_PROCID", "0"), ("SLURM_NTASKS", "0")],
                "SLURM_NTASKS=0",
            ),
        ] {
            let e = placement(&with(&pairs)).unwrap_err().to_string();
            assert!(e.contains(needle), "{e} lacks {needle}");
        }
    }

    #[test]
    fn master_address() {
        let p = Placement {
            rank: 1,
            world_size: 2,
            local_rank: 1,
            source: "RANK/WORLD_SIZE",
        };
        let get = with(&[("MASTER_ADDR", "node7"), ("MASTER_PORT", "29500")]);
        assert_eq!(master_addr(&get, &p).unwrap(), "node7:29500");
        let get = with(&[("MASTER_ADDR", "::1"), ("MASTER_PORT", "29500")]);
        assert_eq!(master_addr(&get, &p).unwrap(), "[::1]:29500");
        let e = master_addr(&with(&[("MASTER_ADDR", "a")]), &p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("MASTER_PORT") && e.contains("rank 1/2"), "{e}");
        let get = with(&[("MASTER_ADDR", "a"), ("MASTER_PORT", "http")]);
        assert!(master_addr(&get, &p)
            .unwrap_err()
            .to_string()
            .contains("MASTER_PORT=\"http\""));
    }
}
