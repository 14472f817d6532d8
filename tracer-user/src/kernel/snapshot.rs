//! The TCP iterator's snapshot of every live connection, in every
//! network namespace.

use std::path::PathBuf;

use aya::programs::Iter;

use super::{ITER_PROGRAM, Kernel, KernelError, PRIVILEGE_HINT};
use crate::{
    event::{ConnEvent, decode},
    sys::{caps, netns},
};

impl Kernel {
    /// Every live TCP connection on the host, as the kernel's TCP iterator
    /// sees it right now: one pass over each network namespace's sockets,
    /// from a short-lived thread that enters each namespace in turn (the
    /// iterator walks the namespace its reader is created in).
    pub(crate) fn snapshot(&mut self) -> Result<Vec<ConnEvent>, KernelError> {
        let (prog, err) =
            super::program_of::<Iter>(&mut self.ebpf, ITER_PROGRAM, "iter/tcp", PRIVILEGE_HINT)?;
        // Our own namespace first, without setns (which needs CAP_SYS_ADMIN
        // even there): then a tracer without it still sees the host's.
        let own = std::fs::read_link("/proc/self/ns/net")
            .ok()
            .and_then(|l| netns::parse_ns_link(&l.to_string_lossy()));
        let mut namespaces: Vec<(u64, Option<PathBuf>)> = netns::list()
            .into_iter()
            .filter(|(ino, _)| Some(*ino) != own)
            .map(|(ino, path)| (ino, Some(path)))
            .collect();
        if let Some(own) = own {
            namespaces.insert(0, (own, None));
        }
        let size = size_of::<tracer_common::Event<tracer_common::SnapshotData>>();
        let (events, bad) = std::thread::scope(|scope| {
            scope
                .spawn(move || -> Result<(Vec<ConnEvent>, u64), KernelError> {
                    let (mut out, mut bad) = (Vec::new(), 0u64);
                    for (ino, path) in &namespaces {
                        if let Some(path) = path
                            && let Err(e) = netns::enter(path)
                        {
                            let detail = format!("skipping netns {ino} ({}): {e}", path.display());
                            if caps::is_denied(&e) {
                                caps::denied(caps::Denied::Setns, &detail);
                            } else {
                                // Namespaces come and go with their processes.
                                log::debug!("{detail}");
                            }
                            continue;
                        }
                        let link_id = prog.attach().map_err(err)?;
                        let link = prog.take_link(link_id).map_err(err)?;
                        let mut file = link
                            .into_file()
                            .map_err(|e| KernelError::Iter(e.to_string()))?;
                        let mut bytes = Vec::new();
                        std::io::Read::read_to_end(&mut file, &mut bytes)
                            .map_err(|e| KernelError::Iter(e.to_string()))?;
                        for record in bytes.chunks_exact(size) {
                            match decode(record) {
                                Ok(ev) => out.push(ev),
                                Err(e) => {
                                    bad += 1;
                                    if bad == 1 {
                                        log::warn!("skipping undecodable TCP iterator record: {e}");
                                    }
                                }
                            }
                        }
                    }
                    Ok((out, bad))
                })
                .join()
                .unwrap_or_else(|_| Err(KernelError::Iter("snapshot thread panicked".into())))
        })?;
        self.decode_errors += bad;
        Ok(events)
    }

    /// Records of the TCP iterator that could not be decoded since the last
    /// call (they count in `conntracer_decode_errors_total`).
    pub(crate) fn take_decode_errors(&mut self) -> u64 {
        std::mem::take(&mut self.decode_errors)
    }
}
