//! The `keyward` command: run the proxy, check a config, or ask who owns a key.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "keyward",
    version,
    about = "Kafka proxy that enforces regional write ownership"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run {
        #[arg(long)]
        config: PathBuf,
        /// Log output format.
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// Validate the static config and the ownership table it points to.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
    /// Print which region owns a key, header value, partition or topic.
    Owner {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        topic: String,
        /// The record key (UTF-8).
        #[arg(long, group = "what")]
        key: Option<String>,
        /// A header, as NAME=VALUE.
        #[arg(long, group = "what")]
        header: Option<String>,
        #[arg(long, group = "what")]
        partition: Option<i32>,
        /// Ask about a record with a null key.
        #[arg(long, group = "what")]
        null_key: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config, log_format } => {
            init_logging(log_format);
            match keyward::cli::run(&config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("keyward: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Check { config } => match keyward::cli::check(&config) {
            Ok(summary) => {
                print!("{summary}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Owner {
            config,
            topic,
            key,
            header,
            partition,
            null_key,
        } => {
            let query = match (&key, &header, partition, null_key) {
                (Some(k), _, _, _) => keyward::cli::OwnerQuery::Key(k.clone()),
                (_, Some(h), _, _) => match h.split_once('=') {
                    Some((n, v)) => keyward::cli::OwnerQuery::Header(n.to_owned(), v.to_owned()),
                    None => {
                        eprintln!("--header takes NAME=VALUE, got {h:?}");
                        return ExitCode::from(2);
                    }
                },
                (_, _, Some(p), _) => keyward::cli::OwnerQuery::Partition(p),
                (_, _, _, true) => keyward::cli::OwnerQuery::NullKey,
                _ => keyward::cli::OwnerQuery::None,
            };
            match keyward::cli::owner(&config, &topic, &query) {
                Ok(line) => {
                    println!("{line}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KEYWARD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
