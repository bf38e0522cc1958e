//! QEMU's wire constants, spelled as QEMU spells them.
