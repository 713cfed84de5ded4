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
    /// Move part of a rule's ownership to another region in every instance of a fleet: freeze
    /// it, wait for replication, flip it.
    Move {
        #[command(subcommand)]
        step: MoveCommand,
    },
}

#[derive(Subcommand)]
enum MoveCommand {
    /// Print what the move would change, in which instances, and the replication lag of the
    /// rule's topics from the old owner to the new one.
    Plan {
        #[command(flatten)]
        what: MoveArgs,
    },
    /// Carry the move out, step by step, each confirmed in every instance; resumes from the
    /// journal after a crash, and aborts back to the old owner when a step before the flip
    /// fails or replication does not catch up in time.
    Run {
        #[command(flatten)]
        what: MoveArgs,
        /// Where the move records its steps (created, or resumed from).
        #[arg(long)]
        journal: PathBuf,
        /// How long to wait for replication before aborting.
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        replication_timeout: std::time::Duration,
        /// Flip without waiting for replication (when no instance measures it).
        #[arg(long)]
        no_replication_gate: bool,
    },
    /// The owner region is down: put the moved table in force in every instance that answers,
    /// with no freeze and no wait for replication, and print what may be lost. Run again with
    /// the same journal to reach the instances that did not answer.
    Failover {
        #[command(flatten)]
        what: MoveArgs,
        #[arg(long)]
        journal: PathBuf,
    },
    /// Put the table a move started from back in force everywhere (before its flip).
    Abort {
        #[arg(long)]
        fleet: PathBuf,
        #[arg(long)]
        journal: PathBuf,
    },
}

#[derive(clap::Args)]
#[group(skip)]
struct MoveArgs {
    /// The fleet file: every instance's admin URL, by region.
    #[arg(long)]
    fleet: PathBuf,
    /// The rule whose ownership moves.
    #[arg(long)]
    rule: String,
    /// Slots of a `by: key` rule: `0-3,7`.
    #[arg(long, group = "parts")]
    slots: Option<String>,
    /// Values of a `by: header` or `by: key_part` rule: `acme,globex`.
    #[arg(long, group = "parts")]
    values: Option<String>,
    /// Partitions of a `by: partition` rule: `0-2`.
    #[arg(long, group = "parts")]
    partitions: Option<String>,
    /// The whole rule.
    #[arg(long, group = "parts")]
    all: bool,
    /// The region that owns them after the move.
    #[arg(long)]
    to: String,
}

impl MoveArgs {
    fn request(&self) -> Result<keyward::moves::Request, String> {
        use keyward::ownership::moves::{Parts, parse_ranges};
        let parts = if let Some(slots) = &self.slots {
            Parts::Slots(parse_ranges(slots)?)
        } else if let Some(partitions) = &self.partitions {
            Parts::Partitions(parse_ranges(partitions)?)
        } else if let Some(values) = &self.values {
            Parts::Values(values.split(',').map(|v| v.trim().to_owned()).collect())
        } else if self.all {
            Parts::All
        } else {
            return Err("name what moves: --slots, --values, --partitions or --all".to_owned());
        };
        Ok(keyward::moves::Request {
            rule: self.rule.clone(),
            parts,
            to: self.to.clone(),
        })
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// jemalloc rather than glibc's malloc: memory that thousands of connections touched goes back
/// to the system once they close (its background thread purges pages unused for 10 s), where
/// glibc's per-thread arenas kept it (docs/performance.md, "Many connections"). The default
/// feature `jemalloc`; without it (`--no-default-features`) the binary uses the system's malloc.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Move { step } => run_move(step),
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

/// `keyward move ...`: exit 0 when the step asked for is done, 2 for a command line keyward
/// cannot read, 1 otherwise (with what happened printed).
fn run_move(step: MoveCommand) -> ExitCode {
    let result = (|| -> anyhow::Result<()> {
        match step {
            MoveCommand::Plan { what } => {
                let request = what.request().map_err(anyhow::Error::msg)?;
                let fleet = keyward::moves::Fleet::load(&what.fleet)?;
                print!("{}", keyward::moves::plan(&fleet, &request)?);
                Ok(())
            }
            MoveCommand::Run {
                what,
                journal,
                replication_timeout,
                no_replication_gate,
            } => {
                let request = what.request().map_err(anyhow::Error::msg)?;
                let fleet = keyward::moves::Fleet::load(&what.fleet)?;
                let gate = keyward::moves::Gate {
                    timeout: replication_timeout,
                    skip: no_replication_gate,
                };
                keyward::moves::run(&fleet, &request, &journal, &gate)
            }
            MoveCommand::Failover { what, journal } => {
                let request = what.request().map_err(anyhow::Error::msg)?;
                let fleet = keyward::moves::Fleet::load(&what.fleet)?;
                keyward::moves::failover(&fleet, &request, &journal)
            }
            MoveCommand::Abort { fleet, journal } => {
                let fleet = keyward::moves::Fleet::load(&fleet)?;
                keyward::moves::abort(&fleet, &journal)
            }
        }
    })();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keyward move: {e:#}");
            ExitCode::FAILURE
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
