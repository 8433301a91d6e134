use super::*;

const ALICE: &str = "sk-alice-0123456789abcdef";
const BOB: &str = "sk-bob-0123456789abcdef01";

fn auth_with(text: &str) -> (tempfile::TempDir, Arc<Auth>) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys");
    std::fs::write(&file, text).unwrap();
    let cfg = AuthConfig { key_file: file, defaults: KeyLimits::default(), open_metrics: false, open_health: false };
    (dir, Auth::load(cfg).unwrap())
}

/// What [`Gate::admit`] checks, without its metrics: the key, then its request rate.
fn check(auth: &Auth, authorization: Option<&[u8]>) -> Result<Arc<Caller>, Denied> {
    let caller = auth.identify(authorization)?;
    caller.admit_request()?;
    Ok(caller)
}

fn bearer_of(key: &str) -> Vec<u8> {
    format!("Bearer {key}").into_bytes()
}

#[test]
fn keys_identify_their_names_and_others_are_refused() {
    let (_dir, auth) = auth_with(&format!("# comment\nalice {ALICE}\n\nbob {BOB}  # trailing\n"));
    assert_eq!(&*check(&auth, Some(&bearer_of(ALICE))).unwrap().name, "alice");
    assert_eq!(&*check(&auth, Some(format!("bearer   {BOB}").as_bytes())).unwrap().name, "bob");
    assert_eq!(check(&auth, None).unwrap_err(), Denied::Missing);
    assert_eq!(check(&auth, Some(&bearer_of("sk-nobody-0123456789abcdef"))).unwrap_err(), Denied::Invalid);
    assert_eq!(check(&auth, Some(ALICE.as_bytes())).unwrap_err(), Denied::Invalid, "no Bearer scheme");
    assert_eq!(check(&auth, Some(b"Basic YWxpY2U6eA==")).unwrap_err(), Denied::Invalid);
    assert_eq!(check(&auth, Some(b"Bearer ")).unwrap_err(), Denied::Invalid);
    assert_eq!(check(&auth, Some(&bearer_of(&"x".repeat(10_000)))).unwrap_err(), Denied::Invalid);
}

#[test]
fn malformed_files_name_the_line_and_never_the_key() {
    let cases = [
        ("alice\n", "line 1: expected"),
        (&*format!("al ice {ALICE}\n"), "line 1"),
        (&*format!("a/b {ALICE}\n"), "line 1: the name"),
        ("alice short\n", "line 1: the key of alice must be 16"),
        (&*format!("alice {ALICE}\nalice {BOB}\n"), "line 2: the name alice appears twice"),
        (&*format!("alice {ALICE}\nbob {ALICE}\n"), "line 2: the key of bob is also"),
        (&*format!("alice {ALICE} requests_per_minute=0\n"), "line 1: requests_per_minute"),
        (&*format!("alice {ALICE} burst=5\n"), "line 1: \"burst\""),
        ("# nothing\n", "holds no key"),
    ];
    for (text, want) in cases {
        let mut entries = parse(text, KeyLimits::default());
        let err = entries.as_mut().map(|_| ()).unwrap_err().clone();
        assert!(err.contains(want), "{text:?}: {err}");
        assert!(!err.contains(ALICE) && !err.contains(BOB), "{err}");
    }
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("absent-keys");
    let cfg = AuthConfig { key_file: missing, defaults: KeyLimits::default(), open_metrics: false, open_health: false };
    assert!(Auth::load(cfg).err().unwrap().contains("absent-keys"));
}

#[test]
fn reload_adds_and_removes_keys_and_a_bad_file_keeps_the_old_ones() {
    let (dir, auth) = auth_with(&format!("alice {ALICE}\n"));
    let file = dir.path().join("keys");
    assert!(check(&auth, Some(&bearer_of(BOB))).is_err());
    std::fs::write(&file, format!("bob {BOB}\n")).unwrap();
    assert_eq!(auth.reload().unwrap(), 1);
    assert!(check(&auth, Some(&bearer_of(BOB))).is_ok());
    assert_eq!(check(&auth, Some(&bearer_of(ALICE))).unwrap_err(), Denied::Invalid, "removed");
    std::fs::write(&file, "garbage\n").unwrap();
    assert!(auth.reload().is_err());
    assert!(check(&auth, Some(&bearer_of(BOB))).is_ok(), "old keys stay after a failed reload");
}

#[test]
fn request_limits_answer_with_a_wait_and_survive_a_reload() {
    let (dir, auth) = auth_with(&format!("alice {ALICE} requests_per_minute=2\nbob {BOB}\n"));
    for _ in 0..2 {
        check(&auth, Some(&bearer_of(ALICE))).unwrap();
    }
    let Denied::RateLimited { retry_after, what } = check(&auth, Some(&bearer_of(ALICE))).unwrap_err() else {
        panic!("expected a rate limit")
    };
    assert_eq!(what, "request");
    // Two a minute: the next one is due within 30 s.
    assert!(retry_after <= Duration::from_secs(30) && retry_after > Duration::from_secs(20), "{retry_after:?}");
    for _ in 0..100 {
        check(&auth, Some(&bearer_of(BOB))).unwrap();
    }
    // An unchanged line keeps its spent budget across a reload.
    std::fs::write(dir.path().join("keys"), format!("bob {BOB}\nalice {ALICE} requests_per_minute=2\n")).unwrap();
    auth.reload().unwrap();
    assert!(matches!(check(&auth, Some(&bearer_of(ALICE))), Err(Denied::RateLimited { .. })));
}

#[test]
fn token_limits_charge_whole_requests() {
    let (_dir, auth) = auth_with(&format!("alice {ALICE} tokens_per_minute=1000\n"));
    let alice = check(&auth, Some(&bearer_of(ALICE))).unwrap();
    alice.charge_tokens(600).unwrap();
    assert!(matches!(alice.charge_tokens(600), Err(Denied::RateLimited { what: "token", .. })));
    alice.charge_tokens(400).unwrap();
    assert_eq!(alice.charge_tokens(5000), Err(Denied::TooLarge { tokens: 5000, per_minute: 1000 }));
    assert!(alice.charge_tokens(u64::MAX).is_err());
}

#[test]
fn retry_seconds_round_up() {
    assert_eq!(retry_secs(Duration::ZERO), 1);
    assert_eq!(retry_secs(Duration::from_millis(1)), 1);
    assert_eq!(retry_secs(Duration::from_millis(1001)), 2);
    assert_eq!(retry_secs(Duration::from_secs(3)), 3);
}
