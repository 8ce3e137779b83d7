//! The `emulate` command: runs the emulator with one tenant until shutdown.

use std::error::Error;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use super::{sample_detections, Emulator, EmulatorOptions, TenantSpec};

/// Options of the `emulate` command.
#[derive(Debug, Clone, clap::Args)]
pub struct EmulateArgs {
    /// Address and port to listen on; port 0 picks a free port.
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:9000")]
    pub listen: SocketAddr,

    /// JSON file with an array of detections to serve in place of the
    /// built-in samples.
    #[arg(long, value_name = "FILE", conflicts_with = "generate")]
    pub detections: Option<PathBuf>,

    /// Serve the loaded detections with their original times, each exactly
    /// as the file has it. By default their times move forward by whole
    /// seconds so the newest is now, and they are served re-serialized.
    #[arg(long)]
    pub keep_times: bool,

    /// Tenant id that the token endpoint accepts, used in the token URL path.
    #[arg(long, value_name = "ID", default_value = "00000000-0000-0000-0000-000000000000")]
    pub tenant_id: String,

    /// Client id (application id) that the token endpoint accepts.
    #[arg(long, value_name = "ID", default_value = "mde-forwarder-demo")]
    pub client_id: String,

    /// Client secret that the token endpoint accepts.
    #[arg(long, value_name = "SECRET", default_value = "demo-secret")]
    pub client_secret: String,

    /// Lifetime of issued access tokens, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 3599, value_parser = clap::value_parser!(u64).range(1..))]
    pub token_lifetime_secs: u64,

    /// Interval between new detections added while running, in seconds; 0 adds none.
    #[arg(long, value_name = "SECS", default_value_t = 0)]
    pub add_every_secs: u64,

    /// Number of synthetic detections from the last hour to serve in place
    /// of the samples.
    #[arg(long, value_name = "COUNT")]
    pub generate: Option<usize>,

    /// Approximate size of each synthetic detection, in bytes of JSON.
    #[arg(long, value_name = "BYTES", default_value_t = 2048)]
    pub detection_bytes: usize,
}

/// Runs the emulator with one tenant and prints its URL and credentials to
/// stderr, until `shutdown` completes.
pub async fn run_cli(
    args: EmulateArgs,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Box<dyn Error + Send + Sync>> {
    // Read the file before binding, so a bad file fails without side effects.
    let text = match &args.detections {
        Some(path) => Some(read_detections(path).await?),
        None => None,
    };
    let detections = match &text {
        Some(text) if !args.keep_times => parse_values(text, args.detections.as_deref())?,
        Some(_) => Vec::new(),
        None => sample_detections(),
    };
    // With --keep-times nothing changes, so the file's texts are served as they are.
    let exact = match &text {
        Some(text) if args.keep_times => Some(
            super::parse_detection_texts(text.as_bytes())
                .map_err(|error| not_an_array(args.detections.as_deref(), &error))?,
        ),
        _ => None,
    };

    let options =
        EmulatorOptions { token_lifetime: Duration::from_secs(args.token_lifetime_secs), ..EmulatorOptions::default() };
    let emulator = Emulator::start(args.listen, options)
        .await
        .map_err(|error| format!("failed to listen on {}: {error}", args.listen))?;
    let tenant = args.tenant_id.as_str();
    emulator.add_tenant(
        tenant,
        TenantSpec { client_id: args.client_id.clone(), client_secret: args.client_secret.clone(), forbidden: false },
    );
    match (args.generate, exact) {
        (Some(count), _) => emulator.generate(tenant, count, args.detection_bytes),
        (None, Some(texts)) => emulator.load_detection_texts(tenant, &texts),
        (None, None) => emulator.load_detections(tenant, detections, !args.keep_times),
    }
    emulator.spawn_generator(tenant, Duration::from_secs(args.add_every_secs));

    let url = emulator.url();
    // The credentials are the emulator's own test values, printed so the
    // user can configure a client.
    eprintln!(
        "emulator listening on {url}: token URL {url}/{tenant}/oauth2/token, API URL {url}/api/alerts, \
         client id {}, client secret {}, {} detections",
        args.client_id,
        args.client_secret,
        emulator.detection_count(tenant),
    );

    shutdown.await;
    emulator.shutdown().await;
    Ok(())
}

async fn read_detections(path: &Path) -> Result<String, Box<dyn Error + Send + Sync>> {
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|error| format!("failed to read detections file {}: {error}", path.display()))?;
    Ok(text)
}

/// Parses the detections file into values, whose times can then move.
/// Values cannot hold a lone surrogate or 128 or more levels of nesting,
/// which `--keep-times` serves as written.
fn parse_values(text: &str, path: Option<&Path>) -> Result<Vec<Value>, Box<dyn Error + Send + Sync>> {
    serde_json::from_str(text).map_err(|error| {
        let message = not_an_array(path, &error);
        format!("{message} (with --keep-times the elements are served as written and not parsed)").into()
    })
}

fn not_an_array(path: Option<&Path>, error: &serde_json::Error) -> Box<dyn Error + Send + Sync> {
    let path = path.map(|p| p.display().to_string()).unwrap_or_default();
    format!("detections file {path} is not a JSON array of detections: {error}").into()
}
