use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use pull_secret_injector::config::{Config, ConfigError};
use pull_secret_injector::credential_provider::{self, Plugin, PluginConfig, PluginError};
use pull_secret_injector::ops::{certs, status};
use pull_secret_injector::settings::{self, Environment, Settings};
use pull_secret_injector::token_server::server::{Clock, TokenServer};
use pull_secret_injector::token_server::TokenServerConfig;
use pull_secret_injector::Service;

// Under load, glibc's malloc and free were a tenth of the service's CPU (perf, hack/bench);
// mimalloc's thread-local free lists make them cheap. See bench-results/HISTORY.md.
mod allocator;

#[derive(Parser)]
#[command(
    name = "pull-secret-injector",
    version,
    about = "Short-lived registry pull Secrets, injected into opted-in namespaces"
)]
struct Cli {
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the admission webhook and keep pull Secrets fresh. The Kubernetes client comes from
    /// KUBECONFIG or the in-cluster environment.
    Serve {
        #[arg(long, env = "PULL_SECRET_INJECTOR_CONFIG")]
        config: PathBuf,
    },
    /// Make (or reuse) the webhook's CA and serving certificate in a Secret, set the webhook
    /// configuration's caBundle, and write tls.crt, tls.key and ca.crt for the server. Run as an
    /// init container; needs no cert-manager.
    Certs {
        /// Namespace of the Secret and the Service.
        #[arg(long, env = "POD_NAMESPACE")]
        namespace: String,
        /// Secret that keeps the certificate (type kubernetes.io/tls).
        #[arg(
            long,
            env = "PULL_SECRET_INJECTOR_TLS_SECRET",
            default_value = "pull-secret-injector-tls"
        )]
        secret: String,
        /// Service the API server calls; the certificate covers its DNS names.
        #[arg(
            long,
            env = "PULL_SECRET_INJECTOR_SERVICE",
            default_value = "pull-secret-injector"
        )]
        service: String,
        /// MutatingWebhookConfiguration whose caBundle to keep current.
        #[arg(long, env = "PULL_SECRET_INJECTOR_WEBHOOK")]
        webhook: Option<String>,
        /// Where to write tls.crt, tls.key and ca.crt.
        #[arg(long, env = "PULL_SECRET_INJECTOR_CERT_DIR")]
        out_dir: Option<PathBuf>,
        /// Validity of a new certificate, in days.
        #[arg(long, default_value_t = 365)]
        validity_days: u64,
        /// Replace the certificate when fewer days than this remain.
        #[arg(long, default_value_t = 30)]
        renew_within_days: u64,
    },
    /// Show every opted-in namespace: its Secret, registries, time to expiry, last renewal and
    /// last error, as the cluster records them.
    Status {
        #[arg(long, env = "PULL_SECRET_INJECTOR_CONFIG")]
        config: PathBuf,
    },
    /// Serve registry tokens (Docker Registry v2 "token" auth) to clients that present a
    /// service-account token of this cluster; see the README's token server walk-through.
    TokenServer {
        #[arg(long, env = "PULL_SECRET_INJECTOR_TOKEN_SERVER_CONFIG")]
        config: PathBuf,
    },
    /// Kubelet image credential provider (credentialprovider.kubelet.k8s.io/v1): reads a
    /// CredentialProviderRequest on stdin, writes the credential for the image's registry,
    /// minted from the Pod's service-account token, on stdout. See docs/credential-provider.md.
    #[command(args_conflicts_with_subcommands = true)]
    CredentialProvider {
        /// `http` and `registries`, as in the service's config.
        #[arg(long, env = "PULL_SECRET_INJECTOR_CREDENTIAL_PROVIDER_CONFIG")]
        config: Option<PathBuf>,
        /// Instead of answering: check the config, then copy this binary to DIR/NAME and the
        /// config to DIR/NAME.yaml (a DaemonSet's init container filling the kubelet's
        /// --image-credential-provider-bin-dir).
        #[arg(long, value_name = "DIR")]
        install_to: Option<PathBuf>,
        /// The file name under --install-to: the provider's `name` in the kubelet's config.
        #[arg(long, default_value = "pull-secret-injector", requires = "install_to")]
        name: String,
        #[command(subcommand)]
        action: Option<ProviderAction>,
    },
    /// Check a config file and print what is wrong with it, without starting anything.
    CheckConfig {
        #[arg(long, env = "PULL_SECRET_INJECTOR_CONFIG")]
        config: PathBuf,
        /// Which command's config the file is.
        #[arg(long, value_enum, default_value_t = ConfigKind::Serve)]
        kind: ConfigKind,
    },
}

#[derive(Subcommand)]
enum ProviderAction {
    /// Print the kubelet's CredentialProviderConfig with this plugin's providers merged in
    /// (one per token audience; other providers kept); with --write, replace the file.
    /// Idempotent. Restart the kubelet after a change.
    Merge {
        #[arg(long, env = "PULL_SECRET_INJECTOR_CREDENTIAL_PROVIDER_CONFIG")]
        config: PathBuf,
        /// The kubelet's --image-credential-provider-config (need not exist yet).
        #[arg(long)]
        kubelet_config: PathBuf,
        /// The plugin's config as the kubelet passes it: default, --config as given.
        #[arg(long)]
        config_path: Option<String>,
        #[arg(long, default_value = "pull-secret-injector")]
        name: String,
        /// Replace --kubelet-config (written beside it, then renamed) instead of printing.
        #[arg(long)]
        write: bool,
    },
    /// Check on a node that the kubelet will call this plugin with the tokens it needs: its
    /// CredentialProviderConfig, the node's right to request each audience, a sample request.
    Check {
        #[arg(long, env = "PULL_SECRET_INJECTOR_CREDENTIAL_PROVIDER_CONFIG")]
        config: PathBuf,
        #[arg(long)]
        kubelet_config: PathBuf,
        /// The kubelet's --image-credential-provider-bin-dir.
        #[arg(long)]
        bin_dir: PathBuf,
        #[arg(long, default_value = "pull-secret-injector")]
        name: String,
        /// Check as node NAME (SubjectAccessReview); without it, as the kubeconfig's identity
        /// (the node's own: SelfSubjectAccessReview).
        #[arg(long, env = "NODE_NAME")]
        node_name: Option<String>,
        /// NAMESPACE/NAME of a ServiceAccount to run a sample request with.
        #[arg(long)]
        sample_service_account: Option<String>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum ConfigKind {
    /// `serve` and `status`.
    Serve,
    /// `token-server`: also the files it names and whether `tokenReview.url` resolves here.
    TokenServer,
    /// `credential-provider`.
    CredentialProvider,
}

fn main() -> anyhow::Result<()> {
    allocator::purge_immediately();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_park(allocator::collect_on_park)
        .build()
        .context("cannot start the async runtime")?
        .block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The one place the environment is read; everything below is handed what it needs.
    let env = Environment::from_process();
    // The kubelet shows a failing plugin's stderr: the one error line, no log lines unless
    // RUST_LOG asks for them.
    let default_log = match cli.command {
        Command::CredentialProvider { .. } => "off",
        _ => "info,kube=warn,hyper=warn",
    };
    init_tracing(cli.log_format, default_log);
    rustls::crypto::ring::default_provider()
        .install_default()
        .map_err(|_| anyhow::anyhow!("a TLS crypto provider was already installed"))?;

    match cli.command {
        Command::CredentialProvider {
            action: Some(action),
            ..
        } => provider_action(action).await?,
        Command::CredentialProvider { config: None, .. } => {
            anyhow::bail!("credential-provider needs --config (or a subcommand: merge, check)")
        }
        Command::CredentialProvider {
            config: Some(config),
            install_to: Some(dir),
            name,
            ..
        } => {
            PluginConfig::from_file(&config)?;
            let binary = std::env::current_exe().context("locating this binary")?;
            for path in credential_provider::install::install(&binary, &config, &dir, &name)? {
                println!("installed {}", path.display());
            }
        }
        Command::CredentialProvider {
            config: Some(config),
            ..
        } => {
            let code = match credential_provider(&config, &env).await {
                Ok(response) => {
                    println!("{response}");
                    0
                }
                Err(e) => {
                    eprintln!("{}", e.line());
                    1
                }
            };
            std::process::exit(code);
        }
        Command::CheckConfig { config, kind } => {
            match kind {
                ConfigKind::Serve => drop(Settings::new(Config::from_file(&config)?, &env)?),
                ConfigKind::TokenServer => {
                    let problems = TokenServerConfig::from_file(&config)?.problems_here();
                    if !problems.is_empty() {
                        return Err(ConfigError::Invalid(problems).into());
                    }
                }
                ConfigKind::CredentialProvider => drop(PluginConfig::from_file(&config)?),
            }
            println!("{}: ok", config.display());
        }
        Command::Status { config } => {
            let settings = Settings::new(Config::from_file(&config)?, &env)?;
            let rows = status::collect(&client(&settings.config.api_server).await?, &settings)
                .await
                .context("reading the cluster")?;
            let now = jiff::Timestamp::now();
            println!("{}", status::render(&rows, now));
            println!("\n{}", status::renewals(&rows, &settings, now));
        }
        Command::Certs {
            namespace,
            secret,
            service,
            webhook,
            out_dir,
            validity_days,
            renew_within_days,
        } => {
            let day = std::time::Duration::from_secs(86400);
            let request = certs::CertsRequest {
                namespace,
                secret,
                service,
                webhook,
                out_dir,
                validity: day * u32::try_from(validity_days).context("--validity-days")?,
                renew_within: day
                    * u32::try_from(renew_within_days).context("--renew-within-days")?,
            };
            certs::ensure(&client(&Default::default()).await?, &request).await?;
        }
        Command::TokenServer { config } => {
            let config = TokenServerConfig::from_file(&config)?;
            let clock: Clock = std::sync::Arc::new(jiff::Timestamp::now);
            let server = TokenServer::start(config, clock, &env.proxy).await?;
            server
                .run_until(shutdown_signal())
                .await
                .context("token server failed")?;
        }
        Command::Serve { config } => {
            let settings = Settings::new(Config::from_file(&config)?, &env)?;
            let client = client(&settings.config.api_server).await?;
            let service = Service::start(settings, client).await?;
            service
                .run_until(shutdown_signal())
                .await
                .context("webhook server failed")?;
        }
    }
    Ok(())
}

/// `credential-provider merge` and `check`.
async fn provider_action(action: ProviderAction) -> anyhow::Result<()> {
    use credential_provider::{check, node};
    match action {
        ProviderAction::Merge {
            config,
            kubelet_config,
            config_path,
            name,
            write,
        } => {
            let plugin = PluginConfig::from_file(&config)?;
            let config_path = config_path.unwrap_or_else(|| config.display().to_string());
            let entries = node::entries(
                &plugin,
                &node::EntryOptions {
                    name: &name,
                    config_path: &config_path,
                },
            );
            let existing = match std::fs::read_to_string(&kubelet_config) {
                Ok(text) => Some(
                    serde_yaml::from_str::<serde_json::Value>(&text)
                        .with_context(|| format!("{} is not YAML", kubelet_config.display()))?,
                ),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(anyhow::anyhow!("reading {}: {e}", kubelet_config.display())),
            };
            let (merged, what) = node::merge(existing, &entries)
                .with_context(|| format!("merging into {}", kubelet_config.display()))?;
            let text = serde_yaml::to_string(&merged).context("writing YAML")?;
            if !write {
                print!("{text}");
                return Ok(());
            }
            match what {
                node::Merged::Unchanged => {
                    println!("{}: unchanged", kubelet_config.display())
                }
                node::Merged::Changed(names) => {
                    let partial = kubelet_config.with_extension("partial");
                    std::fs::write(&partial, text)
                        .with_context(|| format!("writing {}", partial.display()))?;
                    std::fs::rename(&partial, &kubelet_config)
                        .with_context(|| format!("replacing {}", kubelet_config.display()))?;
                    println!(
                        "{}: merged {}; restart the kubelet",
                        kubelet_config.display(),
                        names.join(", ")
                    );
                }
            }
        }
        ProviderAction::Check {
            config,
            kubelet_config,
            bin_dir,
            name,
            node_name,
            sample_service_account,
        } => {
            let options = check::CheckOptions {
                config: PluginConfig::from_file(&config)?,
                kubelet_config,
                bin_dir,
                name,
                node_name,
                sample_service_account,
            };
            let client = client(&Default::default()).await?;
            let findings = check::run(&client, &options).await?;
            let failed = findings.iter().filter(|f| f.is_err()).count();
            for f in &findings {
                match f {
                    Ok(line) => println!("ok: {line}"),
                    Err(line) => println!("FAIL: {line}"),
                }
            }
            if failed > 0 {
                anyhow::bail!("{failed} check(s) failed");
            }
        }
    }
    Ok(())
}

/// One request from stdin, answered.
async fn credential_provider(
    config: &std::path::Path,
    env: &Environment,
) -> Result<String, PluginError> {
    let plugin = Plugin::new(PluginConfig::from_file(config)?, &env.proxy)?;
    let input = credential_provider::read_request(std::io::stdin().lock())?;
    Ok(plugin.answer(&input).await?.to_json())
}

/// The client to the API server, at most `limits` requests per second and burst.
async fn client(
    limits: &pull_secret_injector::config::ApiServerConfig,
) -> anyhow::Result<kube::Client> {
    let context = "cannot create a Kubernetes client from KUBECONFIG or the in-cluster environment";
    let mut config = kube::Config::infer().await.context(context)?;
    // kube falls back to $HTTPS_PROXY for a kubeconfig that names no proxy-url; the API server
    // is reached directly unless the kubeconfig itself asks for a proxy.
    let kubeconfig = kube::config::Kubeconfig::read().ok();
    if !settings::kubeconfig_names_proxy(kubeconfig.as_ref()) {
        config.proxy_url = None;
    }
    pull_secret_injector::api_client::client(config, limits).context(context)
}

fn init_tracing(format: LogFormat, default: &str) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default.into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return ctrl_c.await.unwrap_or(()),
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
