//! The `oncepay` command: `serve` (the default) and `migrate`.

use clap::{Parser, Subcommand};
use oncepay::config::{DatabaseArgs, ServeArgs};
use oncepay::server;

/// oncepay: a payments API where a retried request never charges twice.
#[derive(Parser, Debug)]
#[command(name = "oncepay", version, args_conflicts_with_subcommands = true)]
struct Cli {
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
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("oncepay: cannot start the runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Some(Command::Migrate(database)) => {
                server::init_logging("text");
                oncepay::store::migrate(&database.database).await
            }
            Some(Command::Serve(args)) => {
                server::init_logging(&args.log_format);
                server::serve(args).await
            }
            None => {
                server::init_logging(&cli.serve.log_format);
                server::serve(cli.serve).await
            }
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("oncepay: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}
