//! Configuration errors that say where to look: the key, and whether its
//! value came from the file (with the line) or from an environment
//! variable (with its name). serde alone names only the value
//! (`invalid type: string "abc", expected usize`).

use super::Config;

/// Explain `e`, the error of deserializing the merged file + environment
/// table. `from_env` lists (variable, value, dotted key) of each override.
pub(super) fn explain(
    file: &str,
    text: &str,
    from_env: &[(&str, &str, String)],
    e: toml::de::Error,
) -> anyhow::Error {
    let message = e.message().trim_end();
    let key = failing_key(&e);
    if let Some((var, value, _)) = from_env.iter().find(|(_, _, k)| Some(k) == key.as_ref()) {
        return anyhow::anyhow!(
            "environment variable {var}={value:?} (`{}`): {message}",
            key.as_deref().unwrap_or_default()
        );
    }
    // Not an override: the file alone fails the same way, and its parser
    // knows where.
    let line = toml::from_str::<Config>(text)
        .err()
        .and_then(|fe| fe.span())
        .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1);
    match (key, line) {
        (Some(k), Some(l)) => anyhow::anyhow!("{file}, line {l} (`{k}`): {message}"),
        (Some(k), None) => anyhow::anyhow!("{file} (`{k}`): {message}"),
        (None, Some(l)) => anyhow::anyhow!("{file}, line {l}: {message}"),
        (None, None) => anyhow::anyhow!("configuration: {message}"),
    }
}

/// The dotted key `e` is about. toml keeps the path only in its Display
/// ("…\nin `limits.max_depth`"); for an unknown field that is the table
/// holding it, so the field is appended.
fn failing_key(e: &toml::de::Error) -> Option<String> {
    let shown = e.to_string();
    let table = shown
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("in `")?.strip_suffix('`'))
        .map(str::to_string);
    let unknown = e
        .message()
        .strip_prefix("unknown field `")
        .and_then(|r| r.split('`').next());
    match (table, unknown) {
        (Some(t), Some(f)) => Some(format!("{t}.{f}")),
        (None, Some(f)) => Some(f.to_string()),
        (t, None) => t,
    }
}

#[cfg(test)]
mod tests {
    use super::super::Config;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn bad_environment_value_names_the_variable_and_the_key() {
        let e = Config::from_parts("", &env(&[("NATTER_LIMITS_MAX_DEPTH", "abc")]))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "environment variable NATTER_LIMITS_MAX_DEPTH=\"abc\" (`limits.max_depth`): \
             invalid type: string \"abc\", expected usize"
        );
        let e = Config::from_parts("", &env(&[("NATTER_LISTEN_C2Z", "x")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(
                "environment variable NATTER_LISTEN_C2Z=\"x\" (`listen.c2z`): unknown field `c2z`"
            ),
            "{e}"
        );
    }

    #[test]
    fn bad_file_value_names_the_line_and_the_key() {
        let text = "domains = [\"localhost\"]\n\n[limits]\nmax_attrs = 8\nmax_depth = \"abc\"\n";
        let e = Config::from_parts(text, &[]).unwrap_err().to_string();
        assert_eq!(
            e,
            "config file, line 5 (`limits.max_depth`): invalid type: string \"abc\", expected usize"
        );
        let e = Config::from_parts("[listen]\n\nc2z = \"x\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("config file, line 3 (`listen.c2z`): unknown field `c2z`"),
            "{e}"
        );
        let e = Config::from_parts("log_level = 3\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("config file, line 1 (`log_level`): unknown field"),
            "{e}"
        );
    }

    #[test]
    fn the_environment_is_blamed_only_for_its_own_keys() {
        // The variable is fine; the file's bad value is still the file's.
        let text = "[limits]\nmax_depth = -3\n";
        let e = Config::from_parts(text, &env(&[("NATTER_LIMITS_MAX_ATTRS", "9")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("config file, line 2 (`limits.max_depth`):"),
            "{e}"
        );
    }
}
