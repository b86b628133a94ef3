//! The `natter` command as a new user meets it: the real binary, its
//! output and exit status.

use std::path::Path;
use std::process::{Command, Output};

/// The binary with a clean environment and its data under `dir`.
fn natter_command(dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_natter"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("NATTER_DATA_DIR", dir)
        .env("NATTER_DOMAINS", "localhost");
    cmd
}

fn natter(dir: &Path, args: &[&str]) -> Output {
    natter_command(dir).args(args).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// README: "natter --help — everything above, with details".
#[test]
fn help_shows_every_command_the_readme_lists() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let block = readme
        .split("## Command line")
        .nth(1)
        .and_then(|s| s.split("```").nth(1))
        .expect("README's command table");
    let dir = tempfile::tempdir().unwrap();
    let out = natter(dir.path(), &["--help"]);
    assert!(out.status.success(), "{out:?}");
    let help = text(&out.stdout);
    let mut checked = 0;
    for line in block.lines().filter(|l| l.starts_with("natter ")) {
        // The command words: up to the first argument or option.
        let command = line.split("  ").next().unwrap_or_default();
        let words: Vec<&str> = command
            .split_whitespace()
            .skip(1)
            .take_while(|w| w.chars().all(|c| c.is_ascii_lowercase()))
            .collect();
        if words.is_empty() {
            continue; // `natter --help` itself
        }
        let usage = format!("natter {}", words.join(" "));
        assert!(
            help.contains(&usage),
            "{usage:?} missing from --help:\n{help}"
        );
        checked += 1;
    }
    assert!(checked >= 10, "README block not parsed: {block}");
}

#[test]
fn user_list_for_a_domain_not_served_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = natter(dir.path(), &["user", "list", "example.org"]);
    assert!(!out.status.success(), "{out:?}");
    let err = text(&out.stderr);
    assert!(
        err.contains("example.org") && err.contains("not served"),
        "{err}"
    );
    assert!(err.contains("localhost"), "names what is served: {err}");
    // The served domain, however written, lists (nothing yet) and succeeds.
    for d in ["localhost", "LOCALHOST", "localhost."] {
        let out = natter(dir.path(), &["user", "add", "amy@localhost", "secret-pw"]);
        let _ = out; // created once; later adds fail harmlessly
        let out = natter(dir.path(), &["user", "list", d]);
        assert!(out.status.success(), "{d}: {out:?}");
        assert_eq!(text(&out.stdout), "amy@localhost\n", "{d}");
    }
}

#[test]
fn config_error_from_the_environment_names_the_variable_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_natter"))
        .env_clear()
        .env("NATTER_DATA_DIR", dir.path())
        .env("NATTER_LIMITS_MAX_DEPTH", "abc")
        .args(["user", "list"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = text(&out.stderr);
    assert!(
        err.contains("NATTER_LIMITS_MAX_DEPTH") && err.contains("limits.max_depth"),
        "{err}"
    );
}

#[test]
fn config_error_in_the_file_names_the_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("natter.toml");
    std::fs::write(&file, "[limits]\nmax_attrs = 8\nmax_depth = \"abc\"\n").unwrap();
    let out = natter(
        dir.path(),
        &["--config", file.to_str().unwrap(), "user", "list"],
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("{}, line 3 (`limits.max_depth`)", file.display())),
        "{err}"
    );
}

/// The binary allocates with jemalloc, tuned as `.cargo/config.toml` says: a
/// background thread hands freed pages back after about a second, straight to
/// the system (BENCHMARKS.md, issue 15, for why jemalloc).
#[test]
fn binary_allocates_with_the_configured_jemalloc() {
    let dir = tempfile::tempdir().unwrap();
    let out = natter_command(dir.path())
        // jemalloc prints its statistics, options included, at exit.
        .env("_RJEM_MALLOC_CONF", "stats_print:true")
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stats = text(&out.stderr);
    assert!(stats.contains("Begin jemalloc statistics"), "{stats}");
    for option in [
        "opt.background_thread: true",
        "opt.dirty_decay_ms: 1000",
        "opt.muzzy_decay_ms: 0",
    ] {
        assert!(
            stats.contains(option),
            "{option} not in jemalloc's options:\n{stats}"
        );
    }
}
