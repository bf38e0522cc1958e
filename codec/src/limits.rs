//! Budgets: every length read from the wire is checked against these before anything is
//! reserved, and every count that drives work or output is capped (DESIGN.md, "Everything else
//! streams", and docs/hostile-input.md). Exceeding one is a `DecodeError::LimitExceeded` (or, for
//! a rewrite, `DecodeError::CpuRegisters`) that names the limit.

/// Upper bounds on what the decoder buffers, counts and writes.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Any single non-page record (section header, command, configuration, RAM block list).
    pub max_record: usize,
    /// The held device-state phase (FULL sections and EOF).
    pub max_device_state: usize,
    /// The description JSON (`QEMU_VM_VMDESCRIPTION`).
    pub max_description: usize,
    /// A postcopy `MIG_CMD_PACKAGED` blob.
    pub max_packaged: usize,
    /// `cpu` sections with cpreg arrays in one stream (vCPUs).
    pub max_cpus: usize,
    /// cpreg registers of one vCPU, as received and as rewritten.
    pub max_cpregs: usize,
    /// Bytes of the rewritten device-state phase (sections, EOF and description).
    pub max_rewrite_output: usize,
    /// Iterable sections (START records with distinct ids) in one stream.
    pub max_sections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        const MIB: usize = 1024 * 1024;
        Limits {
            max_record: 16 * MIB,
            max_device_state: 256 * MIB,
            max_description: 16 * MIB,
            max_packaged: 256 * MIB,
            // QEMU's virt machine allows 512 vCPUs (GICv3).
            max_cpus: 512,
            // KVM hosts list a few hundred; the architecture has no more than a few thousand.
            max_cpregs: 4096,
            max_rewrite_output: 320 * MIB,
            max_sections: 256,
        }
    }
}
