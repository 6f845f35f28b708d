//! Validation of a value against an OpenAPI v3 schema, as kube-openapi's `SchemaValidator`
//! does it for custom resources (and for the defaults of a CRD), with its messages (`spec.instances
//! in body should be greater than or equal to 1`) turned into `field.Error`s as
//! apiextensions-apiserver turns them (`kubeOpenAPIResultToFieldErrors`).
//!
//! Not checked: `pattern` (no regular expression engine here), string `format`s, and CEL
//! `x-kubernetes-validations`; see docs/ARCHITECTURE.md.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    JSONSchemaProps, JSONSchemaPropsOrBool,
};
use serde_json::{json, Value};

use super::{
    additional, child, flag, go_float, go_quote, invalid, items, not_supported, properties,
    property, required, too_long, too_many, type_invalid, type_of, FieldError,
};

/// One kube-openapi error: its name is the kube-openapi path (`spec.instances`, `.spec` for a
/// required root field, empty for the root or a composite error).
struct OpenApiError {
    name: String,
    code: Code,
    value: Option<Value>,
    message: String,
}

enum Code {
    Type,
    Required,
    Enum(Vec<Value>),
    TooLong(i64),
    MaxItems(i64, i64),
    TooManyProperties(i64),
    Other,
}

/// Validates `value` against `schema`; errors name fields under `base` (None for an object
/// itself: kube-openapi's paths are then the fields, as for a custom resource).
pub(crate) fn validate(
    base: Option<&str>,
    value: &Value,
    schema: &JSONSchemaProps,
) -> Vec<FieldError> {
    let mut found = Vec::new();
    node("", value, schema, &mut found);
    found.into_iter().map(|e| convert(base, e)).collect()
}

fn convert(base: Option<&str>, e: OpenApiError) -> FieldError {
    let name = e.name.trim_start_matches('.');
    let field = match (base, name) {
        (None, "") => "<nil>".to_string(), // a nil field.Path, as printed
        (Some(base), "") => base.to_string(),
        (base, name) => child(base.unwrap_or(""), name),
    };
    let value = e.value.unwrap_or_else(|| json!(""));
    match e.code {
        Code::Required => required(&field, ""),
        Code::Enum(values) => {
            let values: Vec<String> = values
                .iter()
                .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
                .collect();
            let values: Vec<&str> = values.iter().map(String::as_str).collect();
            not_supported(&field, value, &values)
        }
        Code::TooLong(max) => too_long(&field, value, max),
        Code::MaxItems(actual, max) => too_many(&field, actual, max),
        // kube-openapi carries the limit where the count is expected: printed as Go does.
        Code::TooManyProperties(limit) => too_many(&field, limit, -1),
        Code::Type => type_invalid(&field, value, &e.message),
        Code::Other => invalid(&field, value, &e.message),
    }
}

fn err(out: &mut Vec<OpenApiError>, name: &str, code: Code, value: Option<Value>, message: String) {
    let name = name.to_string();
    out.push(OpenApiError {
        name,
        code,
        value,
        message,
    });
}

fn property_path(path: &str, name: &str) -> String {
    match path {
        "" => name.to_string(),
        _ => format!("{path}.{name}"),
    }
}

/// The format kube-openapi keeps: apiextensions strips those it does not support.
fn effective_format(s: &JSONSchemaProps) -> &str {
    let format = s.format.as_deref().unwrap_or("");
    let kept = match type_of(s) {
        "integer" => matches!(format, "int32" | "int64"),
        "number" => matches!(format, "float" | "double"),
        "" | "string" => STRING_FORMATS.contains(&format.replace('-', "").as_str()),
        _ => false,
    };
    if kept && !flag(s.x_kubernetes_int_or_string) {
        format
    } else {
        ""
    }
}

const STRING_FORMATS: &[&str] = &[
    "bsonobjectid",
    "uri",
    "email",
    "hostname",
    "ipv4",
    "ipv6",
    "cidr",
    "mac",
    "uuid",
    "uuid3",
    "uuid4",
    "uuid5",
    "isbn",
    "isbn10",
    "isbn13",
    "creditcard",
    "ssn",
    "hexcolor",
    "rgbcolor",
    "byte",
    "password",
    "date",
    "duration",
    "datetime",
    "quantity",
];

fn types(s: &JSONSchemaProps) -> Vec<&str> {
    match (flag(s.x_kubernetes_int_or_string), type_of(s)) {
        (true, _) => vec!["integer", "string"],
        (false, "") => vec![],
        (false, t) => vec![t],
    }
}

/// The JSON type and Go format kube-openapi infers for decoded data.
fn data_type(x: &Value) -> (&'static str, &'static str) {
    match x {
        Value::Bool(_) => ("boolean", ""),
        Value::String(_) => ("string", ""),
        Value::Number(n) if n.is_i64() || n.is_u64() => ("integer", "int64"),
        Value::Number(_) => ("number", "float64"),
        Value::Array(_) => ("array", ""),
        Value::Object(_) => ("object", ""),
        Value::Null => ("null", ""),
    }
}

/// `swag.IsFloat64AJSONInteger`.
fn whole(f: f64) -> bool {
    f.is_finite() && f.fract() == 0.0 && f.abs() <= 9_007_199_254_740_992.0
}

fn node(path: &str, x: &Value, s: &JSONSchemaProps, out: &mut Vec<OpenApiError>) {
    let types = types(s);
    if x.is_null() {
        if !types.is_empty() && !flag(s.nullable) {
            let message = format!(
                "{path} in body must be of type {}: \"null\"",
                types.join(",")
            );
            err(out, path, Code::Type, Some(json!("null")), message);
        }
        enumeration(path, x, s, out);
        return;
    }
    let format = effective_format(s);
    if !types.is_empty() || !format.is_empty() {
        type_check(path, x, &types, format, out);
    }
    combinators(path, x, s, out);
    match x {
        Value::String(text) => string(path, text, s, out),
        Value::Number(n) => number(path, n, s, out),
        Value::Array(list) => array(path, list, s, out),
        _ => {}
    }
    enumeration(path, x, s, out);
    if let Value::Object(map) = x {
        object(path, map, s, out);
    }
}

fn type_check(path: &str, x: &Value, types: &[&str], format: &str, out: &mut Vec<OpenApiError>) {
    let (json_type, data_format) = data_type(x);
    let has = |t: &str| types.contains(&t);
    let float_int = json_type == "number" && x.as_f64().is_some_and(whole) && has("integer");
    let int_float = json_type == "integer" && has("number");
    let stringy = matches!(x, Value::String(_) | Value::Array(_));
    let fits = has(json_type) || float_int || int_float;
    let (formatted, numeric) = (!format.is_empty(), has("number") || has("integer"));
    // A format names the type a mismatch is reported against, except for strings and lists.
    if formatted && !stringy && !fits && data_format != format {
        let message = format!(
            "{path} in body must be of type {format}: {}",
            go_quote(data_format)
        );
        return err(out, path, Code::Type, Some(json!(data_format)), message);
    }
    if formatted && stringy && !numeric {
        return;
    }
    if !fits {
        let expected = types.join(",");
        let message = format!(
            "{path} in body must be of type {expected}: {}",
            go_quote(json_type)
        );
        err(out, path, Code::Type, Some(json!(json_type)), message);
    }
}

/// allOf, anyOf, oneOf and not, with kube-openapi's composite messages (which name no field).
fn combinators(path: &str, x: &Value, s: &JSONSchemaProps, out: &mut Vec<OpenApiError>) {
    let run = |sub: &JSONSchemaProps| {
        let mut found = Vec::new();
        node(path, x, sub, &mut found);
        found
    };
    let quoted = go_quote(path);
    if let Some(any_of) = s.any_of.as_ref().filter(|l| !l.is_empty()) {
        let results: Vec<Vec<OpenApiError>> = any_of.iter().map(run).collect();
        if !results.iter().any(Vec::is_empty) {
            let message = format!("{quoted} must validate at least one schema (anyOf)");
            err(out, "", Code::Other, None, message);
            out.extend(results.into_iter().min_by_key(Vec::len).unwrap_or_default());
        }
    }
    if let Some(one_of) = s.one_of.as_ref().filter(|l| !l.is_empty()) {
        let results: Vec<Vec<OpenApiError>> = one_of.iter().map(run).collect();
        let valid = results.iter().filter(|r| r.is_empty()).count();
        if valid != 1 {
            let why = match valid {
                0 => "Found none valid".to_string(),
                n => format!("Found {n} valid alternatives"),
            };
            let message = format!("{quoted} must validate one and only one schema (oneOf). {why}");
            err(out, "", Code::Other, None, message);
            if valid == 0 {
                out.extend(results.into_iter().min_by_key(Vec::len).unwrap_or_default());
            }
        }
    }
    if let Some(all_of) = s.all_of.as_ref().filter(|l| !l.is_empty()) {
        let results: Vec<Vec<OpenApiError>> = all_of.iter().map(run).collect();
        let valid = results.iter().filter(|r| r.is_empty()).count();
        out.extend(results.into_iter().flatten());
        if valid != all_of.len() {
            let none = if valid == 0 { ". None validated" } else { "" };
            let message = format!("{quoted} must validate all the schemas (allOf){none}");
            err(out, "", Code::Other, None, message);
        }
    }
    if let Some(not) = &s.not {
        if run(not).is_empty() {
            let message = format!("{quoted} must not validate the schema (not)");
            err(out, "", Code::Other, None, message);
        }
    }
}

fn string(path: &str, text: &str, s: &JSONSchemaProps, out: &mut Vec<OpenApiError>) {
    let length = text.chars().count() as i64;
    let value = Some(json!(text));
    if let Some(max) = s.max_length.filter(|&max| length > max) {
        let message = format!("{path} in body should be at most {max} chars long");
        return err(out, path, Code::TooLong(max), value, message);
    }
    if let Some(min) = s.min_length.filter(|&min| length < min) {
        let message = format!("{path} in body should be at least {min} chars long");
        err(out, path, Code::Other, value, message);
    }
}

/// multipleOf, maximum, minimum; an integer is compared with the bound truncated, as
/// kube-openapi does.
fn number(path: &str, n: &serde_json::Number, s: &JSONSchemaProps, out: &mut Vec<OpenApiError>) {
    let int = n.as_i64().filter(|_| !n.is_f64());
    let f = n.as_f64().unwrap_or(0.0);
    let value = Some(Value::Number(n.clone()));
    let bound = |b: f64| match int {
        Some(_) => (b.trunc() as i64).to_string(),
        None => go_float(b),
    };
    if let Some(factor) = s.multiple_of {
        let fails = match int {
            Some(i) => (factor.trunc() as i64) != 0 && i % (factor.trunc() as i64) != 0,
            None => !whole(if factor < 1.0 {
                1.0 / factor * f
            } else {
                f / factor
            }),
        };
        if fails {
            let message = format!("{path} in body should be a multiple of {}", bound(factor));
            err(out, path, Code::Other, value.clone(), message);
        }
    }
    let below = |b: f64, exclusive: bool| match int {
        Some(i) => i > b.trunc() as i64 || (exclusive && i == b.trunc() as i64),
        None => f > b || (exclusive && f == b),
    };
    if let Some(max) = s.maximum {
        let exclusive = flag(s.exclusive_maximum);
        if below(max, exclusive) {
            let relation = if exclusive {
                "less than"
            } else {
                "less than or equal to"
            };
            let message = format!("{path} in body should be {relation} {}", bound(max));
            err(out, path, Code::Other, value.clone(), message);
        }
    }
    if let Some(min) = s.minimum {
        let exclusive = flag(s.exclusive_minimum);
        let above = match int {
            Some(i) => i < min.trunc() as i64 || (exclusive && i == min.trunc() as i64),
            None => f < min || (exclusive && f == min),
        };
        if above {
            let relation = if exclusive {
                "greater than"
            } else {
                "greater than or equal to"
            };
            let message = format!("{path} in body should be {relation} {}", bound(min));
            err(out, path, Code::Other, value, message);
        }
    }
}

fn array(path: &str, list: &[Value], s: &JSONSchemaProps, out: &mut Vec<OpenApiError>) {
    let size = list.len() as i64;
    if let Some(min) = s.min_items.filter(|&min| size < min) {
        let message = format!("{path} in body should have at least {min} items");
        err(out, path, Code::Other, Some(json!(size)), message);
    }
    if let Some(max) = s.max_items.filter(|&max| size > max) {
        let message = format!("{path} in body should have at most {max} items");
        err(
            out,
            path,
            Code::MaxItems(size, max),
            Some(json!(size)),
            message,
        );
    }
    if flag(s.unique_items) && list.iter().enumerate().any(|(i, v)| list[..i].contains(v)) {
        let message = format!("{path} in body shouldn't contain duplicates");
        err(out, path, Code::Other, None, message);
    }
    if let Some(item) = items(s) {
        for (i, v) in list.iter().enumerate() {
            node(&format!("{path}[{i}]"), v, item, out);
        }
    }
}

/// Equality as kube-openapi's enum check has it: numbers by value.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        _ => a == b,
    }
}

fn enumeration(path: &str, x: &Value, s: &JSONSchemaProps, out: &mut Vec<OpenApiError>) {
    let Some(values) = s.enum_.as_ref().filter(|v| !v.is_empty()) else {
        return;
    };
    let values: Vec<Value> = values.iter().map(|v| v.0.clone()).collect();
    // A null is never in an enum for kube-openapi, not even next to `null` and `nullable`.
    if !x.is_null() && values.iter().any(|v| !v.is_null() && same(x, v)) {
        return;
    }
    let listed: Vec<String> = values.iter().map(go_enum_value).collect();
    let message = format!("{path} in body should be one of [{}]", listed.join(" "));
    err(out, path, Code::Enum(values), Some(x.clone()), message);
}

/// An enum value as Go's `%v` prints it inside a list.
fn go_enum_value(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "<nil>".to_string(),
        other => super::go_value(other),
    }
}

fn object(
    path: &str,
    map: &serde_json::Map<String, Value>,
    s: &JSONSchemaProps,
    out: &mut Vec<OpenApiError>,
) {
    let count = map.len() as i64;
    if let Some(min) = s.min_properties.filter(|&min| count < min) {
        let message = format!("{path} in body should have at least {min} properties");
        return err(out, path, Code::Other, Some(json!(min)), message);
    }
    if let Some(max) = s.max_properties.filter(|&max| count > max) {
        let message = format!("{path} in body should have at most {max} properties");
        let code = Code::TooManyProperties(max);
        return err(out, path, code, Some(json!(max)), message);
    }
    let known = |k: &str| property(s, k).is_some();
    match &s.additional_properties {
        Some(JSONSchemaPropsOrBool::Bool(false)) => {
            for k in map.keys().filter(|k| !known(k)) {
                let message = format!("{path}.{k} in body is a forbidden property");
                err(out, path, Code::Other, Some(json!(k)), message);
            }
        }
        _ => {
            if let Some(extra) = additional(s) {
                for (k, v) in map.iter().filter(|(k, _)| !known(k)) {
                    node(&format!("{path}.{k}"), v, extra, out);
                }
            }
        }
    }
    for (name, prop) in properties(s) {
        if let Some(v) = map.get(name) {
            node(&property_path(path, name), v, prop, out);
        }
    }
    for name in s.required.iter().flatten() {
        if !map.contains_key(name) {
            let message = format!("{path}.{name} in body is required");
            err(
                out,
                &format!("{path}.{name}"),
                Code::Required,
                None,
                message,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::schema;
    use super::*;

    fn messages(value: Value, s: &JSONSchemaProps) -> Vec<String> {
        validate(None, &value, s)
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn constraints_are_worded_as_kube_openapi_words_them() {
        let s = schema(json!({
            "type": "object",
            "required": ["spec"],
            "properties": {"spec": {"type": "object", "required": ["secrets"], "properties": {
                "instances": {"type": "integer", "format": "uint32", "minimum": 1.0, "maximum": 16.0},
                "mode": {"type": "string", "enum": ["off", "quorum"]},
                "name": {"type": "string", "maxLength": 3, "minLength": 1},
                "ratio": {"type": "number", "exclusiveMaximum": true, "maximum": 1.5},
                "params": {"type": "object", "additionalProperties": {"x-kubernetes-int-or-string": true}},
                "list": {"type": "array", "maxItems": 1, "items": {"type": "string"}},
                "secrets": {"type": "object"}
            }}}
        }));
        assert_eq!(messages(json!({}), &s), ["spec: Required value"]);
        let bad = json!({"spec": {
            "instances": 0, "mode": "on", "name": "long", "ratio": 1.5,
            "params": {"a": 1, "b": "x", "c": true}, "list": ["a", 2]
        }});
        assert_eq!(
            messages(bad, &s),
            [
                "spec.instances: Invalid value: 0: spec.instances in body should be greater than or equal to 1",
                "spec.list: Too many: 2: must have at most 1 items",
                "spec.list[1]: Invalid value: \"integer\": spec.list[1] in body must be of type string: \"integer\"",
                "spec.mode: Unsupported value: \"on\": supported values: \"off\", \"quorum\"",
                "spec.name: Too long: may not be more than 3 bytes",
                "spec.params.c: Invalid value: \"boolean\": spec.params.c in body must be of type integer,string: \"boolean\"",
                "spec.ratio: Invalid value: 1.5: spec.ratio in body should be less than 1.5",
                "spec.secrets: Required value",
            ]
        );
        let wrong = json!({"spec": {"instances": "three", "secrets": {}}});
        assert_eq!(
            messages(wrong, &s),
            ["spec.instances: Invalid value: \"string\": spec.instances in body must be of type integer: \"string\""]
        );
        // A whole float is an integer; 2.0 passes, 20.0 is out of range as a float.
        let floats = json!({"spec": {"instances": 20.0, "secrets": {}}});
        assert_eq!(
            messages(floats, &s),
            ["spec.instances: Invalid value: 20: spec.instances in body should be less than or equal to 16"]
        );
    }

    #[test]
    fn nulls_and_composites() {
        let s = schema(json!({"type": "object", "properties": {
            "n": {"type": "string", "nullable": true, "enum": ["a", null]},
            "m": {"type": "integer"},
            "o": {"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": true}
        }}));
        assert_eq!(
            messages(json!({"n": null, "m": null, "o": 1}), &s),
            [
                "m: Invalid value: \"null\": m in body must be of type integer: \"null\"",
                "n: Unsupported value: \"null\": supported values: \"a\", \"null\"",
            ]
        );
        let s = schema(json!({"type": "object", "properties": {
            "x": {"type": "object", "oneOf": [{"required": ["a"]}, {"required": ["b"]}]}
        }}));
        assert_eq!(
            messages(json!({"x": {"a": 1, "b": 2}}), &s),
            ["<nil>: Invalid value: \"\": \"x\" must validate one and only one schema (oneOf). Found 2 valid alternatives"]
        );
    }
}
