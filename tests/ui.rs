//! The web UI end to end: a real queen (serving the embedded UI), worker and nats-server on the tiny model,
//! driven in Debian's Chromium by Playwright's library (`ui/e2e/run.mjs`; `scripts/test.sh` installs both).
//! Screenshots of every screen land in `target/tmp/ui-e2e/`.

use crate::common;

use std::time::Duration;

use common::queen::{client, start_queen, wait_for_fleet, TOKEN};
use common::servers::{NatsServer, WorkerProcess};
use sd_rbee::queen::http::TokenPolicy;

/// A token of tenant `acme`: the UI shows it its tenant, and none of the operator's jobs or workers.
const TENANT_TOKEN: &str = "acme-token-0123456789abcdef";

#[tokio::test(flavor = "multi_thread")]
async fn a_person_signs_in_generates_edits_cancels_and_browses_in_a_browser() {
    let ui = concat!(env!("CARGO_MANIFEST_DIR"), "/ui");
    assert!(
        std::path::Path::new(ui).join("node_modules/playwright-core").is_dir(),
        "the UI's test dependencies are missing: run `npm ci` in ui/ (scripts/test.sh does)"
    );
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        std::path::Path::new(&chromium).exists(),
        "no browser at {chromium}: install Debian's chromium package (scripts/test.sh does) or set CHROMIUM"
    );
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let store = format!("file://{}", dir.path().display());
    // Two LoRAs in the worker's catalogue, for the form's LoRA picker.
    let loras = tempfile::tempdir().unwrap();
    for name in ["style", "detail"] {
        let from = common::fixture("tiny-sd15").join("lora").join(format!("{name}.safetensors"));
        std::fs::copy(from, loras.path().join(format!("{name}.safetensors"))).unwrap();
    }
    let lora_dir = loras.path().display().to_string();
    // Slow steps, so a long job can be cancelled while it runs and the progress bar is seen moving.
    let _worker =
        WorkerProcess::start("ui-w1", &nats.url(), &store, &[], &["--step-delay", "60ms", "--lora-dir", &lora_dir]);
    let queen = start_queen(&nats.url(), &store, &[], |c| {
        c.api.tokens.push(TENANT_TOKEN.into());
        let acme = TokenPolicy { tenant: Some("acme".into()), ..Default::default() };
        c.api.token_policies.insert(TENANT_TOKEN.into(), acme);
    })
    .await;
    wait_for_fleet(&client(&queen)).await;

    let out = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ui-e2e");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    let run = tokio::process::Command::new("node")
        .arg("e2e/run.mjs")
        .current_dir(ui)
        .env("QUEEN_URL", &queen.base)
        .env("TOKEN", TOKEN)
        .env("TENANT_TOKEN", TENANT_TOKEN)
        .env("CHROMIUM", &chromium)
        .env("OUT_DIR", &out)
        .kill_on_drop(true)
        .output();
    let output =
        tokio::time::timeout(Duration::from_secs(300), run).await.expect("the browser run took over 5 min").unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    println!("{text}");
    assert!(
        output.status.success(),
        "the browser run failed ({}); screenshots in {}:\n{text}",
        output.status,
        out.display()
    );
    for shot in [
        "signin-wrong-token",
        "txt2img",
        "img2img",
        "inpaint",
        "cancelled",
        "queued",
        "gallery",
        "job",
        "settings-again",
        "fleet",
        "phone",
    ] {
        assert!(out.join(format!("{shot}.png")).is_file(), "no screenshot of {shot}");
    }
}
