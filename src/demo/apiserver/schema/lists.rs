//! `x-kubernetes-list-type` at run time (`ValidateListSetsAndMaps`): no duplicates in a `set`,
//! no two items of a `map` with the same keys. The real server checks these after the schema.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaProps;
use serde_json::Value;

use super::{additional, child, duplicate, index, invalid, items, key, property, FieldError};

/// Duplicates in `set` lists and duplicate keys in `map` lists (`ValidateListSetsAndMaps`).
pub(crate) fn list_types(value: &Value, schema: &JSONSchemaProps) -> Vec<FieldError> {
    let mut out = Vec::new();
    if let Value::Object(map) = value {
        object_lists("", map, schema, &mut out);
    }
    out
}

fn object_lists(
    at: &str,
    map: &serde_json::Map<String, Value>,
    s: &JSONSchemaProps,
    out: &mut Vec<FieldError>,
) {
    if let Some(extra) = additional(s) {
        for (k, v) in map {
            lists(&key(at, k), v, extra, out);
        }
    }
    for (k, v) in map {
        if let Some(prop) = property(s, k) {
            lists(&child(at, k), v, prop, out);
        }
    }
}

fn lists(at: &str, x: &Value, s: &JSONSchemaProps, out: &mut Vec<FieldError>) {
    match x {
        Value::Object(map) => object_lists(at, map, s, out),
        Value::Array(list) => {
            match s.x_kubernetes_list_type.as_deref() {
                Some("set") => {
                    for (i, v) in list.iter().enumerate() {
                        if list[..i].contains(v) {
                            out.push(duplicate(&index(at, i), v.clone()));
                        }
                    }
                }
                Some("map") => map_list(at, list, s, out),
                _ => {}
            }
            if let Some(item) = items(s) {
                for (i, v) in list.iter().enumerate() {
                    lists(&index(at, i), v, item, out);
                }
            }
        }
        _ => {}
    }
}

fn map_list(at: &str, list: &[Value], s: &JSONSchemaProps, out: &mut Vec<FieldError>) {
    if let Some((i, x)) = list
        .iter()
        .enumerate()
        .find(|(_, x)| !x.is_object() && !x.is_null())
    {
        let detail = "must be an object for an array of list-type map";
        out.push(invalid(&index(at, i), x.clone(), detail));
        return;
    }
    let names = s.x_kubernetes_list_map_keys.clone().unwrap_or_default();
    let item = items(s);
    let keys_of = |x: &Value| -> serde_json::Map<String, Value> {
        let default = |name: &str| {
            let prop = item.and_then(|item| property(item, name));
            prop.and_then(|p| p.default.as_ref()).map(|d| d.0.clone())
        };
        let key = |name: &String| x.get(name).cloned().or_else(|| default(name));
        names
            .iter()
            .map(|n| (n.clone(), key(n).unwrap_or(Value::Null)))
            .collect()
    };
    let keys: Vec<_> = list.iter().map(keys_of).collect();
    for i in 0..keys.len() {
        if keys[..i].contains(&keys[i]) {
            out.push(duplicate(&index(at, i), Value::Object(keys[i].clone())));
        }
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
    fn sets_and_maps_have_no_duplicates() {
        let s = schema(json!({"type": "object", "properties": {
            "set": {"type": "array", "x-kubernetes-list-type": "set", "items": {"type": "string"}},
            "map": {"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"],
                    "items": {"type": "object", "properties": {"name": {"type": "string"}}}}
        }}));
        let v = json!({"set": ["a", "b", "a"], "map": [{"name": "x"}, {"name": "y"}, {"name": "x", "v": 1}]});
        let found: Vec<String> = list_types(&v, &s).iter().map(ToString::to_string).collect();
        assert_eq!(
            found,
            [
                "map[2]: Duplicate value: {\"name\":\"x\"}",
                "set[2]: Duplicate value: \"a\"",
            ]
        );
    }
}
