//! The example config in the repo parses and equals the built-in defaults,
//! so the documentation cannot drift from the code.

#[test]
fn example_config_is_the_defaults() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/natter.example.toml"))
        .unwrap();
    let example = natter::config::Config::from_parts(&text, &[]).unwrap();
    let defaults = natter::config::Config::from_parts("", &[]).unwrap();
    assert_eq!(format!("{example:?}"), format!("{defaults:?}"));
}
