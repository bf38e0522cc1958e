//! Regenerates `integration-tests/fixtures/kvm/`: for each kernel of the KVM lab, boot its
//! emulated host, save the stream of a fresh inner VM (`-accel kvm -cpu host -M virt,gic-version=3
//! -smp 1 -m 64 -S`, no guest code) and the profile `migproxy profile capture --from-kvm` writes
//! inside the host, xz-compressed.
//!
//! Usage: `cargo run -p migproxy-integration-tests --bin capture-kvm-fixtures [OUT_DIR]`
//! (provisions the lab with `scripts/provision-kvm-lab.sh` unless `MIGPROXY_KVMLAB` is set).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use migproxy_integration_tests::kvm_lab::{Host, Lab};
use migproxy_integration_tests::{guest, qemu, workdir::WorkDir};

fn main() -> Result<()> {
    let out = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| qemu::repo_root().join("integration-tests/fixtures/kvm"));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let lab = Lab::get()?;
    let dir = WorkDir::new("kvm-fixtures")?;
    let guest = guest::build(dir.path(), 512)?;
    let mut readme = String::from(
        "# KVM fixtures\n\nMade by `cargo run -p migproxy-integration-tests --bin capture-kvm-fixtures` \
         (the KVM lab: outer QEMU 10.0 `-M virt,virtualization=on,gic-version=3 -cpu neoverse-n1 -accel tcg`, \
         inner QEMU 10.0 from Debian trixie `-accel kvm -cpu host -M virt,gic-version=3 -smp 1 -m 64 -nodefaults -S`).\n\n",
    );
    for kernel in &lab.kernels {
        let initrd = lab.initrd(&dir, kernel, &guest.path)?;
        let host = Host::boot(&dir, &format!("host-{}", kernel.series), kernel, &initrd, 1)?;
        let stream = out.join(format!("kvm-{}.stream", kernel.series));
        let length = host.save_fresh_stream(&stream, 1)?;
        let profile = out.join(format!("kvm-{}.from-kvm.json", kernel.series));
        std::fs::write(&profile, host.capture_kvm_profile()?)
            .with_context(|| format!("writing {}", profile.display()))?;
        xz(&stream)?;
        xz(&profile)?;
        readme.push_str(&format!(
            "- `kvm-{s}.stream.xz`: the migration stream ({length} bytes) of a fresh inner VM on \
             the {s} host, kernel {r} ({p}).\n\
             - `kvm-{s}.from-kvm.json.xz`: `migproxy profile capture --from-kvm` run inside the same \
             host.\n",
            s = kernel.series,
            r = kernel.release,
            p = kernel.package
        ));
        eprintln!("captured kernel {} ({})", kernel.series, kernel.release);
    }
    std::fs::write(out.join("README.md"), readme).context("writing the README")?;
    Ok(())
}

fn xz(path: &Path) -> Result<()> {
    let status = Command::new("xz")
        .args(["-9", "-f"])
        .arg(path)
        .status()
        .context("running xz")?;
    if !status.success() {
        bail!("xz {} failed ({status})", path.display());
    }
    Ok(())
}
