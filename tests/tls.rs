//! HTTPS with rustls: ALPN offers h2 and http/1.1, and the data path works over both.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::harness::*;
use common::mock_upstream::MockUpstream;
use http::{Method, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::json;

const TOKEN: &str = "tg-tls";

#[tokio::test]
async fn serves_https_with_alpn() {
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();

    let toml = format!(
        r#"
[server]
tls_cert = "{}"
tls_key = "{}"

[upstream]
base_url = "{}"

[[projects]]
name = "p"
api_key_env = "OPENAI_KEY"

[[projects.credentials]]
name = "c"
token_sha256 = "{}"
"#,
        cert_path.display(),
        key_path.display(),
        mock.base_url(),
        sha256_hex(TOKEN)
    );
    let proxy = TestProxy::start(&toml).await;

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der().clone()).unwrap();
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();

    for (http2, expected) in [(true, Version::HTTP_2), (false, Version::HTTP_11)] {
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls.clone())
            .https_only();
        let connector = if http2 {
            builder.enable_http2().build()
        } else {
            builder.enable_http1().build()
        };
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
        let url = format!(
            "https://localhost:{}/v1/chat/completions",
            proxy.addr.port()
        );
        let auth = format!("Bearer {TOKEN}");
        let response = client
            .request(request(
                Method::POST,
                &url,
                &[
                    ("authorization", &auth),
                    ("content-type", "application/json"),
                ],
                Bytes::from(json!({"model": "gpt-4o-mini", "messages": []}).to_string()),
            ))
            .await
            .unwrap();
        assert_eq!(response.version(), expected);
        assert_eq!(response.status(), StatusCode::OK);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert!(body["usage"].is_object());
    }
    assert_eq!(mock.reported().requests_with_usage, 2);

    // Plain HTTP to the TLS port is not served.
    let plain = client()
        .request(request(
            Method::GET,
            &proxy.url("/v1/models"),
            &[],
            Bytes::new(),
        ))
        .await;
    assert!(plain.is_err() || plain.unwrap().status() != StatusCode::OK);
}
