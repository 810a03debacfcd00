//! The relay's REST API (`--api`) end to end, against the real `warren-server` and real agents:
//! tokens (create, list, get, revoke, persistence in the data dir), agents (list, get,
//! disconnect), tunnels (list, get, traffic counters), who may see and do what (admin token,
//! agent tokens, no or wrong token), token limits, `/metrics`, and the OpenAPI document against
//! the routes the server actually answers.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use warren_tests::{
    ADMIN_TOKEN, Agent, ApiClient, EchoBackend, HttpBackend, IO_TIMEOUT, READY_TIMEOUT, Relay,
    RelayOpts, TempDir, eventually, http_get, http_post, random_bytes, tcp_echo, within,
};

/// How long a state change seen through the API (a session ending, a counter moving) may take.
const SETTLE: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------------
// Helpers.

fn admin(relay: &Relay) -> ApiClient {
    ApiClient::new(relay.api_addr, ADMIN_TOKEN)
}

/// Spawns `warren PROTO TARGET --name NAME --agent-id NAME --transport T` with `token`.
fn spawn_agent(
    relay: &Relay,
    tmp: &TempDir,
    token: &str,
    proto: &str,
    target: u16,
    name: &str,
    transport: &str,
) -> Agent {
    let args = [
        proto.to_owned(),
        target.to_string(),
        "--name".into(),
        name.to_owned(),
        "--agent-id".into(),
        name.to_owned(),
        "--transport".into(),
        transport.to_owned(),
        "--config-dir".into(),
        tmp.dir(name).display().to_string(),
        "--relay".into(),
        relay.relay_arg(),
        "--token".into(),
        token.to_owned(),
        "--relay-ca".into(),
        relay.ca_path.display().to_string(),
    ];
    Agent::spawn(name, args)
}

/// `POST /api/v1/tokens` with `body` as the admin; returns the answer, its id and its secret.
async fn create_token(api: &ApiClient, body: Value) -> (Value, String, String) {
    let v = api.post_json("/api/v1/tokens", &body).await.expect(StatusCode::CREATED);
    let id = str_field(&v, "id");
    let secret = str_field(&v, "token");
    (v, id, secret)
}

fn str_field(v: &Value, key: &str) -> String {
    v.get(key)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no string {key:?} in {v}"))
        .to_owned()
}

fn u64_field(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or_else(|| panic!("no integer {key:?} in {v}"))
}

/// The array `key` of a list answer.
fn items(v: &Value, key: &str) -> Vec<Value> {
    v.get(key)
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("no array {key:?} in {v}"))
        .clone()
}

/// `GET path` answering 200, as the array `key`.
async fn list(api: &ApiClient, path: &str, key: &str) -> Vec<Value> {
    items(&api.get(path).await.expect(StatusCode::OK), key)
}

/// The one element of `list` whose `key` is `value`; panics if there are none or several.
fn the_one(list: &[Value], key: &str, value: &str) -> Value {
    let found: Vec<&Value> = list.iter().filter(|v| v[key] == value).collect();
    assert_eq!(found.len(), 1, "want exactly one {key}={value:?} in {list:#?}");
    found[0].clone()
}

/// The values of `key` in `list`, sorted.
fn names(list: &[Value], key: &str) -> Vec<String> {
    let mut out: Vec<String> = list.iter().map(|v| str_field(v, key)).collect();
    out.sort();
    out
}

fn now_unix() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// Unix seconds of an RFC 3339 UTC time `YYYY-MM-DDTHH:MM:SS[.fff](Z|+00:00)`.
fn unix_of(s: &str) -> Option<i64> {
    let (main, rest) = (s.get(..19)?, s.get(19..)?);
    let rest =
        rest.strip_prefix('.').map_or(rest, |r| r.trim_start_matches(|c: char| c.is_ascii_digit()));
    if rest != "Z" && rest != "+00:00" {
        return None;
    }
    let b = main.as_bytes();
    if b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| main.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    // Howard Hinnant's days_from_civil.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some((era * 146_097 + doe - 719_468) * 86_400 + hh * 3600 + mm * 60 + ss)
}

/// Asserts that `v[key]` is an RFC 3339 time within a few minutes of now.
fn assert_recent(v: &Value, key: &str) {
    let s = str_field(v, key);
    let t = unix_of(&s).unwrap_or_else(|| panic!("{key} {s:?} is not an RFC 3339 UTC time: {v}"));
    let now = now_unix();
    assert!((now - 300..=now + 60).contains(&t), "{key} {s:?} is not about now ({now}): {v}");
}

/// `GET /` through an HTTP tunnel; returns the body.
async fn visit_http(relay: &Relay, host: &str) -> String {
    let resp = within(IO_TIMEOUT, "GET through the tunnel", http_get(relay.http_addr, host, "/"))
        .await
        .unwrap_or_else(|e| panic!("GET / with Host {host}: {e:#}"));
    assert_eq!(resp.status, StatusCode::OK, "GET / with Host {host}: {:?}", resp.text());
    resp.text()
}

// ---------------------------------------------------------------------------------------------
// The OpenAPI document against the routes.

const METHODS: [&str; 8] = ["get", "put", "post", "delete", "patch", "head", "options", "trace"];

/// Whether a concrete path matches a template whose `{param}` segments match any non-empty
/// segment.
fn matches_template(template: &str, path: &str) -> bool {
    let (t, p): (Vec<&str>, Vec<&str>) = (template.split('/').collect(), path.split('/').collect());
    t.len() == p.len()
        && t.iter().zip(&p).all(|(t, p)| {
            if t.starts_with('{') && t.ends_with('}') { !p.is_empty() } else { t == p }
        })
}

/// The served OpenAPI document declares exactly the (method, path) pairs the server routes:
/// every declared operation answers (with a documented status, not the "no such route" 404 nor
/// 405, with the documented content type, and asking for a token exactly when the document
/// says so), plausible undeclared operations get the JSON 404 "no such route" or 405, and every
/// operation documents a success response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_matches_the_routes() {
    let relay = Relay::start_default().await;
    let api = admin(&relay);
    let anon = ApiClient::anonymous(relay.api_addr);

    let resp = anon.get("/api/v1/openapi.json").await;
    let doc = resp.expect(StatusCode::OK);
    assert!(resp.content_type().starts_with("application/json"), "{:?}", resp.content_type());
    assert!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
        "not an OpenAPI 3 document: openapi = {}",
        doc["openapi"]
    );
    let paths = doc["paths"].as_object().expect("the document has no paths object");

    let mut declared: BTreeSet<(String, String)> = BTreeSet::new();
    let mut ops: Vec<(Method, String, Value)> = Vec::new();
    for (path, item) in paths {
        for m in METHODS {
            if let Some(op) = item.get(m) {
                declared.insert((m.to_ascii_uppercase(), path.clone()));
                let method = Method::from_bytes(m.to_ascii_uppercase().as_bytes()).expect("method");
                ops.push((method, path.clone(), op.clone()));
            }
        }
    }
    let core = [
        ("GET", "/api/v1/openapi.json"),
        ("GET", "/api/v1/tokens"),
        ("POST", "/api/v1/tokens"),
        ("GET", "/api/v1/tokens/{id}"),
        ("DELETE", "/api/v1/tokens/{id}"),
        ("GET", "/api/v1/agents"),
        ("GET", "/api/v1/agents/{id}"),
        ("DELETE", "/api/v1/agents/{id}"),
        ("GET", "/api/v1/tunnels"),
        ("GET", "/api/v1/tunnels/{id}"),
        ("GET", "/metrics"),
    ];
    for (m, p) in core {
        assert!(
            declared.contains(&(m.to_owned(), p.to_owned())),
            "the document does not declare {m} {p}; it declares {declared:?}"
        );
    }

    // Every operation documents a success.
    for (method, path, op) in &ops {
        let responses = op["responses"]
            .as_object()
            .unwrap_or_else(|| panic!("{method} {path} documents no responses"));
        assert!(
            ["200", "201", "204"].iter().any(|s| responses.contains_key(*s)),
            "{method} {path} documents no 200/201/204 response, only {:?}",
            responses.keys().collect::<Vec<_>>()
        );
    }

    // Ids that exist, where that is cheap: a token to read and one to revoke.
    let (_, keep, _) = create_token(&api, json!({ "name": "probe-keep" })).await;
    let (_, doomed, _) = create_token(&api, json!({ "name": "probe-revoke" })).await;
    let concrete = |method: &Method, template: &str| -> String {
        template
            .split('/')
            .map(|seg| {
                if !(seg.starts_with('{') && seg.ends_with('}')) {
                    seg.to_owned()
                } else if template == "/api/v1/tokens/{id}" {
                    if *method == Method::DELETE { doomed.clone() } else { keep.clone() }
                } else if seg == "{file}" {
                    // A dashboard file that exists.
                    "style.css".to_owned()
                } else {
                    "nonexistent-probe".to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("/")
    };

    for (method, template, op) in &ops {
        let path = concrete(method, template);
        // An event stream never ends: check its head with curl instead of reading it whole.
        if op["responses"]["200"]["content"].get("text/event-stream").is_some() {
            let url = format!("http://{}{path}", relay.api_addr);
            let head = |auth: Option<&str>| {
                let mut cmd = tokio::process::Command::new("curl");
                cmd.args([
                    "-sS",
                    "-o",
                    "/dev/null",
                    "--max-time",
                    "1",
                    "-w",
                    "%{http_code} %{content_type}",
                ]);
                if let Some(a) = auth {
                    cmd.args(["-H", a]);
                }
                cmd.arg(&url);
                async move {
                    String::from_utf8_lossy(&cmd.output().await.expect("curl").stdout).into_owned()
                }
            };
            let admin_head = format!("Authorization: Bearer {}", warren_tests::ADMIN_TOKEN);
            let got = head(Some(&admin_head)).await;
            assert!(got.starts_with("200 text/event-stream"), "{method} {path}: {got}");
            let got = head(None).await;
            assert!(got.starts_with("401"), "{method} {path} without a token: {got}");
            continue;
        }
        let body = (*method == Method::POST).then(|| {
            let v = if template == "/api/v1/tokens" {
                json!({ "name": "probe-new" })
            } else {
                json!({})
            };
            Bytes::from(v.to_string())
        });
        let headers: &[(&str, &str)] =
            if body.is_some() { &[("content-type", "application/json")] } else { &[] };
        let what = format!("{method} {path} (declared as {template})");

        // As the admin: the route exists and answers as documented.
        let resp = api.send(method.clone(), &path, headers, body.clone()).await;
        assert_ne!(resp.status, StatusCode::METHOD_NOT_ALLOWED, "{what}: {:?}", resp.text());
        if resp.status == StatusCode::NOT_FOUND {
            let (code, message) = resp.error();
            assert_eq!(code, "not_found", "{what}");
            assert_ne!(message, "no such route", "{what}: declared but not routed");
            assert!(message.starts_with("no such "), "{what}: 404 message {message:?}");
        }
        let responses = &op["responses"];
        let status = resp.status.as_str().to_owned();
        let class = format!("{}XX", &status[..1]);
        assert!(
            responses.get(&status).is_some()
                || responses.get(&class).is_some()
                || responses.get("default").is_some(),
            "{what} answered {status}, which its operation does not document: {:?}",
            resp.text()
        );
        if resp.status.is_success() {
            let content = responses[&status].get("content").and_then(Value::as_object);
            match content {
                Some(types) => assert!(
                    types.keys().any(|t| resp.content_type().starts_with(t.as_str())),
                    "{what}: content type {:?}, documented {:?}",
                    resp.content_type(),
                    types.keys().collect::<Vec<_>>()
                ),
                None => {
                    assert!(resp.body.is_empty(), "{what}: undocumented body {:?}", resp.text())
                }
            }
            if resp.content_type().starts_with("application/json") {
                resp.json();
            }
        }

        // Anonymously: refused exactly when the document asks for a token.
        let security = op.get("security").unwrap_or(&doc["security"]);
        let needs_token = security.as_array().is_some_and(|s| !s.is_empty());
        let resp = anon.send(method.clone(), &path, headers, body).await;
        if needs_token {
            resp.expect_error(StatusCode::UNAUTHORIZED, "unauthorized");
        } else {
            assert!(
                resp.status.is_success(),
                "{what} without a token: {} {:?}",
                resp.status,
                resp.text()
            );
        }
    }

    // Plausible operations the document does not declare are not routed.
    let undeclared = [
        ("PUT", "/api/v1/tokens".to_owned()),
        ("DELETE", "/api/v1/tokens".to_owned()),
        ("PATCH", "/api/v1/tokens".to_owned()),
        ("PUT", format!("/api/v1/tokens/{keep}")),
        ("PATCH", format!("/api/v1/tokens/{keep}")),
        ("POST", format!("/api/v1/tokens/{keep}")),
        ("GET", format!("/api/v1/tokens/{keep}/secret")),
        ("GET", "/api/v1/tokens/".to_owned()),
        ("POST", "/api/v1/agents".to_owned()),
        ("DELETE", "/api/v1/agents".to_owned()),
        ("PUT", "/api/v1/agents/1".to_owned()),
        ("POST", "/api/v1/agents/1".to_owned()),
        ("GET", "/api/v1/agents/1/tunnels".to_owned()),
        ("POST", "/api/v1/tunnels".to_owned()),
        ("DELETE", "/api/v1/tunnels".to_owned()),
        ("DELETE", "/api/v1/tunnels/x".to_owned()),
        ("PUT", "/api/v1/tunnels/x".to_owned()),
        ("POST", "/api/v1/openapi.json".to_owned()),
        ("POST", "/metrics".to_owned()),
        ("DELETE", "/metrics".to_owned()),
        ("GET", "/api/v1/forwards".to_owned()),
        ("GET", "/api/v1/sessions".to_owned()),
        ("GET", "/api/v1/token".to_owned()),
        ("GET", "/api/v1/openapi.yaml".to_owned()),
        ("GET", "/api/v1".to_owned()),
        ("GET", "/api/v1/".to_owned()),
        ("GET", "/api".to_owned()),
        ("GET", "/".to_owned()),
        ("GET", "/api/v2/tokens".to_owned()),
        ("GET", "/metrics/".to_owned()),
        ("PUT", "/api/v1/reservations".to_owned()),
        ("GET", "/api/v1/reservations/res_x".to_owned()),
        ("PUT", "/api/v1/forwards/x".to_owned()),
        ("POST", "/api/v1/stats".to_owned()),
        ("DELETE", "/api/v1/stats".to_owned()),
    ];
    let mut probed = 0;
    for (m, path) in &undeclared {
        let is_declared = declared.iter().any(|(dm, dp)| dm == m && matches_template(dp, path));
        if is_declared {
            continue;
        }
        probed += 1;
        let method = Method::from_bytes(m.as_bytes()).expect("method");
        let resp = api.send(method, path, &[], None).await;
        let path_declared = paths.keys().any(|p| matches_template(p, path));
        if path_declared {
            resp.expect_error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
        } else {
            let message = resp.expect_error(StatusCode::NOT_FOUND, "not_found");
            assert_eq!(message, "no such route", "{m} {path}");
        }
    }
    assert!(probed >= 20, "only {probed} undeclared operations probed");
}

// ---------------------------------------------------------------------------------------------
// Authentication and authorisation.

/// No token, a wrong token or a malformed header: 401 everywhere it is needed. Agent tokens
/// (given on the relay's command line or created through the API) get 403 on tokens and see
/// (empty) agent and tunnel lists; a revoked one gets 401. The document needs no token,
/// `/metrics` the admin token. (So many wrong tokens from one address would be locked out:
/// this relay allows more failures; `security.rs` tests the lockout.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_checked() {
    let relay =
        Relay::start(RelayOpts::default().args(&["--auth-failures-per-minute", "1000"])).await;
    let api = admin(&relay);
    let (_, id, secret) = create_token(&api, json!({ "name": "scoped" })).await;

    let token_routes = [
        (Method::GET, "/api/v1/tokens".to_owned()),
        (Method::POST, "/api/v1/tokens".to_owned()),
        (Method::GET, format!("/api/v1/tokens/{id}")),
        (Method::DELETE, format!("/api/v1/tokens/{id}")),
    ];
    let agent_routes = [
        (Method::GET, "/api/v1/agents".to_owned()),
        (Method::GET, "/api/v1/agents/1".to_owned()),
        (Method::DELETE, "/api/v1/agents/1".to_owned()),
        (Method::GET, "/api/v1/tunnels".to_owned()),
        (Method::GET, "/api/v1/tunnels/x".to_owned()),
    ];
    let post_body = Bytes::from(json!({ "name": "sneaky" }).to_string());
    let bad_auth: [(&str, Option<String>); 8] = [
        ("no header", None),
        ("wrong token", Some("Bearer not-a-token".into())),
        ("admin token plus a byte", Some(format!("Bearer {ADMIN_TOKEN}x"))),
        ("agent token plus a byte", Some(format!("Bearer {secret}x"))),
        ("empty bearer", Some("Bearer ".into())),
        ("no scheme", Some(ADMIN_TOKEN.into())),
        ("basic scheme", Some("Basic dGVzdC1hZG1pbi10b2tlbjo=".into())),
        ("token id instead of secret", Some(format!("Bearer {id}"))),
    ];
    let anon = ApiClient::anonymous(relay.api_addr);
    for (method, path) in token_routes.iter().chain(&agent_routes) {
        for (what, auth) in &bad_auth {
            let mut headers = vec![("content-type", "application/json")];
            if let Some(a) = auth {
                headers.push(("authorization", a.as_str()));
            }
            let body = (*method == Method::POST).then(|| post_body.clone());
            let resp = anon.send(method.clone(), path, &headers, body).await;
            assert_eq!(resp.status, StatusCode::UNAUTHORIZED, "{what}: {:?}", resp.text());
            resp.expect_error(StatusCode::UNAUTHORIZED, "unauthorized");
        }
    }
    // A malformed body from an unknown caller is still a 401, not a 400.
    anon.post_raw("/api/v1/tokens", "application/json", "{not json")
        .await
        .expect_error(StatusCode::UNAUTHORIZED, "unauthorized");

    // Agent tokens: 403 on tokens, their own (empty) view of agents and tunnels.
    for (what, token) in [("flag token", relay.token().to_owned()), ("API token", secret.clone())] {
        let agent = ApiClient::new(relay.api_addr, &token);
        for (method, path) in &token_routes {
            let body = (*method == Method::POST).then(|| post_body.clone());
            let resp = agent
                .send(method.clone(), path, &[("content-type", "application/json")], body)
                .await;
            let message = resp.expect_error(StatusCode::FORBIDDEN, "forbidden");
            assert!(!message.is_empty(), "{what}");
        }
        assert_eq!(list(&agent, "/api/v1/agents", "agents").await, Vec::<Value>::new(), "{what}");
        assert_eq!(list(&agent, "/api/v1/tunnels", "tunnels").await, Vec::<Value>::new(), "{what}");
        agent.get("/api/v1/agents/1").await.expect_error(StatusCode::NOT_FOUND, "not_found");
    }
    // Nothing the agent tokens tried took effect.
    let tokens = list(&api, "/api/v1/tokens", "tokens").await;
    assert_eq!(names(&tokens, "name"), ["scoped"], "{tokens:#?}");
    assert!(tokens[0]["revoked_at"].is_null(), "an agent token revoked itself: {tokens:#?}");

    // Revoked: 401 from then on; the flag token is unaffected.
    api.delete(&format!("/api/v1/tokens/{id}")).await.expect(StatusCode::OK);
    let revoked = ApiClient::new(relay.api_addr, &secret);
    for path in ["/api/v1/agents", "/api/v1/tunnels"] {
        revoked.get(path).await.expect_error(StatusCode::UNAUTHORIZED, "unauthorized");
    }
    ApiClient::new(relay.api_addr, relay.token())
        .get("/api/v1/agents")
        .await
        .expect(StatusCode::OK);

    // No token needed for the document; the metrics take the admin token.
    anon.get("/api/v1/openapi.json").await.expect(StatusCode::OK);
    anon.get("/metrics").await.expect_error(StatusCode::UNAUTHORIZED, "unauthorized");
    let metrics = ApiClient::new(relay.api_addr, ADMIN_TOKEN).get("/metrics").await;
    assert_eq!(metrics.status, StatusCode::OK, "{:?}", metrics.text());
    assert!(metrics.content_type().starts_with("text/plain"), "{:?}", metrics.content_type());
    let text = metrics.text();
    for line in ["warren_sessions 0", "warren_tunnels{state=\"online\"} 0"] {
        assert!(text.lines().any(|l| l == line), "no line {line:?} in metrics:\n{text}");
    }
}

// ---------------------------------------------------------------------------------------------
// Tokens.

/// Create, list, get and revoke tokens; malformed bodies (400), invalid ones (422) and taken
/// names (409) create nothing; unknown ids are 404; the secret shows only in the create answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_lifecycle_and_bad_bodies() {
    let relay = Relay::start_default().await;
    let api = admin(&relay);
    assert_eq!(list(&api, "/api/v1/tokens", "tokens").await, Vec::<Value>::new());

    let resp = api
        .post_json(
            "/api/v1/tokens",
            &json!({ "name": "ci-runner", "max_tunnels": 3, "max_connections": 50 }),
        )
        .await;
    assert!(resp.content_type().starts_with("application/json"), "{:?}", resp.content_type());
    let limited = resp.expect(StatusCode::CREATED);
    let limited_id = str_field(&limited, "id");
    let limited_secret = str_field(&limited, "token");
    assert!(limited_id.starts_with("tok_"), "{limited}");
    assert_eq!(limited["name"], "ci-runner");
    assert_eq!(limited["max_tunnels"], 3);
    assert_eq!(limited["max_connections"], 50);
    assert!(limited["revoked_at"].is_null(), "{limited}");
    assert_recent(&limited, "created_at");
    assert!(limited_secret.len() >= 20, "a short secret: {limited}");
    assert!(!limited_secret.contains(&limited_id), "{limited}");

    let (plain, plain_id, plain_secret) = create_token(&api, json!({ "name": "plain" })).await;
    assert!(plain["max_tunnels"].is_null() && plain["max_connections"].is_null(), "{plain}");
    assert_ne!(plain_id, limited_id);
    assert_ne!(plain_secret, limited_secret);

    // Bodies that are not JSON at all: 400.
    let not_json = [
        ("truncated", "{\"name\": "),
        ("not JSON", "name=x"),
        ("empty", ""),
        ("trailing garbage", "{\"name\": \"x\"} x"),
    ];
    for (what, body) in not_json {
        let resp = api.post_raw("/api/v1/tokens", "application/json", body).await;
        assert_eq!(resp.status, StatusCode::BAD_REQUEST, "{what}: {:?}", resp.text());
        resp.expect_error(StatusCode::BAD_REQUEST, "bad_request");
    }
    // JSON of the wrong shape: 422.
    let long = "n".repeat(65);
    let invalid = [
        json!({}),
        json!({ "name": 5 }),
        json!({ "name": null }),
        json!({ "name": "" }),
        json!({ "name": "   " }),
        json!({ "name": long }),
        json!({ "name": "a/b" }),
        json!({ "name": "x", "extra": 1 }),
        json!({ "name": "x", "max_tunnels": "2" }),
        json!({ "name": "x", "max_tunnels": -1 }),
        json!({ "name": "x", "max_tunnels": 1.5 }),
        json!({ "name": "x", "max_tunnels": 4_294_967_296_u64 }),
        json!({ "name": "x", "max_tunnels": 0 }),
        json!({ "name": "x", "max_connections": 0 }),
        json!({ "name": "x", "max_connections": true }),
        json!([]),
        json!("x"),
        json!(null),
    ];
    for body in &invalid {
        let resp = api.post_json("/api/v1/tokens", body).await;
        assert_eq!(resp.status, StatusCode::UNPROCESSABLE_ENTITY, "body {body}: {:?}", resp.text());
        resp.expect_error(StatusCode::UNPROCESSABLE_ENTITY, "invalid");
    }
    // A taken name: 409, revoked or not, also after trimming.
    for body in [
        json!({ "name": "plain" }),
        json!({ "name": "plain", "max_tunnels": 2 }),
        json!({ "name": " plain " }),
    ] {
        let resp = api.post_json("/api/v1/tokens", &body).await;
        resp.expect_error(StatusCode::CONFLICT, "conflict");
    }
    // None of that created anything.
    let tokens = list(&api, "/api/v1/tokens", "tokens").await;
    assert_eq!(names(&tokens, "name"), ["ci-runner", "plain"], "{tokens:#?}");

    // Listing and getting never show the secret.
    let listed = the_one(&tokens, "id", &limited_id);
    assert!(listed.get("token").is_none(), "the list shows the secret: {listed}");
    let text = api.get("/api/v1/tokens").await.text();
    assert!(!text.contains(&limited_secret) && !text.contains(&plain_secret), "{text}");
    let got = api.get(&format!("/api/v1/tokens/{limited_id}")).await.expect(StatusCode::OK);
    assert_eq!(got, listed);
    let mut created = limited.clone();
    created.as_object_mut().expect("object").remove("token");
    assert_eq!(got, created, "GET differs from what POST answered (secret aside)");

    // Unknown ids.
    for id in ["tok_doesnotexist", "nope", "%20", &format!("{limited_id}x")] {
        let m = api
            .get(&format!("/api/v1/tokens/{id}"))
            .await
            .expect_error(StatusCode::NOT_FOUND, "not_found");
        assert_eq!(m, "no such token", "GET {id}");
        let m = api
            .delete(&format!("/api/v1/tokens/{id}"))
            .await
            .expect_error(StatusCode::NOT_FOUND, "not_found");
        assert_eq!(m, "no such token", "DELETE {id}");
    }

    // Revoke: the secret stops working, the record stays, a second revoke changes nothing.
    let agent = ApiClient::new(relay.api_addr, &plain_secret);
    agent.get("/api/v1/agents").await.expect(StatusCode::OK);
    let revoked = api.delete(&format!("/api/v1/tokens/{plain_id}")).await.expect(StatusCode::OK);
    assert_eq!(revoked["id"], plain_id.as_str());
    assert_eq!(revoked["name"], "plain");
    assert_eq!(revoked["sessions_ended"], 0, "{revoked}");
    assert!(revoked.get("token").is_none(), "revoking shows the secret: {revoked}");
    assert_recent(&revoked, "revoked_at");
    agent.get("/api/v1/agents").await.expect_error(StatusCode::UNAUTHORIZED, "unauthorized");
    let got = api.get(&format!("/api/v1/tokens/{plain_id}")).await.expect(StatusCode::OK);
    assert_eq!(got["revoked_at"], revoked["revoked_at"], "{got}");
    let again = api.delete(&format!("/api/v1/tokens/{plain_id}")).await.expect(StatusCode::OK);
    assert_eq!(again["revoked_at"], revoked["revoked_at"], "a second revoke moved revoked_at");
    let tokens = list(&api, "/api/v1/tokens", "tokens").await;
    assert_eq!(names(&tokens, "name"), ["ci-runner", "plain"], "{tokens:#?}");
    assert!(the_one(&tokens, "id", &limited_id)["revoked_at"].is_null());
    // The other token still works.
    ApiClient::new(relay.api_addr, &limited_secret)
        .get("/api/v1/tunnels")
        .await
        .expect(StatusCode::OK);
}

// ---------------------------------------------------------------------------------------------
// Agents and tunnels.

/// Two agents on two tokens: the admin sees both with every field; each agent token sees only
/// its own agents and tunnels (another token's are 404, also to disconnect); unknown ids are
/// 404. Disconnecting (with the agent's own token, and as the admin) ends the session with 204;
/// the agent reconnects by itself under a new id and its tunnel comes back online.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_and_tunnels_by_token_and_disconnect() {
    let tmp = TempDir::new("api-agents");
    let relay = Relay::start_default().await;
    let api = admin(&relay);
    let web = HttpBackend::start().await;
    let echo = EchoBackend::start().await;
    let (_, b_token_id, b_secret) = create_token(&api, json!({ "name": "team-b" })).await;
    let mut agent_a =
        spawn_agent(&relay, &tmp, relay.token(), "http", web.port(), "agent-a", "quic");
    let mut agent_b = spawn_agent(&relay, &tmp, &b_secret, "tcp", echo.port(), "agent-b", "tcp");
    let url_a = agent_a.http_url().await;
    let url_b = agent_b.tcp_url().await;
    let as_a = ApiClient::new(relay.api_addr, relay.token());
    let as_b = ApiClient::new(relay.api_addr, &b_secret);

    // The admin sees both agents, with every field.
    let agents = list(&api, "/api/v1/agents", "agents").await;
    assert_eq!(names(&agents, "agent_id"), ["agent-a", "agent-b"], "{agents:#?}");
    let a = the_one(&agents, "agent_id", "agent-a");
    let b = the_one(&agents, "agent_id", "agent-b");
    for (v, transport, token_id) in [(&a, "quic", Value::Null), (&b, "tcp", json!(b_token_id))] {
        let id = str_field(v, "id");
        assert!(id.parse::<u64>().is_ok(), "agent id {id:?} is not a session number: {v}");
        assert_eq!(v["transport"], transport, "{v}");
        assert_eq!(v["tunnels"], 1, "{v}");
        assert_eq!(v["token_id"], token_id, "{v}");
        assert!(str_field(v, "addr").starts_with("127.0.0.1:"), "{v}");
        assert!(!str_field(v, "version").is_empty(), "{v}");
        assert_recent(v, "connected_since");
    }
    let (a_id, b_id) = (str_field(&a, "id"), str_field(&b, "id"));
    assert_ne!(a_id, b_id);
    assert_eq!(api.get(&format!("/api/v1/agents/{a_id}")).await.expect(StatusCode::OK), a);

    // The admin sees both tunnels.
    let tunnels = list(&api, "/api/v1/tunnels", "tunnels").await;
    assert_eq!(names(&tunnels, "name"), ["agent-a", "agent-b"], "{tunnels:#?}");
    let ta = the_one(&tunnels, "name", "agent-a");
    let tb = the_one(&tunnels, "name", "agent-b");
    for (t, protocol, url, session) in
        [(&ta, "http", url_a.url.as_str(), &a_id), (&tb, "tcp", url_b.url.as_str(), &b_id)]
    {
        assert_eq!(t["protocol"], protocol, "{t}");
        assert_eq!(t["url"], url, "{t}");
        assert_eq!(t["status"], "online", "{t}");
        assert_eq!(t["session"], session.as_str(), "{t}");
        for counter in ["bytes_in", "bytes_out", "connections_open", "connections_total"] {
            assert_eq!(t[counter], 0, "{counter} before any visitor: {t}");
        }
    }
    let (ta_id, tb_id) = (str_field(&ta, "id"), str_field(&tb, "id"));
    assert_eq!(api.get(&format!("/api/v1/tunnels/{ta_id}")).await.expect(StatusCode::OK), ta);

    // Each agent token sees only its own.
    for (client, own_agent, own_id, own_tunnel, other_id, other_tunnel) in
        [(&as_a, &a, &a_id, &ta, &b_id, &tb_id), (&as_b, &b, &b_id, &tb, &a_id, &ta_id)]
    {
        assert_eq!(list(client, "/api/v1/agents", "agents").await, std::slice::from_ref(own_agent));
        assert_eq!(
            list(client, "/api/v1/tunnels", "tunnels").await,
            std::slice::from_ref(own_tunnel)
        );
        let got = client.get(&format!("/api/v1/agents/{own_id}")).await.expect(StatusCode::OK);
        assert_eq!(&got, own_agent);
        let own_tunnel_id = str_field(own_tunnel, "id");
        let got =
            client.get(&format!("/api/v1/tunnels/{own_tunnel_id}")).await.expect(StatusCode::OK);
        assert_eq!(&got, own_tunnel);
        let m = client
            .get(&format!("/api/v1/agents/{other_id}"))
            .await
            .expect_error(StatusCode::NOT_FOUND, "not_found");
        assert_eq!(m, "no such agent session");
        let m = client
            .get(&format!("/api/v1/tunnels/{other_tunnel}"))
            .await
            .expect_error(StatusCode::NOT_FOUND, "not_found");
        assert_eq!(m, "no such tunnel");
        let m = client
            .delete(&format!("/api/v1/agents/{other_id}"))
            .await
            .expect_error(StatusCode::NOT_FOUND, "not_found");
        assert_eq!(m, "no such agent session");
    }
    // The refused disconnects did nothing.
    let agents = list(&api, "/api/v1/agents", "agents").await;
    assert_eq!(names(&agents, "id"), {
        let mut ids = vec![a_id.clone(), b_id.clone()];
        ids.sort();
        ids
    });

    // Unknown ids.
    for id in ["0", "abc", "-1", "18446744073709551616", "99999999"] {
        let m = api
            .get(&format!("/api/v1/agents/{id}"))
            .await
            .expect_error(StatusCode::NOT_FOUND, "not_found");
        assert_eq!(m, "no such agent session", "{id}");
        let m = api
            .delete(&format!("/api/v1/agents/{id}"))
            .await
            .expect_error(StatusCode::NOT_FOUND, "not_found");
        assert_eq!(m, "no such agent session", "{id}");
    }
    for id in ["nope", "a:b:c", &format!("{ta_id}x")] {
        let m = api
            .get(&format!("/api/v1/tunnels/{id}"))
            .await
            .expect_error(StatusCode::NOT_FOUND, "not_found");
        assert_eq!(m, "no such tunnel", "{id}");
    }

    // Disconnect B with its own token, and A as the admin.
    for (client, who, old_id, tunnel_id) in
        [(&as_b, "agent-b", &b_id, &tb_id), (&api, "agent-a", &a_id, &ta_id)]
    {
        let resp = client.delete(&format!("/api/v1/agents/{old_id}")).await;
        assert_eq!(resp.status, StatusCode::NO_CONTENT, "disconnect {who}: {:?}", resp.text());
        assert!(resp.body.is_empty(), "204 with a body: {:?}", resp.text());
        let new_id = eventually(SETTLE, || async {
            let agents = list(&api, "/api/v1/agents", "agents").await;
            let mine: Vec<&Value> = agents.iter().filter(|v| v["agent_id"] == who).collect();
            anyhow::ensure!(mine.len() == 1, "{who} is not back (alone): {agents:?}");
            let id = str_field(mine[0], "id");
            anyhow::ensure!(id != *old_id, "{who} still has its old session {old_id}");
            let t = api.get(&format!("/api/v1/tunnels/{tunnel_id}")).await.expect(StatusCode::OK);
            anyhow::ensure!(t["status"] == "online" && t["session"] == id.as_str(), "tunnel {t}");
            Ok(id)
        })
        .await;
        let m = api
            .get(&format!("/api/v1/agents/{old_id}"))
            .await
            .expect_error(StatusCode::NOT_FOUND, "not_found");
        assert_eq!(m, "no such agent session");
        api.get(&format!("/api/v1/agents/{new_id}")).await.expect(StatusCode::OK);
    }
    agent_a.assert_running();
    agent_b.assert_running();
    // Both tunnels carry traffic again, under the same URLs.
    let tunnels = list(&api, "/api/v1/tunnels", "tunnels").await;
    assert_eq!(the_one(&tunnels, "name", "agent-a")["url"], url_a.url.as_str());
    assert_eq!(the_one(&tunnels, "name", "agent-b")["url"], url_b.url.as_str());
    assert_eq!(visit_http(&relay, &url_a.host()).await, web.greeting());
    tcp_echo(url_b.addr(), 1000).await.expect("echo through agent-b after its reconnect");
}

/// Revoking a token ends its agents' sessions at once: the answer counts them, the agent is
/// refused when it reconnects ("unauthorized") and exits non-zero, its session disappears and
/// its tunnel goes offline. Another token's agent is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_token_ends_its_sessions() {
    let tmp = TempDir::new("api-revoke");
    let relay = Relay::start_default().await;
    let api = admin(&relay);
    let web = HttpBackend::start().await;
    let echo = EchoBackend::start().await;
    let (_, id, secret) = create_token(&api, json!({ "name": "doomed" })).await;
    // One agent of the doomed token on each transport, and one of another token.
    let mut doomed_quic =
        spawn_agent(&relay, &tmp, &secret, "http", web.port(), "doomed-q", "quic");
    let mut doomed_tcp = spawn_agent(&relay, &tmp, &secret, "http", web.port(), "doomed-t", "tcp");
    let mut other = spawn_agent(&relay, &tmp, relay.token(), "tcp", echo.port(), "other", "tcp");
    let url = doomed_quic.http_url().await;
    doomed_tcp.http_url().await;
    let other_url = other.tcp_url().await;
    assert_eq!(visit_http(&relay, &url.host()).await, web.greeting());
    let agents = list(&api, "/api/v1/agents", "agents").await;
    let other_id = str_field(&the_one(&agents, "agent_id", "other"), "id");
    for name in ["doomed-q", "doomed-t"] {
        assert_eq!(the_one(&agents, "agent_id", name)["token_id"], id.as_str());
    }

    let revoked = api.delete(&format!("/api/v1/tokens/{id}")).await.expect(StatusCode::OK);
    assert_eq!(revoked["sessions_ended"], 2, "{revoked}");
    assert_eq!(revoked["id"], id.as_str());
    assert_recent(&revoked, "revoked_at");

    for agent in [&mut doomed_quic, &mut doomed_tcp] {
        let stderr = agent.expect_failure(SETTLE).await;
        assert!(
            stderr.to_ascii_lowercase().contains("unauthorized"),
            "the agent should say it was refused as unauthorized; stderr:\n{stderr}"
        );
    }
    eventually(SETTLE, || async {
        let agents = list(&api, "/api/v1/agents", "agents").await;
        anyhow::ensure!(names(&agents, "agent_id") == ["other"], "{agents:?}");
        Ok(())
    })
    .await;
    let agents = list(&api, "/api/v1/agents", "agents").await;
    assert_eq!(the_one(&agents, "agent_id", "other")["id"], other_id.as_str(), "other reconnected");
    let tunnels = list(&api, "/api/v1/tunnels", "tunnels").await;
    for name in ["doomed-q", "doomed-t"] {
        let t = the_one(&tunnels, "name", name);
        assert_eq!(t["status"], "offline", "{t}");
        assert!(t["session"].is_null(), "{t}");
    }
    assert_eq!(the_one(&tunnels, "name", "other")["status"], "online");
    ApiClient::new(relay.api_addr, &secret)
        .get("/api/v1/tunnels")
        .await
        .expect_error(StatusCode::UNAUTHORIZED, "unauthorized");
    other.assert_running();
    tcp_echo(other_url.addr(), 100).await.expect("the other token's tunnel still works");
}

/// A body over the API's size limit is refused with the API's JSON error, like every other
/// error, and without a token it is refused as unauthorized (or too large) all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_get_json_errors() {
    let relay = Relay::start_default().await;
    let tmp = warren_tests::TempDir::new("api-big");
    let big = tmp.write("big.json", &format!("{{\"name\": \"{}\"}}", "a".repeat(3 * 1024 * 1024)));
    // curl, like browsers, reads an answer that comes before its upload is finished.
    for (what, auth, allowed) in [
        ("admin", format!("Authorization: Bearer {}", warren_tests::ADMIN_TOKEN), &[413u16][..]),
        ("anonymous", "X-No-Auth: 1".to_owned(), &[401u16, 413][..]),
    ] {
        let out = tokio::process::Command::new("curl")
            .args(["-sS", "--max-time", "20", "-o", "-", "-w", "\n%{http_code} %{content_type}"])
            .args(["-H", &auth, "-H", "content-type: application/json"])
            .arg("--data-binary")
            .arg(format!("@{}", big.display()))
            .arg(format!("http://{}/api/v1/tokens", relay.api_addr))
            .output()
            .await
            .expect("run curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, tail) = text.rsplit_once('\n').unwrap_or(("", &text));
        let (status, ctype) = tail.split_once(' ').unwrap_or((tail, ""));
        let status: u16 = status.parse().unwrap_or(0);
        assert!(allowed.contains(&status), "{what}: status {status}, body {body:?}");
        assert!(ctype.starts_with("application/json"), "{what}: content type {ctype:?}");
        let v: Value =
            serde_json::from_str(body).unwrap_or_else(|e| panic!("{what}: {e}: {body:?}"));
        assert!(v["error"]["code"].is_string() && v["error"]["message"].is_string(), "{what}: {v}");
    }
    assert_eq!(list(&admin(&relay), "/api/v1/tokens", "tokens").await, Vec::<Value>::new());
}

// ---------------------------------------------------------------------------------------------
// Traffic counters and metrics.

/// A metric's value on the line of `name` whose labels hold `tunnel="TUNNEL"`.
fn metric(text: &str, name: &str, tunnel: &str) -> Option<u64> {
    let label = format!("tunnel=\"{tunnel}\"");
    text.lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with('{')))
        .find(|l| l.contains(&label))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// HTTP requests and TCP echoes through tunnels move their counters in the API (bytes both
/// ways, at least the bodies that went through; exactly the echoed bytes for TCP; connections
/// open and in all), and `/metrics` shows the same numbers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_is_counted() {
    let tmp = TempDir::new("api-traffic");
    let relay = Relay::start_default().await;
    let api = admin(&relay);
    let web = HttpBackend::start().await;
    let echo = EchoBackend::start().await;
    let mut h = spawn_agent(&relay, &tmp, relay.token(), "http", web.port(), "web-stats", "quic");
    let mut t = spawn_agent(&relay, &tmp, relay.token(), "tcp", echo.port(), "tcp-stats", "tcp");
    let host = h.http_url().await.host();
    let tcp = t.tcp_url().await;
    let tunnels = list(&api, "/api/v1/tunnels", "tunnels").await;
    let web_id = str_field(&the_one(&tunnels, "name", "web-stats"), "id");
    let tcp_id = str_field(&the_one(&tunnels, "name", "tcp-stats"), "id");

    // HTTP: a GET and a 64 KiB echo.
    let greeting = visit_http(&relay, &host).await;
    let payload = random_bytes(64 * 1024);
    let resp = within(
        IO_TIMEOUT,
        "POST /echo",
        http_post(relay.http_addr, &host, "/echo", payload.clone()),
    )
    .await
    .expect("POST /echo through the tunnel");
    assert_eq!(resp.status, StatusCode::OK);
    assert!(resp.body == payload, "the echo differs");
    let sent = payload.len() as u64;
    let received = (greeting.len() + resp.body.len()) as u64;
    let web_stats = eventually(SETTLE, || async {
        let v = api.get(&format!("/api/v1/tunnels/{web_id}")).await.expect(StatusCode::OK);
        anyhow::ensure!(u64_field(&v, "bytes_in") >= sent, "bytes_in < {sent}: {v}");
        anyhow::ensure!(u64_field(&v, "bytes_out") >= received, "bytes_out < {received}: {v}");
        anyhow::ensure!(u64_field(&v, "connections_total") >= 1, "no connection counted: {v}");
        Ok(v)
    })
    .await;
    assert_eq!(web_stats["status"], "online");

    // TCP: one echo of 10 000 bytes, and a connection held open.
    tcp_echo(tcp.addr(), 10_000).await.expect("tcp echo");
    let mut held = TcpStream::connect(tcp.addr()).await.expect("connect");
    within(IO_TIMEOUT, "held echo", async {
        held.write_all(&[7u8; 100]).await?;
        let mut back = [0u8; 100];
        held.read_exact(&mut back).await?;
        anyhow::ensure!(back == [7u8; 100], "echo differs");
        anyhow::Ok(())
    })
    .await
    .expect("echo on the held connection");
    let tcp_counts = |v: &Value| {
        ["bytes_in", "bytes_out", "connections_open", "connections_total"].map(|k| u64_field(v, k))
    };
    eventually(SETTLE, || async {
        let v = api.get(&format!("/api/v1/tunnels/{tcp_id}")).await.expect(StatusCode::OK);
        anyhow::ensure!(
            tcp_counts(&v) == [10_100, 10_100, 1, 2],
            "want in/out 10100, 1 open of 2: {v}"
        );
        Ok(())
    })
    .await;
    drop(held);
    let tcp_stats = eventually(SETTLE, || async {
        let v = api.get(&format!("/api/v1/tunnels/{tcp_id}")).await.expect(StatusCode::OK);
        anyhow::ensure!(tcp_counts(&v) == [10_100, 10_100, 0, 2], "want 0 open after closing: {v}");
        Ok(v)
    })
    .await;

    // /metrics agrees.
    eventually(SETTLE, || async {
        let resp = api.get("/metrics").await;
        anyhow::ensure!(resp.status == StatusCode::OK, "{} {:?}", resp.status, resp.text());
        let text = resp.text();
        for line in [
            "warren_sessions 2",
            "warren_tunnels{state=\"online\"} 2",
            "warren_tunnels{state=\"offline\"} 0",
            "# TYPE warren_tunnel_bytes_in_total counter",
        ] {
            anyhow::ensure!(text.lines().any(|l| l == line), "no line {line:?} in:\n{text}");
        }
        let web_now = api.get(&format!("/api/v1/tunnels/{web_id}")).await.expect(StatusCode::OK);
        for (name, key) in [
            ("warren_tunnel_bytes_in_total", "bytes_in"),
            ("warren_tunnel_bytes_out_total", "bytes_out"),
            ("warren_tunnel_streams_total", "connections_total"),
        ] {
            for (tunnel, v) in [("tcp-stats", &tcp_stats), ("web-stats", &web_now)] {
                let want = u64_field(v, key);
                let got = metric(&text, name, tunnel);
                anyhow::ensure!(
                    got == Some(want),
                    "{name} of {tunnel}: {got:?}, API says {want}:\n{text}"
                );
            }
        }
        anyhow::ensure!(
            metric(&text, "warren_tunnel_streams_open", "tcp-stats") == Some(0),
            "{text}"
        );
        Ok(())
    })
    .await;
    h.assert_running();
    t.assert_running();
}

// ---------------------------------------------------------------------------------------------
// Token limits.

/// `max_tunnels: 1`: a second tunnel on the token is refused (the agent exits naming the limit)
/// while the first agent may still re-bind its own after a disconnect. `max_connections: 1`:
/// while one visitor connection is open a second is closed at once, and once the first closes
/// a new one goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_limits() {
    let tmp = TempDir::new("api-limits");
    let relay = Relay::start_default().await;
    let api = admin(&relay);
    let web = HttpBackend::start().await;
    let echo = EchoBackend::start().await;
    let (_, _, one_tunnel) =
        create_token(&api, json!({ "name": "one-tunnel", "max_tunnels": 1 })).await;
    let (_, _, one_conn) =
        create_token(&api, json!({ "name": "one-conn", "max_connections": 1 })).await;

    // max_tunnels.
    let mut first = spawn_agent(&relay, &tmp, &one_tunnel, "http", web.port(), "first", "quic");
    let first_url = first.http_url().await;
    let mut second = spawn_agent(&relay, &tmp, &one_tunnel, "http", web.port(), "second", "quic");
    let stderr = second.expect_failure(READY_TIMEOUT).await;
    assert!(
        stderr.lines().any(|l| l.contains("second") && l.to_ascii_lowercase().contains("limit")),
        "the refused agent should say its tunnel hit the token's limit; stderr:\n{stderr}"
    );
    let as_one = ApiClient::new(relay.api_addr, &one_tunnel);
    let tunnels = list(&as_one, "/api/v1/tunnels", "tunnels").await;
    assert_eq!(names(&tunnels, "name"), ["first"], "{tunnels:#?}");
    // Its own tunnel is not counted against it when it comes back.
    let agents = list(&as_one, "/api/v1/agents", "agents").await;
    let old = str_field(&the_one(&agents, "agent_id", "first"), "id");
    as_one.delete(&format!("/api/v1/agents/{old}")).await.expect(StatusCode::NO_CONTENT);
    eventually(SETTLE, || async {
        let agents = list(&as_one, "/api/v1/agents", "agents").await;
        anyhow::ensure!(agents.len() == 1 && agents[0]["id"] != old.as_str(), "{agents:?}");
        let tunnels = list(&as_one, "/api/v1/tunnels", "tunnels").await;
        anyhow::ensure!(tunnels.len() == 1 && tunnels[0]["status"] == "online", "{tunnels:?}");
        Ok(())
    })
    .await;
    first.assert_running();
    assert_eq!(visit_http(&relay, &first_url.host()).await, web.greeting());

    // max_connections.
    let mut limited = spawn_agent(&relay, &tmp, &one_conn, "tcp", echo.port(), "limited", "tcp");
    let addr = limited.tcp_url().await.addr();
    let mut c1 = TcpStream::connect(addr).await.expect("connect c1");
    within(IO_TIMEOUT, "c1 echo", async {
        c1.write_all(b"ping").await?;
        let mut back = [0u8; 4];
        c1.read_exact(&mut back).await?;
        anyhow::ensure!(&back == b"ping", "echo differs: {back:?}");
        anyhow::Ok(())
    })
    .await
    .expect("the first connection is served");
    let got = within(IO_TIMEOUT, "second connection closed", async {
        let mut c2 = TcpStream::connect(addr).await?;
        let _ = c2.write_all(b"pong").await;
        let mut buf = [0u8; 16];
        anyhow::Ok(c2.read(&mut buf).await.unwrap_or(0))
    })
    .await
    .expect("connect c2");
    assert_eq!(got, 0, "a second connection was served despite max_connections 1");
    assert_eq!(echo.connections(), 1, "the second connection reached the target");
    // The first is still served.
    within(IO_TIMEOUT, "c1 echo again", async {
        c1.write_all(b"more").await?;
        let mut back = [0u8; 4];
        c1.read_exact(&mut back).await?;
        anyhow::ensure!(&back == b"more", "echo differs: {back:?}");
        anyhow::Ok(())
    })
    .await
    .expect("the first connection survives the refused second");
    drop(c1);
    eventually(SETTLE, || async { tcp_echo(addr, 100).await }).await;
    limited.assert_running();
}

// ---------------------------------------------------------------------------------------------
// Persistence.

/// Tokens live in the data dir: after a restart they are listed as before, a token created
/// before still lets an agent in and calls the API, a revoked one stays revoked, and names stay
/// taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_survive_a_restart() {
    let tmp = TempDir::new("api-restart");
    let mut relay = Relay::start_default().await;
    let api = admin(&relay);
    let web = HttpBackend::start().await;
    let (_, keep_id, keep) =
        create_token(&api, json!({ "name": "survivor", "max_tunnels": 2, "max_connections": 7 }))
            .await;
    let (_, gone_id, gone) = create_token(&api, json!({ "name": "gone" })).await;
    api.delete(&format!("/api/v1/tokens/{gone_id}")).await.expect(StatusCode::OK);
    let before = list(&api, "/api/v1/tokens", "tokens").await;

    relay.restart().await;

    let after = list(&api, "/api/v1/tokens", "tokens").await;
    assert_eq!(after, before, "the tokens changed across the restart");
    assert!(the_one(&after, "id", &gone_id)["revoked_at"].is_string());

    let mut agent = spawn_agent(&relay, &tmp, &keep, "http", web.port(), "survivor", "quic");
    let url = agent.http_url().await;
    assert_eq!(visit_http(&relay, &url.host()).await, web.greeting());
    let as_keep = ApiClient::new(relay.api_addr, &keep);
    let agents = list(&as_keep, "/api/v1/agents", "agents").await;
    assert_eq!(the_one(&agents, "agent_id", "survivor")["token_id"], keep_id.as_str());

    let mut refused = spawn_agent(&relay, &tmp, &gone, "http", web.port(), "gone", "quic");
    let stderr = refused.expect_failure(READY_TIMEOUT).await;
    assert!(stderr.to_ascii_lowercase().contains("unauthorized"), "stderr:\n{stderr}");
    ApiClient::new(relay.api_addr, &gone)
        .get("/api/v1/agents")
        .await
        .expect_error(StatusCode::UNAUTHORIZED, "unauthorized");
    for name in ["survivor", "gone"] {
        api.post_json("/api/v1/tokens", &json!({ "name": name }))
            .await
            .expect_error(StatusCode::CONFLICT, "conflict");
    }
    agent.assert_running();
}
