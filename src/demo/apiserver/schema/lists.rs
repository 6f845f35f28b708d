//! `x-kubernetes-list-type` at run time (`ValidateListSetsAndMaps`): no duplicates in a `set`,
//! no two items of a `map` with the same keys. The real server checks these after the schema.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaProps;
use serde_json::Value;

use super::walk::{children, Step, Sub};
use super::{child, duplicate, index, invalid, items, key, property, FieldError};

/// Duplicates in `set` lists and duplicate keys in `map` lists (`ValidateListSetsAndMaps`).
pub(crate) fn list_types(value: &Value, schema: &JSONSchemaProps) -> Vec<FieldError> {
    let mut out = Vec::new();
    if value.is_object() {
        lists("", value, schema, &mut out);
    }
    out
}

fn lists(at: &str, x: &Value, s: &JSONSchemaProps, out: &mut Vec<FieldError>) {
    if let Value::Array(list) = x {
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
    }
    // Go goes over the fields twice, for `additionalProperties` and then for `properties`; a
    // CRD cannot have both (see openapi.rs), so one pass in the walk's terms does the same.
    for (step, sub) in children(x, Some(s)) {
        let (here, s) = match (&step, sub) {
            (Step::Field(k), Sub::Property(prop)) => (child(at, k), prop),
            (Step::Field(k), Sub::Additional(Some(extra))) => (key(at, k), extra),
            (Step::Item(i), Sub::Item(Some(item))) => (index(at, *i), item),
            _ => continue,
        };
        if let Some(v) = step.of(x) {
            lists(&here, v, s, out);
        }
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
    use super::super::tests::schema;
    use super::*;
    use serde_json::json;

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
