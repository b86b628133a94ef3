//! The `natter` command: run the server, manage accounts, operate a running
//! server (admin), back up and restore the store.

use anyhow::Context;
use clap::{Parser, Subcommand};
use natter::config::Config;
use std::io::BufRead;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "natter",
    version,
    // `natter --help` shows every subcommand, `user add` … `admin stats` too.
    flatten_help = true,
    about = "natter: a WhatsApp-class XMPP messaging server",
    long_about = "natter: a WhatsApp-class XMPP messaging server.\n\n\
        With no configuration it serves the domain `localhost` on this machine: \
        c2s on 5222 (STARTTLS), direct TLS on 5223, HTTP/WebSocket on 5280, \
        data under ./data, a self-signed certificate, open registration.\n\n\
        Settings come from a TOML file (--config, see natter.example.toml) and \
        NATTER_<SECTION>_<KEY> environment variables."
)]
struct Cli {
    /// Configuration file (TOML).
    #[arg(long, short, global = true, env = "NATTER_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server until SIGINT/SIGTERM.
    Serve,
    /// Manage accounts.
    #[command(subcommand, flatten_help = true)]
    User(UserCommand),
    /// Operate the running server over its admin endpoint (loopback only;
    /// needs read access to data_dir/admin.token).
    #[command(subcommand, flatten_help = true)]
    Admin(AdminCommand),
    /// Write the whole store to FILE as a XEP-0227 export (works while the
    /// server runs). The file holds SCRAM keys and messages: it is created 0600.
    Backup {
        /// Export file to create.
        file: PathBuf,
        /// Also copy the uploaded files' bytes into DIR (content-addressed:
        /// a later backup into the same DIR only adds new ones).
        #[arg(long, value_name = "DIR")]
        blobs: Option<PathBuf>,
    },
    /// Load a XEP-0227 export into the store. Every account in it must be
    /// new: restore into a fresh data directory, then start the server.
    Restore {
        /// XEP-0227 export written by `natter backup` (or another server).
        file: PathBuf,
        /// Put the uploaded files' bytes from DIR (written by `natter
        /// backup --blobs DIR`) into this server's upload storage.
        #[arg(long, value_name = "DIR")]
        blobs: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum AdminCommand {
    /// List connected sessions.
    Sessions,
    /// Disconnect a bare JID (all its devices) or a full JID (one device).
    Kick {
        /// alice@example.org or alice@example.org/phone.
        jid: String,
    },
    /// Server statistics: uptime, accounts, sessions, stanza counts.
    Stats,
    /// The live nodes of the cluster (`[cluster]`), read from NATS.
    Cluster,
}

#[derive(Subcommand)]
enum UserCommand {
    /// Create an account. The password is read from stdin when not given.
    Add {
        /// The new account, e.g. alice@example.org.
        jid: String,
        /// Visible to other local users in `ps`: prefer stdin.
        password: Option<String>,
    },
    /// Change an account's password. Read from stdin when not given.
    Passwd {
        /// The account, e.g. alice@example.org.
        jid: String,
        /// Visible to other local users in `ps`: prefer stdin.
        password: Option<String>,
    },
    /// Delete an account and everything it owns.
    Del {
        /// The account, e.g. alice@example.org.
        jid: String,
    },
    /// List accounts, optionally of one domain.
    List {
        /// One of the served domains; all of them when omitted.
        domain: Option<String>,
    },
}

fn password_arg(given: Option<String>) -> anyhow::Result<String> {
    if let Some(p) = given {
        return Ok(p);
    }
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("reading the password from stdin")?;
    let p = line.trim_end_matches(['\r', '\n']).to_string();
    if p.is_empty() {
        anyhow::bail!("no password given (pass it as an argument or on stdin)");
    }
    Ok(p)
}

/// Crates whose trace output includes raw payloads.
const PAYLOAD_LOGGING_TARGETS: &[&str] =
    &["tungstenite", "tokio_tungstenite", "rustls", "hyper", "h2"];

/// Whether a filter directive's target (before any `[span]`) is one of
/// `PAYLOAD_LOGGING_TARGETS` or inside one.
fn payload_logging(target: &str) -> bool {
    let target = target.split('[').next().unwrap_or(target);
    PAYLOAD_LOGGING_TARGETS
        .iter()
        .any(|q| target == *q || target.strip_prefix(q).is_some_and(|r| r.starts_with("::")))
}

/// The tracing filter for `log.level`. Dependencies that log whole frames
/// at trace level (message bodies, SASL payloads) are capped: never above
/// debug (logs carry no message content or credentials, whatever the
/// filter says; tests/logs.rs) and never above the configured level, so
/// `info` does not turn on their debug chatter.
fn log_filter(level: &str) -> String {
    use tracing_subscriber::filter::LevelFilter;
    let cap = |l: LevelFilter| l.min(LevelFilter::DEBUG);
    // EnvFilter's level for targets no directive names.
    let mut default = LevelFilter::ERROR;
    let mut named = Vec::new();
    let mut out = Vec::new();
    for d in level.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let (target, l) = match d.rsplit_once('=') {
            Some((t, l)) => (t, l.parse::<LevelFilter>().ok()),
            None => match d.parse::<LevelFilter>() {
                Ok(l) => {
                    default = l;
                    out.push(d.to_string());
                    continue;
                }
                // A bare target means everything it logs.
                Err(_) => (d, Some(LevelFilter::TRACE)),
            },
        };
        match l {
            Some(l) if payload_logging(target) => {
                named.push(target.split('[').next().unwrap_or(target).to_string());
                out.push(format!("{target}={}", cap(l)));
            }
            _ => out.push(d.to_string()),
        }
    }
    for q in PAYLOAD_LOGGING_TARGETS {
        if !named.iter().any(|n| n == q) {
            out.push(format!("{q}={}", cap(default)));
        }
    }
    out.join(",")
}

fn init_logs(config: &Config) {
    use std::io::IsTerminal;
    // NATTER_LOG_LEVEL overrides log.level like any other setting.
    let filter = tracing_subscriber::EnvFilter::new(log_filter(&config.log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colour codes only for a person watching, not in files or journals.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if config.log.format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let running = natter::start(config).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    running.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

async fn admin(config: Config, cmd: AdminCommand) -> anyhow::Result<()> {
    use natter::admin;
    match cmd {
        AdminCommand::Sessions => {
            let v = admin::call(&config, "GET", "/admin/sessions", "").await?;
            admin::print_sessions(&v);
        }
        AdminCommand::Kick { jid } => {
            let v = admin::call(&config, "POST", "/admin/kick", &jid).await?;
            let kicked = v["kicked"].as_array().cloned().unwrap_or_default();
            if kicked.is_empty() {
                anyhow::bail!("no session of {jid} is connected");
            }
            for k in kicked {
                println!("kicked {}", k.as_str().unwrap_or_default());
            }
        }
        AdminCommand::Cluster => {
            if !config.cluster.enabled {
                anyhow::bail!("cluster.enabled is off in this configuration: one node, no cluster");
            }
            let nodes = natter::cluster::live_nodes(&config).await?;
            println!(
                "{:<20} {:>8}  {:<20} listeners",
                "node", "sessions", "started"
            );
            for n in &nodes {
                let started = chrono::DateTime::from_timestamp(n.started as i64, 0)
                    .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                    .unwrap_or_default();
                println!(
                    "{:<20} {:>8}  {:<20} {}",
                    n.name, n.sessions, started, n.listeners
                );
            }
            println!(
                "{} live node(s) in cluster {:?}",
                nodes.len(),
                config.cluster.name
            );
        }
        AdminCommand::Stats => {
            let v = admin::call(&config, "GET", "/admin/stats", "").await?;
            let obj = v.as_object().cloned().unwrap_or_default();
            for (k, v) in obj {
                let shown = match &v {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Object(m) => m
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(" "),
                    other => other.to_string(),
                };
                println!("{k:<22} {shown}");
            }
        }
    }
    Ok(())
}

async fn backup(config: Config, file: PathBuf, blobs: Option<PathBuf>) -> anyhow::Result<()> {
    let store = natter::open_store(&config).await?;
    let r = async {
        let sum = natter::backup::backup_to_file(store.as_ref(), &file).await?;
        println!("backed up {sum} to {}", file.display());
        if let Some(dir) = blobs {
            let blob_store = natter::modules::upload::blobs::open(&config)?;
            let (n, bytes) =
                natter::backup::backup_blobs(store.as_ref(), blob_store.as_ref(), &dir).await?;
            println!("copied {n} new blobs ({bytes} bytes) to {}", dir.display());
        }
        Ok(())
    }
    .await;
    store.close().await;
    r
}

async fn restore(config: Config, file: PathBuf, blobs: Option<PathBuf>) -> anyhow::Result<()> {
    let store = natter::open_store(&config).await?;
    let r = async {
        let sum = natter::backup::restore_from_file(store.as_ref(), &file, &config.domains).await?;
        println!("restored {sum} from {}", file.display());
        if let Some(dir) = blobs {
            let blob_store = natter::modules::upload::blobs::open(&config)?;
            let (n, bytes) =
                natter::backup::restore_blobs(store.as_ref(), blob_store.as_ref(), &dir).await?;
            println!("restored {n} blobs ({bytes} bytes) from {}", dir.display());
        }
        Ok(())
    }
    .await;
    store.close().await;
    r
}

/// `d` normalized (case, trailing dot), if this server serves it: an
/// empty listing must mean "no accounts", not "wrong domain".
fn served_domain(config: &Config, d: &str) -> anyhow::Result<String> {
    let normalized = natter::c2s::strip::parse_jid(d)
        .filter(|j| j.node().is_none() && j.resource().is_none())
        .map(|j| j.domain().to_string())
        .ok_or_else(|| anyhow::anyhow!("{d:?} is not a domain name"))?;
    if !config.serves(&normalized) {
        anyhow::bail!(
            "domain {d} is not served here (domains: {})",
            config.domains.join(", ")
        );
    }
    Ok(normalized)
}

async fn user(config: Config, cmd: UserCommand) -> anyhow::Result<()> {
    use natter::accounts;
    let store = natter::open_store(&config).await?;
    let min = config.registration.min_password_len;
    let r = match cmd {
        UserCommand::Add { jid, password } => {
            let u = accounts::parse_user(&jid, &config.domains)?;
            let pw = password_arg(password)?;
            accounts::create(store.as_ref(), &u, &pw, min, None).await?;
            println!("created {u}");
            Ok(())
        }
        UserCommand::Passwd { jid, password } => {
            let u = accounts::parse_user(&jid, &config.domains)?;
            let pw = password_arg(password)?;
            accounts::set_password(store.as_ref(), &u, &pw, min).await?;
            println!("password changed for {u}");
            Ok(())
        }
        UserCommand::Del { jid } => {
            let u = accounts::parse_user(&jid, &config.domains)?;
            accounts::delete(store.as_ref(), &u).await?;
            println!("deleted {u}");
            Ok(())
        }
        UserCommand::List { domain } => {
            let domain = domain.map(|d| served_domain(&config, &d)).transpose()?;
            for u in store.list_accounts(domain.as_deref()).await? {
                println!("{u}");
            }
            Ok(())
        }
    };
    store.close().await;
    r
}

/// Rust's allocations go to jemalloc; C code (SQLite) keeps glibc's malloc. On the message
/// path glibc spent a quarter of the server's CPU: batches of stanzas overflow its small
/// per-thread cache, and the rest goes through its locked bins and their consolidation
/// (BENCHMARKS.md, issue 15). Its tuning is in `.cargo/config.toml`.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("natter: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    init_logs(&config);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let r = rt.block_on(async {
        match cli.command {
            Command::Serve => serve(config).await,
            Command::User(cmd) => user(config, cmd).await,
            Command::Admin(cmd) => admin(config, cmd).await,
            Command::Backup { file, blobs } => backup(config, file, blobs).await,
            Command::Restore { file, blobs } => restore(config, file, blobs).await,
        }
    });
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("natter: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::log_filter;

    #[test]
    fn payload_logging_crates_are_capped_at_the_level_and_at_debug() {
        assert_eq!(
            log_filter("info"),
            "info,tungstenite=info,tokio_tungstenite=info,rustls=info,hyper=info,h2=info"
        );
        assert_eq!(
            log_filter("trace"),
            "trace,tungstenite=debug,tokio_tungstenite=debug,rustls=debug,hyper=debug,h2=debug"
        );
        // Named explicitly, or a module inside: still capped at debug.
        assert_eq!(
            log_filter("warn,natter=trace,hyper=trace,rustls::conn=trace,h2"),
            "warn,natter=trace,hyper=debug,rustls::conn=debug,h2=debug,\
             tungstenite=warn,tokio_tungstenite=warn,rustls=warn"
        );
        // No bare level: EnvFilter's default (error) applies to them too.
        assert_eq!(
            log_filter("natter=debug"),
            "natter=debug,tungstenite=error,tokio_tungstenite=error,rustls=error,hyper=error,h2=error"
        );
    }
}
