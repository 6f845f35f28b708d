//! Structural schemas: apiextensions-apiserver's `NewStructural` (what cannot be converted at
//! all) and `ValidateStructural` (`validateStructuralInvariants`, the nested value validations
//! under allOf/anyOf/oneOf/not, the metadata restrictions, and `validateStructuralCompleteness`).
//! Not checked: that a `pattern` compiles (no regular expression engine here).

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
};

use super::{
    child, flag, forbidden, index, invalid, items, key, properties, property, required, type_of,
    FieldError,
};

#[derive(Clone, Copy, PartialEq)]
enum Level {
    Root,
    Item,
    Field,
}

/// `NewStructural`'s error, if the schema cannot be made structural at all.
pub(crate) fn convertible(s: &JSONSchemaProps) -> Result<(), String> {
    let unsupported = [
        ("id", s.id.is_some()),
        ("schema", s.schema.is_some()),
        ("$ref", s.ref_path.is_some()),
        ("patternProperties", s.pattern_properties.is_some()),
        (
            "dependencies",
            s.dependencies.as_ref().is_some_and(|d| !d.is_empty()),
        ),
        ("additionalItems", s.additional_items.is_some()),
        ("definitions", s.definitions.is_some()),
    ];
    if let Some((name, _)) = unsupported.iter().find(|(_, set)| *set) {
        return Err(format!("OpenAPIV3Schema '{name}' is not supported"));
    }
    if s.x_kubernetes_preserve_unknown_fields == Some(false) {
        return Err(
            "internal error: 'x-kubernetes-preserve-unknown-fields' must be true or undefined"
                .to_string(),
        );
    }
    match &s.items {
        Some(JSONSchemaPropsOrArray::Schemas(_)) => {
            return Err("OpenAPIV3Schema 'items' must be a schema, but is an array".to_string())
        }
        Some(JSONSchemaPropsOrArray::Schema(item)) => convertible(item)?,
        None => {}
    }
    if let Some(JSONSchemaPropsOrBool::Schema(extra)) = &s.additional_properties {
        convertible(extra)?;
    }
    for (_, p) in properties(s) {
        convertible(p)?;
    }
    let nested = s.all_of.iter().chain(&s.any_of).chain(&s.one_of).flatten();
    for n in nested.chain(s.not.as_deref()) {
        convertible(n)?;
    }
    Ok(())
}

/// `ValidateStructural`, its errors sorted as the real server sorts them.
pub(crate) fn check(s: &JSONSchemaProps, path: &str) -> Vec<FieldError> {
    let mut out = Vec::new();
    invariants(s, Level::Root, path, &mut out);
    completeness(s, s, path, path, &mut out);
    out.sort_by_key(ToString::to_string);
    out
}

fn invariants(s: &JSONSchemaProps, lvl: Level, path: &str, out: &mut Vec<FieldError>) {
    let ty = type_of(s);
    let (int_or_string, preserve) = (
        flag(s.x_kubernetes_int_or_string),
        flag(s.x_kubernetes_preserve_unknown_fields),
    );
    let embedded = flag(s.x_kubernetes_embedded_resource);
    if ty == "array" && s.items.is_none() {
        out.push(required(&child(path, "items"), "must be specified"));
    }
    if let Some(item) = items(s) {
        invariants(item, Level::Item, &child(path, "items"), out);
    }
    for (k, p) in properties(s) {
        invariants(p, Level::Field, &key(&child(path, "properties"), k), out);
    }
    if let Some(extra) = &s.additional_properties {
        let at = child(path, "additionalProperties");
        if lvl == Level::Root {
            out.push(forbidden(&at, "must not be used at the root"));
        }
        if let JSONSchemaPropsOrBool::Schema(extra) = extra {
            invariants(extra, Level::Field, &at, out);
        }
    }
    if int_or_string && preserve {
        let at = child(path, "x-kubernetes-preserve-unknown-fields");
        out.push(invalid(
            &at,
            true,
            "must be false if x-kubernetes-int-or-string is true",
        ));
    }
    if int_or_string && embedded {
        let at = child(path, "x-kubernetes-embedded-resource");
        out.push(invalid(
            &at,
            true,
            "must be false if x-kubernetes-int-or-string is true",
        ));
    }
    value_validation(
        s,
        any_of_is_int_or_string(s),
        all_of_starts_int_or_string(s),
        lvl,
        path,
        out,
    );

    let type_at = child(path, "type");
    if embedded && ty != "object" {
        let detail = "must be object if x-kubernetes-embedded-resource is true";
        out.push(match ty {
            "" => required(&type_at, detail),
            _ => invalid(&type_at, ty, detail),
        });
    } else if ty.is_empty() && !int_or_string && !preserve {
        let detail = match lvl {
            Level::Root => "must not be empty at the root",
            Level::Item => "must not be empty for specified array items",
            Level::Field => "must not be empty for specified object fields",
        };
        out.push(required(&type_at, detail));
    }
    if embedded && s.additional_properties.is_some() {
        let detail = "must not be used if x-kubernetes-embedded-resource is set";
        out.push(forbidden(&child(path, "additionalProperties"), detail));
    }
    if lvl == Level::Root && !ty.is_empty() && ty != "object" {
        out.push(invalid(&type_at, ty, "must be object at the root"));
    }
    let check_metadata = lvl == Level::Root || embedded;
    let props = child(path, "properties");
    for name in ["kind", "apiVersion"] {
        if let Some(p) = property(s, name).filter(|_| check_metadata) {
            if type_of(p) != "string" {
                out.push(invalid(
                    &child(&key(&props, name), "type"),
                    type_of(p),
                    "must be string",
                ));
            }
        }
    }
    if let Some(meta) = property(s, "metadata") {
        metadata(meta, check_metadata, lvl, &key(&props, "metadata"), out);
    }
    if embedded && !preserve && s.properties.as_ref().is_none_or(|p| p.is_empty()) {
        let detail = "must not be empty if x-kubernetes-embedded-resource is true without \
                      x-kubernetes-preserve-unknown-fields";
        out.push(required(&props, detail));
    }
}

/// The root's `metadata` may restrict `name` and `generateName` only.
fn metadata(m: &JSONSchemaProps, check: bool, lvl: Level, path: &str, out: &mut Vec<FieldError>) {
    if check && type_of(m) != "object" {
        out.push(invalid(&child(path, "type"), type_of(m), "must be object"));
    }
    if lvl != Level::Root {
        return;
    }
    let names = m.properties.as_ref().map_or(0, |p| {
        usize::from(p.contains_key("name")) + usize::from(p.contains_key("generateName"))
    });
    let only_names = m
        .properties
        .as_ref()
        .is_some_and(|p| names > 0 && p.len() == names);
    // What is left once type, default and a name/generateName restriction are set aside
    // (externalDocs and example are not part of a structural schema).
    let rest = JSONSchemaProps {
        type_: None,
        default: None,
        properties: if only_names {
            None
        } else {
            m.properties.clone()
        },
        external_docs: None,
        example: None,
        ..m.clone()
    };
    if rest != JSONSchemaProps::default() {
        let detail = "must not specify anything other than name and generateName, but metadata \
                      is implicitly specified";
        out.push(forbidden(path, detail));
    }
}

fn only_type(s: &JSONSchemaProps, ty: &str) -> bool {
    let bare = JSONSchemaProps {
        external_docs: None,
        example: None,
        ..s.clone()
    };
    bare == JSONSchemaProps {
        type_: Some(ty.to_string()),
        ..JSONSchemaProps::default()
    }
}

/// `anyOf: [{type: integer}, {type: string}]`, the int-or-string shape allowed to set types.
fn int_or_string_pair(list: Option<&Vec<JSONSchemaProps>>) -> bool {
    list.is_some_and(|l| l.len() == 2 && only_type(&l[0], "integer") && only_type(&l[1], "string"))
}

fn any_of_is_int_or_string(s: &JSONSchemaProps) -> bool {
    int_or_string_pair(s.any_of.as_ref())
}

fn all_of_starts_int_or_string(s: &JSONSchemaProps) -> bool {
    let first = s.all_of.as_ref().and_then(|l| l.first());
    first.is_some_and(|f| int_or_string_pair(f.any_of.as_ref()))
}

/// The value validations of a node: what is under its allOf, anyOf, oneOf and not.
fn value_validation(
    s: &JSONSchemaProps,
    skip_any_of: bool,
    skip_first_all_of_any_of: bool,
    lvl: Level,
    path: &str,
    out: &mut Vec<FieldError>,
) {
    if !skip_any_of {
        for (i, n) in s.any_of.iter().flatten().enumerate() {
            nested(n, false, false, lvl, &index(&child(path, "anyOf"), i), out);
        }
    }
    for (i, n) in s.all_of.iter().flatten().enumerate() {
        let skip = skip_first_all_of_any_of && i == 0;
        nested(n, skip, false, lvl, &index(&child(path, "allOf"), i), out);
    }
    for (i, n) in s.one_of.iter().flatten().enumerate() {
        nested(n, false, false, lvl, &index(&child(path, "oneOf"), i), out);
    }
    if let Some(not) = &s.not {
        nested(not, false, false, lvl, &child(path, "not"), out);
    }
}

/// A schema under a junctor may only validate values: no types, defaults, docs or extensions.
fn nested(
    v: &JSONSchemaProps,
    skip_any_of: bool,
    skip_all_of_any_of: bool,
    lvl: Level,
    path: &str,
    out: &mut Vec<FieldError>,
) {
    value_validation(v, skip_any_of, skip_all_of_any_of, lvl, path, out);
    if let Some(item) = items(v) {
        nested(item, false, false, lvl, &child(path, "items"), out);
    }
    for (k, p) in properties(v) {
        nested(
            p,
            false,
            false,
            Level::Field,
            &key(&child(path, "properties"), k),
            out,
        );
    }
    let at = |name: &str| child(path, name);
    let empty = "must be empty to be structural";
    let undefined = "must be undefined to be structural";
    let not_true = "must be false to be structural";
    let forbidden_here = [
        ("type", v.type_.is_some(), empty),
        (
            "additionalProperties",
            v.additional_properties.is_some(),
            undefined,
        ),
        ("default", v.default.is_some(), undefined),
        ("title", v.title.is_some(), empty),
        ("description", v.description.is_some(), empty),
        ("nullable", flag(v.nullable), not_true),
        (
            "x-kubernetes-preserve-unknown-fields",
            flag(v.x_kubernetes_preserve_unknown_fields),
            not_true,
        ),
        (
            "x-kubernetes-embedded-resource",
            flag(v.x_kubernetes_embedded_resource),
            not_true,
        ),
        (
            "x-kubernetes-int-or-string",
            flag(v.x_kubernetes_int_or_string),
            not_true,
        ),
        (
            "x-kubernetes-list-map-keys",
            v.x_kubernetes_list_map_keys.is_some(),
            empty,
        ),
        (
            "x-kubernetes-list-type",
            v.x_kubernetes_list_type.is_some(),
            undefined,
        ),
        (
            "x-kubernetes-map-type",
            v.x_kubernetes_map_type.is_some(),
            undefined,
        ),
        (
            "x-kubernetes-validations",
            v.x_kubernetes_validations.is_some(),
            empty,
        ),
    ];
    for (name, set, detail) in forbidden_here {
        if set {
            out.push(forbidden(&at(name), detail));
        }
    }
    if property(v, "metadata").is_some() {
        let at = key(&child(path, "properties"), "metadata");
        out.push(forbidden(&at, "must not be specified in a nested context"));
    }
}

/// `validateStructuralCompleteness`: what the root's value validations name must be specified
/// structurally too.
fn completeness(
    v: &JSONSchemaProps,
    s: &JSONSchemaProps,
    s_path: &str,
    v_path: &str,
    out: &mut Vec<FieldError>,
) {
    let junctors = [
        ("allOf", &v.all_of),
        ("anyOf", &v.any_of),
        ("oneOf", &v.one_of),
    ];
    if let Some(not) = &v.not {
        nested_completeness(not, Some(s), s_path, &child(v_path, "not"), out);
    }
    for (name, list) in junctors {
        for (i, n) in list.iter().flatten().enumerate() {
            nested_completeness(n, Some(s), s_path, &index(&child(v_path, name), i), out);
        }
    }
}

fn nested_completeness(
    v: &JSONSchemaProps,
    s: Option<&JSONSchemaProps>,
    s_path: &str,
    v_path: &str,
    out: &mut Vec<FieldError>,
) {
    let Some(s) = s else {
        out.push(required(
            s_path,
            &format!("because it is defined in {v_path}"),
        ));
        return;
    };
    completeness(v, s, s_path, v_path, out);
    if let Some(item) = items(v) {
        let (sp, vp) = (child(s_path, "items"), child(v_path, "items"));
        nested_completeness(item, items(s), &sp, &vp, out);
    }
    for (k, p) in properties(v) {
        let sp = key(&child(s_path, "properties"), k);
        let vp = key(&child(v_path, "properties"), k);
        match property(s, k) {
            Some(sp_schema) => nested_completeness(p, Some(sp_schema), &sp, &vp, out),
            None => out.push(required(&sp, &format!("because it is defined in {vp}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn errors(v: Value) -> Vec<String> {
        let s: JSONSchemaProps = serde_json::from_value(v).unwrap();
        check(&s, "p").iter().map(ToString::to_string).collect()
    }

    #[test]
    fn every_node_needs_a_type_except_free_and_int_or_string_ones() {
        assert_eq!(
            errors(json!({"type": "object", "properties": {
                "a": {}, "b": {"x-kubernetes-int-or-string": true},
                "c": {"x-kubernetes-preserve-unknown-fields": true},
                "d": {"type": "array"}, "e": {"type": "array", "items": {}}
            }})),
            [
                "p.properties[a].type: Required value: must not be empty for specified object fields",
                "p.properties[d].items: Required value: must be specified",
                "p.properties[e].items.type: Required value: must not be empty for specified array items",
            ]
        );
        assert_eq!(
            errors(json!({"type": "string"})),
            ["p.type: Invalid value: \"string\": must be object at the root"]
        );
    }

    #[test]
    fn junctors_validate_values_only_except_int_or_string() {
        let ok = json!({"type": "object", "properties": {"x": {
            "x-kubernetes-int-or-string": true,
            "anyOf": [{"type": "integer"}, {"type": "string"}]
        }}});
        assert!(errors(ok).is_empty());
        assert_eq!(
            errors(
                json!({"type": "object", "properties": {"x": {"type": "object",
                "properties": {"a": {"type": "string"}},
                "oneOf": [{"type": "object", "description": "d", "required": ["a"]},
                          {"properties": {"b": {"minLength": 1}}}]}}})
            ),
            [
                "p.properties[x].oneOf[0].description: Forbidden: must be empty to be structural",
                "p.properties[x].oneOf[0].type: Forbidden: must be empty to be structural",
            ]
        );
        assert_eq!(
            errors(json!({"type": "object", "properties": {"a": {"type": "string"}},
                "anyOf": [{"properties": {"b": {"minLength": 1}}}]})),
            ["p.properties[b]: Required value: because it is defined in p.anyOf[0].properties[b]"]
        );
    }

    #[test]
    fn metadata_only_at_the_root_and_only_names() {
        let ok = json!({"type": "object", "properties": {"metadata": {"type": "object",
            "properties": {"name": {"type": "string", "maxLength": 10}}}}});
        assert!(errors(ok).is_empty());
        assert_eq!(
            errors(json!({"type": "object", "properties": {"metadata": {"type": "object",
                "properties": {"labels": {"type": "object"}}}}})),
            ["p.properties[metadata]: Forbidden: must not specify anything other than name and generateName, but metadata is implicitly specified"]
        );
        assert_eq!(
            errors(json!({"type": "object", "additionalProperties": {"type": "string"}})),
            ["p.additionalProperties: Forbidden: must not be used at the root"]
        );
    }

    #[test]
    fn unconvertible_schemas() {
        let s: JSONSchemaProps =
            serde_json::from_value(json!({"type": "object", "items": [{"type": "string"}]}))
                .unwrap();
        assert!(convertible(&s)
            .unwrap_err()
            .contains("'items' must be a schema"));
    }
}
