use super::*;
use clap::Parser;

#[derive(Debug, Parser)]
struct FileCli {
    #[command(flatten)]
    args: FileArgs,
}

fn file_args(line: &[&str]) -> FileArgs {
    let base = ["guardrail-request", "--server", "http://127.0.0.1:1", "--app", "pos", "--api-key-file", "k"];
    let until = ["--until", "2026-12-20", "--reason", "batch"];
    let argv = base.iter().chain(line).chain(&until).copied();
    match FileCli::try_parse_from(argv) {
        Ok(cli) => cli.args,
        Err(e) => panic!("{line:?}: {e}"),
    }
}

#[test]
fn each_kind_becomes_the_json_the_companion_takes() {
    let cases: &[(&[&str], Value)] = &[
        (
            &["quota", "--rate", "3000/1m", "--daily-budget", "50000"],
            serde_json::json!({"kind": "quota", "app": "pos", "until": "2026-12-20", "reason": "batch",
                "rate": "3000/1m", "daily_budget": 50000}),
        ),
        (
            &["quota", "--daily-budget", "7"],
            serde_json::json!({"kind": "quota", "app": "pos", "until": "2026-12-20", "reason": "batch",
                "daily_budget": 7}),
        ),
        (
            &["connector", "--connector", "partner-api"],
            serde_json::json!({"kind": "connector", "app": "pos", "until": "2026-12-20", "reason": "batch",
                "connector": "partner-api"}),
        ),
        (
            &["access", "--dataset", "vault"],
            serde_json::json!({"kind": "access", "app": "pos", "until": "2026-12-20", "reason": "batch",
                "dataset": "vault"}),
        ),
        (&["review"], serde_json::json!({"kind": "review", "app": "pos", "until": "2026-12-20", "reason": "batch"})),
    ];
    for (line, want) in cases {
        let got = filing(&file_args(line)).map_err(|e| e.0);
        assert_eq!(got.as_ref(), Ok(want), "{line:?}");
    }
}

#[test]
fn flags_a_kind_needs_or_cannot_take_are_usage_errors() {
    let cases: &[(&[&str], &str)] = &[
        (&["quota"], "a quota request needs --rate REQUESTS/DURATION and/or --daily-budget N"),
        (&["quota", "--rate", "3000/1m", "--dataset", "vault"], "--dataset is not part of a quota request"),
        (&["connector"], "a connector request needs --connector NAME"),
        (&["connector", "--connector", "x", "--rate", "1/1s"], "--rate is not part of a connector request"),
        (&["access"], "a access request needs --dataset ID"),
        (&["access", "--dataset", "v", "--connector", "x"], "--connector is not part of a access request"),
        (&["review", "--daily-budget", "5"], "--daily-budget is not part of a review request"),
    ];
    for (line, want) in cases {
        let got = filing(&file_args(line)).map_err(|e| e.0);
        assert_eq!(got, Err(want.to_string()), "{line:?}");
    }
}

#[test]
fn a_kind_clap_does_not_know_is_refused_by_clap() {
    let e = FileCli::try_parse_from([
        "g",
        "refund",
        "--server",
        "s",
        "--app",
        "a",
        "--api-key-file",
        "k",
        "--until",
        "u",
        "--reason",
        "r",
    ]);
    let e = e.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("invalid value 'refund'") && e.contains("quota, connector, access, review"), "{e}");
}

#[test]
fn basic_credentials_are_what_the_companion_parses() {
    // The app id and key go through the server's own parser (RFC 6749 §2.3.1: form-urlencoded, base64).
    for (app, key) in [("pos", "k-pos-0001"), ("a:b c", "key with %, + and :"), ("é", "ü")] {
        let auth = Auth::Basic { app: app.into(), key: key.into() };
        let mut headers = axum::http::HeaderMap::new();
        let value = axum::http::HeaderValue::from_str(&auth.header().unwrap_or_default());
        headers.insert(AUTHORIZATION, value.unwrap_or_else(|e| panic!("{app}: {e}")));
        let parsed = crate::selfservice::token::basic_credentials(&headers);
        assert_eq!(parsed, Ok(Some((app.to_string(), key.to_string()))), "{app}");
    }
    assert_eq!(Auth::Bearer("t-1".into()).header().as_deref(), Some("Bearer t-1"));
    // An approver by certificate sends no Authorization at all: the TLS session is the credential.
    assert_eq!(Auth::Certificate.header(), None);
}

/// No TLS flags.
fn plain() -> crate::tls::ClientArgs {
    crate::tls::ClientArgs::default()
}

#[test]
fn the_server_is_an_http_address() {
    let ok = [
        ("http://127.0.0.1:18001", "127.0.0.1:18001", "", "http://127.0.0.1:18001"),
        ("127.0.0.1:18001", "127.0.0.1:18001", "", "http://127.0.0.1:18001"),
        ("http://127.0.0.1:18001/", "127.0.0.1:18001", "", "http://127.0.0.1:18001"),
        ("http://guardrail.internal", "guardrail.internal:80", "", "http://guardrail.internal:80"),
        ("http://[::1]:8080/guardrail/", "[::1]:8080", "/guardrail", "http://[::1]:8080/guardrail"),
        ("http://[::1]", "[::1]:80", "", "http://[::1]:80"),
    ];
    for (server, authority, prefix, base) in ok {
        let api = Api::new(server, &plain()).map_err(|e| format!("{e:#}"));
        let got = api.map(|a| (a.authority, a.prefix, a.base));
        assert_eq!(got, Ok((authority.to_string(), prefix.to_string(), base.to_string())), "{server}");
    }
    let bad = [
        ("https://127.0.0.1:18001", "https:// needs --tls-ca FILE"),
        ("ftp://h:1", "expected http://HOST:PORT or https://HOST:PORT"),
        ("http://", "expected http://HOST:PORT"),
        ("http://user:pw@h:1", "expected http://HOST:PORT"),
        ("http://h:port", "port `port` is not a port"),
        ("http://h:70000", "port `70000` is not a port"),
        ("http://h:1/?x=1", "no query or fragment"),
    ];
    for (server, want) in bad {
        let got = Api::new(server, &plain()).map(|_| ()).map_err(|e| format!("{e:#}"));
        assert!(got.as_ref().is_err_and(|e| e.contains(want) && e.starts_with("--server ")), "{server}: {got:?}");
    }
}

#[test]
fn paths_carry_filters_and_only_request_ids() {
    assert_eq!(list_path(None, None), "/api/v1/requests");
    assert_eq!(list_path(Some("pending"), Some("a b&c")), "/api/v1/requests?status=pending&app=a+b%26c");
    assert_eq!(
        decision_path("req-0123456789ab", "approve").map_err(|e| e.0),
        Ok("/api/v1/requests/req-0123456789ab/approve".into())
    );
    for id in ["", "../token", "req-1?x", "req 1", "req/1", &"x".repeat(65)] {
        let got = decision_path(id, "reject").map_err(|e| e.0);
        assert!(got.as_ref().is_err_and(|e| e.contains("not a request id")), "{id:?}: {got:?}");
    }
}

#[test]
fn secrets_are_trimmed_and_must_be_one_line() {
    let dir = std::env::temp_dir().join(format!("guardrail-requests-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    assert_eq!(read_secret(&write("ok", "  k-pos-0001\n"), "--api-key-file").unwrap(), "k-pos-0001");
    let errors = [
        (write("empty", " \n"), "--api-key-file ", "the file is empty"),
        (write("two", "a\nb\n"), "--api-key-file ", "more than one line"),
        (dir.join("missing"), "--api-key-file ", "cannot read"),
    ];
    for (path, start, want) in errors {
        let e = read_secret(&path, "--api-key-file").map_err(|e| format!("{e:#}"));
        assert!(e.as_ref().is_err_and(|e| e.starts_with(start) && e.contains(want)), "{}: {e:?}", path.display());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

fn answer(status: u16, problem: bool, body: &str, hint: &'static str) -> Answer {
    Answer { status, problem, body: Bytes::from(body.to_string()), asked: "POST /api/v1/requests".into(), hint }
}

#[test]
fn refusals_show_the_problem_detail_and_what_to_check() {
    let api = Api::new("http://127.0.0.1:18001", &plain()).unwrap();
    let detail = "rate 5/1m: app `x` already has 5/1m — ask for more than it has";
    let body = serde_json::json!({"type": "urn:guardrail:problem:invalid-request", "title": "Unprocessable Entity",
        "status": 422, "detail": detail});
    let r = answer(422, true, &body.to_string(), "the hint");
    assert_eq!(r.refusal(&api), format!("refused (422 invalid-request): {detail}"));
    let e = answer(422, true, &body.to_string(), "the hint").json(&api).map_err(|e| format!("{e:#}"));
    assert_eq!(e, Err(format!("refused (422 invalid-request): {detail}")));

    let body = serde_json::json!({"type": "urn:guardrail:problem:unauthenticated", "status": 401,
        "detail": "unknown app id or API key"});
    let hint = Auth::Basic { app: String::new(), key: String::new() }.hint();
    let r = answer(401, true, &body.to_string(), hint);
    assert_eq!(r.refusal(&api), format!("refused (401 unauthenticated): unknown app id or API key\n{hint}"));

    let r = answer(404, false, "", "");
    assert_eq!(
        r.refusal(&api),
        "the companion at http://127.0.0.1:18001 answered 404 to POST /api/v1/requests (is it a companion of this \
         release, with --http?)"
    );
    let r = answer(502, false, "bad\ngateway", "");
    assert!(r.refusal(&api).contains("answered 502 to POST /api/v1/requests: badgateway"), "{}", r.refusal(&api));
}

fn sample() -> Request {
    serde_json::from_value(serde_json::json!({
        "id": "req-0123456789ab", "kind": "quota", "app": "claims-bot", "status": "pending",
        "filed_at": "2026-12-06T10:00:00Z", "until": "2026-12-21T00:00:00Z", "until_secs": 1_797_811_200,
        "reason": "month-end batch", "rate": "3000/1m", "risk_tier": "amber",
        "risk_reasons": ["data class `regulated`", "no owner"],
        "change": "rate 600/1m → 3000/1m until 2026-12-21T00:00:00Z",
    }))
    .unwrap()
}

#[test]
fn a_request_is_shown_field_by_field() {
    let text = render(&sample(), "filed");
    let want = "request req-0123456789ab filed, pending
  app     claims-bot
  kind    quota
  status  pending
  change  rate 600/1m → 3000/1m until 2026-12-21T00:00:00Z
  risk    amber (data class `regulated`; no owner)
  until   2026-12-21T00:00:00Z
  filed   2026-12-06T10:00:00Z
  reason  month-end batch
";
    assert_eq!(text, want);

    let mut approved = sample();
    approved.status = "approved".into();
    approved.decided_by = Some("alice".into());
    approved.decided_at = Some("2026-12-06T11:00:00Z".into());
    approved.revision = Some("7+req.0a1b2c3d".into());
    let text = render(&approved, "approved");
    assert!(
        text.starts_with("request req-0123456789ab approved: revision 7+req.0a1b2c3d pushed to the fleet\n"),
        "{text}"
    );
    assert!(text.contains("  decided   approved by alice at 2026-12-06T11:00:00Z\n"), "{text}");
    assert!(!text.contains("decision "), "no reason was given: {text}");

    let mut rejected = sample();
    rejected.status = "rejected".into();
    rejected.decided_by = Some("bob".into());
    rejected.decision_reason = Some("use the partner gateway".into());
    let text = render(&rejected, "rejected");
    assert!(text.starts_with("request req-0123456789ab rejected\n"), "{text}");
    assert!(text.contains("  decided   rejected by bob\n  decision  use the partner gateway\n"), "{text}");
}

#[test]
fn the_list_is_a_table_in_the_order_given() {
    assert_eq!(render_list(&[]), "no requests\n");
    let mut older = sample();
    older.id = "req-ffffffffffff".into();
    older.kind = Kind::Review;
    older.change = "app `claims-bot`'s review_by (none) → 2026-12-20".into();
    let text = render_list(&[sample(), older]);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["ID", "APP", "KIND", "STATUS", "UNTIL", "RISK", "CHANGE"]
    );
    assert!(
        lines[1].starts_with("  req-0123456789ab  claims-bot  quota   pending  2026-12-21T00:00:00Z  amber  rate"),
        "{text}"
    );
    assert!(lines[2].starts_with("  req-ffffffffffff  claims-bot  review  pending"), "{text}");
    assert_eq!(lines.len(), 3);
}

#[test]
fn a_companion_not_listening_is_named() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).unwrap().port();
    let api = Api::new(&format!("127.0.0.1:{port}"), &plain()).unwrap();
    let e = api.call(Method::GET, "/api/v1/requests", &Auth::Bearer("t".into()), None).map(|_| ());
    let e = e.map_err(|e| format!("{e:#}"));
    assert_eq!(
        e,
        Err(format!(
            "cannot reach the companion at http://127.0.0.1:{port}: connection refused (is `guardrail serve --http` running there?)"
        ))
    );
}

#[test]
fn a_peer_that_does_not_speak_http_1_is_named() {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let peer = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut buf = [0u8; 1024];
        let _ = stream.read(&mut buf);
        // What an HTTP/2-only server (the gRPC port) sends to an HTTP/1.1 request: a GOAWAY frame.
        let _ = stream.write_all(&[0, 0, 8, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    });
    let api = Api::new(&format!("http://127.0.0.1:{port}"), &plain()).unwrap();
    let e = api.call(Method::GET, "/api/v1/requests", &Auth::Bearer("t".into()), None).map(|_| ());
    let e = e.map_err(|e| format!("{e:#}"));
    assert!(
        e.as_ref().is_err_and(|e| e.starts_with(&format!("cannot reach the companion at http://127.0.0.1:{port}: "))
            && e.ends_with(
                "(is this the companion's --http address? its gRPC --listen port does not answer HTTP/1.1)"
            )),
        "{e:?}"
    );
    peer.join().unwrap();
}

#[test]
fn a_peer_that_never_answers_is_given_up_on() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut api = Api::new(&format!("http://127.0.0.1:{port}"), &plain()).unwrap();
    assert_eq!(api.timeout, Duration::from_secs(10));
    api.timeout = Duration::from_millis(50);
    // Connected (the backlog accepts it), never answered.
    let e = api.call(Method::GET, "/api/v1/requests", &Auth::Bearer("t".into()), None).map(|_| ());
    let e = e.map_err(|e| format!("{e:#}"));
    assert_eq!(e, Err(format!("cannot reach the companion at http://127.0.0.1:{port}: no answer within 50ms")));
    drop(listener);
}
