//! The guide's nftables rulesets (deploy/nftables), loaded as shipped into a lab host.

use anyhow::{anyhow, bail, Context, Result};

use super::host::Host;
use crate::qemu::repo_root;

impl Host {
    /// Load `deploy/nftables/FILE` as is into this host's namespace, with `defines` replacing the
    /// values of its `define` lines. Every define of the file must be given (a renamed or added
    /// define fails here, not silently in the ruleset). The table goes with the namespace.
    pub fn load_ruleset(&self, file: &str, defines: &[(&str, String)]) -> Result<()> {
        let path = repo_root().join("deploy/nftables").join(file);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let mut ruleset = String::new();
        let mut replaced = Vec::new();
        for line in text.lines() {
            let name = line
                .strip_prefix("define ")
                .and_then(|rest| rest.split_once(" = "))
                .map(|(name, _)| name.trim());
            match name {
                Some(name) => {
                    let (_, value) = defines
                        .iter()
                        .find(|(wanted, _)| *wanted == name)
                        .ok_or_else(|| {
                            anyhow!("{}: no test value for define {name}", path.display())
                        })?;
                    ruleset.push_str(&format!("define {name} = {value}\n"));
                    replaced.push(name.to_owned());
                }
                None => {
                    ruleset.push_str(line);
                    ruleset.push('\n');
                }
            }
        }
        if replaced.len() != defines.len() {
            bail!(
                "{}: defines {replaced:?}, the test sets {:?}",
                path.display(),
                defines.iter().map(|(n, _)| *n).collect::<Vec<_>>()
            );
        }
        let rules_path = self.dir.join(file);
        std::fs::write(&rules_path, &ruleset)?;
        let out = self
            .command_in("nft")
            .arg("-f")
            .arg(&rules_path)
            .output()
            .context("running nft")?;
        if !out.status.success() {
            bail!(
                "host {}: nft -f {} failed: {}\n{ruleset}",
                self.label,
                rules_path.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }
}
