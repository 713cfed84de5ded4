//! The `keyward` command: run the proxy, check a config, or ask who owns a key.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "keyward",
    version = keyward::LONG_VERSION,
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
        /// Also ask the configured clusters for their topics and warn about those whose
        /// partition count is not a multiple of their `by: key` rule's slots (warnings do not
        /// fail the check).
        #[arg(long)]
        clusters: bool,
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
        /// A header, as NAME=VALUE (split at the first `=`; NAME:VALUE is accepted too).
        #[arg(long, group = "what")]
        header: Option<String>,
        /// The partition written to.
        #[arg(long, group = "what")]
        partition: Option<String>,
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
        Command::Check { config, clusters } => match keyward::cli::check(&config).and_then(|s| {
            Ok(if clusters {
                s + &keyward::cli::check_clusters(&config)?
            } else {
                s
            })
        }) {
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
            // The flags are the admin API's parameters, read by the same parser.
            let params = [
                Some(("topic", topic.as_str())),
                key.as_deref().map(|k| ("key", k)),
                header.as_deref().map(|h| ("header", h)),
                partition.as_deref().map(|p| ("partition", p)),
                null_key.then_some(("null_key", "true")),
            ];
            let query = match keyward::ownership::Query::parse(params.into_iter().flatten()) {
                Ok(query) => query,
                Err(e) => {
                    eprintln!("keyward owner: {e}");
                    return ExitCode::from(2);
                }
            };
            match keyward::cli::owner(&config, &query) {
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
