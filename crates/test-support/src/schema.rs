//! JSON Schema validation (draft 2020-12, formats such as `date-time` asserted) for the
//! contract's schemas in `docs/schemas/` and the intake's OpenAPI description.

use serde_json::Value;

/// Where the schema under test lives, as far as its own `$ref`s are concerned.
const LOCATION: &str = "file:///schema-under-test.json";

/// One compiled schema.
pub struct Validator {
    schemas: boon::Schemas,
    index: boon::SchemaIndex,
}

impl Validator {
    /// Compiles `schema`, which must itself be valid against the draft 2020-12 meta-schema.
    pub fn new(schema: Value) -> Result<Validator, String> {
        let mut compiler = boon::Compiler::new();
        compiler.set_default_draft(boon::Draft::V2020_12);
        compiler.enable_format_assertions();
        compiler
            .add_resource(LOCATION, schema)
            .map_err(|e| format!("{e:#}"))?;
        let mut schemas = boon::Schemas::new();
        let index = compiler
            .compile(LOCATION, &mut schemas)
            .map_err(|e| format!("{e:#}"))?;
        Ok(Validator { schemas, index })
    }

    pub fn is_valid(&self, instance: &Value) -> bool {
        self.schemas.validate(instance, self.index).is_ok()
    }

    /// Why `instance` does not fit, one entry per failing place in it; empty if it fits.
    pub fn errors(&self, instance: &Value) -> Vec<String> {
        let Err(error) = self.schemas.validate(instance, self.index) else {
            return Vec::new();
        };
        match error.basic_output().error {
            boon::OutputError::Branch(units) => units.iter().map(describe).collect(),
            boon::OutputError::Leaf(kind) => vec![format!("{}: {kind}", error.instance_location)],
        }
    }
}

/// One unit of boon's "basic" output: where in the instance, and what is wrong there.
fn describe(unit: &boon::OutputUnit) -> String {
    match &unit.error {
        boon::OutputError::Leaf(kind) => format!("{}: {kind}", unit.instance_location),
        boon::OutputError::Branch(units) => {
            units.iter().map(describe).collect::<Vec<_>>().join("; ")
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn refuses_what_does_not_fit_and_names_where() {
        let schema = json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "type": "object",
            "required": ["at"],
            "properties": {"at": {"type": "string", "format": "date-time"}}
        });
        let validator = Validator::new(schema).unwrap();
        assert!(validator.is_valid(&json!({"at": "2026-12-01T08:00:00Z"})));
        assert!(
            validator
                .errors(&json!({"at": "2026-12-01T08:00:00Z"}))
                .is_empty()
        );
        let errors = validator.errors(&json!({"at": "yesterday"}));
        assert!(errors.iter().any(|e| e.starts_with("/at: ")), "{errors:?}");
        assert!(!validator.is_valid(&json!({})));
    }

    #[test]
    fn refuses_a_schema_the_meta_schema_refuses() {
        assert!(Validator::new(json!({"type": "no-such-type"})).is_err());
    }
}
