//! The AsyncAPI 3 document of the WebSocket sessions (`docs/asyncapi.yaml`), generated
//! from the wire types: each variant of [`wire::DriverMessage`], [`wire::RiderMessage`]
//! and [`wire::ServerMessage`] becomes a message whose payload is that variant's schema
//! (utoipa's, as in the OpenAPI document), so a new variant or field reaches the document
//! by itself. What is written here by hand is only which server messages each role gets
//! ([`SERVER_TO`]), the descriptions, the `req`/`ack` correlation and the close codes.
//! `dispatchd asyncapi` prints it; a test fails when the committed file differs, and
//! `.ci/api.sh` validates it with the AsyncAPI CLI.

use serde_json::{Map, Value, json};
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::Schema;
use utoipa::{PartialSchema, ToSchema};

use crate::wire;

/// The server messages each role's session may receive, by `type`.
pub const SERVER_TO: [(&str, &[&str]); 2] = [
    (
        "driver",
        &[
            "welcome",
            "offer",
            "offer_expired",
            "trip_update",
            "ack",
            "error",
        ],
    ),
    (
        "rider",
        &[
            "welcome",
            "trip_update",
            "driver_location",
            "receipt",
            "ack",
            "error",
        ],
    ),
];

/// Close codes the server sends (docs/protocol.md, "WebSocket sessions").
const CLOSE_CODES: [(u16, &str); 6] = [
    (
        4001,
        "replaced: a newer session of the same driver or rider took over",
    ),
    (
        1008,
        "policy: too many bad messages, or a client that stopped reading",
    ),
    (
        1001,
        "going away: the server shuts down, or the client was silent for three ping intervals",
    ),
    (1011, "the session could not start"),
    (1009, "a message over the hard limit (2 MiB)"),
    (1007, "a text frame that is not UTF-8"),
];

/// Each variant of an internally tagged enum's schema, by its `type` value, in order.
fn variants<T: PartialSchema>() -> Vec<(String, Value)> {
    let schema = serde_json::to_value(T::schema()).expect("a schema serializes");
    let items = schema["oneOf"]
        .as_array()
        .expect("a tagged enum is a oneOf")
        .clone();
    items
        .into_iter()
        .map(|item| (tag_of(&item).expect("every variant has a `type` tag"), item))
        .collect()
}

/// The single `type` value a variant's schema allows (inside `allOf` for a newtype).
fn tag_of(v: &Value) -> Option<String> {
    if let Some(t) = v.pointer("/properties/type/enum/0").and_then(Value::as_str) {
        return Some(t.to_owned());
    }
    v.get("allOf")?.as_array()?.iter().find_map(tag_of)
}

/// Every schema the wire messages refer to, by name.
fn referenced() -> Map<String, Value> {
    let mut all: Vec<(String, RefOr<Schema>)> = Vec::new();
    <wire::DriverMessage as ToSchema>::schemas(&mut all);
    <wire::RiderMessage as ToSchema>::schemas(&mut all);
    <wire::ServerMessage as ToSchema>::schemas(&mut all);
    let mut out = Map::new();
    for (name, schema) in all {
        out.insert(
            name,
            serde_json::to_value(schema).expect("a schema serializes"),
        );
    }
    out
}

/// `req` as every client message may carry it.
fn with_req(mut payload: Value) -> Value {
    let req = json!({
        "type": ["integer", "null"], "format": "int64", "minimum": 0,
        "description": "Correlates the one reply (`ack`, `error`, or `trip_update` for `request_ride`) that carries the same `req`; null is the same as none"
    });
    if let Some(props) = payload.get_mut("properties").and_then(Value::as_object_mut) {
        props.insert("req".into(), req);
    } else if let Some(all) = payload.get_mut("allOf").and_then(Value::as_array_mut) {
        all.push(json!({"type": "object", "properties": {"req": req}}));
    }
    payload
}

/// What a client message's `req` is answered with.
fn reply_of(role: &str, t: &str) -> &'static str {
    match (role, t) {
        ("rider", "request_ride") => "trip_update",
        _ => "ack",
    }
}

/// The document as JSON.
pub fn document_json() -> Value {
    let mut schemas = referenced();
    let mut messages = Map::new();
    let mut channels = Map::new();
    let mut operations = Map::new();
    let server: Vec<(String, Value)> = variants::<wire::ServerMessage>();
    let correlation = json!({
        "description": "A client message's `req`, echoed in its one reply",
        "location": "$message.payload#/req"
    });
    for (role, client) in [
        ("driver", variants::<wire::DriverMessage>()),
        ("rider", variants::<wire::RiderMessage>()),
    ] {
        let mut channel_messages = Map::new();
        let mut sends = Vec::new();
        let mut receives = Vec::new();
        for (t, payload) in client {
            let name = format!("{role}_{t}");
            schemas.insert(name.clone(), with_req(payload));
            messages.insert(
                name.clone(),
                json!({
                    "name": t,
                    "title": format!("{role} → server: {t}"),
                    "summary": format!("With `req`, answered by one `{}` or `error` carrying it", reply_of(role, &t)),
                    "contentType": "application/json",
                    "correlationId": correlation,
                    "payload": {"$ref": format!("#/components/schemas/{name}")},
                }),
            );
            channel_messages.insert(
                name.clone(),
                json!({"$ref": format!("#/components/messages/{name}")}),
            );
            receives.push(json!({"$ref": format!("#/channels/{role}/messages/{name}")}));
        }
        let to = SERVER_TO
            .iter()
            .find(|(r, _)| *r == role)
            .map(|(_, ts)| *ts)
            .unwrap_or_default();
        for (t, payload) in server.iter().filter(|(t, _)| to.contains(&t.as_str())) {
            let name = format!("server_{t}");
            schemas.insert(name.clone(), payload.clone());
            let mut m = json!({
                "name": t,
                "title": format!("server → app: {t}"),
                "contentType": "application/json",
                "payload": {"$ref": format!("#/components/schemas/{name}")},
            });
            if ["ack", "error", "trip_update"].contains(&t.as_str()) {
                m["correlationId"] = correlation.clone();
            }
            messages.insert(name.clone(), m);
            channel_messages.insert(
                name.clone(),
                json!({"$ref": format!("#/components/messages/{name}")}),
            );
            sends.push(json!({"$ref": format!("#/channels/{role}/messages/{name}")}));
        }
        let close: Map<String, Value> = CLOSE_CODES
            .iter()
            .map(|(c, what)| (c.to_string(), json!(what)))
            .collect();
        channels.insert(
            role.to_owned(),
            json!({
                "address": format!("/v1/ws/{role}"),
                "title": format!("The {role} app's session"),
                "description": format!(
                    "One live session per {role}: the token comes in the `Authorization: Bearer` header or, for browsers, as `?token=`; a missing or unknown token is refused at the upgrade with 401, the other role's with 403. Text frames, one JSON object each, tagged by `type`. The server sends `welcome` first. A client message with `req` gets exactly one reply carrying the same `req`: `error` when it fails, the new trip's `trip_update` for `request_ride`, `ack` for every other message; without `req`, a reply only when it fails. Close codes the server sends are listed in `x-close-codes`."
                ),
                "messages": channel_messages,
                "bindings": {"ws": {
                    "method": "GET",
                    "query": {"type": "object", "properties": {"token": {"type": "string", "description": "The token, for browsers that cannot set a header"}}},
                    "bindingVersion": "0.1.0",
                }},
                "x-close-codes": close,
            }),
        );
        let channel = json!({"$ref": format!("#/channels/{role}")});
        operations.insert(
            format!("{role}Sends"),
            json!({
                "action": "receive",
                "title": format!("The {role} app sends"),
                "channel": channel,
                "messages": receives,
                "security": [{"$ref": format!("#/components/securitySchemes/{role}")}],
            }),
        );
        operations.insert(
            format!("{role}Receives"),
            json!({
                "action": "send",
                "title": format!("The {role} app receives"),
                "channel": channel,
                "messages": sends,
                "security": [{"$ref": format!("#/components/securitySchemes/{role}")}],
            }),
        );
    }
    json!({
        "asyncapi": "3.1.0",
        "info": {
            "title": "dispatchd WebSocket sessions",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The driver and rider apps' sessions with dispatchd. The contract in prose is docs/protocol.md; the REST routes are in openapi.json. Generated from transport/src/wire.rs by `dispatchd asyncapi`.",
            "license": {"name": "Apache-2.0"},
        },
        "defaultContentType": "application/json",
        "servers": {"local": {
            "host": "127.0.0.1:8080",
            "protocol": "ws",
            "description": "dispatchd's default --listen address",
        }},
        "channels": channels,
        "operations": operations,
        "components": {
            "schemas": schemas,
            "messages": messages,
            "securitySchemes": {
                "driver": {"type": "http", "scheme": "bearer", "description": "A driver's token, from POST /v1/drivers"},
                "rider": {"type": "http", "scheme": "bearer", "description": "A rider's token, from POST /v1/riders"},
            },
        },
    })
}

/// The document as `docs/asyncapi.yaml` holds it.
pub fn document() -> String {
    let mut out = String::from(
        "# Generated by `dispatchd asyncapi` from transport/src/wire.rs: do not edit.\n",
    );
    yaml(&document_json(), 0, &mut out);
    out
}

/// Block-style YAML of a JSON value. Strings and keys that are not plain words are written
/// as JSON strings, which YAML reads as double-quoted scalars with the same escapes.
fn yaml(v: &Value, indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, x) in m {
                out.push_str(&pad);
                out.push_str(&key(k));
                out.push(':');
                nested(x, indent, out);
            }
        }
        Value::Array(a) if !a.is_empty() => {
            for x in a {
                out.push_str(&pad);
                out.push('-');
                nested(x, indent, out);
            }
        }
        _ => {
            out.push_str(&pad);
            out.push_str(&scalar(v));
            out.push('\n');
        }
    }
}

/// What follows `key:` or `-`: a scalar on the same line, or a block below it.
fn nested(x: &Value, indent: usize, out: &mut String) {
    let block = match x {
        Value::Object(m) => !m.is_empty(),
        Value::Array(a) => !a.is_empty(),
        _ => false,
    };
    if block {
        out.push('\n');
        yaml(x, indent + 2, out);
    } else {
        out.push(' ');
        out.push_str(&scalar(x));
        out.push('\n');
    }
}

fn scalar(v: &Value) -> String {
    match v {
        Value::Object(_) => "{}".into(),
        Value::Array(_) => "[]".into(),
        Value::String(s) => Value::String(s.clone()).to_string(),
        other => other.to_string(),
    }
}

fn key(k: &str) -> String {
    let plain = k.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        && !matches!(
            k.to_ascii_lowercase().as_str(),
            "true" | "false" | "null" | "yes" | "no" | "on" | "off" | "y" | "n"
        );
    if plain {
        k.to_owned()
    } else {
        Value::String(k.to_owned()).to_string()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// `docs/asyncapi.yaml` is what the code generates. `DISPATCH_BLESS=1` rewrites it.
    #[test]
    fn the_committed_asyncapi_document_is_what_the_code_generates() {
        crate::server::openapi::assert_committed("asyncapi.yaml", "asyncapi", &document());
    }

    /// Every wire message type is a message of its role's channel, with a payload whose
    /// properties are the fields the wire type serializes.
    #[test]
    fn every_wire_message_type_is_in_the_document() {
        let doc = document_json();
        let in_channel = |role: &str, name: &str| {
            doc["channels"][role]["messages"]
                .as_object()
                .unwrap()
                .contains_key(name)
        };
        for t in wire::DriverMessage::TYPES {
            assert!(in_channel("driver", &format!("driver_{t}")), "driver {t}");
        }
        for t in wire::RiderMessage::TYPES {
            assert!(in_channel("rider", &format!("rider_{t}")), "rider {t}");
        }
        let server: BTreeSet<String> = variants::<wire::ServerMessage>()
            .into_iter()
            .map(|(t, _)| t)
            .collect();
        let placed: BTreeSet<String> = SERVER_TO
            .iter()
            .flat_map(|(_, ts)| ts.iter().map(|t| t.to_string()))
            .collect();
        assert_eq!(
            server, placed,
            "every server message goes to some role, and only real ones"
        );
        for (role, ts) in SERVER_TO {
            for t in ts {
                assert!(in_channel(role, &format!("server_{t}")), "{role} gets {t}");
            }
        }
        // Field names: a serialized message's keys are properties of its payload schema.
        let fields_are_properties = |schema: &str, message: Value| {
            let props = &doc["components"]["schemas"][schema]["properties"];
            for k in message.as_object().unwrap().keys() {
                assert!(props.get(k).is_some(), "{schema}: field {k}");
            }
        };
        let receipt = wire::ServerMessage::Receipt {
            trip_id: "trp_1".into(),
            fare_cents: 1,
            currency: "USD".into(),
            distance_m: 1,
            duration_s: 1,
            surge: 1.0,
        };
        fields_are_properties("server_receipt", serde_json::to_value(&receipt).unwrap());
        let location = wire::DriverMessage::Location {
            lat: 1.0,
            lng: 1.0,
            heading: Some(1.0),
            speed_mps: Some(1.0),
            ts: 1,
        };
        fields_are_properties("driver_location", serde_json::to_value(&location).unwrap());
        let props = &doc["components"]["schemas"]["driver_location"]["properties"];
        assert!(props.get("req").is_some());
    }
}
