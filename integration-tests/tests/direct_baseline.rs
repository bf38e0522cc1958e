//! Without migproxy: QEMU 10.0 and 7.2 cannot migrate an a64fx guest in either direction, even
//! with the same machine type (`virt-7.2`). This is the failure migproxy exists for; the return
//! path is on so the source learns of the failure and keeps running the guest.

use migproxy_integration_tests::flows::{direct_fails, Setup};
use migproxy_integration_tests::qemu::Version::{V10, V72};
use migproxy_integration_tests::scenario::{self, a64fx};

#[test]
fn direct_a64fx_10_to_72_fails_and_source_keeps_running() {
    scenario::run("direct_a64fx_10_to_72_fails", |s| {
        let setup = Setup::new(a64fx(V10), a64fx(V72)).return_path();
        // 7.2 knows 248 cpregs, 10.0 sends 261 (cpreg-scenarios.md).
        direct_fails(
            s,
            &setup,
            &[
                "Invalid value 261 expecting positive value <= 248",
                "Failed to load cpu:cpreg_vmstate_array_len",
            ],
        )
    });
}

#[test]
fn direct_a64fx_72_to_10_fails_and_source_keeps_running() {
    scenario::run("direct_a64fx_72_to_10_fails", |s| {
        let setup = Setup::new(a64fx(V72), a64fx(V10)).return_path();
        // 7.2 sends registers 10.0 does not know: the cpu post_load refuses with EPERM.
        direct_fails(
            s,
            &setup,
            &[
                "error while loading state for instance 0x0 of device 'cpu'",
                "Operation not permitted",
            ],
        )
    });
}
