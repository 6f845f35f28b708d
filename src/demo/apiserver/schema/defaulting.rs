//! Structural defaulting, as apiextensions-apiserver does it when it decodes a custom resource:
//! first the nulls that neither the schema admits (`nullable`) nor a default would replace are
//! dropped (`PruneNonNullableNullsWithoutDefaults`), then every missing field with a `default`
//! gets it, and defaulting goes on inside what was filled in (`Default`), so that a defaulted
//! object has its own fields' defaults too.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaProps;
use serde_json::Value;

use super::walk::{children, Step, Sub};
use super::{flag, properties};

/// Prunes non-nullable nulls without a default, then applies the defaults, in place.
pub(crate) fn apply(obj: &mut Value, schema: &JSONSchemaProps) {
    prune_nulls(obj, schema);
    default(obj, schema);
}

fn nullable(s: &JSONSchemaProps) -> bool {
    flag(s.nullable)
}

fn default_of(s: &JSONSchemaProps) -> Option<&Value> {
    s.default.as_ref().map(|d| &d.0).filter(|d| !d.is_null())
}

/// Drops the fields that are null, whose schema is not nullable and has no default; items stay.
fn prune_nulls(x: &mut Value, s: &JSONSchemaProps) {
    for (at, sub) in children(x, Some(s)) {
        // Below no schema nothing is dropped.
        let Some(s) = sub.schema() else {
            continue;
        };
        let null = at.of(x).is_some_and(Value::is_null);
        if matches!(at, Step::Field(_)) && null && !nullable(s) && default_of(s).is_none() {
            at.remove(x);
        } else if let Some(v) = at.of_mut(x) {
            prune_nulls(v, s);
        }
    }
}

fn default(x: &mut Value, s: &JSONSchemaProps) {
    if let Value::Object(map) = x {
        for (k, prop) in properties(s) {
            let Some(value) = default_of(prop) else {
                continue;
            };
            let missing = map.get(k).is_none_or(|v| v.is_null() && !nullable(prop));
            if missing {
                map.insert(k.clone(), value.clone());
            }
        }
    }
    for (at, sub) in children(x, Some(s)) {
        let Some(v) = at.of_mut(x) else {
            continue;
        };
        match sub {
            Sub::Property(prop) => default(v, prop),
            Sub::Additional(Some(s)) | Sub::Item(Some(s)) => {
                if v.is_null() && !nullable(s) {
                    *v = default_of(s).cloned().unwrap_or(Value::Null);
                }
                default(v, s);
            }
            Sub::Additional(None) | Sub::Item(None) | Sub::Unspecified => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::schema;
    use super::*;
    use serde_json::json;

    #[test]
    fn defaults_fill_in_and_nest() {
        let s = schema(json!({
            "type": "object",
            "properties": {
                "failover": {
                    "type": "object",
                    "default": {"lease": 10},
                    "properties": {
                        "lease": {"type": "integer", "default": 10},
                        "retry": {"type": "integer", "default": 2},
                        "lag": {"type": "integer", "nullable": true}
                    }
                },
                "mode": {"type": "string", "default": "off"},
                "name": {"type": "string"},
                "list": {"type": "array", "items": {"type": "object",
                         "properties": {"k": {"type": "string", "default": "x"}}}}
            }
        }));
        // A missing object gets its default, then its own fields' defaults; a non-nullable
        // null with a default is replaced; one without is dropped; a nullable null stays.
        let mut obj = json!({"mode": null, "name": null, "list": [{}, {"k": "y"}]});
        apply(&mut obj, &s);
        assert_eq!(
            obj,
            json!({
                "failover": {"lease": 10, "retry": 2},
                "mode": "off",
                "list": [{"k": "x"}, {"k": "y"}]
            })
        );
        let mut obj = json!({"failover": {"lag": null, "lease": 30}, "mode": "quorum"});
        apply(&mut obj, &s);
        assert_eq!(
            obj,
            json!({"failover": {"lag": null, "lease": 30, "retry": 2}, "mode": "quorum", })
        );
    }
}
