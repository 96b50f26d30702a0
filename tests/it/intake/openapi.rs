//! The answers' shapes, checked against docs/intake-openapi.yaml with a JSON Schema validator
//! (OpenAPI 3.1 schemas are draft 2020-12), each in the context of the whole description so
//! that its `#/components/schemas/…` references resolve.

use std::sync::OnceLock;

use serde_json::{Value, json};

use crate::common::schema::Validator;

fn spec() -> &'static Value {
    static SPEC: OnceLock<Value> = OnceLock::new();
    SPEC.get_or_init(|| {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/intake-openapi.yaml");
        let text = std::fs::read_to_string(path).expect("the OpenAPI description");
        serde_norway::from_str(&text).expect("the OpenAPI description is YAML")
    })
}

/// Panics unless `status` is documented for POST /v1/requests and `body` fits its schema.
pub fn conforms(status: u16, body: &Value) {
    let spec = spec();
    assert_eq!(spec["openapi"], "3.1.0");
    let response = &spec["paths"]["/v1/requests"]["post"]["responses"][status.to_string()];
    assert!(response.is_object(), "status {status} is not documented");
    let schema = &response["content"]["application/json"]["schema"];
    if let Err(e) = check(schema, body) {
        panic!("a {status} answer does not fit the OpenAPI description: {e}\n{body}");
    }
}

fn check(schema: &Value, v: &Value) -> Result<(), String> {
    let rooted = json!({"components": spec()["components"], "allOf": [schema]});
    let errors = Validator::new(rooted)?.errors(v);
    match errors.is_empty() {
        true => Ok(()),
        false => Err(errors.join("; ")),
    }
}

#[test]
fn the_validator_refuses_what_does_not_fit() {
    let errors = |v: Value| check(&json!({"$ref": "#/components/schemas/Errors"}), &v);
    assert!(errors(json!({"errors": [{"line": 2, "field": null, "message": "m"}]})).is_ok());
    assert!(errors(json!({"errors": []})).is_err());
    assert!(errors(json!({"errors": [{"line": "2", "field": null, "message": "m"}]})).is_err());
    assert!(errors(json!({"errors": [{"line": 0, "field": null, "message": "m"}]})).is_err());
    assert!(errors(json!({"errors": [{"field": null, "message": "m"}]})).is_err());
    assert!(errors(json!({"errors": [], "extra": 1})).is_err());
    let accepted = json!({"$ref": "#/components/schemas/Accepted"});
    assert!(check(&accepted, &json!({"accepted": 1, "request_ids": ["a"]})).is_ok());
    assert!(check(&accepted, &json!({"accepted": 1})).is_err());
}
