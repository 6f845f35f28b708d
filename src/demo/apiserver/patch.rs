//! Patches.

use super::*;

/// Applies a PATCH body by its content type. A strategic merge patch is taken as a merge
/// patch: lists are replaced rather than merged by key.
pub(super) fn apply_patch(
    current: &Value,
    content_type: &str,
    patch: &Value,
) -> Result<Value, ApiError> {
    let mut doc = current.clone();
    match content_type {
        "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
            merge_patch(&mut doc, patch)
        }
        "application/json-patch+json" => {
            let ops = patch
                .as_array()
                .ok_or_else(|| ApiError::bad_request("a JSON patch must be an array"))?;
            for op in ops {
                // The real server answers 422 when a JSON patch does not apply.
                json_patch_op(&mut doc, op).map_err(|e| ApiError::new(422, "Invalid", e))?;
            }
        }
        other => {
            let message = format!("the media type {other:?} is not implemented by this API server (no server-side apply)");
            return Err(ApiError::new(415, "UnsupportedMediaType", message));
        }
    }
    Ok(doc)
}

/// RFC 7386.
pub(super) fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    if let Value::Object(target) = target {
        for (key, value) in patch {
            if value.is_null() {
                target.remove(key);
            } else {
                merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

/// One RFC 6902 operation: add, remove, replace or test.
pub(super) fn json_patch_op(doc: &mut Value, op: &Value) -> Result<(), String> {
    let path = op["path"]
        .as_str()
        .ok_or("a JSON patch operation needs a \"path\"")?;
    let value = op
        .get("value")
        .cloned()
        .ok_or_else(|| format!("the operation on {path} needs a \"value\""));
    let missing = || format!("doc is missing path: {path:?}");
    match op["op"].as_str() {
        Some("add") => pointer_add(doc, path, value?).ok_or_else(missing),
        Some("remove") => pointer_remove(doc, path).map(drop).ok_or_else(missing),
        Some("replace") => {
            let value = value?;
            *doc.pointer_mut(path).ok_or_else(missing)? = value;
            Ok(())
        }
        Some("test") if doc.pointer(path) == Some(&value?) => Ok(()),
        Some("test") => Err(format!("testing value {path} failed")),
        other => Err(format!("JSON patch operation {other:?} is not implemented")),
    }
}

/// Splits a JSON pointer into its parent pointer and its last, unescaped, token.
pub(super) fn split_pointer(path: &str) -> Option<(&str, String)> {
    let (parent, last) = path.rsplit_once('/')?;
    Some((parent, last.replace("~1", "/").replace("~0", "~")))
}

pub(super) fn pointer_add(doc: &mut Value, path: &str, value: Value) -> Option<()> {
    if path.is_empty() {
        *doc = value;
        return Some(());
    }
    let (parent, last) = split_pointer(path)?;
    match doc.pointer_mut(parent)? {
        Value::Object(map) => drop(map.insert(last, value)),
        Value::Array(items) if last == "-" => items.push(value),
        Value::Array(items) => {
            let at = last.parse().ok().filter(|&i| i <= items.len())?;
            items.insert(at, value)
        }
        _ => return None,
    }
    Some(())
}

pub(super) fn pointer_remove(doc: &mut Value, path: &str) -> Option<Value> {
    let (parent, last) = split_pointer(path)?;
    match doc.pointer_mut(parent)? {
        Value::Object(map) => map.remove(&last),
        Value::Array(items) => {
            let at = last.parse().ok().filter(|&i| i < items.len())?;
            Some(items.remove(at))
        }
        _ => None,
    }
}
