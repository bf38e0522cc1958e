//! `QEMU_VM_COMMAND` records (migration/savevm.c `enum qemu_vm_cmd`): the one list of commands
//! with their numbers, names and payload lengths, and the pure parser of one record.
//!
//! ```text
//! 08 | be16 cmd | be16 len | len bytes          (PACKAGED: len = 4, be32 blob_len, then the blob)
//! ```

use crate::reader::Reader;
use crate::record::{Parsed, RecordError};
use crate::wire::*;

/// A `QEMU_VM_COMMAND`, as the decoder reports it. Numbers are QEMU's (`wire::MIG_CMD_*`).
#[derive(Debug, Clone, PartialEq)]
pub enum MigCommand {
    OpenReturnPath,
    Ping(u32),
    PostcopyAdvise {
        len: u16,
    },
    PostcopyListen,
    PostcopyRun,
    PostcopyRamDiscard,
    /// The Verbatim bytes include the whole blob (opaque, length-delimited).
    Packaged {
        blob_len: u32,
    },
    EnableColo,
    PostcopyResume,
    RecvBitmap,
    SwitchoverStart,
    Other(u16),
}

impl MigCommand {
    /// QEMU's command number.
    pub fn number(&self) -> u16 {
        match self {
            MigCommand::OpenReturnPath => MIG_CMD_OPEN_RETURN_PATH,
            MigCommand::Ping(_) => MIG_CMD_PING,
            MigCommand::PostcopyAdvise { .. } => MIG_CMD_POSTCOPY_ADVISE,
            MigCommand::PostcopyListen => MIG_CMD_POSTCOPY_LISTEN,
            MigCommand::PostcopyRun => MIG_CMD_POSTCOPY_RUN,
            MigCommand::PostcopyRamDiscard => MIG_CMD_POSTCOPY_RAM_DISCARD,
            MigCommand::Packaged { .. } => MIG_CMD_PACKAGED,
            MigCommand::EnableColo => MIG_CMD_ENABLE_COLO,
            MigCommand::PostcopyResume => MIG_CMD_POSTCOPY_RESUME,
            MigCommand::RecvBitmap => MIG_CMD_RECV_BITMAP,
            MigCommand::SwitchoverStart => MIG_CMD_SWITCHOVER_START,
            MigCommand::Other(n) => *n,
        }
    }

    /// QEMU's name without the `MIG_CMD_` prefix (`PACKAGED`), or `command N` for unknown ones.
    pub fn name(&self) -> String {
        command_name(self.number())
            .map(str::to_string)
            .unwrap_or_else(|| format!("command {}", self.number()))
    }
}

/// QEMU's name of a command number, without the `MIG_CMD_` prefix.
pub fn command_name(number: u16) -> Option<&'static str> {
    Some(match number {
        MIG_CMD_INVALID => "INVALID",
        MIG_CMD_OPEN_RETURN_PATH => "OPEN_RETURN_PATH",
        MIG_CMD_PING => "PING",
        MIG_CMD_POSTCOPY_ADVISE => "POSTCOPY_ADVISE",
        MIG_CMD_POSTCOPY_LISTEN => "POSTCOPY_LISTEN",
        MIG_CMD_POSTCOPY_RUN => "POSTCOPY_RUN",
        MIG_CMD_POSTCOPY_RAM_DISCARD => "POSTCOPY_RAM_DISCARD",
        MIG_CMD_PACKAGED => "PACKAGED",
        MIG_CMD_ENABLE_COLO => "ENABLE_COLO",
        MIG_CMD_POSTCOPY_RESUME => "POSTCOPY_RESUME",
        MIG_CMD_RECV_BITMAP => "RECV_BITMAP",
        MIG_CMD_SWITCHOVER_START => "SWITCHOVER_START",
        _ => return None,
    })
}

/// The payload length QEMU's loader demands (`mig_cmd_args` in migration/savevm.c); `None` when
/// it varies.
fn fixed_len(number: u16) -> Option<u16> {
    match number {
        MIG_CMD_OPEN_RETURN_PATH
        | MIG_CMD_POSTCOPY_LISTEN
        | MIG_CMD_POSTCOPY_RUN
        | MIG_CMD_ENABLE_COLO
        | MIG_CMD_POSTCOPY_RESUME
        | MIG_CMD_SWITCHOVER_START => Some(0),
        MIG_CMD_PING | MIG_CMD_PACKAGED => Some(4),
        _ => None,
    }
}

/// One parsed command record.
#[derive(Debug)]
pub(crate) struct CommandRecord {
    pub(crate) command: MigCommand,
    /// Bytes of the whole record (PACKAGED: including the blob).
    pub(crate) len: usize,
    /// `ram_pagesize_summary` of a 16-byte POSTCOPY_ADVISE.
    pub(crate) advise_summary: Option<u64>,
}

/// Parse one command record; `buf` starts at its `08` byte. Positions in errors are relative to
/// `buf`. O(1) however much of a PACKAGED blob has arrived. `advised`: a POSTCOPY_ADVISE came
/// earlier in the stream (QEMU sends a package only in postcopy, after advising it).
pub(crate) fn parse(buf: &[u8], max_packaged: usize, advised: bool) -> Parsed<CommandRecord> {
    let mut r = Reader::at(buf, 1);
    let (Some(number), Some(len)) = (r.be16(), r.be16()) else {
        return Ok(None);
    };
    if fixed_len(number).is_some_and(|l| l != len)
        || (number == MIG_CMD_POSTCOPY_ADVISE && len != 0 && len != 16)
    {
        return Err(RecordError::invalid(
            3,
            format!(
                "length {} for command {number}",
                fixed_len(number).map_or("0 or 16".to_string(), |l| l.to_string())
            ),
            len.to_string(),
        ));
    }
    if number == MIG_CMD_INVALID {
        return Err(RecordError::invalid(
            1,
            "a migration command",
            "MIG_CMD_INVALID (0)".to_string(),
        ));
    }
    let Some(payload) = r.bytes(usize::from(len)) else {
        return Ok(None);
    };
    let mut p = Reader::new(payload);
    let mut advise_summary = None;
    let command = match number {
        MIG_CMD_OPEN_RETURN_PATH => MigCommand::OpenReturnPath,
        MIG_CMD_PING => MigCommand::Ping(p.be32().unwrap_or(0)),
        MIG_CMD_POSTCOPY_ADVISE => {
            if len == 16 {
                advise_summary = p.be64();
            }
            MigCommand::PostcopyAdvise { len }
        }
        MIG_CMD_POSTCOPY_LISTEN => MigCommand::PostcopyListen,
        MIG_CMD_POSTCOPY_RUN => MigCommand::PostcopyRun,
        MIG_CMD_POSTCOPY_RAM_DISCARD => MigCommand::PostcopyRamDiscard,
        MIG_CMD_PACKAGED => {
            let blob_len = p.be32().unwrap_or(0);
            let blob = usize::try_from(blob_len).unwrap_or(usize::MAX);
            if blob > max_packaged {
                return Err(RecordError::TooLong {
                    pos: 5,
                    what: "postcopy package (MIG_CMD_PACKAGED)".into(),
                    len: u64::from(blob_len),
                    limit: max_packaged,
                });
            }
            // The package holds device state that no description delimits: a connection that
            // rewrites refuses postcopy at its ADVISE, so a package without one would slip past
            // that refusal. Refused before any of the blob is buffered.
            if !advised {
                return Err(RecordError::invalid(
                    1,
                    "MIG_CMD_POSTCOPY_ADVISE before a postcopy package",
                    "MIG_CMD_PACKAGED without a preceding POSTCOPY_ADVISE".into(),
                ));
            }
            if r.bytes(blob).is_none() {
                return Ok(None);
            }
            MigCommand::Packaged { blob_len }
        }
        MIG_CMD_ENABLE_COLO => MigCommand::EnableColo,
        MIG_CMD_POSTCOPY_RESUME => MigCommand::PostcopyResume,
        MIG_CMD_RECV_BITMAP => MigCommand::RecvBitmap,
        MIG_CMD_SWITCHOVER_START => MigCommand::SwitchoverStart,
        other => MigCommand::Other(other),
    };
    Ok(Some(CommandRecord {
        command,
        len: r.pos(),
        advise_summary,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_named_command_round_trips_its_number() {
        for number in 1..=MIG_CMD_SWITCHOVER_START {
            let name = command_name(number).unwrap_or_default();
            assert!(!name.is_empty(), "command {number} has no name");
        }
        assert_eq!(MigCommand::Packaged { blob_len: 3 }.name(), "PACKAGED");
        assert_eq!(MigCommand::Other(99).name(), "command 99");
        assert_eq!(MigCommand::Ping(1).number(), MIG_CMD_PING);
    }
}
