//! Fuzz the TOML configuration of `migproxy run`: any text parses or fails with a one-line error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use migproxy_config::file::RunFile;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(err) = RunFile::from_toml(text, "fuzz.toml") {
        let message = err.to_string();
        assert!(!message.contains('\n'), "multi-line error: {message}");
    }
});
