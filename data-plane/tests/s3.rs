//! The artifact store on the S3 protocol: the data plane's aws-sdk-s3
//! client against an in-process S3 server (s3s + s3s-fs) on loopback.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use common::{call_at, credential, dp_proc};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;

const AK: &str = "AKIDTESTTESTTEST";
const SK: &str = "test-secret-key-test-secret-key-0123";

/// An S3 server storing under `root`; returns its endpoint.
async fn s3_server(root: &std::path::Path) -> String {
    let fs = s3s_fs::FileSystem::new(root).unwrap();
    let mut b = s3s::service::S3ServiceBuilder::new(fs);
    b.set_auth(s3s::auth::SimpleAuth::from_single(AK, SK));
    let service = b.build();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let svc = service.clone();
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(sock), svc)
                    .await;
            });
        }
    });
    endpoint
}

#[tokio::test]
async fn artifacts_on_s3_are_encrypted_multipart_and_shredded() {
    let tmp = tempfile::tempdir().unwrap();
    let s3_root = tmp.path().join("s3");
    std::fs::create_dir_all(s3_root.join("artifacts")).unwrap(); // the bucket
    let endpoint = s3_server(&s3_root).await;
    let dp = dp_proc(
        "http://127.0.0.1:9", // no agent needed for artifacts
        tmp.path(),
        &[
            "--artifact-store",
            "s3",
            "--s3-bucket",
            "artifacts",
            "--s3-endpoint",
            &endpoint,
            "--s3-access-key-id",
            AK,
            "--s3-secret-access-key",
            SK,
            "--s3-prefix",
            "dp/",
        ],
    )
    .await;
    let acme = credential("acme");
    let http = reqwest::Client::new();
    // 20 MiB: three multipart parts of the 8 MiB the store writes.
    let data: Vec<u8> = (0..20 * 1024 * 1024u32).map(|i| (i % 249) as u8).collect();
    for payload in [data.clone(), b"small".to_vec()] {
        let resp = http
            .post(format!("{}/internal/v1/artifacts?name=x", dp.url))
            .bearer_auth(&acme)
            .body(payload.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 201);
        let info: Value = resp.json().await.unwrap();
        let id = info["artifactId"].as_str().unwrap().to_owned();
        let back = http
            .get(format!("{}/internal/v1/artifacts/{id}", dp.url))
            .bearer_auth(&acme)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(back.len(), payload.len());
        assert!(
            back.as_ref() == payload.as_slice(),
            "round trip through S3 changed the bytes"
        );

        // At rest in the bucket: ciphertext, under the prefix.
        let object = s3_root.join("artifacts/dp/objects/acme").join(&id);
        let raw = std::fs::read(&object).unwrap();
        assert!(raw.len() > payload.len());
        if payload.len() > 64 {
            assert!(!raw.windows(64).any(|w| w == &payload[4096..4160]));
        }
        // Another tenant sees nothing.
        let (st, _) = call_at(
            &dp.url,
            "GET",
            &format!("/internal/v1/artifacts/{id}/info"),
            Some(&credential("globex")),
            None,
        )
        .await;
        assert_eq!(st, 404);
        // Tampering in the bucket is caught.
        let mut altered = raw.clone();
        altered[20] ^= 1;
        std::fs::write(&object, &altered).unwrap();
        let (st, e) = call_at(
            &dp.url,
            "GET",
            &format!("/internal/v1/artifacts/{id}"),
            Some(&acme),
            None,
        )
        .await;
        assert_eq!(
            (st, e["code"].as_str()),
            (500, Some("integrity_error")),
            "{e}"
        );
        // Delete removes the data key, then the object.
        let dek = s3_root.join(format!("artifacts/dp/keys/acme/{id}.dek"));
        assert!(dek.exists());
        let (st, _) = call_at(
            &dp.url,
            "DELETE",
            &format!("/internal/v1/artifacts/{id}"),
            Some(&acme),
            None,
        )
        .await;
        assert_eq!(st, 204);
        assert!(!dek.exists(), "the data key is still in the bucket");
        assert!(!object.exists());
        let (st, e) = call_at(
            &dp.url,
            "GET",
            &format!("/internal/v1/artifacts/{id}"),
            Some(&acme),
            None,
        )
        .await;
        assert_eq!(
            (st, e["code"].as_str()),
            (404, Some("artifact_not_found")),
            "{e}"
        );
    }
    // The tenant key was created once and is shared by both artifacts.
    assert!(s3_root.join("artifacts/dp/keys/acme/tenant.key").exists());
    dp.stop().await;
}
