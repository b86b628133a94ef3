//! The `natter` command: run the server, manage accounts.

use anyhow::Context;
use clap::{Parser, Subcommand};
use natter::config::Config;
use std::io::BufRead;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "natter",
    version,
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
    #[command(subcommand)]
    User(UserCommand),
}

#[derive(Subcommand)]
enum UserCommand {
    /// Create an account. The password is read from stdin when not given.
    Add {
        jid: String,
        password: Option<String>,
    },
    /// Change an account's password. Read from stdin when not given.
    Passwd {
        jid: String,
        password: Option<String>,
    },
    /// Delete an account and everything it owns.
    Del { jid: String },
    /// List accounts, optionally of one domain.
    List { domain: Option<String> },
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

fn init_logs(config: &Config) {
    // NATTER_LOG_LEVEL overrides log.level like any other setting.
    let filter = tracing_subscriber::EnvFilter::new(&config.log.level);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
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
            for u in store.list_accounts(domain.as_deref()).await? {
                println!("{u}");
            }
            Ok(())
        }
    };
    store.close().await;
    r
}

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
