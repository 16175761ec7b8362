//! `sd-rbee queen`: flags and environment to a [`QueenConfig`], then serve until SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::Args;

use super::parse_duration;
use crate::queen::http::{load_tokens, TokenSource, Tokens};
use crate::queen::webhooks::{AddressPolicy, WebhookConfig};
use crate::queen::{Queen, QueenConfig};

#[derive(Debug, Clone, Args)]
pub struct QueenArgs {
    #[arg(long, env = "SD_RBEE_NATS_URL", hide_env_values = true, default_value = "nats://127.0.0.1:4222")]
    pub nats: String,
    /// The fleet's object store (the workers' --store).
    #[arg(long, env = "SD_RBEE_STORE_URL", hide_env_values = true, default_value = "sd-rbee-store")]
    pub store: String,
    /// Address to serve the HTTP API on.
    #[arg(long, env = "SD_RBEE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    #[arg(long, env = "SD_RBEE_PREFIX", default_value = "sd")]
    pub prefix: String,
    /// A file of bearer tokens, one per line (blank lines and # comments ignored), each optionally followed by
    /// `default_priority=high|normal|low` (for its jobs that name none), `max_priority=...` (the highest
    /// its jobs may ask for), `tenant=NAME` (it sees and acts on that tenant's jobs alone; a token without
    /// a tenant is an operator's and sees every job) and `submit_rate=N/s|N/min|N/h` (jobs it may submit).
    /// Also SD_RBEE_API_TOKENS (comma-separated, no options, operators' tokens); both may be given, a token
    /// in both only with the same options.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Serve without authentication (only for a trusted network).
    #[arg(long)]
    pub no_auth: bool,
    /// Largest request body, in bytes (JSON with inline images, or an upload).
    #[arg(long, default_value_t = 16 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Longest a request body may take to arrive.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub body_timeout: Duration,
    /// Accept jobs for any model, known or not (they wait in the queue for a worker that serves it).
    #[arg(long)]
    pub accept_unserved_models: bool,
    /// Models jobs may name even with no worker serving them now (a fleet that starts workers from zero on
    /// queue depth); repeat or comma-separate. Models workers advertised within --model-retention are
    /// accepted too.
    #[arg(long, value_delimiter = ',', env = "SD_RBEE_MODEL_CATALOGUE")]
    pub model_catalogue: Vec<String>,
    /// How long a model stays accepted after the last worker serving it was heard of.
    #[arg(long, default_value = "7d", value_parser = parse_duration)]
    pub model_retention: Duration,
    /// Origins allowed to call the API from a browser (CORS); repeat or comma-separate.
    #[arg(long, value_delimiter = ',')]
    pub cors_origin: Vec<String>,
    /// A worker silent this long is shown as lost.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub worker_lost_after: Duration,
    /// How long job status is kept after its last change (a job waiting on the queue keeps its own).
    #[arg(long, default_value = "7d", value_parser = parse_duration)]
    pub keep_status: Duration,
    /// The ttl of jobs that give no `ttl_s`: after it a job's status answers 410 Gone and its images are
    /// deleted. None: jobs expire only when they give a ttl_s.
    #[arg(long, env = "SD_RBEE_DEFAULT_TTL", value_parser = parse_duration)]
    pub default_ttl: Option<Duration>,
    /// Validation limits as JSON, e.g. '{"max_steps": 80, "max_pixels": 1048576}' (see docs/PROTOCOL.md).
    #[arg(long)]
    pub limits: Option<String>,
    /// The model of OpenAI-style (`/v1/images/*`) and AUTOMATIC1111-style (`/sdapi/v1/*`) requests that name
    /// none (or name one of OpenAI's, such as dall-e-3); default: the only model of the catalogue.
    #[arg(long, env = "SD_RBEE_COMPAT_MODEL", value_name = "NAME")]
    pub compat_model: Option<String>,
    /// Longest an OpenAI-style or A1111-style request waits for its images; then it is answered 504
    /// (`WAIT_TIMEOUT`, naming the job, which goes on).
    #[arg(long, env = "SD_RBEE_COMPAT_WAIT", default_value = "10m", value_parser = parse_duration)]
    pub compat_wait: Duration,
    /// The most event streams (`GET /v1/jobs/{id}/events`, and OpenAI-style or A1111-style requests waiting
    /// for their images) one token may hold open at once; more are answered 429 (`TOO_MANY_STREAMS`). Each
    /// holds a consumer in NATS. Without authentication (--no-auth) there is no cap.
    #[arg(long, env = "SD_RBEE_MAX_STREAMS_PER_CALLER", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_streams_per_caller: u32,
    /// What webhook deliveries are signed with: `whsec_` and base64 (the Standard Webhooks form), or text of
    /// at least 16 bytes (without a comma). Comma-separate several while rotating: each signs every delivery.
    /// Without one, jobs that ask for a webhook are refused.
    #[arg(long, env = "SD_RBEE_WEBHOOK_SECRET", hide_env_values = true, value_delimiter = ',', value_name = "SECRET")]
    pub webhook_secret: Vec<String>,
    /// Address ranges webhooks may go to although they are private, loopback, link-local or otherwise not
    /// public (e.g. 10.0.0.0/8, 127.0.0.1); repeat or comma-separate.
    #[arg(long, env = "SD_RBEE_WEBHOOK_ALLOW", value_delimiter = ',', value_name = "CIDR")]
    pub webhook_allow: Vec<String>,
    /// Address ranges webhooks never go to (over --webhook-allow); repeat or comma-separate.
    #[arg(long, env = "SD_RBEE_WEBHOOK_DENY", value_delimiter = ',', value_name = "CIDR")]
    pub webhook_deny: Vec<String>,
    /// The longest one webhook attempt may take (connecting, sending, reading the answer).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub webhook_timeout: Duration,
    /// How long a webhook delivery is retried before it is given up on (and shown in the job's status).
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    pub webhook_retry_for: Duration,
    /// The wait before a webhook delivery's first retry; it doubles with each failure, up to 10 minutes.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub webhook_backoff: Duration,
    /// The least time between two progress deliveries of a job's webhook.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub webhook_progress_interval: Duration,
    /// How long a job whose publish the bus did not confirm is published again before it is ended (at most
    /// the default, which keeps every copy inside the jobs stream's duplicate window; for tests).
    #[arg(long, value_parser = parse_duration, hide = true)]
    pub publish_confirm_window: Option<Duration>,
    #[arg(long)]
    pub log_json: bool,
}

/// The webhook flags as a [`WebhookConfig`]; errors name the flag and never show a secret.
fn webhook_config(args: &QueenArgs) -> anyhow::Result<WebhookConfig> {
    let secrets = args.webhook_secret.iter().filter(|s| !s.trim().is_empty()).enumerate();
    let secrets = secrets
        .map(|(i, s)| s.parse().map_err(|e| anyhow::anyhow!("--webhook-secret (entry {}): {e}", i + 1)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    for (flag, d) in [("--webhook-timeout", args.webhook_timeout), ("--webhook-backoff", args.webhook_backoff)] {
        if d.is_zero() {
            bail!("{flag} must be more than 0");
        }
    }
    Ok(WebhookConfig {
        secrets,
        policy: AddressPolicy {
            allow: AddressPolicy::parse_ranges(&args.webhook_allow, "--webhook-allow")?,
            deny: AddressPolicy::parse_ranges(&args.webhook_deny, "--webhook-deny")?,
        },
        timeout: args.webhook_timeout,
        retry_for: args.webhook_retry_for,
        backoff: args.webhook_backoff,
        progress_interval: args.webhook_progress_interval,
    })
}

pub fn run(args: QueenArgs) -> anyhow::Result<()> {
    let webhooks = webhook_config(&args)?;
    let mut config = QueenConfig::new(args.nats, args.store, args.listen);
    config.prefix = args.prefix;
    let env_tokens = std::env::var("SD_RBEE_API_TOKENS").ok();
    let tokens = Tokens::from_loaded(load_tokens(args.token_file.as_deref(), env_tokens.as_deref())?);
    (config.api.tokens, config.api.token_policies) = (tokens.tokens, tokens.policies);
    // Read again when the file changes (or on SIGHUP): tokens are added and revoked without a restart.
    config.api.token_source = Some(TokenSource { file: args.token_file.clone(), env: env_tokens });
    if config.api.tokens.is_empty() && !args.no_auth {
        bail!("no API tokens: give --token-file FILE or SD_RBEE_API_TOKENS, or --no-auth for a trusted network");
    }
    config.api.max_body_bytes = args.max_body_bytes;
    config.api.body_timeout = args.body_timeout;
    config.api.require_served_model = !args.accept_unserved_models;
    for model in &args.model_catalogue {
        crate::protocol::validate_model_name(model).map_err(|e| anyhow::anyhow!("--model-catalogue {}", e.message))?;
    }
    config.api.model_catalogue = args.model_catalogue;
    config.api.model_retention = args.model_retention;
    config.api.cors_origins = args.cors_origin;
    if let Some(model) = &args.compat_model {
        crate::protocol::validate_model_name(model).map_err(|e| anyhow::anyhow!("--compat-model {}", e.message))?;
    }
    config.api.compat_model = args.compat_model;
    config.api.compat_wait = args.compat_wait;
    config.api.max_streams_per_caller = args.max_streams_per_caller as usize;
    if let Some(json) = args.limits {
        config.api.limits = serde_json::from_str(&json).context("--limits")?;
    }
    config.worker_lost_after = args.worker_lost_after;
    config.status_max_age = args.keep_status;
    config.default_ttl = args.default_ttl;
    config.webhooks = webhooks;
    if let Some(window) = args.publish_confirm_window {
        let most = crate::queen::PUBLISH_CONFIRM_WINDOW;
        if window.is_zero() || window > most {
            bail!("--publish-confirm-window must be more than 0 and at most {} s", most.as_secs());
        }
        config.publish_confirm_window = window;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let queen = Queen::start(config).await?;
        eprintln!("sd-rbee queen listening on http://{}", queen.addr);
        queen.serve(crate::shutdown::signal()).await
    })
}

/// `sd-rbee openapi`: the API's OpenAPI document on stdout.
pub fn print_openapi() -> anyhow::Result<()> {
    use utoipa::OpenApi;
    println!("{}", crate::queen::http::ApiDoc::openapi().to_pretty_json()?);
    Ok(())
}
