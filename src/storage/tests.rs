use super::*;

#[tokio::test]
async fn local_store_round_trip_and_missing_keys() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let store = Store::open(&url, &StoreOptions::default()).unwrap();
    assert_eq!(store.size("jobs/a/0.png").await.unwrap(), None);
    store.put("jobs/a/0.png", Bytes::from_static(b"png!"), "image/png").await.unwrap();
    assert_eq!(store.size("jobs/a/0.png").await.unwrap(), Some(4));
    assert_eq!(&store.get("jobs/a/0.png").await.unwrap()[..], b"png!");
    assert!(dir.path().join("jobs/a/0.png").is_file());
    assert!(store.presigned_get("jobs/a/0.png", None).await.is_none());
    let missing = store.get("jobs/b/0.png").await.unwrap_err();
    assert!(matches!(missing, StoreError::NotFound { .. }), "{missing}");
    assert!(missing.to_string().contains("jobs/b/0.png"));
    // Keys the file system cannot hold are the caller's error, not an unreachable store.
    let long = format!("uploads/{}.png", "x".repeat(300));
    let size = store.size(&long).await;
    assert!(matches!(size, Ok(None) | Err(StoreError::InvalidKey { .. })), "{size:?}");
    let err = store.get(&long).await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. } | StoreError::InvalidKey { .. }), "{err}");
    let err = store.put(&long, Bytes::from_static(b"x"), "image/png").await.unwrap_err();
    assert!(matches!(err, StoreError::InvalidKey { .. }), "{err}");
    // Bounded reads refuse a larger object without reading it.
    assert_eq!(&store.get_at_most("jobs/a/0.png", 4).await.unwrap()[..], b"png!");
    let err = store.get_at_most("jobs/a/0.png", 3).await.unwrap_err();
    assert!(matches!(err, StoreError::TooLarge { size: 4, max: 3, .. }), "{err}");
    assert!(matches!(store.get_at_most("jobs/b/0.png", 3).await, Err(StoreError::NotFound { .. })));
    // An empty object is empty (for the caller to refuse as what it is), not a failing store.
    store.put("jobs/empty.png", Bytes::new(), "image/png").await.unwrap();
    assert_eq!(store.get_at_most("jobs/empty.png", 3).await.unwrap().len(), 0);
    let under_a_file = store.size("jobs/a/0.png/x").await;
    assert!(matches!(under_a_file, Ok(None) | Err(StoreError::InvalidKey { .. })), "{under_a_file:?}");
}

#[tokio::test]
async fn a_listing_gives_the_first_keys_in_order_however_many_there_are() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&format!("file://{}", dir.path().display()), &StoreOptions::default()).unwrap();
    // Written out of order (the local store lists in the file system's order).
    for i in [7, 3, 11, 0, 5, 9, 1, 10, 2, 8, 4, 6] {
        store.put(&format!("jobs/a/{i:02}.png"), Bytes::from_static(b"x"), "image/png").await.unwrap();
    }
    store.put("jobs/b/00.png", Bytes::from_static(b"x"), "image/png").await.unwrap();
    let first: Vec<String> = (0..5).map(|i| format!("{i:02}.png")).collect();
    assert_eq!(store.list("jobs/a/", 5).await.unwrap(), first);
    assert_eq!(store.list("jobs/a/", 100).await.unwrap().len(), 12);
    assert_eq!(store.list("jobs/a/", 0).await.unwrap(), Vec::<String>::new());
}

#[tokio::test]
async fn plain_paths_are_local_folders() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("results");
    let store = Store::open(sub.to_str().unwrap(), &StoreOptions::default()).unwrap();
    store.put("k", Bytes::from_static(b"x"), "text/plain").await.unwrap();
    assert!(sub.join("k").is_file());
}

#[test]
fn bad_urls_are_named() {
    let opts = StoreOptions::default();
    let err = Store::open("ftp://host/x", &opts).unwrap_err().to_string();
    assert!(err.contains("\"ftp\""), "{err}");
    let err = Store::open("", &opts).unwrap_err().to_string();
    assert!(err.contains("empty"), "{err}");
    // Credentials in the URL are refused, and not repeated in the message.
    let err = Store::open("s3://AKIA:s3cr3t@bucket/x", &opts).unwrap_err().to_string();
    assert!(err.contains("user name or password") && !err.contains("s3cr3t"), "{err}");
    let err = Store::open("s3://bucket/x?secret=1", &opts).unwrap_err().to_string();
    assert!(err.contains("query"), "{err}");
    let odd = StoreOptions { settings: vec![("AWS_COLOUR".into(), "red".into())], ..Default::default() };
    let err = Store::open("s3://b", &odd).unwrap_err().to_string();
    assert!(err.contains("AWS_COLOUR"), "{err}");
}

/// An S3 endpoint that answers every request 403 with `code`.
fn refusing_s3(code: &'static str) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        use std::io::{BufRead, Write};
        for stream in listener.incoming().take(16) {
            let Ok(mut stream) = stream else { continue };
            let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                line.clear();
            }
            let body = format!("<Error><Code>{code}</Code><Message>refused</Message></Error>");
            let answer = format!(
                "HTTP/1.1 403 Forbidden\r\ncontent-type: application/xml\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(answer.as_bytes());
        }
    });
    port
}

fn s3_at(port: u16) -> Store {
    let settings = [
        ("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}")),
        ("AWS_ALLOW_HTTP", "true".into()),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE".into()),
        ("AWS_SECRET_ACCESS_KEY", "secret".into()),
    ];
    let settings = settings.map(|(k, v)| (k.to_string(), v)).to_vec();
    let opts = StoreOptions { settings, retry_timeout: Duration::from_millis(200), ..Default::default() };
    Store::open("s3://results", &opts).unwrap()
}

#[tokio::test]
async fn an_object_s3_refuses_to_show_is_denied_and_bad_credentials_an_outage() {
    // S3 as it answers credentials without ListBucket asking for a missing key: 403 AccessDenied.
    let store = s3_at(refusing_s3("AccessDenied"));
    let err = store.size("uploads/typo.png").await.unwrap_err();
    assert!(matches!(err, StoreError::Denied { op: "head", .. }), "{err:?}");
    let err = store.get_at_most("uploads/typo.png", 1 << 20).await.unwrap_err();
    assert!(matches!(err, StoreError::Denied { .. }), "{err:?}");
    assert!(err.to_string().contains("access denied"), "{err}");
    // A key named after a code is still the job's.
    let err = store.size("uploads/SignatureDoesNotMatch.png").await.unwrap_err();
    assert!(matches!(err, StoreError::Denied { .. }), "{err:?}");
    // Keys the store does not accept, or a skewed clock: the worker's failure, whatever the object.
    for code in ["SignatureDoesNotMatch", "InvalidAccessKeyId", "RequestTimeTooSkewed"] {
        let store = s3_at(refusing_s3(code));
        let err = store.size("uploads/x.png").await.unwrap_err();
        assert!(matches!(err, StoreError::Failed { .. }), "{code}: {err:?}");
        let err = store.get("uploads/x.png").await.unwrap_err();
        assert!(matches!(err, StoreError::Failed { .. }), "{code}: {err:?}");
    }
}

#[tokio::test]
async fn an_s3_store_without_credentials_says_so() {
    let closed = |()| std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let settings = [
        ("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{}", closed(()))),
        ("AWS_METADATA_ENDPOINT", format!("http://127.0.0.1:{}", closed(()))),
        ("AWS_ALLOW_HTTP", "true".into()),
        ("AWS_REGION", "us-east-1".into()),
    ];
    let settings = settings.map(|(k, v)| (k.to_string(), v)).to_vec();
    let opts = StoreOptions { settings, retry_timeout: Duration::from_millis(200), ..Default::default() };
    let store = Store::open("s3://results", &opts).unwrap();
    let err = format!("{:#}", store.check().await.unwrap_err());
    assert!(err.contains("no S3 credentials") && err.contains("AWS_ACCESS_KEY_ID"), "{err}");
}

#[tokio::test]
async fn s3_urls_presign_with_the_prefix() {
    let settings = [("AWS_ACCESS_KEY_ID", "test"), ("aws_secret_access_key", "test"), ("AWS_REGION", "us-east-1")];
    let settings = settings.map(|(k, v)| (k.to_string(), v.to_string())).to_vec();
    let opts = StoreOptions { settings, ..Default::default() };
    let store = Store::open("s3://results-bucket/fleet-a", &opts).unwrap();
    let url = store.presigned_get("jobs/x/0.png", None).await.expect("S3 stores presign");
    assert!(url.contains("results-bucket") && url.contains("fleet-a/jobs/x/0.png"), "{url}");
    assert!(url.contains("X-Amz-Signature="), "{url}");
}

#[tokio::test]
async fn presigned_urls_name_the_public_endpoint_when_given() {
    let settings = [
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ENDPOINT_URL", "http://minio:9000"),
        ("AWS_ALLOW_HTTP", "true"),
    ];
    let settings = settings.map(|(k, v)| (k.to_string(), v.to_string())).to_vec();
    let opts = StoreOptions { settings: settings.clone(), ..Default::default() };
    let inside = Store::open("s3://results", &opts).unwrap().presigned_get("jobs/x/0.png", None).await.unwrap();
    assert!(inside.starts_with("http://minio:9000/results/jobs/x/0.png?"), "{inside}");
    let opts = StoreOptions { settings, presign_endpoint: Some("http://127.0.0.1:9000".into()), ..Default::default() };
    let public = Store::open("s3://results", &opts).unwrap().presigned_get("jobs/x/0.png", None).await.unwrap();
    assert!(public.starts_with("http://127.0.0.1:9000/results/jobs/x/0.png?"), "{public}");
    assert!(public.contains("X-Amz-Signature="), "{public}");
    let no_scheme = StoreOptions { presign_endpoint: Some("127.0.0.1:9000".into()), ..opts.clone() };
    let err = Store::open("s3://results", &no_scheme).unwrap_err().to_string();
    assert!(err.contains("not an http:// or https:// URL"), "{err}");
    let gcs = Store::open("gs://results", &opts).unwrap_err().to_string();
    assert!(gcs.contains("S3 stores only"), "{gcs}");
}
