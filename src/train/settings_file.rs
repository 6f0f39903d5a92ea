//! Reading a settings file (`--config`): TOML, YAML or JSON, bounded in size
//! and nesting before any parser sees it (YAML parsers take quadratic time on
//! deeply nested flow sequences), and with every number finite (NaN and
//! infinity would reach serde as null and be reported without their field).

use std::path::Path;

use anyhow::{bail, Result};
use serde_json::Value;

/// Settings files are a few kilobytes; anything near this is not one.
pub const MAX_BYTES: u64 = 1 << 20;
/// No setting nests deeper than a list in a table.
pub const MAX_DEPTH: usize = 16;

/// The file's contents as a JSON value, or one error naming the file (and
/// the field, for a value that is not finite).
pub fn read(path: &Path) -> Result<Value> {
    let text = peft_adapters::fsio::read_regular_string(path, MAX_BYTES, "settings file")?;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    if !matches!(ext, "toml" | "yaml" | "yml" | "json") {
        bail!(
            "{}: give a .toml, .yaml, .yml or .json file",
            path.display()
        );
    }
    if let Some(depth) = nesting_beyond(&text, MAX_DEPTH) {
        bail!(
            "{}: values nested {depth} deep; settings are at most {MAX_DEPTH} deep (is this a settings file?)",
            path.display()
        );
    }
    let parse_error = |e: String| anyhow::anyhow!("{}: {}", path.display(), one_line(&e));
    let value: Value = match ext {
        "toml" => {
            let v: toml::Value = toml::from_str(&text).map_err(|e| parse_error(e.to_string()))?;
            non_finite_toml(&v, "").map_or(Ok(()), |f| not_finite(path, &f))?;
            serde_json::to_value(v)?
        }
        "json" => serde_json::from_str(&text).map_err(|e| parse_error(e.to_string()))?,
        _ => {
            let v: serde_yaml::Value =
                serde_yaml::from_str(&text).map_err(|e| parse_error(e.to_string()))?;
            non_finite_yaml(&v, "").map_or(Ok(()), |f| not_finite(path, &f))?;
            serde_json::to_value(v)?
        }
    };
    Ok(value)
}

fn not_finite(path: &Path, field: &str) -> Result<()> {
    bail!(
        "{}: field `{field}` is not a finite number; every setting takes a finite value",
        path.display()
    )
}

/// The deepest nesting of brackets and braces outside strings, when it
/// exceeds `limit` (a scan of the text, linear in its length).
pub fn nesting_beyond(text: &str, limit: usize) -> Option<usize> {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for c in text.chars() {
        if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if c == '\\' && q == '"' {
                escaped = true;
            } else if c == q {
                quote = None;
            }
            continue;
        }
        match c {
            '"' | '\'' => quote = Some(c),
            '[' | '{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            ']' | '}' => depth = depth.saturating_sub(1),
            // A comment runs to the end of its line: its quotes do not count.
            '\n' => quote = None,
            _ => {}
        }
    }
    (deepest > limit).then_some(deepest)
}

fn non_finite_toml(v: &toml::Value, at: &str) -> Option<String> {
    match v {
        toml::Value::Float(f) if !f.is_finite() => Some(at.to_owned()),
        toml::Value::Table(t) => t.iter().find_map(|(k, v)| non_finite_toml(v, &join(at, k))),
        toml::Value::Array(a) => a
            .iter()
            .enumerate()
            .find_map(|(i, v)| non_finite_toml(v, &format!("{at}[{i}]"))),
        _ => None,
    }
}

fn non_finite_yaml(v: &serde_yaml::Value, at: &str) -> Option<String> {
    match v {
        serde_yaml::Value::Number(n) if n.as_f64().is_some_and(|f| !f.is_finite()) => {
            Some(at.to_owned())
        }
        serde_yaml::Value::Mapping(m) => m.iter().find_map(|(k, v)| {
            let key = k.as_str().map_or_else(|| format!("{k:?}"), str::to_owned);
            non_finite_yaml(v, &join(at, &key))
        }),
        serde_yaml::Value::Sequence(s) => s
            .iter()
            .enumerate()
            .find_map(|(i, v)| non_finite_yaml(v, &format!("{at}[{i}]"))),
        serde_yaml::Value::Tagged(t) => non_finite_yaml(&t.value, at),
        _ => None,
    }
}

fn join(at: &str, key: &str) -> String {
    if at.is_empty() {
        key.to_owned()
    } else {
        format!("{at}.{key}")
    }
}

/// `s` with every run of white space made one space: errors are one line.
pub(crate) fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nesting_is_measured_outside_strings() {
        assert_eq!(nesting_beyond("a = [[1], [2]]", 1), Some(2));
        assert_eq!(nesting_beyond("a = [[1], [2]]", 2), None);
        assert_eq!(nesting_beyond("a = \"[[[[\"", 1), None);
        assert_eq!(nesting_beyond(&"[".repeat(100_000), 16), Some(100_000));
    }
}
