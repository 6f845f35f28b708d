//! Pruning (apiextensions-apiserver's `pruning.Prune`): fields the schema does not specify are
//! dropped, except under `x-kubernetes-preserve-unknown-fields`, and except the `apiVersion`,
//! `kind` and `metadata` of the object itself and of embedded resources.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaProps;
use serde_json::Value;

use super::walk::{children, Step, Sub};
use super::{child, flag, index};

const META_FIELDS: [&str; 3] = ["apiVersion", "kind", "metadata"];

/// Prunes `obj` in place; `root`: `obj` is a whole object (its type and object meta are kept).
/// Returns the paths of what was dropped (`spec.bogus`), as the real server warns of them.
pub(crate) fn prune(obj: &mut Value, schema: &JSONSchemaProps, root: bool) -> Vec<String> {
    let mut pruned = Vec::new();
    let embedded = root || flag(schema.x_kubernetes_embedded_resource);
    walk(obj, Some(schema), embedded, "", &mut pruned);
    pruned
}

/// `embedded`: the node is a resource, whose meta fields are left alone. Below no schema (below
/// `additionalProperties: true`) nothing is specified.
fn walk(
    x: &mut Value,
    s: Option<&JSONSchemaProps>,
    embedded: bool,
    at: &str,
    out: &mut Vec<String>,
) {
    let preserve = s.is_some_and(|s| flag(s.x_kubernetes_preserve_unknown_fields));
    for (step, sub) in children(x, s) {
        let here = match &step {
            Step::Field(k) if embedded && META_FIELDS.contains(&k.as_str()) => continue,
            Step::Field(k) => child(at, k),
            Step::Item(i) => index(at, *i),
        };
        match sub {
            Sub::Unspecified if !preserve => {
                step.remove(x);
                out.push(here);
            }
            Sub::Unspecified => {}
            sub => {
                let sub = sub.schema();
                let embedded = sub.is_some_and(|s| flag(s.x_kubernetes_embedded_resource));
                if let Some(v) = step.of_mut(x) {
                    walk(v, sub, embedded, &here, out);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::schema;
    use super::*;
    use serde_json::json;

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
