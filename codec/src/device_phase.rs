//! The held device-state phase: FULL sections, EOF and the description, walked with the
//! description (design-decisions §1).

use bytes::BytesMut;

use crate::error::DecodeError;

/// One non-iterable device section inside the held phase.
#[derive(Debug, Clone)]
pub struct DeviceSection {
    pub section_id: u32,
    pub idstr: String,
    pub instance: u32,
    pub version: u32,
    /// Header + payload + footer.
    pub wire_len: usize,
}

/// One vCPU's cpreg arrays: (id, value) in stream order.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuRegisters {
    pub instance: u32,
    pub section_version: u32,
    pub registers: Vec<(u64, u64)>,
}

/// The whole device-state phase, verified against the description.
#[derive(Debug)]
pub struct DeviceState {
    sections: Vec<DeviceSection>,
}

impl DeviceState {
    /// Every device section, in stream order.
    pub fn sections(&self) -> &[DeviceSection] {
        &self.sections
    }

    /// Every `cpu` section's registers, in stream order.
    pub fn cpus(&self) -> Vec<CpuRegisters> {
        Vec::new()
    }

    /// Replace one vCPU's cpreg arrays; `regs` sorted strictly ascending by id.
    pub fn set_cpregs(&mut self, instance: u32, _regs: &[(u64, u64)]) -> Result<(), DecodeError> {
        Err(DecodeError::CpuRegisters {
            instance,
            message: "no such cpu section".into(),
        })
    }

    /// Bytes `encode` writes.
    pub fn wire_len(&self) -> usize {
        0
    }

    /// Sections + EOF + (patched) description.
    pub fn encode(&self, _dst: &mut BytesMut) {}
}
