//! Keeps `docs/openapi.yaml` in sync with the code: the documented routes are exactly the served
//! ones, every operation documents its answers and errors, every example fits its schema, and the
//! real server answers every documented example request with a body that fits the spec.

mod common;

use std::collections::BTreeSet;

use common::http::{method, send, Answer};
use common::{Server, Topology, Ws};
use presence_service::api::{BASE, ROUTES};
use serde_json::{json, Value};

const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "patch", "head", "options", "trace",
];

// ---------------------------------------------------------------------------------------------
// The spec and a small schema checker (the OpenAPI 3.0 subset the spec uses).

struct Spec {
    root: Value,
}

/// One operation: path, upper-case method, the operation object.
struct Op<'a> {
    path: &'a str,
    method: String,
    op: &'a Value,
    path_item: &'a Value,
}

impl Spec {
    fn load() -> Spec {
        let file = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.yaml");
        let text = std::fs::read_to_string(file).expect("docs/openapi.yaml is readable");
        let root: Value = serde_yaml::from_str(&text).expect("docs/openapi.yaml is valid YAML");
        Spec { root }
    }

    fn ops(&self) -> Vec<Op<'_>> {
        let paths = self.root["paths"].as_object().expect("spec has paths");
        let mut out = Vec::new();
        for (path, item) in paths {
            for m in METHODS {
                if let Some(op) = item.get(m) {
                    out.push(Op {
                        path,
                        method: m.to_uppercase(),
                        op,
                        path_item: item,
                    });
                }
            }
        }
        out
    }

    /// Follows `$ref`s (local ones only).
    fn resolve<'a>(&'a self, mut v: &'a Value) -> &'a Value {
        for _ in 0..32 {
            let Some(r) = v.get("$ref").and_then(Value::as_str) else {
                return v;
            };
            let pointer = r
                .strip_prefix('#')
                .unwrap_or_else(|| panic!("non-local $ref {r}"));
            v = self
                .root
                .pointer(pointer)
                .unwrap_or_else(|| panic!("dangling $ref {r}"));
        }
        panic!("$ref cycle")
    }

    /// Every property name a schema documents, through `$ref` and `allOf`.
    fn props(&self, schema: &Value) -> BTreeSet<String> {
        let s = self.resolve(schema);
        let mut out: BTreeSet<String> = s
            .get("properties")
            .and_then(Value::as_object)
            .map(|p| p.keys().cloned().collect())
            .unwrap_or_default();
        for m in s
            .get("allOf")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            out.extend(self.props(m));
        }
        out
    }

    /// Whether the schema references `#/components/schemas/<name>`, directly or through allOf.
    fn includes(&self, schema: &Value, name: &str) -> bool {
        let target = format!("#/components/schemas/{name}");
        let mut v = schema;
        for _ in 0..32 {
            if v.get("allOf")
                .and_then(Value::as_array)
                .is_some_and(|all| all.iter().any(|m| self.includes(m, name)))
            {
                return true;
            }
            match v.get("$ref").and_then(Value::as_str) {
                Some(r) if r == target => return true,
                Some(_) => v = self.resolve_once(v),
                None => return false,
            }
        }
        false
    }

    fn resolve_once<'a>(&'a self, v: &'a Value) -> &'a Value {
        let r = v["$ref"].as_str().expect("a $ref");
        self.root
            .pointer(r.strip_prefix('#').expect("local $ref"))
            .expect("dangling $ref")
    }

    /// Checks `v` against `schema`, pushing one message per mismatch. `strict` also rejects
    /// object properties the schema does not document (off for the members of an allOf, which
    /// each see only part of the properties).
    fn check(&self, schema: &Value, v: &Value, at: &str, strict: bool, errs: &mut Vec<String>) {
        let s = self.resolve(schema);
        for m in s
            .get("allOf")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            self.check(m, v, at, false, errs);
        }
        for key in ["anyOf", "oneOf"] {
            if let Some(alts) = s.get(key).and_then(Value::as_array) {
                let passing = alts
                    .iter()
                    .filter(|m| {
                        let mut e = Vec::new();
                        self.check(m, v, at, false, &mut e);
                        e.is_empty()
                    })
                    .count();
                let ok = if key == "oneOf" {
                    passing == 1
                } else {
                    passing >= 1
                };
                if !ok {
                    errs.push(format!("{at}: {passing} of the {key} alternatives match"));
                }
            }
        }
        if let Some(allowed) = s.get("enum").and_then(Value::as_array) {
            if !allowed.contains(v) {
                errs.push(format!("{at}: {v} is not one of {allowed:?}"));
            }
        }
        if v.is_null() {
            let nullable = s.get("nullable").and_then(Value::as_bool).unwrap_or(false);
            if !nullable && (s.get("type").is_some() || s.get("properties").is_some()) {
                errs.push(format!("{at}: null, but the schema is not nullable"));
            }
            return;
        }
        if let Some(ty) = s.get("type").and_then(Value::as_str) {
            let ok = match ty {
                "string" => v.is_string(),
                "integer" => v.is_i64() || v.is_u64(),
                "number" => v.is_number(),
                "boolean" => v.is_boolean(),
                "array" => v.is_array(),
                "object" => v.is_object(),
                other => panic!("{at}: unknown schema type {other}"),
            };
            if !ok {
                errs.push(format!("{at}: expected {ty}, got {v}"));
                return;
            }
        }
        match s.get("format").and_then(Value::as_str) {
            Some("date-time") => {
                let t = v.as_str().unwrap_or_default();
                if chrono::DateTime::parse_from_rfc3339(t).is_err() {
                    errs.push(format!("{at}: {v} is not an RFC 3339 date-time"));
                }
            }
            Some("int64") if !v.is_i64() => errs.push(format!("{at}: {v} is not an int64")),
            _ => {}
        }
        if let (Some(min), Some(n)) = (s.get("minimum").and_then(Value::as_f64), v.as_f64()) {
            if n < min {
                errs.push(format!("{at}: {v} is below the minimum {min}"));
            }
        }
        if let (Some(max), Some(n)) = (s.get("maximum").and_then(Value::as_f64), v.as_f64()) {
            if n > max {
                errs.push(format!("{at}: {v} is above the maximum {max}"));
            }
        }
        if let Some(text) = v.as_str() {
            let len = text.chars().count() as u64;
            if s.get("minLength")
                .and_then(Value::as_u64)
                .is_some_and(|m| len < m)
            {
                errs.push(format!("{at}: {v} is shorter than minLength"));
            }
            if s.get("maxLength")
                .and_then(Value::as_u64)
                .is_some_and(|m| len > m)
            {
                errs.push(format!("{at}: {v} is longer than maxLength"));
            }
        }
        if let Some(items) = v.as_array() {
            if s.get("maxItems")
                .and_then(Value::as_u64)
                .is_some_and(|m| items.len() as u64 > m)
            {
                errs.push(format!("{at}: more than maxItems items"));
            }
            if let Some(item_schema) = s.get("items") {
                for (i, item) in items.iter().enumerate() {
                    self.check(item_schema, item, &format!("{at}[{i}]"), true, errs);
                }
            }
        }
        if let Some(obj) = v.as_object() {
            for name in s
                .get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let name = name.as_str().expect("required names are strings");
                if !obj.contains_key(name) {
                    errs.push(format!("{at}: required property {name} is missing"));
                }
            }
            if let Some(props) = s.get("properties").and_then(Value::as_object) {
                for (name, ps) in props {
                    if let Some(x) = obj.get(name) {
                        self.check(ps, x, &format!("{at}.{name}"), true, errs);
                    }
                }
            }
            let open = s
                .get("additionalProperties")
                .is_some_and(|a| a != &Value::Bool(false));
            let known = self.props(s);
            if strict && !open && !known.is_empty() {
                for name in obj.keys().filter(|k| !known.contains(*k)) {
                    errs.push(format!("{at}: property {name} is not documented"));
                }
            }
        }
    }

    fn assert_fits(&self, schema: &Value, v: &Value, what: &str) {
        let mut errs = Vec::new();
        self.check(schema, v, "$", true, &mut errs);
        assert!(
            errs.is_empty(),
            "{what} does not fit its schema:\n  {}\nvalue: {v}",
            errs.join("\n  ")
        );
    }
}

impl Op<'_> {
    fn name(&self) -> String {
        format!("{} {}", self.method, self.path)
    }

    fn responses(&self) -> &serde_json::Map<String, Value> {
        self.op["responses"]
            .as_object()
            .unwrap_or_else(|| panic!("{} has no responses", self.name()))
    }

    /// The response object documented for `status`, resolved.
    fn response<'s>(&'s self, spec: &'s Spec, status: u16) -> Option<&'s Value> {
        self.responses()
            .get(&status.to_string())
            .map(|r| spec.resolve(r))
    }

    fn request_example(&self, spec: &Spec) -> Option<Value> {
        let body = spec.resolve(self.op.get("requestBody")?);
        Some(body["content"]["application/json"]["example"].clone())
    }

    /// The request path, with each path parameter replaced by its documented example.
    fn url_path(&self, spec: &Spec) -> String {
        let mut path = self.path.to_owned();
        let params = [self.path_item.get("parameters"), self.op.get("parameters")];
        for p in params
            .into_iter()
            .flatten()
            .flat_map(|p| p.as_array().into_iter().flatten())
        {
            let p = spec.resolve(p);
            if p["in"] == "path" {
                let name = p["name"].as_str().expect("parameter name");
                let example = p.get("example").unwrap_or_else(|| {
                    panic!("{}: path parameter {name} has no example", self.name())
                });
                let text = match example {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                path = path.replace(&format!("{{{name}}}"), &text);
            }
        }
        assert!(
            !path.contains('{'),
            "{}: undocumented path parameter",
            self.name()
        );
        path
    }

    /// The query string, from the documented example of each query parameter.
    fn query(&self, spec: &Spec) -> String {
        let params = [self.path_item.get("parameters"), self.op.get("parameters")];
        let mut pairs = Vec::new();
        for p in params
            .into_iter()
            .flatten()
            .flat_map(|p| p.as_array().into_iter().flatten())
        {
            let p = spec.resolve(p);
            if p["in"] == "query" {
                let name = p["name"].as_str().expect("parameter name");
                let example = p.get("example").unwrap_or_else(|| {
                    panic!("{}: query parameter {name} has no example", self.name())
                });
                let text = match example {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                pairs.push(format!("{name}={text}"));
            }
        }
        pairs.join("&")
    }
}

// ---------------------------------------------------------------------------------------------
// The spec alone.

#[test]
fn documented_routes_are_exactly_the_served_routes() {
    let spec = Spec::load();
    let documented: BTreeSet<(String, String)> = spec
        .ops()
        .iter()
        .map(|o| (o.path.to_owned(), o.method.clone()))
        .collect();
    let served: BTreeSet<(String, String)> = ROUTES
        .iter()
        .flat_map(|(path, methods)| methods.iter().map(|m| (path.to_string(), m.to_string())))
        .collect();
    let missing: Vec<_> = served.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&served).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "docs/openapi.yaml is out of sync with api::ROUTES\n  served but not documented: {missing:?}\n  documented but not served: {extra:?}"
    );
}

#[test]
fn spec_header_and_server() {
    let spec = Spec::load();
    assert_eq!(spec.root["openapi"], "3.0.3");
    let url = spec.root["servers"][0]["url"]
        .as_str()
        .expect("a server url");
    assert!(
        url.ends_with(":8004"),
        "server url {url} should use the default port 8004"
    );
}

#[test]
fn every_operation_documents_its_answers_and_errors() {
    let spec = Spec::load();
    for o in spec.ops() {
        let name = o.name();
        let responses = o.responses();
        assert!(
            responses.keys().any(|c| c.starts_with('2') || c == "101"),
            "{name}: no 2xx (or 101 Switching Protocols) response"
        );
        let mut enveloped = false;
        for (code, r) in responses {
            let r = spec.resolve(r);
            assert!(
                r.get("description").is_some(),
                "{name} {code}: no description"
            );
            if code == "101" {
                assert!(
                    r.get("content").is_none(),
                    "{name} 101: a protocol switch has no body"
                );
                continue;
            }
            let content = r["content"]
                .as_object()
                .unwrap_or_else(|| panic!("{name} {code}: no content"));
            for (media, m) in content {
                let schema = m
                    .get("schema")
                    .unwrap_or_else(|| panic!("{name} {code}: no schema"));
                if media == "application/json" {
                    assert!(
                        spec.includes(schema, "Envelope"),
                        "{name} {code}: not the Envelope"
                    );
                    enveloped = true;
                }
                let example = m
                    .get("example")
                    .unwrap_or_else(|| panic!("{name} {code}: no example"));
                spec.assert_fits(schema, example, &format!("{name} {code} example"));
                if media == "application/json" {
                    assert_eq!(
                        example["code"].as_u64(),
                        code.parse::<u64>().ok(),
                        "{name} {code}: example code"
                    );
                }
                if !code.starts_with('2') {
                    assert_eq!(media, "application/json", "{name} {code}: errors are JSON");
                    assert!(
                        spec.includes(schema, "ErrorEnvelope"),
                        "{name} {code}: not the ErrorEnvelope"
                    );
                    assert!(
                        example["data"].is_null(),
                        "{name} {code}: example data is not null"
                    );
                }
            }
        }
        assert!(enveloped, "{name}: no response documents the envelope");
        // Any other method on a served path answers 405.
        assert!(responses.contains_key("405"), "{name}: 405 not documented");
        if o.path.starts_with(BASE) {
            assert!(
                responses.contains_key("503"),
                "{name}: 503 (overload) not documented"
            );
        }
        if o.path.contains("{userId}") {
            assert!(
                responses.contains_key("400"),
                "{name}: 400 (bad userId) not documented"
            );
        }
        if o.method == "POST" || o.method == "PUT" {
            for code in ["400", "413", "415"] {
                assert!(
                    responses.contains_key(code),
                    "{name}: {code} not documented"
                );
            }
            let body = spec.resolve(
                o.op.get("requestBody")
                    .unwrap_or_else(|| panic!("{name}: no requestBody")),
            );
            assert_eq!(body["required"], true, "{name}: request body not required");
            let media = &body["content"]["application/json"];
            let example = media
                .get("example")
                .unwrap_or_else(|| panic!("{name}: no request example"));
            spec.assert_fits(
                &media["schema"],
                example,
                &format!("{name} request example"),
            );
        }
    }
    // The messages of the seed contract.
    let message = |path: &str, method: &str| {
        let op = &spec.root["paths"][path][method];
        op["responses"]["200"]["content"]["application/json"]["example"]["message"].clone()
    };
    assert_eq!(message("/api/v1/presence/online", "post"), "上线成功");
    assert_eq!(message("/api/v1/presence/offline", "post"), "下线成功");
    assert_eq!(message("/api/v1/presence/heartbeat", "post"), "心跳成功");
    assert_eq!(
        message("/api/v1/presence/status/{userId}", "get"),
        "success"
    );
    assert_eq!(message("/api/v1/presence/status/batch", "post"), "success");
}

#[test]
fn request_schemas_reject_what_the_code_rejects() {
    let spec = Spec::load();
    let schema = |name: &str| json!({ "$ref": format!("#/components/schemas/{name}") });
    let fits = |name: &str, v: Value| {
        let mut errs = Vec::new();
        spec.check(&schema(name), &v, "$", true, &mut errs);
        errs.is_empty()
    };
    assert!(fits(
        "OnlineRequest",
        json!({"userId": 1, "deviceId": "a.b:c-d_e", "platform": "PC"})
    ));
    assert!(!fits(
        "OnlineRequest",
        json!({"userId": 0, "deviceId": "d", "platform": "WEB"})
    ));
    assert!(!fits(
        "OnlineRequest",
        json!({"userId": 1, "deviceId": "", "platform": "WEB"})
    ));
    assert!(!fits(
        "OnlineRequest",
        json!({"userId": 1, "deviceId": "d", "platform": "MAC"})
    ));
    assert!(!fits(
        "OnlineRequest",
        json!({"userId": 1, "deviceId": "x".repeat(129), "platform": "WEB"})
    ));
    assert!(!fits(
        "OnlineRequest",
        json!({"userId": "1", "deviceId": "d", "platform": "WEB"})
    ));
    assert!(!fits("DeviceRequest", json!({"userId": 1})));
    assert!(!fits(
        "HeartbeatRequest",
        json!({"userId": 1, "deviceId": "d", "active": "yes"})
    ));
    assert!(fits("BatchRequest", json!({"userIds": []})));
    assert!(!fits("BatchRequest", json!({"userIds": vec![1; 1001]})));
    assert!(fits("SetStatusRequest", json!({"customText": "外出"})));
    assert!(!fits("SetStatusRequest", json!({"status": "OFFLINE"})));
    assert!(!fits(
        "SetStatusRequest",
        json!({"expiresAt": "2030-01-01T00:00:00Z"})
    ));
    assert!(!fits(
        "SetStatusRequest",
        json!({"customText": "字".repeat(101)})
    ));
    assert!(!fits(
        "SetStatusRequest",
        json!({"status": "BUSY", "expiresAt": "tomorrow"})
    ));
    let limit =
        &spec.root["components"]["schemas"]["BatchRequest"]["properties"]["userIds"]["maxItems"];
    assert_eq!(
        limit, 1000,
        "the documented batch limit is the default PRESENCE_BATCH_LIMIT"
    );
}

// ---------------------------------------------------------------------------------------------
// The real server (in this process, on the in-memory store).

/// Checks a live answer against the response the operation documents for its status.
fn check_answer(spec: &Spec, o: &Op<'_>, a: &Answer, what: &str) -> Value {
    let name = o.name();
    let documented = o.response(spec, a.status).unwrap_or_else(|| {
        panic!(
            "{name} ({what}) answered {} which is not documented: {}",
            a.status, a.body
        )
    });
    let media = a
        .content_type
        .as_deref()
        .unwrap_or_default()
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned();
    let m = documented["content"].get(&media).unwrap_or_else(|| {
        panic!(
            "{name} ({what}) answered {media}, not documented for {}",
            a.status
        )
    });
    if media != "application/json" {
        assert!(!a.body.is_empty(), "{name} ({what}): empty body");
        return Value::Null;
    }
    let body: Value = serde_json::from_str(&a.body)
        .unwrap_or_else(|e| panic!("{name} ({what}): body is not JSON ({e}): {}", a.body));
    assert_eq!(
        body["code"].as_u64(),
        Some(a.status as u64),
        "{name} ({what}): code != HTTP status"
    );
    spec.assert_fits(
        &m["schema"],
        &body,
        &format!("{name} ({what}) live {} answer", a.status),
    );
    body
}

#[tokio::test]
async fn the_server_answers_as_documented() {
    let spec = Spec::load();
    let client = common::http::client(true);
    let server = Server::start(Topology::Memory, &[]);
    let url = |path: &str| format!("{}{path}", server.base);

    // Every documented example, in an order where the device is online for the heartbeat and
    // goes offline last.
    let mut ops = spec.ops();
    let rank = |o: &Op<'_>| match o.path.rsplit('/').next() {
        Some("online") => 0,
        Some("offline") => 2,
        _ => 1,
    };
    ops.sort_by_key(|o| rank(o));
    for o in ops.iter().filter(|o| !o.responses().contains_key("101")) {
        let name = o.name();
        let mut req = client.request(method(&o.method), url(&o.url_path(&spec)));
        if let Some(example) = o.request_example(&spec) {
            req = req.json(&example);
        }
        let a = send(req).await;
        assert!(
            (200..300).contains(&a.status),
            "{name}: example answered {}: {}",
            a.status,
            a.body
        );
        let body = check_answer(&spec, o, &a, "example");
        let example =
            &o.response(&spec, a.status).unwrap()["content"]["application/json"]["example"];
        if !body.is_null() {
            assert_eq!(
                body["message"], example["message"],
                "{name}: message differs from the spec"
            );
        }
    }

    // The documented errors of every operation with a JSON body.
    for o in ops.iter().filter(|o| o.request_example(&spec).is_some()) {
        let path = url(&o.url_path(&spec));
        let req = || client.request(method(&o.method), &path);
        let a = send(req().header("content-type", "text/plain").body("{}")).await;
        assert_eq!(a.status, 415, "{}: wrong Content-Type", o.name());
        check_answer(&spec, o, &a, "wrong Content-Type");
        let a = send(
            req()
                .header("content-type", "application/json")
                .body("{\"userId\":"),
        )
        .await;
        assert_eq!(a.status, 400, "{}: malformed JSON", o.name());
        check_answer(&spec, o, &a, "malformed JSON");
        let a = send(req().json(&json!({"userId": "10001", "deviceId": 7, "userIds": {}}))).await;
        assert_eq!(a.status, 400, "{}: wrong types", o.name());
        check_answer(&spec, o, &a, "wrong types");
        let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(70 * 1024));
        let a = send(req().header("content-type", "application/json").body(big)).await;
        assert_eq!(a.status, 413, "{}: body too large", o.name());
        check_answer(&spec, o, &a, "body too large");
    }

    // A bad userId in the path.
    for o in ops.iter().filter(|o| o.path.contains("{userId}")) {
        let mut req = client.request(method(&o.method), url(&o.path.replace("{userId}", "0")));
        if let Some(example) = o.request_example(&spec) {
            req = req.json(&example);
        }
        let a = send(req).await;
        assert_eq!(a.status, 400, "{}: userId 0", o.name());
        check_answer(&spec, o, &a, "userId 0");
    }

    // Any other method on a documented path: 405, documented on each of its operations.
    for o in &ops {
        let a = send(client.patch(url(&o.url_path(&spec)))).await;
        assert_eq!(a.status, 405, "PATCH {}", o.path);
        check_answer(&spec, o, &a, "unsupported method");
    }

    // WebSocket upgrades: the documented query examples open a socket (101, then `welcome`);
    // the same request without the upgrade, and a bad parameter, answer the documented 400.
    for o in ops.iter().filter(|o| o.responses().contains_key("101")) {
        let name = o.name();
        let query = o.query(&spec);
        let ws_url = format!("{}?{query}", url(&o.url_path(&spec))).replacen("http", "ws", 1);
        // 101, and the first message is the `welcome`.
        Ws::open(&ws_url, &name).await.close().await;
        let plain = format!("{}?{query}", url(&o.url_path(&spec)));
        let a = send(client.get(&plain)).await;
        assert_eq!(a.status, 400, "{name}: not a WebSocket request: {}", a.body);
        check_answer(&spec, o, &a, "not a WebSocket request");
        let a = send(client.get(url(&o.url_path(&spec)))).await;
        assert_eq!(a.status, 400, "{name}: no query: {}", a.body);
        check_answer(&spec, o, &a, "no query");
    }

    // Heartbeat from a device that is not online: 404 with the documented message.
    let hb = ops
        .iter()
        .find(|o| o.path == format!("{BASE}/heartbeat"))
        .expect("heartbeat");
    let a = send(
        client
            .post(url(hb.path))
            .json(&json!({"userId": 77, "deviceId": "never-online"})),
    )
    .await;
    assert_eq!(a.status, 404);
    let body = check_answer(&spec, hb, &a, "device not online");
    let documented = &hb.response(&spec, 404).unwrap()["content"]["application/json"]["example"];
    assert_eq!(body["message"], documented["message"]);

    // Too many devices for one user: 409.
    let on = ops
        .iter()
        .find(|o| o.path == format!("{BASE}/online"))
        .expect("online");
    let mut conflict = None;
    for i in 0..1024 {
        let req = json!({"userId": 424242, "deviceId": format!("dev-{i}"), "platform": "IOS"});
        let a = send(client.post(url(on.path)).json(&req)).await;
        if a.status != 200 {
            conflict = Some(a);
            break;
        }
    }
    let a = conflict.expect("a device limit");
    assert_eq!(a.status, 409, "too many devices: {}", a.body);
    check_answer(&spec, on, &a, "too many devices");

    // Unknown routes are the error envelope too.
    let a = send(client.get(url(&format!("{BASE}/nope")))).await;
    assert_eq!(a.status, 404);
    let body: Value = serde_json::from_str(&a.body).expect("JSON 404");
    spec.assert_fits(
        &json!({"$ref": "#/components/schemas/ErrorEnvelope"}),
        &body,
        "unknown route",
    );

    drop(server);
}
