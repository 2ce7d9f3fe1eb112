//! The reference binding's JSON documents: the handshake's `HelloMessage`, the
//! JSON fallback's `JSONMessage`, and the `{"success": …}` answers.

use std::collections::BTreeMap;

use avp_wire::ModelIdentity;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{AVP_VERSION, IMPLEMENTATION};

fn avp_version() -> String {
    AVP_VERSION.to_owned()
}

/// `HelloMessage`: who an agent is. Missing fields take the reference's
/// defaults; `identity` is left out when there is none.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct Hello {
    #[serde(default)]
    pub(crate) agent_id: String,
    #[serde(default = "avp_version")]
    pub(crate) avp_version: String,
    #[serde(default)]
    pub(crate) capabilities: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) identity: Option<ModelIdentity>,
}

/// The capabilities avp announces: its name, and the wire formats it reads
/// (the first is preferred).
pub(crate) fn capabilities() -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("implementation".into(), IMPLEMENTATION.into());
    m.insert("version".into(), env!("CARGO_PKG_VERSION").into());
    m.insert("wire_formats".into(), serde_json::json!(["v2", "v1"]));
    m
}

/// Whether `capabilities` say the peer reads the v2 format.
pub(crate) fn reads_v2(capabilities: &Map<String, Value>) -> bool {
    capabilities
        .get("wire_formats")
        .and_then(Value::as_array)
        .is_some_and(|f| f.iter().any(|v| v.as_str() == Some("v2")))
}

/// `JSONMessage`: the reference's JSON fallback. `extra` is left out when empty.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct JsonMessage {
    #[serde(default = "avp_version")]
    pub(crate) avp_version: String,
    #[serde(default)]
    pub(crate) session_id: String,
    #[serde(default)]
    pub(crate) source_agent_id: String,
    #[serde(default)]
    pub(crate) target_agent_id: String,
    #[serde(default)]
    pub(crate) content: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) extra: BTreeMap<String, Value>,
}

/// `{"success": true, …fields}`.
pub(crate) fn ok(fields: Value) -> Value {
    let mut m = Map::new();
    m.insert("success".into(), true.into());
    if let Value::Object(f) = fields {
        m.extend(f);
    }
    Value::Object(m)
}

/// `{"success": false, "message": …}`, the reference's error shape.
pub(crate) fn error(message: impl Into<String>) -> Value {
    serde_json::json!({"success": false, "message": message.into()})
}

/// The `message` (or FastAPI's `detail`) of an error answer, else the body as text.
pub(crate) fn error_message(body: &[u8]) -> String {
    match serde_json::from_slice::<Value>(body) {
        Ok(v) => match v.get("message").or_else(|| v.get("detail")) {
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => v.to_string(),
        },
        Err(_) => String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_take_the_reference_defaults_and_shapes() {
        let h: Hello = serde_json::from_str(r#"{"agent_id":"a"}"#).unwrap();
        assert_eq!(h.avp_version, AVP_VERSION);
        assert!(h.identity.is_none() && h.capabilities.is_empty());
        let j = serde_json::to_value(&h).unwrap();
        assert!(j.get("identity").is_none(), "{j}");
        let m: JsonMessage = serde_json::from_str(r#"{"content":"hi"}"#).unwrap();
        assert_eq!(m.content, "hi");
        assert!(
            serde_json::to_value(&m).unwrap().get("extra").is_none(),
            "extra is left out when empty"
        );
        assert!(reads_v2(&capabilities()));
        assert!(!reads_v2(&Map::new()));
        assert_eq!(
            ok(serde_json::json!({"session_id": "s"})),
            serde_json::json!({"success": true, "session_id": "s"})
        );
        assert_eq!(error_message(br#"{"success":false,"message":"no"}"#), "no");
        assert_eq!(error_message(br#"{"detail":"Not Found"}"#), "Not Found");
        assert_eq!(error_message(b"plain"), "plain");
    }
}
