//! The `PGWARDEN_*` environment overlay on the configuration file.

use super::{ConfigError, ENV_PREFIX, RESERVED_ENV};

/// Overlays `PGWARDEN_A__B=value` onto `a.b`. A value is read as a TOML value when it
/// parses as one (numbers, booleans, arrays), otherwise as a plain string.
pub(super) fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| {
            k.starts_with(ENV_PREFIX) && !RESERVED_ENV.contains(&k.as_str()) && !is_service_link(k)
        })
        .collect();
    vars.sort();
    for (var, raw) in vars {
        let path: Vec<String> = var[ENV_PREFIX.len()..]
            .split("__")
            .map(|s| s.to_ascii_lowercase())
            .collect();
        if path.iter().any(|p| p.is_empty()) {
            return Err(ConfigError::key(var, "malformed variable name"));
        }
        let value = parse_env_value(&raw);
        let Some((last, parents)) = path.split_last() else {
            return Err(ConfigError::key(var, "malformed variable name"));
        };
        let mut node = &mut *table;
        for (depth, part) in parents.iter().enumerate() {
            let entry = node
                .entry(part.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            node = match entry {
                toml::Value::Table(t) => t,
                _ => {
                    return Err(ConfigError::key(
                        path[..=depth].join("."),
                        format!("{var} treats it as a section, but it is a value"),
                    ))
                }
            };
        }
        node.insert(last.clone(), value);
    }
    Ok(())
}

/// Variables Kubernetes injects for a Service whose name starts with `pgwarden`
/// (`PGWARDEN_SERVICE_HOST`, `PGWARDEN_PORT_8000_TCP_ADDR`, ...). Configuration keys never look
/// like these: nested keys use a double underscore, and no key is named `service_*` or `port_*`.
fn is_service_link(var: &str) -> bool {
    if var.contains("__") {
        return false;
    }
    let rest = &var[ENV_PREFIX.len()..];
    let parts: Vec<&str> = rest.split('_').collect();
    parts
        .windows(2)
        .any(|w| w[0] == "SERVICE" && (w[1] == "HOST" || w[1] == "PORT"))
        || parts.last() == Some(&"PORT")
        || parts.iter().position(|p| *p == "PORT").is_some_and(|i| {
            parts
                .get(i + 1)
                .is_some_and(|n| n.chars().all(|c| c.is_ascii_digit()))
        })
}

fn parse_env_value(raw: &str) -> toml::Value {
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}
