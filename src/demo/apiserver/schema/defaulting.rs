//! Structural defaulting, as apiextensions-apiserver does it when it decodes a custom resource:
//! first the nulls that neither the schema admits (`nullable`) nor a default would replace are
//! dropped (`PruneNonNullableNullsWithoutDefaults`), then every missing field with a `default`
//! gets it, and defaulting goes on inside what was filled in (`Default`), so that a defaulted
//! object has its own fields' defaults too.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    JSONSchemaProps, JSONSchemaPropsOrBool,
};
use serde_json::Value;

use super::{additional, flag, items, properties, property};

/// Prunes non-nullable nulls without a default, then applies the defaults, in place.
pub(crate) fn apply(obj: &mut Value, schema: &JSONSchemaProps) {
    prune_nulls(obj, Some(schema));
    default(obj, schema);
}

fn nullable(s: &JSONSchemaProps) -> bool {
    flag(s.nullable)
}

fn default_of(s: &JSONSchemaProps) -> Option<&Value> {
    s.default.as_ref().map(|d| &d.0).filter(|d| !d.is_null())
}

/// The schema a field of an object follows: its property, else `additionalProperties`.
fn field_schema<'a>(s: Option<&'a JSONSchemaProps>, name: &str) -> Option<&'a JSONSchemaProps> {
    let s = s?;
    property(s, name).or(match &s.additional_properties {
        Some(JSONSchemaPropsOrBool::Schema(schema)) => Some(schema),
        _ => None,
    })
}

fn prune_nulls(x: &mut Value, s: Option<&JSONSchemaProps>) {
    match x {
        Value::Object(map) => {
            map.retain(|k, v| {
                let schema = field_schema(s, k);
                let drop =
                    v.is_null() && schema.is_some_and(|s| !nullable(s) && default_of(s).is_none());
                if !drop {
                    prune_nulls(v, schema);
                }
                !drop
            });
        }
        Value::Array(list) => {
            let item = s.and_then(items);
            list.iter_mut().for_each(|v| prune_nulls(v, item));
        }
        _ => {}
    }
}

fn default(x: &mut Value, s: &JSONSchemaProps) {
    match x {
        Value::Object(map) => {
            for (k, prop) in properties(s) {
                let Some(value) = default_of(prop) else {
                    continue;
                };
                let missing = map.get(k).is_none_or(|v| v.is_null() && !nullable(prop));
                if missing {
                    map.insert(k.clone(), value.clone());
                }
            }
            for (k, v) in map.iter_mut() {
                if let Some(prop) = property(s, k) {
                    default(v, prop);
                } else if let Some(extra) = additional(s) {
                    if v.is_null() && !nullable(extra) {
                        *v = default_of(extra).cloned().unwrap_or(Value::Null);
                    }
                    default(v, extra);
                }
            }
        }
        Value::Array(list) => {
            let Some(item) = items(s) else {
                return;
            };
            for v in list.iter_mut() {
                if v.is_null() && !nullable(item) {
                    *v = default_of(item).cloned().unwrap_or(Value::Null);
                }
                default(v, item);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema(v: Value) -> JSONSchemaProps {
        serde_json::from_value(v).unwrap()
    }

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
