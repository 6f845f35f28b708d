//! Pruning (apiextensions-apiserver's `pruning.Prune`): fields the schema does not specify are
//! dropped, except under `x-kubernetes-preserve-unknown-fields`, and except the `apiVersion`,
//! `kind` and `metadata` of the object itself and of embedded resources.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    JSONSchemaProps, JSONSchemaPropsOrBool,
};
use serde_json::Value;

use super::{flag, items, property};

const META_FIELDS: [&str; 3] = ["apiVersion", "kind", "metadata"];

/// Prunes `obj` in place; `root`: `obj` is a whole object (its type and object meta are kept).
/// Returns the paths of what was dropped (`spec.bogus`), as the real server warns of them.
pub(crate) fn prune(obj: &mut Value, schema: &JSONSchemaProps, root: bool) -> Vec<String> {
    let mut pruned = Vec::new();
    let embedded = root || flag(schema.x_kubernetes_embedded_resource);
    walk(obj, Some(schema), embedded, "", &mut pruned);
    pruned
}

/// `embedded`: the node is a resource, whose meta fields are left alone.
fn walk(
    x: &mut Value,
    s: Option<&JSONSchemaProps>,
    embedded: bool,
    at: &str,
    out: &mut Vec<String>,
) {
    let preserve = s.is_some_and(|s| flag(s.x_kubernetes_preserve_unknown_fields));
    match x {
        Value::Object(map) => {
            let Some(s) = s else {
                // Below `additionalProperties: true`: nothing is specified.
                out.extend(map.keys().map(|k| path(at, k)));
                map.clear();
                return;
            };
            let keys: Vec<String> = map.keys().cloned().collect();
            for k in keys {
                if embedded && META_FIELDS.contains(&k.as_str()) {
                    continue;
                }
                let sub = property(s, &k)
                    .map(Some)
                    .or_else(|| match &s.additional_properties {
                        Some(JSONSchemaPropsOrBool::Schema(schema)) => Some(Some(schema.as_ref())),
                        Some(JSONSchemaPropsOrBool::Bool(_)) => Some(None),
                        None => None,
                    });
                match (sub, map.get_mut(&k)) {
                    (Some(sub), Some(v)) => {
                        let embedded = sub.is_some_and(|s| flag(s.x_kubernetes_embedded_resource));
                        walk(v, sub, embedded, &path(at, &k), out);
                    }
                    (None, _) if !preserve => {
                        map.remove(&k);
                        out.push(path(at, &k));
                    }
                    _ => {}
                }
            }
        }
        Value::Array(list) => {
            let item = s.and_then(items);
            let embedded = item.is_some_and(|s| flag(s.x_kubernetes_embedded_resource));
            for (i, v) in list.iter_mut().enumerate() {
                walk(v, item, embedded, &format!("{at}[{i}]"), out);
            }
        }
        _ => {}
    }
}

fn path(at: &str, key: &str) -> String {
    match at {
        "" => key.to_string(),
        _ => format!("{at}.{key}"),
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
    fn unknown_fields_go_meta_and_preserved_ones_stay() {
        let s = schema(json!({
            "type": "object",
            "properties": {
                "spec": {"type": "object", "properties": {
                    "a": {"type": "integer"},
                    "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true,
                             "properties": {"known": {"type": "object", "properties": {}}}},
                    "map": {"type": "object", "additionalProperties": {"type": "object",
                            "properties": {"x": {"type": "string"}}}},
                    "list": {"type": "array", "items": {"type": "object",
                             "properties": {"y": {"type": "string"}}}}
                }}
            }
        }));
        let mut obj = json!({
            "apiVersion": "v", "kind": "K", "metadata": {"name": "n", "odd": 1},
            "spec": {
                "a": 1, "bogus": 2,
                "free": {"anything": {"goes": true}, "known": {"dropped": 1}},
                "map": {"k": {"x": "1", "z": 2}},
                "list": [{"y": "1", "w": 3}]
            },
            "extra": {}
        });
        let pruned = prune(&mut obj, &s, true);
        assert_eq!(
            obj,
            json!({
                "apiVersion": "v", "kind": "K", "metadata": {"name": "n", "odd": 1},
                "spec": {
                    "a": 1,
                    "free": {"anything": {"goes": true}, "known": {}},
                    "map": {"k": {"x": "1"}},
                    "list": [{"y": "1"}]
                }
            })
        );
        assert_eq!(
            pruned,
            [
                "extra",
                "spec.bogus",
                "spec.free.known.dropped",
                "spec.list[0].w",
                "spec.map.k.z"
            ]
        );
    }
}
