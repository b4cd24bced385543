//! The token service's parsing and limits, table-driven; the endpoint itself is tested end to end
//! (tests/e2e/test_selfservice.py) with a real OAuth client, the real companion and Envoy.

use super::token::{basic_credentials, parse_form, Form};
use super::*;
use axum::http::HeaderMap;

#[test]
fn forms_are_parsed_per_rfc_6749() {
    // (why, body, expected form or part of the error)
    let some = |s: &str| Some(s.to_string());
    let cases: Vec<(&str, &str, Result<Form, &str>)> = vec![
        (
            "every parameter, percent- and plus-encoded",
            "grant_type=client_credentials&scope=dataset%3Apayments+dataset%3Acrm&client_id=pos&client_secret=k%2B1",
            Ok(Form {
                grant_type: some("client_credentials"),
                scope: some("dataset:payments dataset:crm"),
                client_id: some("pos"),
                client_secret: some("k+1"),
            }),
        ),
        ("an empty value counts as omitted", "grant_type=&scope=x", Ok(Form { scope: some("x"), ..Form::default() })),
        ("unknown parameters are ignored", "foo=bar&scope=x", Ok(Form { scope: some("x"), ..Form::default() })),
        ("a repeated parameter is an error", "scope=a&scope=b", Err("parameter `scope` is given more than once")),
        ("repeated, even empty", "client_id=&client_id=pos", Err("`client_id` is given more than once")),
        ("nothing", "", Ok(Form::default())),
    ];
    for (why, body, want) in cases {
        match (parse_form(body.as_bytes()), want) {
            (Ok(got), Ok(want)) => assert_eq!(got, want, "{why}"),
            (Err(got), Err(part)) => assert!(got.contains(part), "{why}: {got:?} should contain {part:?}"),
            (got, want) => panic!("{why}: got {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn basic_credentials_are_form_encoded_then_base64() {
    let with = |value: &str| {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap_or(HeaderValue::from_static("x")));
        h
    };
    let b64 = |s: &str| Base64::encode_string(s.as_bytes());
    use base64ct::{Base64, Encoding};
    assert_eq!(basic_credentials(&HeaderMap::new()), Ok(None), "no header");
    assert_eq!(
        basic_credentials(&with(&format!("Basic {}", b64("pos:s3cret")))),
        Ok(Some(("pos".into(), "s3cret".into())))
    );
    assert_eq!(
        basic_credentials(&with(&format!("basic {}", b64("my%20app:a%3Ab+c")))),
        Ok(Some(("my app".into(), "a:b c".into()))),
        "§2.3.1: form-urlencoded before base64; the scheme in any case"
    );
    for (why, value, part) in [
        ("another scheme", "Bearer abc".to_string(), "`Bearer` is not supported"),
        ("not base64", "Basic !!!".to_string(), "not base64"),
        ("no colon", format!("Basic {}", b64("pos")), "no `:`"),
        ("no credentials", "Basic".to_string(), "not `Basic <credentials>`"),
    ] {
        match basic_credentials(&with(&value)) {
            Err(e) => assert!(e.contains(part), "{why}: {e:?} should contain {part:?}"),
            Ok(got) => panic!("{why}: accepted as {got:?}"),
        }
    }
}

#[test]
fn rates_parse_and_name_the_flag() {
    assert_eq!(parse_rate("60/1m", "--token-rate"), Ok(Rate { requests: 60, per: Duration::from_secs(60) }));
    assert_eq!(parse_rate("3000/1s", "--rate"), Ok(Rate { requests: 3000, per: Duration::from_secs(1) }));
    for (bad, part) in [
        ("60", "no `/`"),
        ("0/1m", "zero requests"),
        ("x/1m", "not a whole number"),
        ("-5/1m", "not a whole number"),
        ("5/0s", "greater than zero"),
        ("5/soon", "--rate 5/soon"),
    ] {
        match parse_rate(bad, "--rate") {
            Err(e) => assert!(e.contains(part) && e.starts_with("--rate "), "{bad}: {e:?} should contain {part:?}"),
            Ok(r) => panic!("{bad}: accepted as {r:?}"),
        }
    }
}

#[test]
fn the_limiter_gives_each_client_its_bucket_and_refills_it() {
    let limiter = Limiter::new(Rate { requests: 2, per: Duration::from_secs(10) });
    let t0 = Instant::now();
    assert_eq!(limiter.take("a", t0), Ok(()));
    assert_eq!(limiter.take("a", t0), Ok(()));
    assert_eq!(limiter.take("a", t0), Err(5), "one back in 5 s");
    assert_eq!(limiter.take("b", t0), Ok(()), "another client has its own bucket");
    assert_eq!(limiter.take("a", t0 + Duration::from_secs(5)), Ok(()), "refilled");
    assert_eq!(limiter.take("a", t0 + Duration::from_secs(5)), Err(5));
    assert_eq!(limiter.take("a", t0 + Duration::from_secs(100)), Ok(()), "never above its size");
    assert_eq!(limiter.take("a", t0 + Duration::from_secs(100)), Ok(()));
    assert_eq!(limiter.take("a", t0 + Duration::from_secs(100)), Err(5));
}

#[cfg(unix)]
#[test]
fn an_issuer_key_readable_by_others_is_refused_naming_who() {
    use std::os::unix::fs::PermissionsExt;
    let dir = crate::store::tests::TempDir::new("issuer-key");
    let path = dir.0.join("issuer.jwk");
    std::fs::write(&path, "{}").unwrap_or_else(|e| panic!("{e}"));
    for (mode, part) in [(0o644, "its group and others"), (0o640, "its group (mode 640)"), (0o604, "by others")] {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap_or_else(|e| panic!("{e}"));
        match refuse_if_readable_by_others(&path) {
            Err(e) => assert!(e.to_string().contains(part), "{mode:o}: {e}"),
            Ok(()) => panic!("mode {mode:o} accepted"),
        }
    }
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap_or_else(|e| panic!("{e}"));
    assert!(refuse_if_readable_by_others(&path).is_ok(), "600 is fine");
}

#[test]
fn the_trail_needs_the_consoles_token_where_the_console_does() {
    let with = |value: &str| {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap_or(HeaderValue::from_static("x")));
        h
    };
    let token = "console-token-0123456789";
    // (why, the console's token, the request's headers, allowed)
    let cases = [
        ("no console token (loopback): open", None, HeaderMap::new(), true),
        ("the token", Some(token), with(&format!("Bearer {token}")), true),
        ("the scheme in any case", Some(token), with(&format!("bearer {token}")), true),
        ("no header", Some(token), HeaderMap::new(), false),
        ("another token", Some(token), with("Bearer console-token-0123456788"), false),
        ("a prefix of it", Some(token), with("Bearer console-token"), false),
        ("Basic is not the console's", Some(token), with(&format!("Basic {token}")), false),
    ];
    for (why, console, headers, want) in cases {
        assert_eq!(console_authorized(console, &headers), want, "{why}");
    }
}
