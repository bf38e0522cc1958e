//! The policy knobs as the command line and the configuration file spell them, turned into the
//! rewrite's `Policy`. One vocabulary: the file's words are parsed with clap's own value enums.

use clap::ValueEnum;
use migproxy_config::file::PolicyFile;
use migproxy_config::{FillMissing, OnExtra, OnIdMismatch, Policy, RegId};

use crate::cli::{FillMissingArg, OnExtraArg, OnIdMismatchArg, PolicyArgs};
use crate::error::ProxyError;

pub fn policy_from_args(args: &PolicyArgs) -> Result<Policy, ProxyError> {
    Ok(Policy {
        on_extra: on_extra(args.on_extra),
        allow_drop: reg_ids(&args.allow_drop)?,
        fill_missing: fill_missing(args.fill_missing),
        on_id_mismatch: on_id_mismatch(args.on_id_mismatch),
    })
}

/// The file spells policy words exactly as the flags do; clap's parser is the one vocabulary.
pub fn policy_from_file(file: &PolicyFile) -> Result<Policy, ProxyError> {
    fn word<T: ValueEnum>(key: &str, value: Option<&String>, default: T) -> Result<T, ProxyError> {
        match value {
            None => Ok(default),
            Some(text) => T::from_str(text, false).map_err(|_| {
                let allowed: Vec<String> = T::value_variants()
                    .iter()
                    .filter_map(|v| v.to_possible_value().map(|p| p.get_name().to_owned()))
                    .collect();
                ProxyError::InvalidConfig(format!(
                    "policy.{key} = {text:?}: expected one of {}",
                    allowed.join(", ")
                ))
            }),
        }
    }
    Ok(Policy {
        on_extra: on_extra(word(
            "on_extra",
            file.on_extra.as_ref(),
            OnExtraArg::DropUnused,
        )?),
        allow_drop: reg_ids(&file.allow_drop)?,
        fill_missing: fill_missing(word(
            "fill_missing",
            file.fill_missing.as_ref(),
            FillMissingArg::Auto,
        )?),
        on_id_mismatch: on_id_mismatch(word(
            "on_id_mismatch",
            file.on_id_mismatch.as_ref(),
            OnIdMismatchArg::Auto,
        )?),
    })
}

fn reg_ids(names: &[String]) -> Result<Vec<RegId>, ProxyError> {
    names
        .iter()
        .map(|name| {
            name.parse::<RegId>()
                .map_err(|source| ProxyError::AllowDrop {
                    name: name.clone(),
                    source,
                })
        })
        .collect()
}

fn on_extra(arg: OnExtraArg) -> OnExtra {
    match arg {
        OnExtraArg::DropUnused => OnExtra::DropUnused,
        OnExtraArg::Drop => OnExtra::Drop,
        OnExtraArg::Refuse => OnExtra::Refuse,
    }
}

fn fill_missing(arg: FillMissingArg) -> FillMissing {
    match arg {
        FillMissingArg::Auto => FillMissing::Auto,
        FillMissingArg::Always => FillMissing::Always,
        FillMissingArg::Never => FillMissing::Never,
    }
}

fn on_id_mismatch(arg: OnIdMismatchArg) -> OnIdMismatch {
    match arg {
        OnIdMismatchArg::Auto => OnIdMismatch::Auto,
        OnIdMismatchArg::Refuse => OnIdMismatch::Refuse,
        OnIdMismatchArg::Warn => OnIdMismatch::Warn,
        OnIdMismatchArg::UseDestination => OnIdMismatch::UseDestination,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(allow: &[&str]) -> PolicyArgs {
        PolicyArgs {
            on_extra: OnExtraArg::Refuse,
            allow_drop: allow.iter().map(|s| s.to_string()).collect(),
            fill_missing: FillMissingArg::Never,
            on_id_mismatch: OnIdMismatchArg::UseDestination,
        }
    }

    #[test]
    fn policy_flags_map_and_registers_parse_by_name_or_id() {
        let policy = policy_from_args(&args(&["TCR2_EL1", "0x6030000000160003", "s3_0_c10_c2_3"]));
        let policy = match policy {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(policy.on_extra, OnExtra::Refuse);
        assert_eq!(policy.fill_missing, FillMissing::Never);
        assert_eq!(policy.on_id_mismatch, OnIdMismatch::UseDestination);
        let ids: Vec<u64> = policy.allow_drop.iter().map(|r| r.0).collect();
        assert_eq!(
            ids,
            vec![
                0x6030_0000_0013_c103,
                0x6030_0000_0016_0003,
                0x6030_0000_0013_c513
            ]
        );
    }

    #[test]
    fn an_unknown_register_is_a_usage_error() {
        match policy_from_args(&args(&["NO_SUCH_REG"])) {
            Err(e) => {
                assert_eq!(e.exit_code(), 2);
                assert!(e.to_string().contains("NO_SUCH_REG"));
            }
            Ok(_) => panic!("accepted an unknown register"),
        }
    }
}
