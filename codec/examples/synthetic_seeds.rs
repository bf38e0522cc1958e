//! Write a few small synthetic streams (header to description, with every RAM record kind, device
//! sections and two vCPUs) into a directory: fuzz seeds that reach the device phase quickly.
//!
//! `cargo run -p migproxy-codec --features testing --example synthetic_seeds -- DIR`

use migproxy_codec::testing::{RamRecord, StreamBuilder};

fn stream(regs: u64, fill: u8) -> Vec<u8> {
    let cpregs: Vec<(u64, u64)> = (0..regs)
        .map(|i| (0x6030_0000_0013_0000 + i * 8, i * u64::from(fill)))
        .collect();
    let mut b = StreamBuilder::new("virt-7.2");
    b.ram_start(1 << 20)
        .ram_section(
            false,
            &[
                RamRecord::Page(vec![fill, 1, 2]),
                RamRecord::Zero,
                RamRecord::Xbzrle(vec![1, 2, 3]),
                RamRecord::Compressed(vec![0x78, 0x9c]),
                RamRecord::MultifdFlush,
            ],
        )
        .ram_section(true, &[RamRecord::Zero]);
    b.device("timer", 0, &[0u8; 24], None);
    b.cpu(0, &cpregs, fill);
    b.cpu(1, &cpregs, fill.wrapping_add(1));
    b.device("arm_gic", 0, &[fill; 64], Some(("sub", &[1, 2, 3, 4])));
    b.finish()
}

fn main() -> std::io::Result<()> {
    let dir = std::env::args().nth(1).unwrap_or_else(|| ".".into());
    std::fs::create_dir_all(&dir)?;
    for (i, (regs, fill)) in [(0, 0u8), (3, 7), (40, 0x7e)].into_iter().enumerate() {
        // The `decode` target's control byte: rewriting decoder, or checking relay (bit 7).
        for control in [0u8, 0x80] {
            let mut seed = vec![control];
            seed.extend(stream(regs, fill));
            std::fs::write(format!("{dir}/synthetic-{i}-{control}"), seed)?;
        }
    }
    Ok(())
}
