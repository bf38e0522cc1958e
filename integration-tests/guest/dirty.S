// migproxy test guest: a bare-metal AArch64 program that counts and dirties memory forever.
//
// QEMU's generic loader (`-device loader,file=dirty.bin,addr=LOAD_ADDR,cpu-num=0`, LOAD_ADDR = 0x40200000: the
// first MiB of RAM holds the device tree QEMU generates) copies the flat
// binary into guest RAM and starts vCPU 0 at its first byte with the MMU off; every other vCPU stays
// powered off (PSCI never starts it), which is what a real guest looks like before it boots its
// secondaries. Under `-M virt` RAM starts at 0x40000000.
//
// Each loop iteration increments a 64-bit counter, stores it at COUNTER_ADDR (the host reads it back
// with QMP `human-monitor-command "xp /1xg COUNTER_ADDR"`), and stores it into one word of page
// (counter mod WINDOW_PAGES) of a window starting at WINDOW_ADDR, so every page of the window is dirty
// again within microseconds: each precopy iteration has to resend the whole window.
//
// The loop reloads the counter from memory only at start: after a migration the destination resumes
// the vCPU with its registers, so the counter in x1 simply continues.
//
// Assembled at test time with `aarch64-linux-gnu-as --defsym WINDOW_PAGES=N` (a power of two), then
// `aarch64-linux-gnu-objcopy -O binary`: the code is position independent (literal pool only),
// so no link step is needed.

    .text
    .global _start
_start:
    ldr     x0, =COUNTER_ADDR
    ldr     x2, =WINDOW_ADDR
    ldr     x3, =(WINDOW_PAGES - 1)     // page index mask
    ldr     x1, [x0]                    // 0 on a fresh guest
1:
    add     x1, x1, #1
    str     x1, [x0]
    and     x4, x1, x3
    lsl     x4, x4, #12                 // 4 KiB pages
    str     x1, [x2, x4]
    cbnz    x4, 1b
    // Once per sweep of the window: drop every cached translation. TCG re-arms dirty tracking of a
    // page only when it refills the page's softmmu TLB entry; a small window never leaves the TLB,
    // so without this QEMU 7.2 sees each page dirtied once and never again.
    tlbi    vmalle1
    dsb     ish
    isb
    b       1b
    .ltorg
