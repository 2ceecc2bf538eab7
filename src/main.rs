//! The `oncepay` command: `serve` (the default) and `migrate` run the service; `pay`, `get`,
//! `list`, `refund`, `rewards` and `key` call a running one through the client SDK.

mod cli;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use oncepay::config::{DatabaseArgs, ServeArgs};
use oncepay::server;

/// oncepay: a payments API where a retried request never charges twice.
#[derive(Parser, Debug)]
#[command(name = "oncepay", version, args_conflicts_with_subcommands = true)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,

    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the HTTP service (the default).
    Serve(ServeArgs),
    /// Create or upgrade the database schema, then exit.
    Migrate(DatabaseArgs),
    #[command(flatten)]
    Client(cli::ClientCommand),
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("oncepay: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match args.command {
            Some(Command::Client(command)) => Ok(cli::run(command).await),
            Some(Command::Migrate(database)) => {
                server::init_logging("text");
                oncepay::store::migrate(&database.database)
                    .await
                    .map(|()| ExitCode::SUCCESS)
            }
            Some(Command::Serve(serve)) => {
                server::init_logging(&serve.log_format);
                server::serve(serve).await.map(|()| ExitCode::SUCCESS)
            }
            None => {
                server::init_logging(&args.serve.log_format);
                server::serve(args.serve).await.map(|()| ExitCode::SUCCESS)
            }
        }
    });
    result.unwrap_or_else(|err| {
        eprintln!("oncepay: {err}");
        ExitCode::FAILURE
    })
}
