//! QEMU's wire constants, spelled as QEMU spells them, grouped by the QEMU file they mirror.
//!
//! Values are identical in QEMU 7.2 and 10.0 except where noted.

// migration/savevm.c: file header and record types.
pub const QEMU_VM_FILE_MAGIC: u32 = 0x5145_564d;
pub const QEMU_VM_FILE_VERSION: u32 = 0x0000_0003;
/// The first four bytes of a main channel: `QEMU_VM_FILE_MAGIC` as sent (`QEVM`).
pub const QEMU_VM_FILE_MAGIC_BYTES: [u8; 4] = QEMU_VM_FILE_MAGIC.to_be_bytes();
pub const QEMU_VM_EOF: u8 = 0x00;
pub const QEMU_VM_SECTION_START: u8 = 0x01;
pub const QEMU_VM_SECTION_PART: u8 = 0x02;
pub const QEMU_VM_SECTION_END: u8 = 0x03;
pub const QEMU_VM_SECTION_FULL: u8 = 0x04;
pub const QEMU_VM_SUBSECTION: u8 = 0x05;
pub const QEMU_VM_VMDESCRIPTION: u8 = 0x06;
pub const QEMU_VM_CONFIGURATION: u8 = 0x07;
pub const QEMU_VM_COMMAND: u8 = 0x08;
pub const QEMU_VM_SECTION_FOOTER: u8 = 0x7e;

// migration/multifd.c: the first four bytes of a multifd channel (be32 MULTIFD_MAGIC).
pub const MULTIFD_MAGIC: u32 = 0x1122_3344;
pub const MULTIFD_MAGIC_BYTES: [u8; 4] = MULTIFD_MAGIC.to_be_bytes();

// migration/savevm.c: enum qemu_vm_cmd. `MigCommand` (command.rs) names them and knows their
// payload lengths; these are only the numbers.
pub const MIG_CMD_INVALID: u16 = 0;
pub const MIG_CMD_OPEN_RETURN_PATH: u16 = 1;
pub const MIG_CMD_PING: u16 = 2;
pub const MIG_CMD_POSTCOPY_ADVISE: u16 = 3;
pub const MIG_CMD_POSTCOPY_LISTEN: u16 = 4;
pub const MIG_CMD_POSTCOPY_RUN: u16 = 5;
pub const MIG_CMD_POSTCOPY_RAM_DISCARD: u16 = 6;
pub const MIG_CMD_PACKAGED: u16 = 7;
pub const MIG_CMD_ENABLE_COLO: u16 = 8;
pub const MIG_CMD_POSTCOPY_RESUME: u16 = 9;
pub const MIG_CMD_RECV_BITMAP: u16 = 10;
/// QEMU 10.0 only (machines >= 10.0).
pub const MIG_CMD_SWITCHOVER_START: u16 = 11;

// migration/ram.c: RAM record flags (low bits of the be64 record header).
pub const RAM_SAVE_FLAG_FULL: u64 = 0x01;
pub const RAM_SAVE_FLAG_ZERO: u64 = 0x02;
pub const RAM_SAVE_FLAG_MEM_SIZE: u64 = 0x04;
pub const RAM_SAVE_FLAG_PAGE: u64 = 0x08;
pub const RAM_SAVE_FLAG_EOS: u64 = 0x10;
pub const RAM_SAVE_FLAG_CONTINUE: u64 = 0x20;
pub const RAM_SAVE_FLAG_XBZRLE: u64 = 0x40;
pub const RAM_SAVE_FLAG_HOOK: u64 = 0x80;
/// QEMU 7.2 ... 9.0 (compress capability).
pub const RAM_SAVE_FLAG_COMPRESS_PAGE: u64 = 0x100;
/// QEMU 8.1+.
pub const RAM_SAVE_FLAG_MULTIFD_FLUSH: u64 = 0x200;
/// migration/ram.c: the byte after an XBZRLE record's block id.
pub const ENCODING_FLAG_XBZRLE: u8 = 0x1;

// migration/block-dirty-bitmap.c: chunk flags.
pub const DIRTY_BITMAP_MIG_FLAG_EOS: u8 = 0x01;
pub const DIRTY_BITMAP_MIG_FLAG_ZEROES: u8 = 0x02;
pub const DIRTY_BITMAP_MIG_FLAG_BITMAP_NAME: u8 = 0x04;
pub const DIRTY_BITMAP_MIG_FLAG_DEVICE_NAME: u8 = 0x08;
pub const DIRTY_BITMAP_MIG_FLAG_START: u8 = 0x10;
pub const DIRTY_BITMAP_MIG_FLAG_COMPLETE: u8 = 0x20;
pub const DIRTY_BITMAP_MIG_FLAG_BITS: u8 = 0x40;
pub const DIRTY_BITMAP_MIG_EXTRA_FLAGS_8: u8 = 0x80;
/// include/block/block.h: bitmap sector numbers and counts are in 512-byte sectors.
pub const BDRV_SECTOR_BITS: u32 = 9;

// migration/block.c (QEMU <= 9.0): block migration record flags.
pub const BLK_MIG_FLAG_DEVICE_BLOCK: u64 = 0x01;
pub const BLK_MIG_FLAG_EOS: u64 = 0x02;
pub const BLK_MIG_FLAG_PROGRESS: u64 = 0x04;
pub const BLK_MIG_FLAG_ZERO_BLOCK: u64 = 0x08;
/// migration/block.c: every DEVICE_BLOCK record carries exactly this many bytes.
pub const BLK_MIG_BLOCK_SIZE: usize = 1 << 20;

// migration/options.c / configuration subsections (migration/savevm.c).
pub const CONFIGURATION_TARGET_PAGE_BITS: &str = "configuration/target-page-bits";
pub const CONFIGURATION_CAPABILITIES: &str = "configuration/capabilities";
pub const CONFIGURATION_UUID: &str = "configuration/uuid";
/// target/arm/cpu-param.h: TARGET_PAGE_BITS_MIN (the page size when the subsection is absent).
pub const ARM_TARGET_PAGE_BITS_MIN: u32 = 10;

// Well-known section names.
pub const IDSTR_RAM: &str = "ram";
pub const IDSTR_DIRTY_BITMAP: &str = "dirty-bitmap";
pub const IDSTR_BLOCK: &str = "block";
pub const IDSTR_CPU: &str = "cpu";

// target/arm/machine.c: vmstate_arm_cpu field names of the cpreg arrays.
pub const CPREG_ARRAY_LEN_FIELD: &str = "cpreg_vmstate_array_len";
pub const CPREG_INDEXES_FIELD: &str = "cpreg_vmstate_indexes";
pub const CPREG_VALUES_FIELD: &str = "cpreg_vmstate_values";

/// Name of a top-level record type byte, for error messages.
pub fn record_type_name(byte: u8) -> String {
    let name = match byte {
        QEMU_VM_EOF => "QEMU_VM_EOF",
        QEMU_VM_SECTION_START => "QEMU_VM_SECTION_START",
        QEMU_VM_SECTION_PART => "QEMU_VM_SECTION_PART",
        QEMU_VM_SECTION_END => "QEMU_VM_SECTION_END",
        QEMU_VM_SECTION_FULL => "QEMU_VM_SECTION_FULL",
        QEMU_VM_SUBSECTION => "QEMU_VM_SUBSECTION",
        QEMU_VM_VMDESCRIPTION => "QEMU_VM_VMDESCRIPTION",
        QEMU_VM_CONFIGURATION => "QEMU_VM_CONFIGURATION",
        QEMU_VM_COMMAND => "QEMU_VM_COMMAND",
        QEMU_VM_SECTION_FOOTER => "QEMU_VM_SECTION_FOOTER",
        _ => return format!("unknown record type 0x{byte:02x}"),
    };
    format!("{name} (0x{byte:02x})")
}
