//! Metric queries in the postgres_exporter / CloudNativePG YAML format: pgwarden's built-in
//! ones and the user's. A query is run through the simple query protocol, so every value
//! arrives as text and any numeric column type works.

use std::collections::BTreeMap;

use serde::Deserialize;
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::metrics::families::{Kind, Sample};

/// The built-in queries, in the same format users write.
pub const BUILTIN: &str = include_str!("builtin_queries.yaml");

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    Label,
    Gauge,
    Counter,
    Discard,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    pub name: String,
    pub usage: Usage,
    pub description: String,
}

/// Which databases a query runs in.
#[derive(Debug, Clone, PartialEq)]
pub enum Databases {
    /// The default database only.
    Default,
    /// Every database that accepts connections.
    All,
    Named(Vec<String>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct QuerySpec {
    pub name: String,
    pub query: String,
    /// Run only on a primary.
    pub primary_only: bool,
    pub databases: Databases,
    pub columns: Vec<Column>,
    /// Set when the definition cannot be used; the query is reported as broken, not run.
    pub invalid: Option<String>,
}

#[derive(Deserialize)]
struct RawQuery {
    query: String,
    #[serde(default)]
    primary: bool,
    /// postgres_exporter's older spelling of `primary`.
    #[serde(default)]
    master: bool,
    #[serde(default)]
    target_databases: Vec<String>,
    #[serde(default)]
    metrics: Vec<BTreeMap<String, RawColumn>>,
}

#[derive(Deserialize)]
struct RawColumn {
    usage: String,
    #[serde(default)]
    description: String,
}

/// Parses a queries file. A malformed file is an error; a malformed query inside a well-formed
/// file is kept and marked invalid so the other queries still run.
pub fn parse(yaml: &str) -> Result<Vec<QuerySpec>, String> {
    let raw: BTreeMap<String, serde_norway::Value> =
        serde_norway::from_str(yaml).map_err(|e| e.to_string())?;
    let mut specs = Vec::with_capacity(raw.len());
    for (name, value) in raw {
        let mut spec = QuerySpec {
            name: name.clone(),
            query: String::new(),
            primary_only: false,
            databases: Databases::Default,
            columns: Vec::new(),
            invalid: None,
        };
        match serde_norway::from_value::<RawQuery>(value) {
            Ok(q) => {
                spec.query = q.query;
                spec.primary_only = q.primary || q.master;
                spec.databases = match q.target_databases.as_slice() {
                    [] => Databases::Default,
                    dbs if dbs.iter().any(|d| d == "*") => Databases::All,
                    dbs => Databases::Named(dbs.to_vec()),
                };
                for map in q.metrics {
                    for (column, c) in map {
                        let usage = match c.usage.to_ascii_uppercase().as_str() {
                            "LABEL" => Usage::Label,
                            "GAUGE" => Usage::Gauge,
                            "COUNTER" => Usage::Counter,
                            "DISCARD" => Usage::Discard,
                            other => {
                                spec.invalid = Some(format!(
                                    "column {column}: usage {other} is not supported (LABEL, GAUGE, COUNTER, DISCARD)"
                                ));
                                Usage::Discard
                            }
                        };
                        spec.columns.push(Column {
                            name: column,
                            usage,
                            description: c.description,
                        });
                    }
                }
                if spec.invalid.is_none() {
                    spec.invalid = check_names(&spec).err();
                }
            }
            Err(e) => spec.invalid = Some(e.to_string()),
        }
        specs.push(spec);
    }
    Ok(specs)
}

fn valid_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn check_names(spec: &QuerySpec) -> Result<(), String> {
    if !valid_metric_name(&spec.name) {
        return Err(format!("{:?} cannot be part of a metric name", spec.name));
    }
    for c in &spec.columns {
        if !valid_metric_name(&c.name) {
            return Err(format!(
                "column {:?} cannot be part of a metric name",
                c.name
            ));
        }
    }
    if !spec
        .columns
        .iter()
        .any(|c| matches!(c.usage, Usage::Gauge | Usage::Counter))
    {
        return Err("no GAUGE or COUNTER column".into());
    }
    Ok(())
}

impl QuerySpec {
    /// Prometheus name of a value column.
    pub fn metric_name(&self, column: &Column) -> String {
        let base = format!("pgwarden_{}_{}", self.name, column.name);
        match column.usage {
            Usage::Counter if !base.ends_with("_total") => format!("{base}_total"),
            _ => base,
        }
    }

    /// Runs the query on `client` and turns its rows into samples. `database` becomes a label
    /// when the query runs in several databases.
    pub async fn run(
        &self,
        client: &Client,
        database: Option<&str>,
    ) -> Result<Vec<Sample>, String> {
        if let Some(reason) = &self.invalid {
            return Err(reason.clone());
        }
        let messages =
            client
                .simple_query(&self.query)
                .await
                .map_err(|e| match e.as_db_error() {
                    Some(db) => db.message().to_string(),
                    None => e.to_string(),
                })?;
        let mut samples = Vec::new();
        for message in messages {
            let SimpleQueryMessage::Row(row) = message else {
                continue;
            };
            let mut labels: Vec<(String, String)> = Vec::new();
            if let Some(db) = database {
                labels.push(("database".into(), db.into()));
            }
            let mut values = Vec::new();
            for col in &self.columns {
                let index = row
                    .columns()
                    .iter()
                    .position(|c| c.name() == col.name)
                    .ok_or_else(|| format!("the query returns no column {:?}", col.name))?;
                let text = row.get(index);
                match col.usage {
                    Usage::Label => labels.push((col.name.clone(), text.unwrap_or("").into())),
                    Usage::Gauge | Usage::Counter => {
                        let Some(text) = text else { continue };
                        let value = parse_value(text).ok_or_else(|| {
                            format!("column {:?}: {text:?} is not a number", col.name)
                        })?;
                        values.push((col, value));
                    }
                    Usage::Discard => {}
                }
            }
            for (col, value) in values {
                samples.push(Sample {
                    name: self.metric_name(col),
                    help: col.description.clone(),
                    kind: if col.usage == Usage::Counter {
                        Kind::Counter
                    } else {
                        Kind::Gauge
                    },
                    labels: labels.clone(),
                    value,
                });
            }
        }
        Ok(samples)
    }
}

fn parse_value(text: &str) -> Option<f64> {
    match text {
        "t" | "true" => Some(1.0),
        "f" | "false" => Some(0.0),
        _ => text.trim().parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_queries_parse_and_are_valid() {
        let specs = parse(BUILTIN).unwrap();
        assert!(specs.len() >= 8);
        for s in &specs {
            assert_eq!(s.invalid, None, "{}", s.name);
        }
    }

    #[test]
    fn parses_the_postgres_exporter_format() {
        let specs = parse(
            r#"
pg_replication:
  query: "SELECT 1 AS lag"
  master: true
  metrics:
    - lag:
        usage: "GAUGE"
        description: "Replication lag behind master in seconds"
pg_stat_user_tables:
  query: "SELECT current_database() datname, relname, seq_scan FROM pg_stat_user_tables"
  target_databases: ["*"]
  cache_seconds: 30
  metrics:
    - datname: {usage: LABEL, description: "db"}
    - relname: {usage: LABEL, description: "table"}
    - seq_scan: {usage: COUNTER, description: "scans"}
broken:
  query: "SELECT 1 AS x"
  metrics:
    - x: {usage: HISTOGRAM}
"#,
        )
        .unwrap();
        let by = |n: &str| specs.iter().find(|s| s.name == n).unwrap();
        assert!(by("pg_replication").primary_only);
        assert_eq!(by("pg_stat_user_tables").databases, Databases::All);
        let t = by("pg_stat_user_tables");
        assert_eq!(
            t.metric_name(&t.columns[2]),
            "pgwarden_pg_stat_user_tables_seq_scan_total"
        );
        assert!(by("broken")
            .invalid
            .as_deref()
            .unwrap()
            .contains("HISTOGRAM"));
        assert!(parse("not: [valid").is_err());
    }

    #[test]
    fn values() {
        assert_eq!(parse_value("t"), Some(1.0));
        assert_eq!(parse_value("12.5"), Some(12.5));
        assert_eq!(parse_value("abc"), None);
    }
}
