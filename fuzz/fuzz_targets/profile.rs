//! Fuzz the destination profile format: any text either parses or fails with a `ConfigError`;
//! a profile that parses writes out a text that parses to the same profile.
#![no_main]

use libfuzzer_sys::fuzz_target;
use migproxy_config::Profile;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(profile) = Profile::from_json(text) else {
        return;
    };
    let written = profile.to_json();
    let again = Profile::from_json(&written).expect("a written profile parses");
    assert_eq!(
        again.to_json(),
        written,
        "the profile round trip is not stable"
    );
});
