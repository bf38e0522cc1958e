//! Memory bounds: every length read from the wire is checked against these before anything is
//! reserved (DESIGN.md, "Everything else streams").

/// Upper bounds on what the decoder will buffer.
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
}

impl Default for Limits {
    fn default() -> Self {
        const MIB: usize = 1024 * 1024;
        Limits {
            max_record: 16 * MIB,
            max_device_state: 256 * MIB,
            max_description: 16 * MIB,
            max_packaged: 256 * MIB,
        }
    }
}
