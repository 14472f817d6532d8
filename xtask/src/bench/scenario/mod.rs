//! The measured sections, one module each. Each takes the run's settings
//! (`Args`) and the shared paths (`Ctx`), starts the tracers and load it
//! needs through `procs`, and gives back plain, serializable results that
//! `report` turns into tables, charts and targets.

pub mod churn;
pub mod cluster;
pub mod latency;
pub mod loss;
pub mod memory;
pub mod paced;
pub mod pipeline;
pub mod syscalls;

use serde::Serialize;

use self::{
    churn::ChurnRun, cluster::Cluster, latency::Latency, loss::TinyRing, memory::Memory,
    paced::PacedRun, pipeline::Pipeline, syscalls::SyscallCost,
};

/// Everything one run measured.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Results {
    pub churn: Vec<ChurnRun>,
    pub scaling: Vec<ChurnRun>,
    pub paced: Vec<PacedRun>,
    pub memory: Option<Memory>,
    pub cluster: Option<Cluster>,
    pub latency: Option<Latency>,
    pub pipeline: Vec<Pipeline>,
    pub tiny_ring: Option<TinyRing>,
    pub syscalls: Vec<SyscallCost>,
}
