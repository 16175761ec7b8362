//! `sd-rbee healthcheck URL`: a container's HEALTHCHECK without curl in the image. GETs the URL and succeeds
//! on a 2xx answer within the timeout; anything else is a failure, said in one line.

use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::Args;

use super::parse_duration;

#[derive(Debug, Args)]
pub struct HealthcheckArgs {
    /// The probe to ask, e.g. http://127.0.0.1:8080/ready (queen) or http://127.0.0.1:9090/ready (a worker's
    /// --health-listen).
    pub url: String,
    /// How long to wait for the answer.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,
}

pub fn run(args: HealthcheckArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        // No proxy: a probe asks this container itself, and a proxy set for the container (Docker passes its
        // client's proxies in as HTTP_PROXY) would answer for it, or not at all.
        let client = reqwest::Client::builder().timeout(args.timeout).no_proxy().build()?;
        let response = client.get(&args.url).send().await.with_context(|| format!("GET {}", args.url))?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            bail!("GET {} answered {status}: {}", args.url, body.trim());
        }
        Ok(())
    })
}
